"""Outer product mean of AF3 (Alg. 9): the MSA's update to the pair representation.

``z_ij = W (sum_s a_si (x) b_sj) / (1e-3 + sum_s mask_si mask_sj) + bias``. The eager
form builds the ``[N, N, c_h, c_h]`` outer products (1.2 GB at N = 768 in bf16); here each
program owns a tile of (i, j) pairs and, one channel c of ``a`` at a time, forms the
``[BLOCK_I * BLOCK_J, c_h]`` slice ``P_c = a_c^T b`` and contracts it with ``W[:, c, :]``
at once, so memory stays O(N^2 c_z). The scalar normaliser commutes with the contraction
and is applied to the result.

LayerNorm and the a/b projection run through ``layernorm_linear`` on the (small) MSA tensor.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megafold.kernels._common import resolve_backend, run_tuned
from megafold.kernels.layernorm_linear import (
    autocast_dtype,
    block_size,
    dot_precision,
    expect_shape,
    layernorm_linear,
)

PARAM_NAMES = ("norm_weight", "norm_bias", "proj_weight", "out_weight", "out_bias")
NORM_EPS = 1e-3  # added to the count of valid MSA rows of each pair, as in AF3


@triton.jit
def _right_tile(r_ptr, batch, ss, s_ok, j0, N, CH, sr_b, sr_s, sr_n, sr_c,
                BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``r[batch, ss, j0 + jj, d]`` as ``[BLOCK_S, BLOCK_J * BLOCK_D]`` with column jj * BLOCK_D + d."""
    cols = tl.arange(0, BLOCK_J * BLOCK_D)
    js = j0 + cols // BLOCK_D
    ds = cols % BLOCK_D
    ok = s_ok[:, None] & ((js < N) & (ds < CH))[None, :]
    offsets = batch.to(tl.int64) * sr_b + ss[:, None] * sr_s + js[None, :] * sr_n + ds[None, :] * sr_c
    return tl.load(r_ptr + offsets, mask=ok, other=0.0)


@triton.jit
def _left_tile(l_ptr, batch, c, is_, i_ok, ss, s_ok, sl_b, sl_c, sl_n, sl_s):
    """``l[batch, c, is_, ss]`` as ``[BLOCK_I, BLOCK_S]``, from the channel-major left operand."""
    offsets = batch.to(tl.int64) * sl_b + c * sl_c + is_[:, None] * sl_n + ss[None, :] * sl_s
    return tl.load(l_ptr + offsets, mask=i_ok[:, None] & s_ok[None, :], other=0.0)


@triton.jit
def _pair_rows(i0, j0, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """(i, j) of the BLOCK_I * BLOCK_J rows of a tile, row r = ii * BLOCK_J + jj."""
    r = tl.arange(0, BLOCK_I * BLOCK_J)
    ri = i0 + r // BLOCK_J
    rj = j0 + r % BLOCK_J
    return ri, rj, (ri < N) & (rj < N)


@triton.jit
def _outer_product_mean_forward_kernel(
    left_ptr, right_ptr, inv_norm_ptr, w_ptr, bias_ptr, out_ptr,
    N, S, CH, CZ,
    sl_b, sl_c, sl_n, sl_s, sr_b, sr_s, sr_n, sr_c, sn_b, sn_i, sn_j, sw_e, sw_c, sw_d,
    ONE_S_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    num_j = tl.cdiv(N, BLOCK_J)
    i0 = (tl.program_id(0) // num_j) * BLOCK_I
    j0 = (tl.program_id(0) % num_j) * BLOCK_J
    batch = tl.program_id(1)
    is_ = i0 + tl.arange(0, BLOCK_I)
    i_ok = is_ < N
    es = tl.arange(0, BLOCK_CZ)
    e_ok = es < CZ
    ds = tl.arange(0, BLOCK_D)
    dtype = w_ptr.dtype.element_ty

    if ONE_S_BLOCK:  # the b tile serves every channel c: load it once
        ss = tl.arange(0, BLOCK_S)
        s_ok = ss < S
        right = _right_tile(right_ptr, batch, ss, s_ok, j0, N, CH, sr_b, sr_s, sr_n, sr_c, BLOCK_J, BLOCK_D)
    acc = tl.zeros([BLOCK_I * BLOCK_J, BLOCK_CZ], tl.float32)
    for c in range(0, CH):
        # P_c[i, (j, d)] = sum_s a[s, i, c] b[s, j, d], complete over s before the contraction.
        if ONE_S_BLOCK:
            left = _left_tile(left_ptr, batch, c, is_, i_ok, ss, s_ok, sl_b, sl_c, sl_n, sl_s)
            outer = tl.dot(left, right, input_precision=DOT_PRECISION)
        else:
            outer = tl.zeros([BLOCK_I, BLOCK_J * BLOCK_D], tl.float32)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                s_ok = ss < S
                left = _left_tile(left_ptr, batch, c, is_, i_ok, ss, s_ok, sl_b, sl_c, sl_n, sl_s)
                right = _right_tile(right_ptr, batch, ss, s_ok, j0, N, CH, sr_b, sr_s, sr_n, sr_c, BLOCK_J, BLOCK_D)
                outer = tl.dot(left, right, outer, input_precision=DOT_PRECISION)
        outer = tl.reshape(outer, [BLOCK_I * BLOCK_J, BLOCK_D]).to(dtype)
        w_c = tl.load(w_ptr + c * sw_c + ds[:, None] * sw_d + es[None, :] * sw_e,
                      mask=(ds < CH)[:, None] & e_ok[None, :], other=0.0)
        acc = tl.dot(outer, w_c, acc, input_precision=DOT_PRECISION)

    ri, rj, r_ok = _pair_rows(i0, j0, N, BLOCK_I, BLOCK_J)
    inv_norm = tl.load(inv_norm_ptr + batch.to(tl.int64) * sn_b + ri * sn_i + rj * sn_j, mask=r_ok, other=0.0)
    bias = tl.load(bias_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    out = acc * inv_norm[:, None] + bias[None, :]
    flat = (batch.to(tl.int64) * N + ri) * N + rj
    tl.store(out_ptr + flat[:, None] * CZ + es[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def _outer_product_mean_backward_kernel(
    left_ptr, right_ptr, inv_norm_ptr, w_ptr, dz_ptr, d_left_ptr, dw_part_ptr,
    N, S, CH, CZ,
    sl_b, sl_c, sl_n, sl_s, sr_b, sr_s, sr_n, sr_c, sn_b, sn_i, sn_j, sw_e, sw_c, sw_d,
    sz_b, sz_i, sz_j, sz_e, sd_b, sd_s, sd_n, sd_c,
    COMPUTE_DW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """Gradient of the left operand for one i block, channel c and s block:
    ``dl[s, i, c] = sum_{j, d} r[s, j, d] dP[i, j, c, d]`` with ``dP = (dz / norm) W``.

    Called with (a, b) for da, and with (b, a), transposed dz and norm and W's channel axes
    swapped for db. With COMPUTE_DW it also writes this program's share of
    ``dW[e, c, :] = sum_ij (dz_ij[e] / norm_ij) P_ij[c, :]`` over its s block (P is linear
    in s), one fp32 partial per program, summed on the host (deterministic).
    """
    # c is the fastest grid axis: the c_h programs of one i block read the same dz and b
    # tiles at about the same time, from L2.
    c = tl.program_id(0)
    pid_i = tl.program_id(1)
    num_s = tl.cdiv(S, BLOCK_S)
    batch = tl.program_id(2) // num_s
    s_block = tl.program_id(2) % num_s
    i0 = pid_i * BLOCK_I
    is_ = i0 + tl.arange(0, BLOCK_I)
    i_ok = is_ < N
    ss = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    es = tl.arange(0, BLOCK_CZ)
    e_ok = es < CZ
    ds = tl.arange(0, BLOCK_D)
    dtype = w_ptr.dtype.element_ty

    w_c = tl.load(w_ptr + c * sw_c + es[:, None] * sw_e + ds[None, :] * sw_d,
                  mask=e_ok[:, None] & (ds < CH)[None, :], other=0.0)
    if COMPUTE_DW:
        left = _left_tile(left_ptr, batch, c, is_, i_ok, ss, s_ok, sl_b, sl_c, sl_n, sl_s)
        dw = tl.zeros([BLOCK_CZ, BLOCK_D], tl.float32)
    d_left = tl.zeros([BLOCK_I, BLOCK_S], tl.float32)
    for j0 in range(0, N, BLOCK_J):
        ri, rj, r_ok = _pair_rows(i0, j0, N, BLOCK_I, BLOCK_J)
        inv_norm = tl.load(inv_norm_ptr + batch.to(tl.int64) * sn_b + ri * sn_i + rj * sn_j, mask=r_ok, other=0.0)
        dz_rows = batch.to(tl.int64) * sz_b + ri.to(tl.int64) * sz_i + rj.to(tl.int64) * sz_j
        dz = tl.load(dz_ptr + dz_rows[:, None] + es[None, :] * sz_e, mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        g = (dz.to(tl.float32) * inv_norm[:, None]).to(dtype)
        d_outer = tl.dot(g, w_c, input_precision=DOT_PRECISION)
        d_outer = tl.reshape(d_outer, [BLOCK_I, BLOCK_J * BLOCK_D]).to(dtype)
        right = _right_tile(right_ptr, batch, ss, s_ok, j0, N, CH, sr_b, sr_s, sr_n, sr_c, BLOCK_J, BLOCK_D)
        d_left = tl.dot(d_outer, tl.trans(right), d_left, input_precision=DOT_PRECISION)
        if COMPUTE_DW:
            outer = tl.dot(left, right, input_precision=DOT_PRECISION)
            outer = tl.reshape(outer, [BLOCK_I * BLOCK_J, BLOCK_D]).to(dtype)
            dw = tl.dot(tl.trans(g), outer, dw, input_precision=DOT_PRECISION)

    offsets = batch.to(tl.int64) * sd_b + ss[None, :] * sd_s + is_[:, None] * sd_n + c * sd_c
    tl.store(d_left_ptr + offsets, d_left.to(d_left_ptr.dtype.element_ty), mask=i_ok[:, None] & s_ok[None, :])
    if COMPUTE_DW:
        part = (tl.program_id(2) * tl.num_programs(1) + pid_i).to(tl.int64) * CZ * CH * CH
        tl.store(dw_part_ptr + part + es[:, None] * CH * CH + c * CH + ds[None, :], dw,
                 mask=e_ok[:, None] & (ds < CH)[None, :])


# --------------------------------------------------------------------------- launches


def _channel_major(t: torch.Tensor) -> torch.Tensor:
    # [B, S, N, c] -> [B, c, N, S]: a channel's [N, S] slab is contiguous for the left tile.
    return t.permute(0, 3, 2, 1).contiguous()


def _w_strides(weight: torch.Tensor, CH: int, swap: bool) -> tuple[int, int, int]:
    """Strides (e, c, d) of out_weight ``[c_z, c_h * c_h]`` seen as ``[c_z, c_h, c_h]``."""
    s_e, s_cd = weight.stride()
    return (s_e, s_cd, CH * s_cd) if swap else (s_e, CH * s_cd, s_cd)


def _opm_forward(ab, inv_norm, weight, bias):
    B, S, N, two_ch = ab.shape
    CH = two_ch // 2
    CZ = weight.shape[0]
    a, b = ab[..., :CH], ab[..., CH:]
    left = _channel_major(a)
    out = torch.empty(B, N, N, CZ, device=ab.device, dtype=weight.dtype)
    block_d, block_cz = block_size(CH, 1 << 30), block_size(CZ, 1 << 30)

    def launch(cfg):
        grid = (triton.cdiv(N, cfg["BLOCK_I"]) * triton.cdiv(N, cfg["BLOCK_J"]), B)
        _outer_product_mean_forward_kernel[grid](
            left, b, inv_norm, weight, bias, out, N, S, CH, CZ,
            *left.stride(), *b.stride(), *inv_norm.stride(), *_w_strides(weight, CH, False),
            ONE_S_BLOCK=S <= cfg["BLOCK_S"], DOT_PRECISION=dot_precision(weight.dtype),
            BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_S=cfg["BLOCK_S"],
            BLOCK_D=block_d, BLOCK_CZ=block_cz, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2),
        )

    block_s = block_size(S, 128)
    # Registers bound the tiles: the [BLOCK_I * BLOCK_J, c_z] accumulator and the b tile
    # [BLOCK_S, BLOCK_J * c_h] held across the channel loop.
    block_j = max(1, min(8, 16384 // (block_s * block_d)))
    default = {"BLOCK_I": 16, "BLOCK_J": block_j, "BLOCK_S": block_s, "num_warps": 8}
    small = block_d <= 32 and block_cz <= 128
    candidates = [
        {"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_S": bs, "num_warps": nw, "num_stages": ns}
        for bi in (16, 32) for bj in (4, 8) for bs in sorted({block_size(S, 32), block_size(S, 64), block_s})
        for nw in (4, 8) for ns in (2, 3)
    ] if small else []
    run_tuned("outer_product_mean_fwd", (CH, CZ, min(S, 64), str(weight.dtype), str(ab.dtype)), ab.device, candidates, default, launch)
    return out, left


def _opm_backward(dz, ab, left, inv_norm, weight):
    B, S, N, two_ch = ab.shape
    CH = two_ch // 2
    CZ = weight.shape[0]
    a, b = ab[..., :CH], ab[..., CH:]
    d_ab = torch.empty_like(ab)
    block_d, block_cz = block_size(CH, 1 << 30), block_size(CZ, 1 << 30)
    block_s = block_size(S, 64)
    block_i = 16
    block_j = max(1, min(8, 256 // block_d))
    num_s = triton.cdiv(S, block_s)
    dw_parts = torch.empty(B * num_s * triton.cdiv(N, block_i), CZ, CH * CH, device=ab.device, dtype=torch.float32)
    common = dict(DOT_PRECISION=dot_precision(weight.dtype), BLOCK_I=block_i, BLOCK_J=block_j,
                  BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_CZ=block_cz, num_warps=8)
    grid = (CH, triton.cdiv(N, block_i), B * num_s)
    # da, with this program's share of dW.
    _outer_product_mean_backward_kernel[grid](
        left, b, inv_norm, weight, dz, d_ab[..., :CH], dw_parts, N, S, CH, CZ,
        *left.stride(), *b.stride(), *inv_norm.stride(), *_w_strides(weight, CH, False),
        *dz.stride(), *d_ab.stride(), COMPUTE_DW=True, **common,
    )
    # db: the same kernel on the transposed problem (i <-> j, a <-> b, W's c <-> d).
    dz_t, inv_t = dz.transpose(1, 2), inv_norm.transpose(1, 2)
    _outer_product_mean_backward_kernel[grid](
        left, a, inv_t, weight, dz_t, d_ab[..., CH:], dw_parts, N, S, CH, CZ,
        *left.stride(), *a.stride(), *inv_t.stride(), *_w_strides(weight, CH, True),
        *dz_t.stride(), *d_ab.stride(), COMPUTE_DW=False, **common,
    )
    return d_ab, dw_parts.sum(0)


# --------------------------------------------------------------------------- autograd


class OuterProductMeanFunction(torch.autograd.Function):
    """The contraction part: masked, projected ``ab`` ``[B, S, N, 2 c_h]`` -> ``[B, N, N, c_z]``."""

    @staticmethod
    def forward(ctx, ab, inv_norm, out_weight, out_bias, compute_dtype):
        ab = ab.to(compute_dtype)
        weight = out_weight.to(compute_dtype)
        out, left = _opm_forward(ab, inv_norm, weight, out_bias)
        ctx.save_for_backward(ab, left, inv_norm, weight)
        return out

    @staticmethod
    def backward(ctx, dz):
        ab, left, inv_norm, weight = ctx.saved_tensors
        d_ab, dw = _opm_backward(dz, ab, left, inv_norm, weight)
        d_bias = dz.sum(dim=(0, 1, 2), dtype=torch.float32)
        return d_ab, None, dw, d_bias, None


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
    ``flatten(o_ij) W_out^T + b_out``: ``[B, N, N, c_z]`` (in autocast's dtype under autocast).
    """
    _check_shapes(m, mask, params)
    values = [params[name] for name in PARAM_NAMES]
    if resolve_backend(backend, m, *values) == "torch" or m.numel() == 0:
        return outer_product_mean_reference(m, mask, params)
    p = params
    row_mask = mask[..., None]
    ab = layernorm_linear(m, p["norm_weight"], p["norm_bias"], p["proj_weight"], backend=backend)
    ab = ab * row_mask.to(ab.dtype)
    with torch.autocast(m.device.type, enabled=False):  # counts up to S must stay exact
        valid = mask.to(torch.float32)
        inv_norm = 1.0 / (NORM_EPS + torch.einsum("bsi,bsj->bij", valid, valid))
    return _outer_product_triton(ab, inv_norm, p["out_weight"], p["out_bias"], autocast_dtype(m))


@torch.compiler.disable  # a compiled caller breaks its graph here instead of tracing the launcher
def _outer_product_triton(ab, inv_norm, out_weight, out_bias, compute_dtype):
    return OuterProductMeanFunction.apply(ab, inv_norm, out_weight, out_bias, compute_dtype)


def _check_shapes(m: torch.Tensor, mask: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    missing = [name for name in PARAM_NAMES if name not in params]
    if missing:
        raise KeyError(f"outer_product_mean: params lack {missing}")
    if m.dim() != 4:
        raise ValueError(f"outer_product_mean: m must be [B, S, N, c_m], got {tuple(m.shape)}")
    if mask.shape != m.shape[:3] or mask.dtype != torch.bool:
        raise ValueError(f"outer_product_mean: mask must be bool {tuple(m.shape[:3])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    c_m, c_h2, c_z = m.shape[-1], params["proj_weight"].shape[0], params["out_weight"].shape[0]
    c_h = c_h2 // 2
    expected = {"norm_weight": (c_m,), "norm_bias": (c_m,), "proj_weight": (2 * c_h, c_m),
                "out_weight": (c_z, c_h * c_h), "out_bias": (c_z,)}
    for name, shape in expected.items():
        expect_shape("outer_product_mean", name, params[name], shape)
