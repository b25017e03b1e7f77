"""Triangle multiplicative update of AF3 (Alg. 12 outgoing, Alg. 13 incoming) in one op.

Three passes over the pair tensor:
1. one kernel: input LayerNorm, the gated projections and the pair mask, writing ``a`` and
   ``b`` as ``[B, c_h, N, N]`` so that the triangular product is one batched matmul;
2. the product ``x = a b^T`` (outgoing) or ``a^T b`` (incoming) in cuBLAS, the right tool;
3. one kernel: output LayerNorm, output projection and the output gate, which recomputes
   LN(z) from two saved fp32 numbers per pair instead of storing the gate.
The backward mirrors them. Its row-parallel kernels also write the operands of the weight
gradients (LN(z), LN(x) and the gradients of the projections and gates) for a bounded chunk
of pair rows at a time; cuBLAS multiplies them and the chunks' products add in fp32 in a
fixed order (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megafold.kernels._common import cdiv, launch_kernel, multiprocessors, resolve_backend, run_tuned
from megafold.kernels._math import sigmoid
from megafold.kernels.layernorm_linear import (
    WEIGHT_GRAD_CHUNK_BYTES,
    _chunk_rows,
    _layernorm_backward_rows,
    _layernorm_chunk,
    _layernorm_tile,
    _row_offsets,
    add_weight_grad,
    autocast_dtype,
    block_size,
    dot_precision,
    expect_shape,
    row_chunks,
    wave_rows,
)

# The input backward's gradients of the projection and gate pre-activations ([rows, 4 c_h], 1 KB
# a row: with LN(z), which the input forward saves, the operands of the input weights'
# gradients) in chunks of 2.5 times the pair tensor's bytes in the compute dtype, clamped to half
# and one and a half times the common budget (128-384 MB): 2 chunks at N = 384 and 768. Each
# chunk costs ~0.03-0.04 ms at N = 768 (its kernel's last wave, more cuBLAS products): 2 chunks
# instead of 3 took 3.48 instead of 3.52 ms (benchmarks/NOTES.md, session 18). At N = 384 one
# chunk would raise the op's peak above cuEquivariance's (session 16).
INPUT_CHUNK_BUDGET_SCALE = (0.5, 1.5)
INPUT_CHUNK_PAIR_FACTOR = 2.5


def _input_chunk_scale(pair_bytes: int) -> float:
    """The input backward's chunk budget, as a fraction of the common one, for a pair tensor
    of ``pair_bytes`` in the compute dtype (bf16 under autocast, whatever z's own dtype)."""
    low, high = INPUT_CHUNK_BUDGET_SCALE
    return min(high, max(low, INPUT_CHUNK_PAIR_FACTOR * pair_bytes / WEIGHT_GRAD_CHUNK_BYTES))


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
# What the kernels read, in the order the autograd function saves it: the projection and gate
# weights as one interleaved matrix (``interleaved_weights``) in place of the two.
KERNEL_PARAM_NAMES = tuple(n for n in PARAM_NAMES if n not in ("ab_proj_weight", "ab_gate_weight")) + ("ab_interleaved",)


def interleaved_weights(w_p: torch.Tensor, w_g: torch.Tensor) -> torch.Tensor:
    """ab_proj_weight and ab_gate_weight ``[2 c_h, c_z]`` as one contiguous ``[4 c_h, c_z]``
    matrix whose row ``2 (side c_h + c) + t`` is channel c's projection (t = 0) or gate (t = 1)
    row of side a (0) or b (1): one product gives both pre-activations of a channel block."""
    two_ch, cz = w_p.shape
    return torch.stack((w_p.reshape(2, two_ch // 2, cz), w_g.reshape(2, two_ch // 2, cz)), dim=2).view(2 * two_ch, cz)


def split_interleaved(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ab_proj_weight and ab_gate_weight from that of ``interleaved_weights``."""
    four_ch, cz = grad.shape
    pairs = grad.view(2, four_ch // 4, 2, cz)
    return pairs[:, :, 0].reshape(four_ch // 2, cz), pairs[:, :, 1].reshape(four_ch // 2, cz)


@triton.jit
def _gated_projection(zn, w_pg_ptr, side, c0, CH, CZ: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_CZ: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Projection and gate pre-activations (fp32, ``[BLOCK_M, BLOCK_C]`` each) of channels
    ``c0 + [0, BLOCK_C)`` of one side from one product with their interleaved weight rows
    (``interleaved_weights``: a channel's projection and gate side by side, so the two come
    out of the accumulator as even and odd columns), the ``[2 BLOCK_C, c_z]`` tile and its
    rows' validity."""
    rs = tl.arange(0, 2 * BLOCK_C)
    ks = tl.arange(0, BLOCK_CZ)
    r_ok = (2 * c0 + rs) < 2 * CH
    w = tl.load(w_pg_ptr + (side * 2 * CH + 2 * c0 + rs)[:, None] * CZ + ks[None, :],
                mask=r_ok[:, None] & (ks < CZ)[None, :], other=0.0)
    pg = tl.dot(zn, tl.trans(w), input_precision=DOT_PRECISION)
    proj, gate = tl.split(tl.reshape(pg, (BLOCK_M, BLOCK_C, 2)))
    return proj, gate, w, r_ok


@triton.jit
def _square_tile(w_ptr, s0, s1, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rs = tl.arange(0, BLOCK_R)
    cs = tl.arange(0, BLOCK_C)
    return tl.load(w_ptr + rs[:, None] * s0 + cs[None, :] * s1,
                   mask=(rs < R)[:, None] & (cs < C)[None, :], other=0.0)


@triton.jit
def _triangle_input_forward_kernel(
    z_ptr, mask_ptr, ln_w_ptr, ln_b_ptr, w_pg_ptr, ab_ptr, mean_ptr, rstd_ptr, zn_ptr,
    N, CH, side_stride, sz_b, sz_i, sz_j, sz_c, sm_b, sm_i, sm_j, eps,
    CZ: tl.constexpr, Z_MERGED: tl.constexpr, M_MERGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STORE_ZN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """a, b = sigmoid(LN(z) W_g^T) * (LN(z) W_p^T) * mask, stored as ``[2, B, c_h, N, N]``; with
    STORE_ZN also LN(z) ``[B * N * N, c_z]``, for the backward's weight gradients."""
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    NN = N * N
    ij = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = ij < NN
    z_rows = _row_offsets(batch, ij, N, sz_b, sz_i, sz_j, Z_MERGED)
    zn, mean, rstd = _layernorm_tile(z_ptr, z_rows, row_ok, sz_c, ln_w_ptr, ln_b_ptr, eps, CZ, BLOCK_CZ)
    zn = zn.to(w_pg_ptr.dtype.element_ty)
    flat = batch.to(tl.int64) * NN + ij
    if STORE_ZN:  # LN(z) ``[B * N * N, c_z]``, the operand of the backward's weight gradients
        ks = tl.arange(0, BLOCK_CZ)
        tl.store(zn_ptr + flat[:, None] * CZ + ks[None, :], zn, mask=row_ok[:, None] & (ks < CZ)[None, :])
    valid = tl.load(mask_ptr + _row_offsets(batch, ij, N, sm_b, sm_i, sm_j, M_MERGED), mask=row_ok, other=0)
    valid = valid.to(tl.float32)

    ab_batch = ab_ptr + batch.to(tl.int64) * CH * NN
    for c0 in range(0, CH, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < CH
        for side in tl.static_range(2):
            proj, gate, _, _ = _gated_projection(zn, w_pg_ptr, side, c0, CH, CZ, BLOCK_M, BLOCK_CZ, BLOCK_C,
                                                 DOT_PRECISION)
            value = sigmoid(gate) * proj * valid[:, None]
            # Channel-major store: each channel's N x N plane is one matrix of the product.
            tl.store(ab_batch + side * side_stride + cs[None, :].to(tl.int64) * NN + ij[:, None],
                     value.to(ab_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
    tl.store(mean_ptr + flat, mean, mask=row_ok)
    tl.store(rstd_ptr + flat, rstd, mask=row_ok)


@triton.jit
def _triangle_output_forward_kernel(
    x_ptr, z_ptr, z_mean_ptr, z_rstd_ptr, ln_in_w_ptr, ln_in_b_ptr, w_og_ptr,
    ln_out_w_ptr, ln_out_b_ptr, w_o_ptr, out_ptr, x_mean_ptr, x_rstd_ptr,
    N, sz_b, sz_i, sz_j, sz_c, sw_og0, sw_og1, sw_o0, sw_o1, eps,
    CZ: tl.constexpr, CH: tl.constexpr, Z_MERGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_CH: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out = sigmoid(LN(z) W_og^T) * (LN(x) W_o^T); x is ``[B, c_h, N, N]``. Program (p, b)
    takes row blocks p, p + P, ... of batch b (P programs a batch): one block each where P is
    the block count; fewer, persistent programs (PERSISTENT) load the two weight tiles once and
    let the loop's loads of the next block overlap this block's work (NUM_STAGES)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    NN = N * N
    dtype = w_o_ptr.dtype.element_ty
    w_o = _square_tile(w_o_ptr, sw_o0, sw_o1, CZ, CH, BLOCK_CZ, BLOCK_CH)
    w_og = _square_tile(w_og_ptr, sw_og0, sw_og1, CZ, CZ, BLOCK_CZ, BLOCK_CZ)
    ks = tl.arange(0, BLOCK_CZ)
    for block in tl.range(pid, tl.cdiv(NN, BLOCK_M), tl.num_programs(0), num_stages=NUM_STAGES):
        ij = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = ij < NN
        flat = batch.to(tl.int64) * NN + ij

        x_rows = batch.to(tl.int64) * CH * NN + ij
        xn, x_mean, x_rstd = _layernorm_tile(x_ptr, x_rows, row_ok, NN, ln_out_w_ptr, ln_out_b_ptr, eps, CH,
                                             BLOCK_CH)
        update = tl.dot(xn.to(dtype), tl.trans(w_o), input_precision=DOT_PRECISION)

        z_rows = _row_offsets(batch, ij, N, sz_b, sz_i, sz_j, Z_MERGED)
        z_mean = tl.load(z_mean_ptr + flat, mask=row_ok, other=0.0)
        z_rstd = tl.load(z_rstd_ptr + flat, mask=row_ok, other=0.0)
        zn = _layernorm_chunk(z_ptr, z_rows, row_ok, sz_c, ln_in_w_ptr, ln_in_b_ptr, z_mean, z_rstd, 0, CZ,
                              BLOCK_CZ)
        gate = sigmoid(tl.dot(zn.to(dtype), tl.trans(w_og), input_precision=DOT_PRECISION))

        tl.store(out_ptr + flat[:, None] * CZ + ks[None, :], (gate * update).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (ks < CZ)[None, :])
        tl.store(x_mean_ptr + flat, x_mean, mask=row_ok)
        tl.store(x_rstd_ptr + flat, x_rstd, mask=row_ok)


@triton.jit
def _triangle_output_backward_kernel(
    x_ptr, z_ptr, dout_ptr, z_mean_ptr, z_rstd_ptr, x_mean_ptr, x_rstd_ptr,
    ln_in_w_ptr, ln_in_b_ptr, w_og_ptr, ln_out_w_ptr, ln_out_b_ptr, w_o_ptr,
    dx_ptr, d_gate_ptr, d_update_ptr, xn_ptr, dln_w_part_ptr, dln_b_part_ptr,
    row_start, row_end, N, sz_b, sz_i, sz_j, sz_c, sd_b, sd_i, sd_j, sd_c, sw_og0, sw_og1, sw_o0, sw_o1,
    CZ: tl.constexpr, CH: tl.constexpr, Z_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """One row block of a chunk of pairs: dx (``[B, c_h, N, N]``), the gradient of the gate
    pre-activation (``[B * N * N, c_z]``, for the input pass), partials of the output
    LayerNorm's parameter gradients, and for the chunk the operands of the output
    projection's weight gradient: the update's gradient ``[rows, c_z]`` and LN(x) ``[rows, c_h]``."""
    NN = N * N
    local, flat, row_ok, batch, ij = _chunk_rows(row_start, row_end, NN, BLOCK_M)
    dtype = w_o_ptr.dtype.element_ty
    hs = tl.arange(0, BLOCK_CH)
    h_ok = hs < CH
    ks = tl.arange(0, BLOCK_CZ)
    k_ok = ks < CZ

    x_rows = batch.to(tl.int64) * CH * NN + ij
    x_ptrs = x_rows[:, None] + hs[None, :].to(tl.int64) * NN
    x_ok = row_ok[:, None] & h_ok[None, :]
    x = tl.load(x_ptr + x_ptrs, mask=x_ok, other=0.0).to(tl.float32)
    x_mean = tl.load(x_mean_ptr + flat, mask=row_ok, other=0.0)
    x_rstd = tl.load(x_rstd_ptr + flat, mask=row_ok, other=0.0)
    xhat = tl.where(x_ok, (x - x_mean[:, None]) * x_rstd[:, None], 0.0)
    gamma_out = tl.load(ln_out_w_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    beta_out = tl.load(ln_out_b_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    xn = tl.where(x_ok, xhat * gamma_out[None, :] + beta_out[None, :], 0.0).to(dtype)
    tl.store(xn_ptr + local[:, None] * CH + hs[None, :], xn, mask=x_ok)
    w_o = _square_tile(w_o_ptr, sw_o0, sw_o1, CZ, CH, BLOCK_CZ, BLOCK_CH)
    update = tl.dot(xn, tl.trans(w_o), input_precision=DOT_PRECISION)

    z_rows = _row_offsets(batch, ij, N, sz_b, sz_i, sz_j, Z_MERGED)
    z_mean = tl.load(z_mean_ptr + flat, mask=row_ok, other=0.0)
    z_rstd = tl.load(z_rstd_ptr + flat, mask=row_ok, other=0.0)
    zn = _layernorm_chunk(z_ptr, z_rows, row_ok, sz_c, ln_in_w_ptr, ln_in_b_ptr, z_mean, z_rstd, 0, CZ, BLOCK_CZ)
    w_og = _square_tile(w_og_ptr, sw_og0, sw_og1, CZ, CZ, BLOCK_CZ, BLOCK_CZ)
    gate = sigmoid(tl.dot(zn.to(dtype), tl.trans(w_og), input_precision=DOT_PRECISION))

    d_rows = _row_offsets(batch, ij, N, sd_b, sd_i, sd_j, D_MERGED)
    ok = row_ok[:, None] & k_ok[None, :]
    dout = tl.load(dout_ptr + d_rows[:, None] + ks[None, :].to(tl.int64) * sd_c, mask=ok, other=0.0).to(tl.float32)
    d_update = (dout * gate).to(dtype)
    d_gate = (dout * update * gate * (1.0 - gate)).to(dtype)
    tl.store(d_update_ptr + local[:, None] * CZ + ks[None, :], d_update, mask=ok)
    tl.store(d_gate_ptr + flat[:, None] * CZ + ks[None, :], d_gate, mask=ok)

    dxn = tl.dot(d_update, w_o, input_precision=DOT_PRECISION)
    dx = _layernorm_backward_rows(dxn, xhat, x_rstd, gamma_out, CH)
    tl.store(dx_ptr + x_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=x_ok)
    # Chunks start at multiples of BLOCK_M, so this block's partials have one global index.
    part = row_start // BLOCK_M + tl.program_id(0)
    tl.store(dln_w_part_ptr + part * CH + hs, tl.sum(dxn * xhat, axis=0), mask=h_ok)
    tl.store(dln_b_part_ptr + part * CH + hs, tl.sum(dxn, axis=0), mask=h_ok)


@triton.jit
def _triangle_output_backward_persistent_kernel(
    x_ptr, z_ptr, dout_ptr, z_mean_ptr, z_rstd_ptr, x_mean_ptr, x_rstd_ptr,
    ln_in_w_ptr, ln_in_b_ptr, w_og_ptr, ln_out_w_ptr, ln_out_b_ptr, w_o_ptr,
    dx_ptr, d_gate_ptr, dw_o_part_ptr, dln_w_part_ptr, dln_b_part_ptr,
    part_rows, M, N, sz_b, sz_i, sz_j, sz_c, sd_b, sd_i, sd_j, sd_c, sw_og0, sw_og1, sw_o0, sw_o1,
    CZ: tl.constexpr, CH: tl.constexpr, Z_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """The output backward over all ``M = B * N * N`` pairs, this program taking row blocks
    pid, pid + P, ... (P programs): per block what the chunked kernel computes, except that
    out_proj_weight's gradient ``d(update)^T LN(x)`` accumulates in fp32 registers over the
    program's blocks, stored as one partial per program and summed in a fixed order (the
    output LayerNorm's parameter gradients too). LN(x) and d(update) are never written to
    memory and read back (1 KB a pair at c_z = c_h = 128).
    The row work repeats the chunked kernel's on purpose: one helper shared by both kept LN(x)
    and d(update) live through the chunked kernel's row work and slowed it by 8% at N = 768
    (benchmarks/NOTES.md, session 15)."""
    pid = tl.program_id(0)
    NN = N * N
    dtype = w_o_ptr.dtype.element_ty
    hs = tl.arange(0, BLOCK_CH)
    h_ok = hs < CH
    ks = tl.arange(0, BLOCK_CZ)
    k_ok = ks < CZ
    gamma_out = tl.load(ln_out_w_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    beta_out = tl.load(ln_out_b_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
    w_o = _square_tile(w_o_ptr, sw_o0, sw_o1, CZ, CH, BLOCK_CZ, BLOCK_CH)
    w_og = _square_tile(w_og_ptr, sw_og0, sw_og1, CZ, CZ, BLOCK_CZ, BLOCK_CZ)
    dw_o = tl.zeros([BLOCK_CZ, BLOCK_CH], tl.float32)
    dln_w = tl.zeros([BLOCK_CH], tl.float32)
    dln_b = tl.zeros([BLOCK_CH], tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        flat = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = flat < M
        batch, ij = flat // NN, flat % NN

        x_ptrs = (batch * CH * NN + ij)[:, None] + hs[None, :].to(tl.int64) * NN
        x_ok = row_ok[:, None] & h_ok[None, :]
        x = tl.load(x_ptr + x_ptrs, mask=x_ok, other=0.0).to(tl.float32)
        x_mean = tl.load(x_mean_ptr + flat, mask=row_ok, other=0.0)
        x_rstd = tl.load(x_rstd_ptr + flat, mask=row_ok, other=0.0)
        xhat = tl.where(x_ok, (x - x_mean[:, None]) * x_rstd[:, None], 0.0)
        xn = tl.where(x_ok, xhat * gamma_out[None, :] + beta_out[None, :], 0.0).to(dtype)
        update = tl.dot(xn, tl.trans(w_o), input_precision=DOT_PRECISION)

        z_rows = _row_offsets(batch, ij, N, sz_b, sz_i, sz_j, Z_MERGED)
        z_mean = tl.load(z_mean_ptr + flat, mask=row_ok, other=0.0)
        z_rstd = tl.load(z_rstd_ptr + flat, mask=row_ok, other=0.0)
        zn = _layernorm_chunk(z_ptr, z_rows, row_ok, sz_c, ln_in_w_ptr, ln_in_b_ptr, z_mean, z_rstd, 0, CZ, BLOCK_CZ)
        gate = sigmoid(tl.dot(zn.to(dtype), tl.trans(w_og), input_precision=DOT_PRECISION))

        d_rows = _row_offsets(batch, ij, N, sd_b, sd_i, sd_j, D_MERGED)
        ok = row_ok[:, None] & k_ok[None, :]
        dout = tl.load(dout_ptr + d_rows[:, None] + ks[None, :].to(tl.int64) * sd_c, mask=ok, other=0.0)
        dout = dout.to(tl.float32)
        d_update = (dout * gate).to(dtype)
        d_gate = (dout * update * gate * (1.0 - gate)).to(dtype)
        tl.store(d_gate_ptr + flat[:, None] * CZ + ks[None, :], d_gate, mask=ok)

        dxn = tl.dot(d_update, w_o, input_precision=DOT_PRECISION)
        dx = _layernorm_backward_rows(dxn, xhat, x_rstd, gamma_out, CH)
        tl.store(dx_ptr + x_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=x_ok)
        dln_w += tl.sum(dxn * xhat, axis=0)
        dln_b += tl.sum(dxn, axis=0)
        dw_o = tl.dot(tl.trans(d_update), xn, dw_o, input_precision=DOT_PRECISION)
    # One partial buffer [P, part_rows = c_z + 2, c_h] (one reduction): dW_o's rows, then the
    # output LayerNorm's weight and bias gradients (dln_w_part_ptr, dln_b_part_ptr: its rows c_z, c_z + 1).
    part = pid.to(tl.int64)
    tl.store(dln_w_part_ptr + part * part_rows * CH + hs, dln_w, mask=h_ok)
    tl.store(dln_b_part_ptr + part * part_rows * CH + hs, dln_b, mask=h_ok)
    tl.store(dw_o_part_ptr + (part * part_rows + ks[:, None]) * CH + hs[None, :], dw_o,
             mask=k_ok[:, None] & h_ok[None, :])


@triton.jit
def _gated_projection_backward(zn, valid, dab_ptr, ab_rows, row_ok, side, c0, side_stride, NN, w_pg_ptr, CH,
                               CZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr,
                               BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gradients of the projection and gate pre-activations of one side and channel block,
    interleaved as the weight rows are (``[BLOCK_M, 2 BLOCK_C]``, fp32), the weight tile and
    its rows' validity; ``ab_rows``: each row's offset ``batch * c_h * N * N + ij`` in the
    ``[B, c_h, N, N]`` planes."""
    proj, gate, w, r_ok = _gated_projection(zn, w_pg_ptr, side, c0, CH, CZ, BLOCK_M, BLOCK_CZ, BLOCK_C,
                                            DOT_PRECISION)
    cs = c0 + tl.arange(0, BLOCK_C)
    d_ab = tl.load(dab_ptr + side * side_stride + cs[None, :].to(tl.int64) * NN + ab_rows[:, None],
                   mask=row_ok[:, None] & (cs < CH)[None, :], other=0.0).to(tl.float32)
    d_ab = d_ab * valid[:, None]
    sig = sigmoid(gate)
    d_proj = d_ab * sig
    d_pg = tl.reshape(tl.join(d_proj, d_proj * proj * (1.0 - sig)), (BLOCK_M, 2 * BLOCK_C))
    return d_pg, w, r_ok


@triton.jit
def _triangle_input_backward_kernel(
    z_ptr, mask_ptr, z_mean_ptr, z_rstd_ptr, ln_w_ptr, ln_b_ptr, w_pg_ptr, w_og_ptr,
    dab_ptr, d_gate_ptr, dz_ptr, d_pg_ptr, dln_w_part_ptr, dln_b_part_ptr,
    row_start, row_end, N, CH, side_stride,
    sz_b, sz_i, sz_j, sz_c, sm_b, sm_i, sm_j, sw_og0, sw_og1,
    CZ: tl.constexpr, Z_MERGED: tl.constexpr, M_MERGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CZ: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row block of a chunk of pairs: dz through the input LayerNorm from the a, b and
    gate paths at once, partials of the LayerNorm's parameter gradients, and for the chunk
    the gradients of the projection and gate pre-activations ``[rows, 4 c_h]`` in the order of
    the interleaved weight rows (``interleaved_weights``): with the forward's LN(z), the
    operands of the input weights' gradients."""
    NN = N * N
    local, flat, row_ok, batch, ij = _chunk_rows(row_start, row_end, NN, BLOCK_M)
    dtype = w_pg_ptr.dtype.element_ty
    ks = tl.arange(0, BLOCK_CZ)
    k_ok = ks < CZ
    ok = row_ok[:, None] & k_ok[None, :]

    z_rows = _row_offsets(batch, ij, N, sz_b, sz_i, sz_j, Z_MERGED)
    mean = tl.load(z_mean_ptr + flat, mask=row_ok, other=0.0)
    rstd = tl.load(z_rstd_ptr + flat, mask=row_ok, other=0.0)
    z = tl.load(z_ptr + z_rows[:, None] + ks[None, :].to(tl.int64) * sz_c, mask=ok, other=0.0).to(tl.float32)
    zhat = tl.where(ok, (z - mean[:, None]) * rstd[:, None], 0.0)
    gamma = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    zn = tl.where(ok, zhat * gamma[None, :] + beta[None, :], 0.0).to(dtype)
    valid = tl.load(mask_ptr + _row_offsets(batch, ij, N, sm_b, sm_i, sm_j, M_MERGED), mask=row_ok, other=0)
    valid = valid.to(tl.float32)

    d_gate = tl.load(d_gate_ptr + flat[:, None] * CZ + ks[None, :], mask=ok, other=0.0)
    w_og = _square_tile(w_og_ptr, sw_og0, sw_og1, CZ, CZ, BLOCK_CZ, BLOCK_CZ)
    dzn = tl.dot(d_gate, w_og, input_precision=DOT_PRECISION)
    ab_rows = batch.to(tl.int64) * CH * NN + ij
    d_pg_rows = d_pg_ptr + local[:, None].to(tl.int64) * (4 * CH)
    rs = tl.arange(0, 2 * BLOCK_C)
    for c0 in range(0, CH, BLOCK_C):
        for side in tl.static_range(2):
            d_pg, w, r_ok = _gated_projection_backward(
                zn, valid, dab_ptr, ab_rows, row_ok, side, c0, side_stride, NN, w_pg_ptr, CH,
                CZ, BLOCK_M, BLOCK_CZ, BLOCK_C, DOT_PRECISION,
            )
            d_pg = d_pg.to(dtype)
            tl.store(d_pg_rows + (side * 2 * CH + 2 * c0 + rs)[None, :], d_pg, mask=row_ok[:, None] & r_ok[None, :])
            dzn = tl.dot(d_pg, w, dzn, input_precision=DOT_PRECISION)

    dz = _layernorm_backward_rows(dzn, zhat, rstd, gamma, CZ)
    tl.store(dz_ptr + flat[:, None] * CZ + ks[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
    part = row_start // BLOCK_M + tl.program_id(0)
    tl.store(dln_w_part_ptr + part * CZ + ks, tl.sum(dzn * zhat, axis=0), mask=k_ok)
    tl.store(dln_b_part_ptr + part * CZ + ks, tl.sum(dzn, axis=0), mask=k_ok)


# --------------------------------------------------------------------------- launches


def _pair_args(t: torch.Tensor) -> tuple[tuple[int, int, int, int], bool]:
    """Strides of a ``[B, N, N, C]`` tensor and whether its (i, j) rows are one run."""
    return t.stride(), t.stride(1) == t.shape[2] * t.stride(2)


def _mask_args(mask: torch.Tensor) -> tuple[tuple[int, int, int], bool]:
    return mask.stride(), mask.stride(1) == mask.shape[2] * mask.stride(2)


def _row_block(width: int) -> int:
    # Full rows of c_z and c_h sit in registers: fewer rows per program as they widen.
    return max(16, min(64, 8192 // width))


def _stages(cfg: dict) -> dict:
    """``num_stages`` of a choice that names it; choices stored without it keep Triton's default."""
    return {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}


def _input_candidates() -> list[dict]:
    """Tuning candidates of the two input-side kernels, whose loop over c_h in BLOCK_C slices
    loads weight tiles: the pipeline depth is a choice too (Triton's default, 1, 2 and 4). One
    stage halves the shared memory, so two programs can share an SM where one fit before
    (compiled as launched for sm_90: the input backward at 64 rows and 4 warps needs 64 KiB
    with one stage, 144 with two; benchmarks/register_report.py)."""
    base = [{"BLOCK_M": bm, "BLOCK_C": bc, "num_warps": nw} for bm in (32, 64, 128) for bc in (32, 64) for nw in (4, 8)]
    # (16-channel slices, the fewest spills, lost to every shipped H100 choice in session 11.)
    return base + [{**cfg, "num_stages": ns} for cfg in base for ns in (1, 2, 4)]


def _output_forward_candidates() -> list[dict]:
    """Tuning candidates of the output forward (a row block: LN(x), the output projection
    and the gate from LN(z), no channel loop). 16 warps lost to these at N = 384 and 768
    (benchmarks/NOTES.md, session 16)."""
    plain = [{"BLOCK_M": bm, "num_warps": nw} for bm in (32, 64, 128) for nw in (4, 8)]
    # Persistent programs (1, 2 or 4 an SM) loop over the row blocks, the weights loaded once,
    # optionally with the next block's loads pipelined (LOOP_STAGES). Two an SM without the
    # pipelining won at N = 384 and 768 on the H200 (session 29); it is the default.
    persistent = [{"BLOCK_M": bm, "num_warps": nw, "PERSISTENT": per_sm, "LOOP_STAGES": ls}
                  for bm in (32, 64) for nw in (4, 8) for per_sm in (1, 2, 4) for ls in (1, 2)]
    return plain + persistent


def _tuning_key(z: torch.Tensor, c_h: int, dtype: torch.dtype) -> tuple[tuple, bool]:
    """Autotune key, and whether the shape is one the candidates are meant for (c_z <= 128)."""
    return (z.shape[-1], c_h, str(dtype), str(z.dtype)), block_size(z.shape[-1], 1 << 30) <= 128


def _triangle_forward(z, mask, p, outgoing, eps, keep_zn=True):
    B, N, _, CZ = z.shape
    CH = p["norm_out_weight"].shape[0]
    NN = N * N
    dtype = p["ab_interleaved"].dtype
    dev = z.device
    (sz, z_merged), (sm, m_merged) = _pair_args(z), _mask_args(mask)
    block_cz, block_ch = block_size(CZ, 1 << 30), block_size(CH, 1 << 30)
    prec = dot_precision(dtype)

    ab = torch.empty(2, B, CH, N, N, device=dev, dtype=dtype)
    z_mean = torch.empty(B * NN, device=dev, dtype=torch.float32)
    z_rstd = torch.empty_like(z_mean)
    zn = torch.empty(B * NN, CZ, device=dev, dtype=dtype) if keep_zn else None
    w_pg = p["ab_interleaved"]

    def launch_in(cfg):
        launch_kernel(_triangle_input_forward_kernel, (cdiv(NN, cfg["BLOCK_M"]), B),
            z, mask, p["norm_in_weight"], p["norm_in_bias"], w_pg, ab, z_mean, z_rstd, zn if keep_zn else z_mean,
            N, CH, ab.stride(0), *sz, *sm, eps,
            CZ=CZ, Z_MERGED=z_merged, M_MERGED=m_merged, DOT_PRECISION=prec, STORE_ZN=keep_zn,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_CZ=block_cz, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
            **_stages(cfg),
        )

    key, small = _tuning_key(z, CH, dtype)
    default = {"BLOCK_M": _row_block(block_cz), "BLOCK_C": 32, "num_warps": 4}
    candidates = _input_candidates() if small else []
    run_tuned("triangle_multiply_in_fwd", key, dev, candidates, default, launch_in, rows=B * NN)

    a, b = ab[0].view(B * CH, N, N), ab[1].view(B * CH, N, N)
    x = torch.bmm(a, b.transpose(1, 2)) if outgoing else torch.bmm(a.transpose(1, 2), b)

    out = torch.empty(B, N, N, CZ, device=dev, dtype=dtype)
    x_mean = torch.empty(B * NN, device=dev, dtype=torch.float32)
    x_rstd = torch.empty_like(x_mean)
    w_og, w_o = p["out_gate_weight"], p["out_proj_weight"]

    def launch_out(cfg):
        blocks = cdiv(NN, cfg["BLOCK_M"])
        if cfg.get("PERSISTENT"):  # PERSISTENT programs an SM, shared by the batches
            blocks = min(blocks, max(1, cfg["PERSISTENT"] * multiprocessors(dev) // B))
        launch_kernel(_triangle_output_forward_kernel, (blocks, B),
            x, z, z_mean, z_rstd, p["norm_in_weight"], p["norm_in_bias"], w_og,
            p["norm_out_weight"], p["norm_out_bias"], w_o, out, x_mean, x_rstd,
            N, *sz, *w_og.stride(), *w_o.stride(), eps,
            CZ=CZ, CH=CH, Z_MERGED=z_merged, DOT_PRECISION=prec,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_CZ=block_cz, BLOCK_CH=block_ch,
            NUM_STAGES=cfg.get("LOOP_STAGES", 1), num_warps=cfg["num_warps"],
        )

    # Two persistent programs an SM: 0.3075 -> 0.249 ms at N = 768 on the H200 (session 29).
    default = {"BLOCK_M": _row_block(max(block_cz, block_ch)), "num_warps": 4, "PERSISTENT": 2}
    candidates = _output_forward_candidates() if small else []
    run_tuned("triangle_multiply_out_fwd", key, dev, candidates, default, launch_out, rows=B * NN)
    return out, ab, x.view(B, CH, N, N), z_mean, z_rstd, x_mean, x_rstd, zn


def _output_backward(dout, z, p, x, z_mean, z_rstd, x_mean, x_rstd):
    """dx ``[B, c_h, N, N]``, the gradient of the gate pre-activation ``[B, N, N, c_z]``, and
    the fp32 gradients of out_proj_weight and the output LayerNorm's parameters."""
    B, N, _, CZ = z.shape
    CH = x.shape[1]
    M = B * N * N
    dtype, dev = x.dtype, z.device
    (sz, z_merged), (sd, d_merged) = _pair_args(z), _pair_args(dout)
    block_cz, block_ch = block_size(CZ, 1 << 30), block_size(CH, 1 << 30)
    dx = torch.empty_like(x)
    d_gate = torch.empty(B, N, N, CZ, device=dev, dtype=dtype)
    w_og, w_o = p["out_gate_weight"], p["out_proj_weight"]
    grads = {}

    def launch_persistent(cfg):
        block_m = cfg["BLOCK_M"]
        blocks = cdiv(M, block_m)
        programs = min(blocks, cfg["PERSISTENT"] * multiprocessors(dev))
        parts = torch.empty(programs, CZ + 2, CH, device=dev, dtype=torch.float32)  # one reduction
        dw_o_part, ln_w_part, ln_b_part = parts, parts[:, CZ], parts[:, CZ + 1]
        launch_kernel(_triangle_output_backward_persistent_kernel, (programs,),
            x, z, dout, z_mean, z_rstd, x_mean, x_rstd, p["norm_in_weight"], p["norm_in_bias"], w_og,
            p["norm_out_weight"], p["norm_out_bias"], w_o, dx, d_gate, dw_o_part, ln_w_part, ln_b_part,
            CZ + 2, M, N, *sz, *sd, *w_og.stride(), *w_o.stride(),
            CZ=CZ, CH=CH, Z_MERGED=z_merged, D_MERGED=d_merged, DOT_PRECISION=dot_precision(dtype),
            BLOCK_M=block_m, BLOCK_CZ=block_cz, BLOCK_CH=block_ch, num_warps=cfg["num_warps"], **_stages(cfg),
        )
        total = parts.sum(0)
        grads.update(w_o=total[:CZ], ln_w=total[CZ], ln_b=total[CZ + 1])

    def launch(cfg):
        if cfg.get("PERSISTENT"):
            return launch_persistent(cfg)
        block_m = cfg["BLOCK_M"]
        ln_parts = torch.empty(2, cdiv(M, block_m), CH, device=dev, dtype=torch.float32)
        ln_w_part, ln_b_part = ln_parts
        dw_o = None
        chunks = row_chunks(M, (CZ + CH) * dtype.itemsize, wave_rows(block_m, dev))
        d_update = torch.empty(chunks[0][1], CZ, device=dev, dtype=dtype)
        xn = torch.empty(chunks[0][1], CH, device=dev, dtype=dtype)
        for start, end in chunks:
            launch_kernel(_triangle_output_backward_kernel, (cdiv(end - start, block_m),),
                x, z, dout, z_mean, z_rstd, x_mean, x_rstd, p["norm_in_weight"], p["norm_in_bias"], w_og,
                p["norm_out_weight"], p["norm_out_bias"], w_o, dx, d_gate, d_update, xn, ln_w_part, ln_b_part,
                start, end, N, *sz, *sd, *w_og.stride(), *w_o.stride(),
                CZ=CZ, CH=CH, Z_MERGED=z_merged, D_MERGED=d_merged, DOT_PRECISION=dot_precision(dtype),
                BLOCK_M=block_m, BLOCK_CZ=block_cz, BLOCK_CH=block_ch, num_warps=cfg["num_warps"],
            )
            dw_o = add_weight_grad(dw_o, d_update[: end - start], xn[: end - start])
        ln_w, ln_b = ln_parts.sum(1)
        grads.update(w_o=dw_o, ln_w=ln_w, ln_b=ln_b)

    key, small = _tuning_key(z, CH, dtype)
    default = {"BLOCK_M": _row_block(max(block_cz, block_ch)), "num_warps": 4}
    candidates = _output_backward_candidates() if small else []
    run_tuned("triangle_multiply_out_bwd", key, dev, candidates, default, launch, rows=M)
    return dx, d_gate, grads["w_o"], grads["ln_w"], grads["ln_b"]


def _output_backward_candidates() -> list[dict]:
    """The chunked kernel (weight-gradient operands through memory and cuBLAS) at 32-128 rows
    a block, and the persistent one (weight gradients in registers) at 32 and 64 rows with 1
    or 2 programs an SM. The persistent one at 8 warps only: compiled as launched for sm_90
    (N = 768, Triton 3.6), 4 warps spill 0.7-4.3 KB a thread, 8 warps at 32 rows 24-120 B
    (``benchmarks/NOTES.md``, session 15)."""
    chunked = [{"BLOCK_M": bm, "num_warps": nw} for bm in (32, 64, 128) for nw in (4, 8)]
    persistent = [{"BLOCK_M": bm, "num_warps": 8, "PERSISTENT": per_sm} for bm in (32, 64) for per_sm in (1, 2)]
    # At 32 rows, fewer pipeline stages than the default 3 spill less (Triton 3.6, sm_90: none
    # at one stage, 20 / 12 B a thread at two, 16 / 8 at three; register_report.py).
    staged = [{"BLOCK_M": 32, "num_warps": 8, "PERSISTENT": per_sm, "num_stages": ns} for per_sm in (1, 2) for ns in (1, 2)]
    return chunked + persistent + staged


def _product_backward(dx, ab, outgoing):
    """Gradients of a and b, ``[2, B, c_h, N, N]``, from dx ``[B, c_h, N, N]`` (cuBLAS)."""
    _, B, CH, N, _ = ab.shape
    dab = torch.empty_like(ab)
    a, b = ab[0].view(B * CH, N, N), ab[1].view(B * CH, N, N)
    da, db = dab[0].view(B * CH, N, N), dab[1].view(B * CH, N, N)
    dx = dx.view(B * CH, N, N)
    if outgoing:  # x = a b^T
        torch.bmm(dx, b, out=da)
        torch.bmm(dx.transpose(1, 2), a, out=db)
    else:  # x = a^T b
        torch.bmm(b, dx.transpose(1, 2), out=da)
        torch.bmm(a, dx, out=db)
    return dab


def _input_backward(z, mask, p, dab, d_gate, z_mean, z_rstd, zn):
    """dz through the input LayerNorm from the a, b and gate paths, and the fp32 gradients
    of the input LayerNorm's parameters, ab_proj_weight, ab_gate_weight and out_gate_weight
    (their LN(z) operand ``zn`` ``[B * N * N, c_z]`` saved by the input forward: storing it
    there instead of in this kernel took 0.05 ms off the op at N = 768, session 18)."""
    B, N, _, CZ = z.shape
    CH = dab.shape[2]
    M = B * N * N
    dtype, dev = dab.dtype, z.device
    (sz, z_merged), (sm, m_merged) = _pair_args(z), _mask_args(mask)
    block_cz = block_size(CZ, 1 << 30)
    dz = torch.empty(B, N, N, CZ, device=dev, dtype=z.dtype)
    d_gate_rows = d_gate.view(M, CZ)
    w_pg, w_og = p["ab_interleaved"], p["out_gate_weight"]
    grads = {}

    def launch(cfg):
        block_m = cfg["BLOCK_M"]
        ln_parts = torch.empty(2, cdiv(M, block_m), CZ, device=dev, dtype=torch.float32)
        ln_w_part, ln_b_part = ln_parts
        dw_pg = None
        chunks = row_chunks(M, 4 * CH * dtype.itemsize, wave_rows(block_m, dev),
                            _input_chunk_scale(M * CZ * dtype.itemsize))
        d_pg = torch.empty(chunks[0][1], 4 * CH, device=dev, dtype=dtype)
        # d(gate) and LN(z) exist whole: one product over every row, not one per chunk.
        dw_og = add_weight_grad(None, d_gate_rows, zn)
        for start, end in chunks:
            launch_kernel(_triangle_input_backward_kernel, (cdiv(end - start, block_m),),
                z, mask, z_mean, z_rstd, p["norm_in_weight"], p["norm_in_bias"], w_pg, w_og,
                dab, d_gate, dz, d_pg, ln_w_part, ln_b_part, start, end, N, CH, dab.stride(0),
                *sz, *sm, *w_og.stride(),
                CZ=CZ, Z_MERGED=z_merged, M_MERGED=m_merged, DOT_PRECISION=dot_precision(dtype),
                BLOCK_M=block_m, BLOCK_CZ=block_cz, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
                **_stages(cfg),
            )
            # The 4 c_h-wide product in the other operand order: cuBLAS ran it with sm90
            # kernels where the plain order got cutlass sm80 ones (weight_grad_mm.py, N=768:
            # 0.096 / 0.092 ms against 0.114 / 0.104).
            dw_pg = add_weight_grad(dw_pg, d_pg[: end - start], zn[start:end], swapped=True)
        w_p, w_g = split_interleaved(dw_pg.contiguous())
        ln_w, ln_b = ln_parts.sum(1)
        grads.update(ln_w=ln_w, ln_b=ln_b, w_p=w_p, w_g=w_g, w_og=dw_og)

    key, small = _tuning_key(z, CH, dtype)
    default = {"BLOCK_M": _row_block(block_cz), "BLOCK_C": 32, "num_warps": 4}
    candidates = _input_candidates() if small else []
    run_tuned("triangle_multiply_in_bwd", key, dev, candidates, default, launch, rows=M)
    return dz, grads["ln_w"], grads["ln_b"], grads["w_p"], grads["w_g"], grads["w_og"]


def _triangle_backward(dout, z, mask, p, outgoing, ab, x, z_mean, z_rstd, x_mean, x_rstd, zn):
    """dz and the fp32 gradient of every parameter. Each pair-sized buffer is dropped as soon
    as its last reader has run, and the weight gradients' operands exist one bounded chunk of
    rows at a time: the peak stays near the forward's."""
    grads: dict[str, torch.Tensor] = {}
    dx, d_gate, grads["out_proj_weight"], grads["norm_out_weight"], grads["norm_out_bias"] = _output_backward(
        dout, z, p, x, z_mean, z_rstd, x_mean, x_rstd
    )
    dab = _product_backward(dx, ab, outgoing)
    del dx
    (dz, grads["norm_in_weight"], grads["norm_in_bias"], grads["ab_proj_weight"], grads["ab_gate_weight"],
     grads["out_gate_weight"]) = _input_backward(z, mask, p, dab, d_gate, z_mean, z_rstd, zn)
    return dz, grads


# --------------------------------------------------------------------------- autograd


class TriangleMultiplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mask, outgoing, eps, compute_dtype, for_backward, *param_values):
        named = dict(zip(PARAM_NAMES, param_values))
        w_p, w_g = named.pop("ab_proj_weight"), named.pop("ab_gate_weight")
        # Matrix weights in the compute dtype; LayerNorm parameters are read in fp32. The
        # projection and gate weights are interleaved first, then cast: one copy, one cast.
        params = {name: value.to(compute_dtype) if value.dim() == 2 else value for name, value in named.items()}
        params["ab_interleaved"] = interleaved_weights(w_p, w_g).to(compute_dtype)
        out, ab, x, z_mean, z_rstd, x_mean, x_rstd, zn = _triangle_forward(
            z, mask, params, outgoing, eps, keep_zn=for_backward)
        ctx.save_for_backward(z, mask, ab, x, z_mean, z_rstd, x_mean, x_rstd, zn,
                              *(params[name] for name in KERNEL_PARAM_NAMES))
        ctx.outgoing = outgoing
        return out

    @staticmethod
    def backward(ctx, dout):
        z, mask, ab, x, z_mean, z_rstd, x_mean, x_rstd, zn, *param_values = ctx.saved_tensors
        params = dict(zip(KERNEL_PARAM_NAMES, param_values))
        dz, grads = _triangle_backward(dout, z, mask, params, ctx.outgoing, ab, x, z_mean, z_rstd, x_mean, x_rstd,
                                       zn)
        return (dz, None, None, None, None, None, *(grads[name] for name in PARAM_NAMES))


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


def _check_shapes(z: torch.Tensor, mask: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    missing = [name for name in PARAM_NAMES if name not in params]
    if missing:
        raise KeyError(f"triangle_multiply: params lack {missing}")
    if z.dim() != 4 or z.shape[1] != z.shape[2]:
        raise ValueError(f"triangle_multiply: z must be [B, N, N, c_z], got {tuple(z.shape)}")
    if mask.shape != z.shape[:3] or mask.dtype != torch.bool:
        raise ValueError(f"triangle_multiply: mask must be bool {tuple(z.shape[:3])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    c_z, c_h = z.shape[-1], params["norm_out_weight"].shape[0]
    expected = {
        "norm_in_weight": (c_z,), "norm_in_bias": (c_z,), "ab_proj_weight": (2 * c_h, c_z),
        "ab_gate_weight": (2 * c_h, c_z), "out_gate_weight": (c_z, c_z), "norm_out_weight": (c_h,),
        "norm_out_bias": (c_h,), "out_proj_weight": (c_z, c_h),
    }
    for name, shape in expected.items():
        expect_shape("triangle_multiply", name, params[name], shape)


def triangle_multiply(
    z: torch.Tensor,
    mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    outgoing: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """AF3 triangle multiplication; returns the update (the caller adds the residual).

    z: ``[B, N, N, c_z]``, any strides; mask: ``[B, N, N]`` bool (True = valid pair).
    params: norm_in_weight, norm_in_bias ``[c_z]``; ab_proj_weight, ab_gate_weight
    ``[2 * c_h, c_z]`` (rows: a then b); out_gate_weight ``[c_z, c_z]``; norm_out_weight,
    norm_out_bias ``[c_h]``; out_proj_weight ``[c_z, c_h]``.
    outgoing: ``x_ij = sum_k a_ik b_jk``; incoming: ``x_ij = sum_k a_ki b_kj``.
    Returns ``sigmoid(LN(z) W_og^T) * (LN(x) W_o^T)``: ``[B, N, N, c_z]`` (in autocast's
    dtype under autocast).
    """
    _check_shapes(z, mask, params)
    values = [params[name] for name in PARAM_NAMES]
    if resolve_backend(backend, z, *values) == "torch" or z.numel() == 0:
        return triangle_multiply_reference(z, mask, params, outgoing)
    return _triangle_multiply_triton(z, mask, outgoing, values)


@torch.compiler.disable  # a compiled caller breaks its graph here instead of tracing the launcher
def _triangle_multiply_triton(z, mask, outgoing, values):
    # Whether a backward can follow: only then does the input forward keep LN(z) for it.
    for_backward = torch.is_grad_enabled() and (z.requires_grad or any(v.requires_grad for v in values))
    return TriangleMultiplyFunction.apply(z, mask, outgoing, 1e-5, autocast_dtype(z), for_backward, *values)
