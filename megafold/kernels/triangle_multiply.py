"""Triangle multiplicative update of AF3 (Alg. 12 outgoing, Alg. 13 incoming) in one op."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from megafold.kernels._common import resolve_backend

PARAM_NAMES = (
    "norm_in_weight",
    "norm_in_bias",
    "ab_proj_weight",
    "ab_gate_weight",
    "out_gate_weight",
    "norm_out_weight",
    "norm_out_bias",
    "out_proj_weight",
)


def triangle_multiply_reference(
    z: torch.Tensor,
    mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    outgoing: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    p = params
    zn = F.layer_norm(z, (z.shape[-1],), p["norm_in_weight"], p["norm_in_bias"], eps)
    ab = torch.sigmoid(F.linear(zn, p["ab_gate_weight"])) * F.linear(zn, p["ab_proj_weight"])
    a, b = (ab * mask[..., None].to(ab.dtype)).chunk(2, dim=-1)
    if outgoing:
        x = torch.einsum("bikc,bjkc->bijc", a, b)
    else:
        x = torch.einsum("bkic,bkjc->bijc", a, b)
    xn = F.layer_norm(x, (x.shape[-1],), p["norm_out_weight"], p["norm_out_bias"], eps)
    return torch.sigmoid(F.linear(zn, p["out_gate_weight"])) * F.linear(xn, p["out_proj_weight"])


def triangle_multiply(
    z: torch.Tensor,
    mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    outgoing: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """AF3 triangle multiplication; returns the update (the caller adds the residual).

    z: ``[B, N, N, c_z]``; mask: ``[B, N, N]`` bool (True = valid pair).
    params: norm_in_weight, norm_in_bias ``[c_z]``; ab_proj_weight, ab_gate_weight
    ``[2 * c_h, c_z]`` (rows: a then b); out_gate_weight ``[c_z, c_z]``; norm_out_weight,
    norm_out_bias ``[c_h]``; out_proj_weight ``[c_z, c_h]``.
    outgoing: ``x_ij = sum_k a_ik b_jk``; incoming: ``x_ij = sum_k a_ki b_kj``.
    Returns ``sigmoid(LN(z) W_og^T) * (LN(x) W_o^T)``: ``[B, N, N, c_z]``.
    """
    resolve_backend(backend, z, *(params[name] for name in PARAM_NAMES))
    return triangle_multiply_reference(z, mask, params, outgoing)
