"""Benchmark cases of the four pair ops, for benchmarks/kernels.py (forward + backward).

As in training (and in issue 3's measurements), activations are bf16 and parameters fp32, and
every implementation runs under ``torch.autocast("cuda", torch.bfloat16)``. c_z = 128:
- layernorm_linear: x ``[1, N, N, 128]`` -> 16, 128, 512 or 640 outputs (with bias);
- transition: n = 4;
- triangle_multiply: outgoing, c_h = 128, the last 5% of tokens padding;
- outer_product_mean: c_m = 64, c_h = 32, S = 128 MSA rows for N <= 512, else 64.

``cases(quick, device)`` lists them; each has ``make_inputs()`` (fresh inputs with
requires_grad), ``implementations`` (name -> fn(inputs) -> output: eager, compile, megafold,
and cueq where cuequivariance_torch has the op) and ``reference(inputs)``, the output in
float64 (differentiable: float64 leaves give float64 gradients). ``run`` times them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from _harness import dtype_for
from megafold.kernels import evo_attention, layernorm_linear, outer_product_mean, transition, triangle_multiply
from megafold.kernels.evo_attention import evo_attention_reference
from megafold.kernels.layernorm_linear import layernorm_linear_reference
from megafold.kernels.outer_product_mean import NORM_EPS, outer_product_mean_reference
from megafold.kernels.transition import transition_reference
from megafold.kernels.triangle_multiply import triangle_multiply_reference

C_Z = 128
LINEAR_OUTPUTS = (16, 128, 512, 640)
ALL_N = (256, 384, 512, 768, 1024)
QUICK_N = (384, 768)
Inputs = dict[str, torch.Tensor]


@dataclass
class Case:
    op: str
    shape: str
    N: int
    make_inputs: Callable[[], Inputs]
    implementations: dict[str, Callable[[Inputs], torch.Tensor]]
    reference: Callable[[Inputs], torch.Tensor]
    extra: dict = field(default_factory=dict)


def _leaf(*shape, device, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()


def _float64(inputs: Inputs) -> Inputs:
    return {k: (v.double() if v.is_floating_point() and v.dtype != torch.float64 else v) for k, v in inputs.items()}


def _autocast(fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
    def run(inputs: Inputs) -> torch.Tensor:
        device = next(iter(inputs.values())).device
        with torch.autocast(device.type, dtype=dtype_for(device)):
            return fn(inputs)

    return run


def _row_chunked(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args, pieces: int = 8) -> torch.Tensor:
    """``fn(x, *args)`` over slices of x's dim 1 under activation checkpointing, so that a
    float64 reference at N = 1024 stays within a few GiB."""
    step = math.ceil(x.shape[1] / pieces)
    parts = [checkpoint(fn, x[:, i:i + step], *args, use_reentrant=False) for i in range(0, x.shape[1], step)]
    return torch.cat(parts, dim=1)


def _impls(eager: Callable[[Inputs], torch.Tensor], megafold: Callable[[Inputs], torch.Tensor]):
    compiled = torch.compile(eager, dynamic=False)
    return {"eager": _autocast(eager), "compile": _autocast(compiled), "megafold": _autocast(megafold)}


def _layernorm_linear_case(N: int, out_features: int, device) -> Case:
    def make_inputs():
        return {"x": _leaf(1, N, N, C_Z, device=device, dtype=dtype_for(device)),
                "ln_weight": _leaf(C_Z, device=device, scale=0.1, shift=1.0),
                "ln_bias": _leaf(C_Z, device=device, scale=0.1),
                "weight": _leaf(out_features, C_Z, device=device, scale=C_Z**-0.5),
                "bias": _leaf(out_features, device=device, scale=0.1)}

    def reference(inputs):
        x = _float64(inputs)
        return _row_chunked(lambda rows, *p: layernorm_linear_reference(rows, *p), x["x"],
                            x["ln_weight"], x["ln_bias"], x["weight"], x["bias"])

    return Case("layernorm_linear", f"{C_Z}->{out_features}", N, make_inputs,
                _impls(lambda x: layernorm_linear_reference(**x), lambda x: layernorm_linear(**x, backend="triton")),
                reference)


def _transition_case(N: int, device, n: int = 4) -> Case:
    def make_inputs():
        return {"x": _leaf(1, N, N, C_Z, device=device, dtype=dtype_for(device)),
                "ln_weight": _leaf(C_Z, device=device, scale=0.1, shift=1.0),
                "ln_bias": _leaf(C_Z, device=device, scale=0.1),
                "w_in": _leaf(2 * n * C_Z, C_Z, device=device, scale=C_Z**-0.5),
                "w_out": _leaf(C_Z, n * C_Z, device=device, scale=(n * C_Z) ** -0.5)}

    def reference(inputs):
        x = _float64(inputs)
        return _row_chunked(lambda rows, *p: transition_reference(rows, *p), x["x"],
                            x["ln_weight"], x["ln_bias"], x["w_in"], x["w_out"])

    return Case("transition", f"n{n}", N, make_inputs,
                _impls(lambda x: transition_reference(**x), lambda x: transition(**x, backend="triton")),
                reference)


def _triangle_params(c_z: int, c_h: int, device) -> Inputs:
    return {"norm_in_weight": _leaf(c_z, device=device, scale=0.1, shift=1.0),
            "norm_in_bias": _leaf(c_z, device=device, scale=0.1),
            "ab_proj_weight": _leaf(2 * c_h, c_z, device=device, scale=c_z**-0.5),
            "ab_gate_weight": _leaf(2 * c_h, c_z, device=device, scale=c_z**-0.5),
            "out_gate_weight": _leaf(c_z, c_z, device=device, scale=c_z**-0.5),
            "norm_out_weight": _leaf(c_h, device=device, scale=0.1, shift=1.0),
            "norm_out_bias": _leaf(c_h, device=device, scale=0.1),
            "out_proj_weight": _leaf(c_z, c_h, device=device, scale=c_h**-0.5)}


def _padded_pair_mask(N: int, device) -> torch.Tensor:
    tokens = torch.ones(1, N, dtype=torch.bool, device=device)
    tokens[:, N - max(1, N // 20):] = False  # crop padding
    return tokens[:, :, None] & tokens[:, None, :]


def _triangle_case(N: int, device, outgoing: bool = True) -> Case:
    def make_inputs():
        return {"z": _leaf(1, N, N, C_Z, device=device, dtype=dtype_for(device)),
                "mask": _padded_pair_mask(N, device), **_triangle_params(C_Z, C_Z, device)}

    def split(x):
        return x["z"], x["mask"], {k: v for k, v in x.items() if k not in ("z", "mask")}

    def eager(x):
        z, mask, params = split(x)
        return triangle_multiply_reference(z, mask, params, outgoing)

    def megafold(x):
        z, mask, params = split(x)
        return triangle_multiply(z, mask, params, outgoing=outgoing, backend="triton")

    impls = _impls(eager, megafold)
    try:
        import cuequivariance_torch as cuet

        def cueq(x):
            z, mask, p = split(x)
            weights = {k: (v.to(z.dtype) if v.dim() == 2 else v) for k, v in p.items()}  # as autocast's Linear would
            return cuet.triangle_multiplicative_update(
                z, direction="outgoing" if outgoing else "incoming", mask=mask.to(z.dtype),
                norm_in_weight=weights["norm_in_weight"], norm_in_bias=weights["norm_in_bias"],
                p_in_weight=weights["ab_proj_weight"], g_in_weight=weights["ab_gate_weight"],
                norm_out_weight=weights["norm_out_weight"], norm_out_bias=weights["norm_out_bias"],
                p_out_weight=weights["out_proj_weight"], g_out_weight=weights["out_gate_weight"],
            )

        if hasattr(cuet, "triangle_multiplicative_update"):
            impls["cueq"] = _autocast(cueq)
    except ImportError:
        pass
    return Case("triangle_multiply", "outgoing" if outgoing else "incoming", N, make_inputs, impls,
                lambda x: eager(_float64(x)))


def _opm_reference_chunked(m, mask, params) -> torch.Tensor:
    """outer_product_mean_reference, i-chunk by i-chunk under checkpointing: the float64
    [N, N, c_h, c_h] outer products never exist whole."""
    p = params
    mn = torch.nn.functional.layer_norm(m, (m.shape[-1],), p["norm_weight"], p["norm_bias"], 1e-5)
    valid = mask.to(mn.dtype)
    a, b = (torch.nn.functional.linear(mn, p["proj_weight"]) * valid[..., None]).chunk(2, dim=-1)
    count = torch.einsum("bsi,bsj->bij", valid, valid)

    def rows(a_rows, count_rows, b, weight, bias):
        outer = torch.einsum("bsic,bsjd->bijcd", a_rows, b).flatten(-2)
        return torch.nn.functional.linear(outer / (NORM_EPS + count_rows[..., None]), weight, bias)

    N, c_h = m.shape[2], a.shape[-1]
    step = max(1, 2**26 // (N * c_h * c_h))
    parts = [checkpoint(rows, a[:, :, i:i + step], count[:, i:i + step], b, p["out_weight"], p["out_bias"],
                        use_reentrant=False) for i in range(0, N, step)]
    return torch.cat(parts, dim=1)


def _opm_case(N: int, device, c_m: int = 64, c_h: int = 32) -> Case:
    S = 128 if N <= 512 else 64

    def make_inputs():
        mask = torch.rand(1, S, N, device=device) > 0.1  # gaps in the alignment
        mask[:, :, N - max(1, N // 20):] = False  # crop padding
        return {"m": _leaf(1, S, N, c_m, device=device, dtype=dtype_for(device)), "mask": mask,
                "norm_weight": _leaf(c_m, device=device, scale=0.1, shift=1.0),
                "norm_bias": _leaf(c_m, device=device, scale=0.1),
                "proj_weight": _leaf(2 * c_h, c_m, device=device, scale=c_m**-0.5),
                "out_weight": _leaf(C_Z, c_h * c_h, device=device, scale=1.0 / c_h),
                "out_bias": _leaf(C_Z, device=device, scale=0.1)}

    def split(x):
        return x["m"], x["mask"], {k: v for k, v in x.items() if k not in ("m", "mask")}

    return Case("outer_product_mean", f"S{S}", N, make_inputs,
                _impls(lambda x: outer_product_mean_reference(*split(x)),
                       lambda x: outer_product_mean(*split(x), backend="triton")),
                lambda x: _opm_reference_chunked(*split(_float64(x))), {"S": S})


def cases(quick: bool, device, ns=None) -> list[Case]:
    """Every pair-op case at N in 256..1024 (quick: 384 and 768), or at ``ns``."""
    out = []
    for N in ns or (QUICK_N if quick else ALL_N):
        out += [_layernorm_linear_case(N, o, device) for o in LINEAR_OUTPUTS]
        out += [_transition_case(N, device), _triangle_case(N, device), _opm_case(N, device)]
    return out


OPS = ("layernorm_linear", "transition", "triangle_multiply", "outer_product_mean")

# Logits of one row chunk of EvoAttention's float64 reference in ``evo_case`` (2^26: 0.5 GB,
# and as much again per gradient).
EVO_REFERENCE_LOGITS = 2**26


def evo_case(N: int, device, shape: str = "tri") -> Case:
    """EvoAttention for benchmarks/variant_ab.py, with the shapes and inputs of
    benchmarks/kernels.py's own rows (``EVO_SHAPES``, ``evo_inputs``: bf16, a key mask whose
    last 5% of tokens are padding). The float64 reference runs row chunk by row chunk under
    checkpointing (at N=768 the whole ``[S, H, N, N]`` logits would take 14 GB)."""
    import kernels  # benchmarks/kernels.py imports this module only inside its main

    dims = kernels.EVO_SHAPES[shape](N)
    S, H, D = dims["S"], dims["H"], dims["D"]

    def make_inputs():
        return kernels.evo_inputs(S, N, H, D, device, dtype=dtype_for(device), width=dims.get("width"),
                                  ending=dims.get("ending", False))

    def reference(inputs):
        x = _float64(inputs)
        chunk = max(1, EVO_REFERENCE_LOGITS // (H * N * N))
        outs = [checkpoint(evo_attention_reference, *(x[n][:, rows] for n in ("q", "k", "v")), x["bias"],
                           x["mask"][:, rows], x["gate"][:, rows], use_reentrant=False)
                for rows in (slice(start, start + chunk) for start in range(0, S, chunk))]
        return torch.cat(outs, 1)

    impls = {"eager": _autocast(lambda x: evo_attention_reference(**x)),
             "megafold": _autocast(lambda x: evo_attention(**x, backend="triton"))}
    # Peers as benchmarks/kernels.py sets them up (``--peers flex compile sdpa``): each one's
    # layout change or block mask is made once per input set, outside the timed replays.
    # Peers that copy their inputs into new leaves (cuEquivariance) are not offered here.
    for name, (prepare, fn) in kernels.evo_implementations(S, N, H, D).items():
        if name not in impls and name in ("compile", "sdpa", "flex"):
            impls[name] = _prepared_once(prepare, fn)
    return Case("evo_attention", shape, N, make_inputs, impls, reference, {"S": S, "H": H, "D": D})


def _prepared_once(prepare, fn):
    """``fn(prepare(x))`` with ``prepare`` run once per input set (the set is kept alive with
    its prepared form, so an id is never reused while it is remembered)."""
    if prepare is None:
        return fn
    memo: dict[tuple, tuple] = {}

    def call(x):
        key = tuple(id(v) for v in x.values())
        if key not in memo:
            memo.clear()
            memo[key] = (x, prepare(x))
        return fn(memo[key][1])

    return call


def run(ns, device, rows: list[dict], ops=OPS, impls=None, graph: bool = False) -> None:
    """Time every case and implementation (fwd + bwd) and check it against float64; ``ops``
    and ``impls`` (names, None: all) select which. ``graph``: also time each one replayed
    from a CUDA graph (``graph_ms``; ``graph_error`` where the capture fails)."""
    from _harness import graph_time, is_oom, peak_mib, rel_err, row_summary, time_ms

    for case in cases(False, device, ns):
        if case.op not in ops:
            continue
        torch._dynamo.reset()
        inputs = case.make_inputs()
        leaves = [k for k, v in inputs.items() if v.requires_grad]
        ref_inputs = {k: (v.detach().double().requires_grad_() if k in leaves else v) for k, v in inputs.items()}
        ref = case.reference(ref_inputs)
        grad_out = torch.randn(ref.shape, device=device, dtype=dtype_for(device))
        ref_grads = torch.autograd.grad(ref, [ref_inputs[k] for k in leaves], grad_out.double())
        ref = ref.detach()
        del ref_inputs
        for impl, fn in case.implementations.items():
            if impls and impl not in impls:
                continue
            row = {"op": case.op, "shape": case.shape, "N": case.N, "impl": impl, **case.extra}
            try:
                out = fn(inputs)
                grads = torch.autograd.grad(out, [inputs[k] for k in leaves], grad_out)
                errors = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                row["rel_err"], row["rel_err_out"] = max(errors), errors[0]
                del out, grads

                def step():
                    torch.autograd.grad(fn(inputs), [inputs[k] for k in leaves], grad_out)

                row["ms"] = time_ms(step)
                row["peak_mib"] = peak_mib(step)
            except Exception as error:  # a peer that cannot run a shape is a row, not a crash
                row["error"] = ("OOM" if is_oom(error) else f"{type(error).__name__}: {error}")[:200]
            if graph and "ms" in row:
                row.update(graph_time(step))
            rows.append(row)
            print(f"  {case.op:18s} {case.shape:9s} N={case.N:5d} {impl:9s} {row_summary(row)}", flush=True)
        del ref, ref_grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
