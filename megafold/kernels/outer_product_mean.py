"""Outer product mean of AF3 (Alg. 9): the MSA's update to the pair representation.

``z_ij = W (sum_s a_si (x) b_sj) / (1e-3 + sum_s mask_si mask_sj) + bias``. The eager form
builds the ``[N, N, c_h, c_h]`` outer products (1.2 GB at N = 768 in bf16); here no kernel
stores anything pair-sized but the ``[N, N, c_z]`` output and its gradient, so memory stays
O(N^2 c_z). Each program holds one tile of the outer products (or of their gradient) for a
block of i, a block of j and a chunk of channels, in one of two layouts:

- ``[(i, c), (j, d)]``: what the MSA products make and use, ``P = A B^T`` and
  ``dA = dP B`` with the MSA axis s as the inner dimension;
- ``[(i, j), (c, d)]``: what the contraction with ``W`` makes and uses, ``z = P W^T``,
  ``dP = (dz / norm) W`` and ``dW = (dz / norm)^T P`` with pairs or ``c_z`` inner;

and swaps the middle axes of the tile in registers (through shared memory) between the two
products, so every product is a tensor-core dot with tiles of 64-256 and each term of the
math is computed once per kernel:

- forward, per (i block, j block), looping over channel chunks: ``P`` then ``z += P W^T``;
- ``dA`` per (i block, channel chunk, s block), looping over j blocks: ``dP = g W`` with
  ``g = dz / norm``, then ``dA += dP B``; ``dB`` is the same on the transposed problem, by
  programs of the same launch;
- ``dW`` per (group of j blocks, channel chunk), looping over i blocks: ``P`` then
  ``dW += g^T P``, one fp32 partial per program summed in a fixed order (deterministic, no
  atomics; at most 64 partials per batch element).

The scalar normaliser commutes with the contraction and is applied to ``z`` and ``dz``.
LayerNorm and the a/b projection run through ``layernorm_linear`` on the (small) MSA tensor.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megafold.kernels._common import cdiv, launch_kernel, next_power_of_2, resolve_backend, run_tuned
from megafold.kernels.layernorm_linear import (
    autocast_dtype,
    block_size,
    dot_precision,
    expect_shape,
    layernorm_linear,
)

PARAM_NAMES = ("norm_weight", "norm_bias", "proj_weight", "out_weight", "out_bias")
NORM_EPS = 1e-3  # added to the count of valid MSA rows of each pair, as in AF3
# dW partials per batch element: bounds their memory (64 x c_z c_h^2 fp32, 32 MB at AF3's
# widths) and still gives 64 x c_h / BLOCK_C programs.
MAX_WEIGHT_GRAD_PARTIALS = 64


@triton.jit
def _channel_rows(t_ptr, batch, n0, c0, ss, s_ok, N, CH, st_b, st_n, st_c, st_s,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``t[batch, n0 + nn, c0 + cc, ss]`` as ``[BLOCK_N * BLOCK_C, BLOCK_S]``, row nn * BLOCK_C + cc,
    from an MSA operand in the ``[B, N, c, S]`` layout."""
    rows = tl.arange(0, BLOCK_N * BLOCK_C)
    ns = n0 + rows // BLOCK_C
    cs = c0 + rows % BLOCK_C
    ok = ((ns < N) & (cs < CH))[:, None] & s_ok[None, :]
    offsets = (batch.to(tl.int64) * st_b + ns[:, None].to(tl.int64) * st_n + cs[:, None] * st_c
               + ss[None, :] * st_s)
    return tl.load(t_ptr + offsets, mask=ok, other=0.0)


@triton.jit
def _swap_middle_axes(x, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """``[(a, b), (c, d)]`` -> ``[(a, c), (b, d)]``: a tile moved between the two layouts."""
    x = tl.reshape(x, [BLOCK_A, BLOCK_B, BLOCK_C, BLOCK_D])
    x = tl.permute(x, (0, 2, 1, 3))
    return tl.reshape(x, [BLOCK_A * BLOCK_C, BLOCK_B * BLOCK_D])


@triton.jit
def _weight_tile(w_ptr, c0, CH, CZ, sw_e, sw_c, sw_d, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_CZ: tl.constexpr):
    """``W[e, c0 + cc, d]`` as ``[BLOCK_CZ, BLOCK_C * BLOCK_D]``, column cc * BLOCK_D + d."""
    es = tl.arange(0, BLOCK_CZ)
    cols = tl.arange(0, BLOCK_C * BLOCK_D)
    cs = c0 + cols // BLOCK_D
    ds = cols % BLOCK_D
    ok = (es < CZ)[:, None] & ((cs < CH) & (ds < CH))[None, :]
    return tl.load(w_ptr + es[:, None] * sw_e + cs[None, :] * sw_c + ds[None, :] * sw_d, mask=ok, other=0.0)


@triton.jit
def _pair_rows(i0, j0, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """(i, j) of the BLOCK_I * BLOCK_J rows of a tile, row r = ii * BLOCK_J + jj."""
    r = tl.arange(0, BLOCK_I * BLOCK_J)
    ri = i0 + r // BLOCK_J
    rj = j0 + r % BLOCK_J
    return ri, rj, (ri < N) & (rj < N)


@triton.jit
def _grad_tile(dz_ptr, inv_norm_ptr, batch, i0, j0, N, CZ, sn_b, sn_i, sn_j, sz_b, sz_i, sz_j, sz_e,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CZ: tl.constexpr):
    """``dz_ij`` as ``[BLOCK_I * BLOCK_J, BLOCK_CZ]`` (fp32, zero outside) and ``1 / norm_ij``,
    rows as in _pair_rows."""
    ri, rj, r_ok = _pair_rows(i0, j0, N, BLOCK_I, BLOCK_J)
    es = tl.arange(0, BLOCK_CZ)
    inv_norm = tl.load(inv_norm_ptr + batch.to(tl.int64) * sn_b + ri * sn_i + rj * sn_j, mask=r_ok, other=0.0)
    rows = batch.to(tl.int64) * sz_b + ri.to(tl.int64) * sz_i + rj.to(tl.int64) * sz_j
    dz = tl.load(dz_ptr + rows[:, None] + es[None, :] * sz_e, mask=r_ok[:, None] & (es < CZ)[None, :], other=0.0)
    return dz.to(tl.float32), inv_norm


@triton.jit
def _scaled_grad_tile(dz_ptr, inv_norm_ptr, batch, i0, j0, N, CZ, sn_b, sn_i, sn_j, sz_b, sz_i, sz_j, sz_e,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CZ: tl.constexpr):
    """``g = dz_ij / norm_ij`` as ``[BLOCK_I * BLOCK_J, BLOCK_CZ]`` (fp32), rows as in _pair_rows."""
    dz, inv_norm = _grad_tile(dz_ptr, inv_norm_ptr, batch, i0, j0, N, CZ, sn_b, sn_i, sn_j, sz_b, sz_i, sz_j, sz_e,
                              BLOCK_I, BLOCK_J, BLOCK_CZ)
    return dz * inv_norm[:, None]


@triton.jit
def _outer_tile(a_ptr, b_ptr, right, batch, i0, j0, c0, N, S, CH, st_b, st_n, st_c, st_s,
                ONE_S_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """``P[(i, j), (c, d)] = sum_s a[s, i0 + i, c0 + c] b[s, j0 + j, d]`` as
    ``[BLOCK_I * BLOCK_J, BLOCK_C * BLOCK_D]`` in the operands' dtype. With ONE_S_BLOCK,
    ``right`` is the caller's b tile ``[BLOCK_J * BLOCK_D, BLOCK_S]`` (loaded once for all calls)."""
    if ONE_S_BLOCK:
        ss = tl.arange(0, BLOCK_S)
        s_ok = ss < S
        left = _channel_rows(a_ptr, batch, i0, c0, ss, s_ok, N, CH, st_b, st_n, st_c, st_s, BLOCK_I, BLOCK_C)
        outer = tl.dot(left, tl.trans(right), input_precision=DOT_PRECISION)
    else:
        outer = tl.zeros([BLOCK_I * BLOCK_C, BLOCK_J * BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            left = _channel_rows(a_ptr, batch, i0, c0, ss, s_ok, N, CH, st_b, st_n, st_c, st_s, BLOCK_I, BLOCK_C)
            right_s = _channel_rows(b_ptr, batch, j0, 0, ss, s_ok, N, CH, st_b, st_n, st_c, st_s, BLOCK_J, BLOCK_D)
            outer = tl.dot(left, tl.trans(right_s), outer, input_precision=DOT_PRECISION)
    outer = outer.to(a_ptr.dtype.element_ty)
    return _swap_middle_axes(outer, BLOCK_I, BLOCK_C, BLOCK_J, BLOCK_D)


@triton.jit
def _outer_product_mean_forward_kernel(
    a_ptr, b_ptr, inv_norm_ptr, w_ptr, bias_ptr, out_ptr,
    N, S, CH, CZ,
    st_b, st_n, st_c, st_s, sn_b, sn_i, sn_j, sw_e, sw_c, sw_d,
    ONE_S_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """``z`` for one (i block, j block): ``acc[(i, j), e] += P[(i, j), (c, d)] W[e, c, d]`` over
    channel chunks, then scaled by 1 / norm_ij plus the bias."""
    num_j = tl.cdiv(N, BLOCK_J)
    i0 = (tl.program_id(0) // num_j) * BLOCK_I
    j0 = (tl.program_id(0) % num_j) * BLOCK_J
    batch = tl.program_id(1)
    es = tl.arange(0, BLOCK_CZ)
    e_ok = es < CZ

    if ONE_S_BLOCK:  # the b tile serves every channel chunk: load it once
        ss = tl.arange(0, BLOCK_S)
        right = _channel_rows(b_ptr, batch, j0, 0, ss, ss < S, N, CH, st_b, st_n, st_c, st_s, BLOCK_J, BLOCK_D)
    else:
        right = 0
    acc = tl.zeros([BLOCK_I * BLOCK_J, BLOCK_CZ], tl.float32)
    for c0 in range(0, CH, BLOCK_C):
        outer = _outer_tile(a_ptr, b_ptr, right, batch, i0, j0, c0, N, S, CH, st_b, st_n, st_c, st_s,
                            ONE_S_BLOCK, DOT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_C, BLOCK_S, BLOCK_D)
        w = _weight_tile(w_ptr, c0, CH, CZ, sw_e, sw_c, sw_d, BLOCK_C, BLOCK_D, BLOCK_CZ)
        acc = tl.dot(outer, tl.trans(w), acc, input_precision=DOT_PRECISION)

    ri, rj, r_ok = _pair_rows(i0, j0, N, BLOCK_I, BLOCK_J)
    inv_norm = tl.load(inv_norm_ptr + batch.to(tl.int64) * sn_b + ri * sn_i + rj * sn_j, mask=r_ok, other=0.0)
    bias = tl.load(bias_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    out = acc * inv_norm[:, None] + bias[None, :]
    flat = (batch.to(tl.int64) * N + ri) * N + rj
    tl.store(out_ptr + flat[:, None] * CZ + es[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def _outer_product_mean_left_grad_kernel(
    ab_ptr, inv_norm_ptr, w_ptr, dz_ptr, d_ab_ptr,
    N, S, CH, CZ,
    st_b, st_n, st_c, st_s, sn_b, sn_i, sn_j, sw_e, sw_c, sw_d, sz_b, sz_i, sz_j, sz_e,
    sd_b, sd_n, sd_c, sd_s,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """Gradient of one operand for one (i block, channel chunk, s block, side):
    ``dl[s, i, c] = sum_{j, d} dP[i, j, c, d] r[s, j, d]`` with ``dP = (dz / norm) W``.

    Side 0 makes da from (dz, b); side 1 makes db from the transposed problem (i <-> j in dz
    and the norm, a as the other operand, W's channel axes swapped). Both sides share one
    launch, so together they fill the GPU (one side alone leaves a partial last wave at
    N = 384). Each dP element is made once per s block and side.
    """
    side = tl.program_id(2) % 2
    num_s = tl.cdiv(S, BLOCK_S)
    batch = (tl.program_id(2) // 2) // num_s
    ss = ((tl.program_id(2) // 2) % num_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    i0 = tl.program_id(0) * BLOCK_I
    c0 = tl.program_id(1) * BLOCK_C
    s_ok = ss < S
    dtype = w_ptr.dtype.element_ty
    right_ptr = ab_ptr + (1 - side) * CH * st_c
    d_left_ptr = d_ab_ptr + side * CH * sd_c
    sn_row, sn_col = sn_i + side * (sn_j - sn_i), sn_j + side * (sn_i - sn_j)
    sz_row, sz_col = sz_i + side * (sz_j - sz_i), sz_j + side * (sz_i - sz_j)
    sw_left, sw_right = sw_c + side * (sw_d - sw_c), sw_d + side * (sw_c - sw_d)

    w = _weight_tile(w_ptr, c0, CH, CZ, sw_e, sw_left, sw_right, BLOCK_C, BLOCK_D, BLOCK_CZ)
    acc = tl.zeros([BLOCK_I * BLOCK_C, BLOCK_S], tl.float32)
    for j0 in range(0, N, BLOCK_J):
        g = _scaled_grad_tile(dz_ptr, inv_norm_ptr, batch, i0, j0, N, CZ, sn_b, sn_row, sn_col,
                              sz_b, sz_row, sz_col, sz_e, BLOCK_I, BLOCK_J, BLOCK_CZ)
        d_outer = tl.dot(g.to(dtype), w, input_precision=DOT_PRECISION).to(dtype)
        d_outer = _swap_middle_axes(d_outer, BLOCK_I, BLOCK_J, BLOCK_C, BLOCK_D)
        right = _channel_rows(right_ptr, batch, j0, 0, ss, s_ok, N, CH, st_b, st_n, st_c, st_s, BLOCK_J, BLOCK_D)
        acc = tl.dot(d_outer, right, acc, input_precision=DOT_PRECISION)

    rows = tl.arange(0, BLOCK_I * BLOCK_C)
    is_ = i0 + rows // BLOCK_C
    cs = c0 + rows % BLOCK_C
    offsets = (batch.to(tl.int64) * sd_b + is_[:, None].to(tl.int64) * sd_n + cs[:, None] * sd_c
               + ss[None, :] * sd_s)
    tl.store(d_left_ptr + offsets, acc.to(d_left_ptr.dtype.element_ty),
             mask=((is_ < N) & (cs < CH))[:, None] & s_ok[None, :])


@triton.jit
def _outer_product_mean_weight_grad_kernel(
    a_ptr, b_ptr, inv_norm_ptr, dz_ptr, dw_part_ptr, db_part_ptr,
    N, S, CH, CZ,
    st_b, st_n, st_c, st_s, sn_b, sn_i, sn_j, sz_b, sz_i, sz_j, sz_e,
    ONE_S_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_CZ: tl.constexpr,
):
    """This program's share of ``dW[e, c, d] = sum_ij g_ij[e] P_ij[c, d]`` for one channel chunk:
    j blocks program_id(0), + num_programs(0), ..., every i; one fp32 partial per program
    (summed on the host in a fixed order). The programs of the first channel chunk also sum
    ``dz`` over their pairs: the bias gradient's partials, with no pass of its own over dz."""
    c0 = tl.program_id(1) * BLOCK_C
    batch = tl.program_id(2)
    dtype = a_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_CZ, BLOCK_C * BLOCK_D], tl.float32)
    bias_acc = tl.zeros([BLOCK_CZ], tl.float32)
    for j0 in range(tl.program_id(0) * BLOCK_J, N, tl.num_programs(0) * BLOCK_J):
        if ONE_S_BLOCK:  # the b tile serves every i block: load it once
            ss = tl.arange(0, BLOCK_S)
            right = _channel_rows(b_ptr, batch, j0, 0, ss, ss < S, N, CH, st_b, st_n, st_c, st_s, BLOCK_J, BLOCK_D)
        else:
            right = 0
        for i0 in range(0, N, BLOCK_I):
            outer = _outer_tile(a_ptr, b_ptr, right, batch, i0, j0, c0, N, S, CH, st_b, st_n, st_c, st_s,
                                ONE_S_BLOCK, DOT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_C, BLOCK_S, BLOCK_D)
            dz, inv_norm = _grad_tile(dz_ptr, inv_norm_ptr, batch, i0, j0, N, CZ, sn_b, sn_i, sn_j,
                                      sz_b, sz_i, sz_j, sz_e, BLOCK_I, BLOCK_J, BLOCK_CZ)
            bias_acc += tl.sum(dz, axis=0)
            g = dz * inv_norm[:, None]
            acc = tl.dot(tl.trans(g.to(dtype)), outer, acc, input_precision=DOT_PRECISION)

    es = tl.arange(0, BLOCK_CZ)
    cols = tl.arange(0, BLOCK_C * BLOCK_D)
    cs = c0 + cols // BLOCK_D
    ds = cols % BLOCK_D
    part = (batch * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * CZ * CH * CH
    tl.store(dw_part_ptr + part + es[:, None] * CH * CH + (cs * CH + ds)[None, :], acc,
             mask=(es < CZ)[:, None] & ((cs < CH) & (ds < CH))[None, :])
    if tl.program_id(1) == 0:
        bias_part = (batch * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * CZ
        tl.store(db_part_ptr + bias_part + es, bias_acc, mask=es < CZ)


# --------------------------------------------------------------------------- launches


def _msa_operands(ab: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ab * mask`` ``[B, S, N, 2 c_h]`` -> ``[B, N, 2 c_h, S]`` in ``dtype``, in one pass:
    a residue's channels are rows and the MSA axis is contiguous, so both the ``[(i, c), s]``
    and ``[(j, d), s]`` tiles load coalesced. (A multiply, then a copy into this layout,
    made two passes over ab and, in the backward, two over its gradient.)"""
    B, S, N, C = ab.shape
    ab_t = torch.empty(B, N, C, S, device=ab.device, dtype=dtype)
    torch.mul(ab.permute(0, 2, 3, 1), mask.permute(0, 2, 1)[:, :, None, :], out=ab_t)
    return ab_t


def _masked_rows_grad(d_ab_t: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``ab`` ``[B, S, N, 2 c_h]`` (contiguous, as the LayerNorm+Linear
    backward reads it) from that of ``_msa_operands``' output, in one pass."""
    B, N, C, S = d_ab_t.shape
    d_ab = torch.empty(B, S, N, C, device=d_ab_t.device, dtype=dtype)
    torch.mul(d_ab_t.permute(0, 3, 1, 2), mask[..., None], out=d_ab)
    return d_ab


def _w_strides(weight: torch.Tensor, CH: int) -> tuple[int, int, int]:
    """Strides (e, c, d) of out_weight ``[c_z, c_h * c_h]`` seen as ``[c_z, c_h, c_h]``."""
    s_e, s_cd = weight.stride()
    return s_e, CH * s_cd, s_cd


def default_configs(CH: int, CZ: int, S: int) -> dict[str, dict]:
    """Tiles and launch settings of the three kernels, chosen for c_h = 32, c_z = 128 on
    H100/H200 (sm_90 builds of these settings use wgmma for every dot) and scaled for other
    widths; every dot dimension is >= 16. With Triton 3.6 they do spill registers, 28 B to
    1.3 KB a thread (``benchmarks/register_report.py``); the H100's tuned choices spill more
    and still measured faster.

    forward: a ``[BLOCK_I * BLOCK_C, BLOCK_J * c_h]`` outer-product tile (64 x 128) moved to
    ``[(i, j), (c, d)]`` (128 x 64) and contracted with W into a 128 x c_z accumulator.
    weight_grad: the same kind of tile (64 x 128 -> 64 x 128) contracted with ``g^T`` into a
    c_z x 128 accumulator. left_grad: a ``[BLOCK_I * BLOCK_J, BLOCK_C * c_h]`` dP tile
    (64 x 256) moved to ``[(i, c), (j, d)]`` and contracted with the other operand's
    ``[(j, d), s]`` tile into 64 x BLOCK_S.
    """
    block_d = block_size(CH, 1 << 30)
    block_cz = block_size(CZ, 1 << 30)
    channels = next_power_of_2(CH)
    pair_j = max(1, 128 // block_d)
    forward_c = min(channels, max(1, 64 // block_d))
    forward_i = max(16 // forward_c, 16 // pair_j, min(32, 16384 // (pair_j * block_cz)))
    weight_c = min(channels, max(1, 128 // block_d))
    left_c = min(channels, max(1, 256 // block_d))
    settings = {"num_warps": 8, "num_stages": 2}
    return {
        "forward": {"BLOCK_I": forward_i, "BLOCK_J": pair_j, "BLOCK_C": forward_c, "BLOCK_S": block_size(S, 128),
                    **settings},
        # Two stages with a 128-row MSA tile spill a little on sm_90; one does not.
        "weight_grad": {"BLOCK_I": max(16, 16 // weight_c), "BLOCK_J": pair_j, "BLOCK_C": weight_c,
                        "BLOCK_S": block_size(S, 128), **settings} | ({"num_stages": 1} if S > 64 else {}),
        "left_grad": {"BLOCK_I": max(8, 16 // left_c), "BLOCK_J": max(1, 256 // block_d), "BLOCK_C": left_c,
                      "BLOCK_S": block_size(S, 64), **settings},
    }


def _candidates(default: dict, CH: int, CZ: int, S: int | None = None) -> list[dict]:
    """A few variations of ``default`` for the tuner (c_h <= 32, c_z <= 128 only). ``S``: the
    MSA depth, for the left-gradient kernel, whose s blocks each make the dP tiles again:
    one s block of up to 128 rows makes them once (more shared memory, fewer stages)."""
    if block_size(CH, 1 << 30) > 32 or block_size(CZ, 1 << 30) > 128:
        return []
    variants = [default]
    half_c = {"BLOCK_C": max(1, default["BLOCK_C"] // 2), "BLOCK_I": 2 * default["BLOCK_I"]}
    changes = [{"num_warps": 4}, {"num_stages": 1}, {"num_stages": 2}, {"num_stages": 3}, half_c]
    # Wider and narrower j blocks (every dot dimension stays >= 16: BLOCK_I * BLOCK_J >= 16).
    for base in ({}, half_c):
        for block_j in (2 * default["BLOCK_J"], default["BLOCK_J"] // 2):
            if block_j >= 1 and block_j * (base or default)["BLOCK_I"] >= 16:
                changes.append(base | {"BLOCK_J": block_j})
    # Four warps with more stages: the changes above move one setting at a time from an 8-warp
    # default, so 4 warps were only ever timed at the default's stages. Nsight Compute at
    # N=384 (session 23): both backward kernels stall on global loads (long scoreboard ~2.8
    # cycles an instruction) at 10-12% occupancy.
    changes += [{"num_warps": 4, "num_stages": ns} for ns in (2, 3)]
    changes += [half_c | {"num_warps": 4, "num_stages": ns} for ns in (1, 2, 3)]
    # ... and narrower channel chunks at 4 warps (the weight gradient's accumulator is
    # c_z x BLOCK_C c_h: half the chunk was its best choice on the H200).
    changes += [half_c | {"num_warps": 4, "BLOCK_J": bj} for bj in (2 * default["BLOCK_J"], default["BLOCK_J"] // 2)
                if bj >= 1 and bj * half_c["BLOCK_I"] >= 16]
    if default["BLOCK_C"] >= 4:
        changes.append({"BLOCK_C": default["BLOCK_C"] // 4, "BLOCK_I": 4 * default["BLOCK_I"], "num_warps": 4})
    if S is not None and block_size(S, 128) > default["BLOCK_S"]:
        whole = {"BLOCK_S": block_size(S, 128)}
        changes += [whole | {"num_stages": ns} for ns in (1, 2)]
        changes += [whole | {"BLOCK_C": half_c["BLOCK_C"], "num_stages": ns} for ns in (1, 2)]
        changes += [whole | half_c | {"num_stages": ns} for ns in (1, 2)]
        changes += [whole | half_c | {"num_warps": 4, "num_stages": ns} for ns in (1, 2)]
        changes += [whole | half_c | {"BLOCK_J": default["BLOCK_J"] // 2, "num_stages": ns} for ns in (1, 2)
                    if default["BLOCK_J"] // 2 * half_c["BLOCK_I"] >= 16]
        # The same half-height dP tiles at 4 warps: the left gradient is latency-bound at one
        # 8-warp program an SM (Nsight Compute, N=384, session 23).
        changes += [whole | half_c | {"BLOCK_J": default["BLOCK_J"] // 2, "num_warps": 4, "num_stages": ns}
                    for ns in (1, 2) if default["BLOCK_J"] // 2 * half_c["BLOCK_I"] >= 16]
    for change in changes:
        if default | change not in variants:
            variants.append(default | change)
    return variants


def _launch_settings(cfg: dict) -> dict:
    return {name: cfg[name] for name in ("BLOCK_I", "BLOCK_J", "BLOCK_C", "BLOCK_S", "num_warps", "num_stages")}


# Every dot dimension still >= 16 at any c_h; a few tens of KB of shared memory.
SMALLEST_CONFIG = {"BLOCK_I": 4, "BLOCK_J": 4, "BLOCK_C": 4, "BLOCK_S": 16, "num_warps": 4, "num_stages": 1}
_fitted: dict[tuple, dict] = {}  # (kernel, shape key, asked config) -> the config that fit


def _fitting(key: tuple, launch: Callable[[dict], None]) -> Callable[[dict], None]:
    """``launch`` retried with one pipeline stage, then with the smallest tiles, where a
    configuration does not fit the GPU's shared memory (the defaults are sized for the
    228 KB of an H100 or H200; a 64 KB AMD LDS takes the smallest). The config that fit is
    remembered, so a call pays for the failed attempts once per process."""
    def run(cfg: dict) -> None:
        asked = (*key, tuple(sorted(cfg.items())))
        attempts = (cfg, cfg | {"num_stages": 1}, SMALLEST_CONFIG)
        for attempt in attempts[attempts.index(_fitted.get(asked, cfg)):]:
            try:
                launch(attempt)
            except Exception as error:
                if attempt is SMALLEST_CONFIG or "out of resource" not in str(error).lower():
                    raise
                continue
            _fitted[asked] = attempt
            return
    return run


def _tuning_key(CH: int, CZ: int, S: int, dtype: torch.dtype) -> tuple:
    return (CH, CZ, block_size(S, 128), str(dtype))


def _opm_forward(ab_t, inv_norm, weight, bias):
    B, N, two_ch, S = ab_t.shape
    CH = two_ch // 2
    CZ = weight.shape[0]
    a_t, b_t = ab_t[:, :, :CH], ab_t[:, :, CH:]
    out = torch.empty(B, N, N, CZ, device=ab_t.device, dtype=weight.dtype)
    block_d, block_cz = block_size(CH, 1 << 30), block_size(CZ, 1 << 30)

    def launch(cfg):
        grid = (cdiv(N, cfg["BLOCK_I"]) * cdiv(N, cfg["BLOCK_J"]), B)
        launch_kernel(_outer_product_mean_forward_kernel, grid,
            a_t, b_t, inv_norm, weight, bias, out, N, S, CH, CZ,
            *a_t.stride(), *inv_norm.stride(), *_w_strides(weight, CH),
            ONE_S_BLOCK=S <= cfg["BLOCK_S"], DOT_PRECISION=dot_precision(weight.dtype),
            BLOCK_D=block_d, BLOCK_CZ=block_cz, **_launch_settings(cfg),
        )

    default = default_configs(CH, CZ, S)["forward"]
    fit_key = (CH, CZ, S, str(weight.dtype), str(ab_t.device))
    run_tuned("outer_product_mean_forward", _tuning_key(CH, CZ, S, weight.dtype), ab_t.device,
              _candidates(default, CH, CZ), default, _fitting(("forward", *fit_key), launch))
    return out


def _opm_backward(dz, ab_t, inv_norm, weight):
    B, N, two_ch, S = ab_t.shape
    CH = two_ch // 2
    CZ = weight.shape[0]
    a_t, b_t = ab_t[:, :, :CH], ab_t[:, :, CH:]
    block_d, block_cz = block_size(CH, 1 << 30), block_size(CZ, 1 << 30)
    precision = dot_precision(weight.dtype)
    configs = default_configs(CH, CZ, S)
    key = _tuning_key(CH, CZ, S, weight.dtype)
    fit_key = (CH, CZ, S, str(weight.dtype), str(ab_t.device))
    d_ab_t = torch.empty_like(ab_t)

    def left_grads(cfg):
        # Axis 2: (batch, s block) x side; side 0 makes da, side 1 db (the transposed problem).
        grid = (cdiv(N, cfg["BLOCK_I"]), cdiv(CH, cfg["BLOCK_C"]), B * cdiv(S, cfg["BLOCK_S"]) * 2)
        launch_kernel(_outer_product_mean_left_grad_kernel, grid,
            ab_t, inv_norm, weight, dz, d_ab_t, N, S, CH, CZ,
            *ab_t.stride(), *inv_norm.stride(), *_w_strides(weight, CH), *dz.stride(), *d_ab_t.stride(),
            DOT_PRECISION=precision, BLOCK_D=block_d, BLOCK_CZ=block_cz, **_launch_settings(cfg),
        )

    run_tuned("outer_product_mean_left_grad", key, ab_t.device, _candidates(configs["left_grad"], CH, CZ, S),
              configs["left_grad"], _fitting(("left_grad", *fit_key), left_grads))

    dw_parts = db_parts = None

    def weight_grad(cfg):
        nonlocal dw_parts, db_parts
        num_j = cdiv(N, cfg["BLOCK_J"])
        groups = cdiv(num_j, cdiv(num_j, MAX_WEIGHT_GRAD_PARTIALS))  # equal j blocks per program
        dw_parts = torch.empty(B * groups, CZ, CH * CH, device=ab_t.device, dtype=torch.float32)
        db_parts = torch.empty(B * groups, CZ, device=ab_t.device, dtype=torch.float32)
        grid = (groups, cdiv(CH, cfg["BLOCK_C"]), B)
        launch_kernel(_outer_product_mean_weight_grad_kernel, grid,
            a_t, b_t, inv_norm, dz, dw_parts, db_parts, N, S, CH, CZ,
            *a_t.stride(), *inv_norm.stride(), *dz.stride(),
            ONE_S_BLOCK=S <= cfg["BLOCK_S"], DOT_PRECISION=precision,
            BLOCK_D=block_d, BLOCK_CZ=block_cz, **_launch_settings(cfg),
        )

    run_tuned("outer_product_mean_weight_grad", key, ab_t.device, _candidates(configs["weight_grad"], CH, CZ),
              configs["weight_grad"], _fitting(("weight_grad", *fit_key), weight_grad))
    return d_ab_t, dw_parts.sum(0), db_parts.sum(0)


# --------------------------------------------------------------------------- autograd


class OuterProductMeanFunction(torch.autograd.Function):
    """The contraction part: projected ``ab`` ``[B, S, N, 2 c_h]`` and its bool row mask
    ``[B, S, N]`` -> ``[B, N, N, c_z]`` (masked rows contribute nothing)."""

    @staticmethod
    def forward(ctx, ab, mask, inv_norm, out_weight, out_bias, compute_dtype):
        ab_t = _msa_operands(ab, mask, compute_dtype)
        weight = out_weight.to(compute_dtype)
        out = _opm_forward(ab_t, inv_norm, weight, out_bias)
        ctx.save_for_backward(ab_t, mask, inv_norm, weight)
        ctx.ab_dtype = ab.dtype
        return out

    @staticmethod
    def backward(ctx, dz):
        ab_t, mask, inv_norm, weight = ctx.saved_tensors
        d_ab_t, dw, d_bias = _opm_backward(dz, ab_t, inv_norm, weight)
        return _masked_rows_grad(d_ab_t, mask, ctx.ab_dtype), None, None, dw, d_bias, None


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
    ab = layernorm_linear(m, p["norm_weight"], p["norm_bias"], p["proj_weight"], backend=backend)
    with torch.autocast(m.device.type, enabled=False):  # counts up to S must stay exact
        valid = mask.to(torch.float32)
        inv_norm = 1.0 / (NORM_EPS + torch.einsum("bsi,bsj->bij", valid, valid))
    return _outer_product_triton(ab, mask, inv_norm, p["out_weight"], p["out_bias"], autocast_dtype(m))


@torch.compiler.disable  # a compiled caller breaks its graph here instead of tracing the launcher
def _outer_product_triton(ab, mask, inv_norm, out_weight, out_bias, compute_dtype):
    return OuterProductMeanFunction.apply(ab, mask, inv_norm, out_weight, out_bias, compute_dtype)


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
