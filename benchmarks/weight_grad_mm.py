"""The pair ops' weight-gradient products, each way cuBLAS can be asked for them.

    python benchmarks/weight_grad_mm.py [--ns 384 768] [--name NAME]

The Triton kernels of layernorm_linear, transition and triangle_multiply write the operands
of their weight gradients (``grad [R, G]``, ``act [R, A]``, 16-bit) in row chunks, and
``layernorm_linear.add_weight_grad`` sums ``grad^T act`` into an fp32 accumulator with one
cuBLAS call per chunk. On the H200 the triangle's calls ran cutlass sm80 kernels (0.29 ms at
N = 768, session 23) where the transition's ran sm90 ones. This records every
``add_weight_grad`` call of one fwd+bwd of each op's benchmark case (the shapes as the ops
make them), then times, for each distinct call:

- ``widening``: ``torch.mm(grad.t(), act, out_dtype=float32)``, what add_weight_grad does;
- ``widening_swapped``: the same product as ``(act^T grad)^T``: the other operand order,
  which cuBLAS may serve with another kernel (the same fp32 result, to rounding order);
- ``widening_split``: ``torch.bmm`` over 2 or 4 equal row pieces with fp32 output, summed;
- ``rounded``: ``torch.mm(grad.t(), act)`` in 16 bits, widened after (what autocast's own
  weight gradients are; more rounding, shown for its time only).

Each row: the median ms of ``_harness.time_ms`` (``triton.testing.do_bench``; session 23's
JSON was timed at 2d75780 with back-to-back calls between two events, 5 x 30), and the error
against a float64 product (``max|x - ref| / max|ref|``). Writes ``results/<gpu>/<date>-<name>.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pair_ops  # noqa: E402
from _harness import environment, time_ms, write_json  # noqa: E402

MODULES = ("layernorm_linear", "transition", "triangle_multiply")


def record_calls(device, ns) -> list[dict]:
    """Every add_weight_grad call of one fwd+bwd of each pair-op case at ``ns``: op, N, shapes."""
    calls: list[dict] = []
    modules = [importlib.import_module(f"megafold.kernels.{name}") for name in MODULES]
    original = modules[0].add_weight_grad
    for case in _pair_ops.cases(False, device, ns):
        if case.op == "outer_product_mean":
            continue

        def recording(acc, grad, act, _case=case, **options):  # options: add_weight_grad's (swapped)
            calls.append({"op": _case.op, "shape": _case.shape, "N": _case.N, "grad": list(grad.shape),
                          "act": list(act.shape), "dtype": str(grad.dtype), "first": acc is None, **options})
            return original(acc, grad, act, **options)

        for module in modules:
            module.add_weight_grad = recording
        try:
            inputs = case.make_inputs()
            leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            out = case.implementations["megafold"](inputs)
            torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)
        finally:
            for module in modules:
                module.add_weight_grad = original
        del inputs, out
        torch.cuda.empty_cache()
    return calls


def _split(pieces: int):
    """The product as ``torch.bmm`` over ``pieces`` equal row pieces, fp32 out, summed."""
    def run(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        R = grad.shape[0]
        rows = R // pieces * pieces
        g = grad[:rows].view(pieces, rows // pieces, -1).transpose(1, 2)
        a = act[:rows].view(pieces, rows // pieces, -1)
        out = torch.bmm(g, a, out_dtype=torch.float32).sum(0)
        if rows < R:
            out += torch.mm(grad[rows:].t(), act[rows:], out_dtype=torch.float32)
        return out
    return run


# Each way of asking cuBLAS for grad^T act, as a function of (grad, act).
WAYS = {
    "widening": lambda grad, act: torch.mm(grad.t(), act, out_dtype=torch.float32),
    "widening_swapped": lambda grad, act: torch.mm(act.t(), grad, out_dtype=torch.float32).t(),
    "widening_split2": _split(2),
    "widening_split4": _split(4),
    "rounded": lambda grad, act: torch.mm(grad.t(), act).float(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--name", default="weight_grad_mm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("weight_grad_mm.py times cuBLAS products: it needs a GPU")
    device = torch.device("cuda")
    calls = record_calls(device, args.ns)
    distinct: dict[tuple, dict] = {}
    for call in calls:
        key = (tuple(call["grad"]), tuple(call["act"]), call["dtype"])
        entry = distinct.setdefault(key, {"grad": call["grad"], "act": call["act"], "dtype": call["dtype"],
                                          "used_by": []})
        entry["used_by"].append(f"{call['op']} {call['shape']} N={call['N']}")
    rows = []
    print(f"{'grad':>16s} {'act':>14s}  " + "  ".join(f"{w:>16s}" for w in WAYS))
    for entry in distinct.values():
        dtype = getattr(torch, entry["dtype"].split(".")[-1])
        grad = torch.randn(*entry["grad"], device=device).to(dtype)
        act = torch.randn(*entry["act"], device=device).to(dtype)
        ref = torch.mm(grad.t().double(), act.double())
        scale = ref.abs().max().item()
        row = dict(entry, uses=len(entry["used_by"]), used_by=sorted(set(entry["used_by"])), ms={}, rel_err={})
        for name, way in WAYS.items():
            fn = functools.partial(way, grad, act)
            try:
                row["rel_err"][name] = (fn().double() - ref).abs().max().item() / scale
                row["ms"][name] = round(time_ms(fn), 4)
            except (RuntimeError, TypeError) as error:
                row["ms"][name] = None
                row["rel_err"][name] = f"{type(error).__name__}: {error}"[:120]
        rows.append(row)
        print(f"{str(entry['grad']):>16s} {str(entry['act']):>14s}  "
              + "  ".join(f"{row['ms'][w] if row['ms'][w] is not None else 'n/a':>16}" for w in row["ms"])
              + f"   x{row['uses']}  {', '.join(row['used_by'])}")
        del grad, act, ref
    path = write_json(args.name, environment(), rows, {"ns": args.ns}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
