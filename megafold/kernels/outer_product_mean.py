"""Outer product mean of AF3 (Alg. 9): the MSA's update to the pair representation."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from megafold.kernels._common import resolve_backend

PARAM_NAMES = ("norm_weight", "norm_bias", "proj_weight", "out_weight", "out_bias")
NORM_EPS = 1e-3  # added to the count of valid MSA rows of each pair, as in AF3


def outer_product_mean_reference(
    m: torch.Tensor,
    mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    eps: float = 1e-5,
) -> torch.Tensor:
    p = params
    mn = F.layer_norm(m, (m.shape[-1],), p["norm_weight"], p["norm_bias"], eps)
    row_mask = mask[..., None].to(mn.dtype)
    a, b = (F.linear(mn, p["proj_weight"]) * row_mask).chunk(2, dim=-1)
    outer = torch.einsum("bsic,bsjd->bijcd", a, b).flatten(-2)
    count = torch.einsum("bsi,bsj->bij", row_mask[..., 0], row_mask[..., 0])[..., None]
    return F.linear(outer / (NORM_EPS + count), p["out_weight"], p["out_bias"])


def outer_product_mean(
    m: torch.Tensor,
    mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """AF3 outer product mean; returns the pair update.

    m: ``[B, S, N, c_m]``; mask: ``[B, S, N]`` bool (True = valid MSA entry).
    params: norm_weight, norm_bias ``[c_m]``; proj_weight ``[2 * c_h, c_m]`` (rows: a then b);
    out_weight ``[c_z, c_h * c_h]``; out_bias ``[c_z]``.
    ``o_ij = sum_s a_si (x) b_sj / (1e-3 + sum_s mask_si mask_sj)``; returns
    ``flatten(o_ij) W_out^T + b_out``: ``[B, N, N, c_z]``.
    """
    resolve_backend(backend, m, *(params[name] for name in PARAM_NAMES))
    return outer_product_mean_reference(m, mask, params)
