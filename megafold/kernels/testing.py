"""What the kernel tests and benchmarks share: the error measure, its tolerances, and
references at sizes where the plain reference does not fit in memory.

EvoAttention's rows are independent except for the shared bias, so its reference runs row
chunk by row chunk and sums the bias gradient over the chunks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType

import torch

from megafold.kernels.evo_attention import evo_attention_reference

# Relative Frobenius error allowed against a float64 reference, by the kernels' input dtype:
# fp32 arithmetic lands far under 1e-5; fp16 and bf16 round operands to 11 and 8 mantissa
# bits (and P / dS before the second product of each pair), so errors of 1e-4..1e-3 and
# 3e-3..1e-2 are expected; an indexing or masking bug gives O(1).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; non-finite values in ``x`` fail at once."""
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_backward_repeats(out: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """Two backward passes with one random output gradient give every gradient of ``leaves``
    bit for bit (deterministic: no atomics, partial sums added in a fixed order)."""
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def record_descriptor_use(monkeypatch, module: ModuleType, *names: str) -> list[bool]:
    """Wrap each ``module.<name>``, a launcher's helper that returns its tensor descriptors or
    None (the pointer path), so that each call of any of them appends whether it gave
    descriptors to the one list returned, in call order (pytest's ``monkeypatch`` undoes it)."""
    used: list[bool] = []
    for name in names:

        def recorded(*args, real=getattr(module, name)):
            descs = real(*args)
            used.append(descs is not None)
            return descs

        monkeypatch.setattr(module, name, recorded)
    return used


def shipped_descriptor_choices_offered(module: ModuleType, prefix: str, call: Callable[[str, list], None]) -> int:
    """Check that every shipped tuned choice (``megafold/kernels/tuned/*.json``) of an op named
    ``prefix*`` that takes tensor descriptors (``"TMA"``) is among the candidates that
    ``module``'s launcher offers for its key, so that the launcher knows its kernel (a choice
    it no longer offers would run some other path untimed). ``call(op, key)`` calls the
    launcher for that key on CPU tensors; ``module.run_tuned`` is replaced meanwhile. Returns
    how many choices were checked."""
    from megafold.kernels import _common

    class Offered(Exception):
        pass

    def offered(op, key, device, candidates, default, launch, rows=None):
        raise Offered(candidates)

    real, module.run_tuned = module.run_tuned, offered
    checked = 0
    try:
        for path in sorted(_common.TUNED_DIR.glob("*.json")):
            for name, choice in json.loads(path.read_text()).items():
                if name.startswith("_"):
                    continue
                op, key, _device = json.loads(name)
                if not (op.startswith(prefix) and choice.get("TMA")):
                    continue
                try:
                    call(op, key)
                except Offered as candidates:
                    assert choice in candidates.args[0], (path.name, op, key, choice)
                else:
                    raise AssertionError(f"{op} {key}: the launcher tuned nothing")
                checked += 1
    finally:
        module.run_tuned = real
    return checked


def evo_attention_reference_chunked(
    inputs: dict[str, torch.Tensor],
    grad_out: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    max_logits: int = 2**26,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of ``evo_attention_reference`` for ``inputs`` (q, k, v and optional
    bias, mask, gate with a single leading batch axis ``[B, S, N, H, D]``), computed in ``dtype``
    with at most ``max_logits`` logits alive at a time."""
    B, S, N, H, _ = inputs["q"].shape
    chunk = max(1, max_logits // (B * H * N * N))
    data = {n: (t.detach().to(dtype) if t.is_floating_point() else t) for n, t in inputs.items()}
    out = torch.empty_like(data["q"])
    grads = {n: torch.zeros_like(t) for n, t in data.items() if t.is_floating_point()}
    bias = data.get("bias")
    if bias is not None:
        bias.requires_grad_()
    for start in range(0, S, chunk):
        rows = slice(start, start + chunk)
        part = {n: data[n][:, rows].requires_grad_() for n in ("q", "k", "v", "gate") if n in data}
        mask = data["mask"][:, rows] if "mask" in data else None
        chunk_out = evo_attention_reference(**part, bias=bias, mask=mask)
        out[:, rows] = chunk_out.detach()
        names = list(part) + (["bias"] if bias is not None else [])
        leaves = list(part.values()) + ([bias] if bias is not None else [])
        for name, grad in zip(names, torch.autograd.grad(chunk_out, leaves, grad_out[:, rows].to(dtype))):
            if name == "bias":
                grads[name] += grad
            else:
                grads[name][:, rows] = grad
    return out, grads
