"""The SwiGLU transition of AF3 (Alg. 11): LayerNorm -> Linear -> SwiGLU -> Linear, fused.

The hidden activation is ``n`` times wider than the input (n = 4 in AF3); the fused path
never stores it whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafold.kernels._common import resolve_backend


def transition_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    hidden = F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), w_in)
    a, b = hidden.chunk(2, dim=-1)
    return F.linear(F.silu(a) * b, w_out)


def transition(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(silu(a) * b, w_out)`` with ``a, b = F.linear(LN(x), w_in).chunk(2, -1)``.

    x: ``[*, c]``; ln_weight, ln_bias: ``[c]``; w_in: ``[2 * h, c]`` (rows: a then b);
    w_out: ``[c_out, h]`` with h = n * c. Returns ``[*, c_out]``.
    """
    resolve_backend(backend, x, ln_weight, ln_bias, w_in, w_out)
    return transition_reference(x, ln_weight, ln_bias, w_in, w_out, eps)
