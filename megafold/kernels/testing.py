"""Reference outputs and gradients at sizes where the plain reference does not fit in memory.

Used by the GPU tests and the benchmarks to check the kernels in float64 (or float32) at real
sizes: EvoAttention's rows are independent except for the shared bias, so the reference runs
row chunk by row chunk and sums the bias gradient over the chunks.
"""

from __future__ import annotations

import torch

from megafold.kernels.evo_attention import evo_attention_reference


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
