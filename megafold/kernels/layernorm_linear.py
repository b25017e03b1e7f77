"""LayerNorm followed by a Linear layer, fused: ``F.linear(F.layer_norm(x), weight, bias)``.

The pair track applies this to ``[B, N, N, c_z]`` tensors over and over (projections into
attention heads, pair biases, gates), so the forward reads the input once and never writes
the normalised activation; the backward recomputes it from two fp32 numbers per row.

This file also holds the pieces the other pair ops share: row addressing of strided
tensors, the fp32 LayerNorm statistics, the autocast compute dtype and the chunked
weight-gradient products ``dW = G^T A`` (cuBLAS over row chunks that the row-parallel
backward kernels write).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megafold.kernels._common import (
    cdiv,
    descriptors_available,
    launch_kernel,
    multiprocessors,
    next_power_of_2,
    resolve_backend,
    run_tuned,
    tensor_descriptor,
)

MAX_GRID_Y = 65535


# --------------------------------------------------------------------------- host helpers


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 operands get exact fp32 products as in torch's default, not TF32.
    return "ieee" if dtype == torch.float32 else None


def block_size(n: int, cap: int) -> int:
    """A power of two >= 16 (tl.dot's smallest tile) covering ``n``, at most ``cap``."""
    return max(16, min(cap, next_power_of_2(n)))


def expect_shape(op: str, name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """A clear error for a wrongly shaped argument, before a kernel reads past its end."""
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


@dataclass(frozen=True)
class Rows:
    """The leading dims of tensors that share one shape, as three groups ``[D0, D1, D2]``.

    Each tensor's rows are addressed ``d0 * s0 + d1 * s1 + d2 * s2`` (its ``strides[i]``),
    so a transposed view is read in place. ``merged[i]``: d1 and d2 collapse into one
    stride (``s1 == D2 * s2``), which lets Triton see contiguous rows.
    """

    sizes: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]
    merged: tuple[bool, ...]

    @property
    def per_batch(self) -> int:
        return self.sizes[1] * self.sizes[2]

    @property
    def count(self) -> int:
        return self.sizes[0] * self.per_batch

    def args(self, index: int) -> tuple[int, int, int]:
        return self.strides[index]


def row_groups(*tensors: torch.Tensor) -> Rows | None:
    """Group the leading dims (all but the last) of same-shaped tensors for ``Rows``.

    Returns None when more than three groups would be needed (the caller then copies).
    """
    shape = tensors[0].shape[:-1]
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    groups: list[list[int]] = []
    for d in dims:
        if groups and all(
            t.stride(groups[-1][-1]) == t.stride(d) * shape[d] for t in tensors
        ):
            groups[-1].append(d)
        else:
            groups.append([d])
    if len(groups) > 3:
        return None
    sizes = [math.prod(shape[d] for d in group) for group in groups]
    strides = [[t.stride(group[-1]) for group in groups] for t in tensors]
    # Two groups: the outer one goes on the grid's batch axis, so that the rows inside a
    # batch stay one contiguous run when they are (a [B, c, N, N] layout seen as pairs).
    pad_at = 1 if len(sizes) == 2 and sizes[0] <= MAX_GRID_Y else 0
    while len(sizes) < 3:
        sizes.insert(pad_at, 1)
        for s in strides:
            s.insert(pad_at, 0)
    if sizes[0] > MAX_GRID_Y:
        return None
    merged = tuple(s[1] == sizes[2] * s[2] or sizes[1] == 1 for s in strides)
    return Rows(tuple(sizes), tuple(tuple(s) for s in strides), merged)


def rows_of(*tensors: torch.Tensor) -> tuple[Rows, tuple[torch.Tensor, ...]]:
    """``row_groups`` of the tensors, copying them to contiguous only where no view fits."""
    rows = row_groups(*tensors)
    if rows is None:
        tensors = tuple(t.contiguous() for t in tensors)
        rows = row_groups(*tensors)
    return rows, tensors


# --------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _row_offsets(batch, rows, inner, stride_batch, stride_outer, stride_inner, MERGED: tl.constexpr):
    # int64: a pair tensor at N = 1024 with B = 4 passes 2**31 elements.
    base = batch.to(tl.int64) * stride_batch
    if MERGED:
        return base + rows.to(tl.int64) * stride_inner
    outer = (rows // inner).to(tl.int64)
    return base + outer * stride_outer + (rows % inner).to(tl.int64) * stride_inner


@triton.jit
def _layernorm_stats(
    x_ptr, x_rows, row_ok, stride_c, eps,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 mean and 1/std of each row (channel offsets in int64: a channel-major [c, N, N]
    tensor has a channel stride of N^2)."""
    # Two passes in fp32 (mean, then centred variance): E[x^2] - E[x]^2 loses digits when
    # |mean| >> std, which residual streams do reach.
    total = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * stride_c, mask=ok, other=0.0)
        total += x.to(tl.float32)
    mean = tl.sum(total, axis=1) / K
    total = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * stride_c, mask=ok, other=0.0)
        centred = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
        total += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(total, axis=1) / K + eps)
    return mean, rstd


@triton.jit
def _layernorm_chunk(
    x_ptr, x_rows, row_ok, stride_c, ln_w_ptr, ln_b_ptr, mean, rstd, k0,
    K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LN(x) of the columns [k0, k0 + BLOCK_K) in fp32, zero outside the tensor."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ok = row_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * stride_c, mask=ok, other=0.0)
    return _layernorm_chunk_of(x, ok, ks, k_ok, ln_w_ptr, ln_b_ptr, mean, rstd)


@triton.jit
def _layernorm_chunk_of(x, ok, ks, k_ok, ln_w_ptr, ln_b_ptr, mean, rstd):
    """``_layernorm_chunk`` of a loaded tile ``x`` of the columns ``ks``."""
    gamma = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    return tl.where(ok, xhat * gamma[None, :] + beta[None, :], 0.0)


@triton.jit
def _layernorm_tile(
    x_ptr, x_rows, row_ok, stride_c, ln_w_ptr, ln_b_ptr, eps,
    K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LN(x) of whole rows (BLOCK_K >= K) from one load of x: the fp32 tile (zero outside the
    tensor) and the rows' fp32 mean and 1/std, the statistics taken in two passes over the
    register tile (mean, then centred variance)."""
    ks = tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (ks < K)[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * stride_c, mask=ok, other=0.0)
    return _layernorm_of(x, ok, ln_w_ptr, ln_b_ptr, eps, K, BLOCK_K)


@triton.jit
def _layernorm_of(x, ok, ln_w_ptr, ln_b_ptr, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_layernorm_tile`` of a loaded tile ``x`` ``[rows, BLOCK_K]``, zero outside ``ok``."""
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / K + eps)
    gamma = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    return tl.where(ok, centred * rstd[:, None] * gamma[None, :] + beta[None, :], 0.0), mean, rstd


@triton.jit
def _chunk_rows(row_start, row_end, rows_per_batch, BLOCK_M: tl.constexpr):
    """This program's rows of the chunk ``[row_start, row_end)`` of ``B * rows_per_batch`` rows:
    index in the chunk, flat index, validity, batch and row within the batch."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = row_start + local
    # int64 flat index: flat * c_z passes 2**31 for a pair tensor at N = 2048 with B = 4.
    return local, flat.to(tl.int64), flat < row_end, flat // rows_per_batch, flat % rows_per_batch


@triton.jit
def _normalised_rows(x_ptr, x_rows, stride_c, mean_ptr, rstd_ptr, flat, row_ok, ks, ok,
                     FULL_ROWS: tl.constexpr):
    """Whole rows of x normalised with their saved statistics (fp32, zero outside the tensor),
    and the rows' 1/std. FULL_ROWS (K == BLOCK_K): every column is in the tensor, and rows
    past its end load x = mean = rstd = 0, so they come out 0 without a select."""
    x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * stride_c, mask=ok, other=0.0)
    return _normalised(x, mean_ptr, rstd_ptr, flat, row_ok, ok, FULL_ROWS)


@triton.jit
def _normalised(x, mean_ptr, rstd_ptr, flat, row_ok, ok, FULL_ROWS: tl.constexpr):
    """``_normalised_rows`` of a loaded tile ``x`` (zero outside the tensor)."""
    mean = tl.load(mean_ptr + flat, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + flat, mask=row_ok, other=0.0)
    xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if not FULL_ROWS:
        xhat = tl.where(ok, xhat, 0.0)
    return xhat, rstd


@triton.jit
def _store_layernorm_grads(dxn, xhat, rstd, gamma, dx_ptr, flat, ks, ok, k_ok, part,
                           dln_w_part_ptr, dln_b_part_ptr, row0, K: tl.constexpr, TMA: tl.constexpr):
    """dx of whole rows from d(LN(x)), and this row block's partials (index ``part``) of the
    LayerNorm parameters' gradients. TMA: dx_ptr is a descriptor of dx, the rows start at
    ``row0``."""
    dx = _layernorm_backward_rows(dxn, xhat, rstd, gamma, K)
    if TMA:
        dx_ptr.store([row0, 0], dx.to(dx_ptr.dtype))
    else:
        tl.store(dx_ptr + flat[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dln_w_part_ptr + part * K + ks, tl.sum(dxn * xhat, axis=0), mask=k_ok)
    tl.store(dln_b_part_ptr + part * K + ks, tl.sum(dxn, axis=0), mask=k_ok)


@triton.jit
def _layernorm_backward_rows(dxn, xhat, rstd, gamma, K: tl.constexpr):
    """d(x) of LayerNorm rows from d(LN(x)) ``dxn``, the normalised rows and 1/std (fp32)."""
    dxhat = dxn * gamma[None, :]
    mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / K
    mean_dxhat = tl.sum(dxhat, axis=1) / K
    return (dxhat - xhat * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _layernorm_linear_forward_kernel(
    x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr,
    rows_per_batch, inner, O,
    sx_b, sx_o, sx_i, sx_c, sw_o, sw_k, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, X_MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COL_BLOCKS: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """One row block and COL_BLOCKS output-column blocks of ``LN(x) W^T + b``.

    When the row fits one tile (BLOCK_K >= K), x is read once: the statistics and LN(x) come
    from the register tile and serve every column block of the program. With COL_BLOCKS
    covering all of O (large row counts), x crosses HBM once in all; with fewer, the column
    blocks of one row block are neighbours in launch order, so x comes from L2 after the first.

    TMA (BLOCK_K >= K only): x_ptr, w_ptr and out_ptr are tensor descriptors of x ``[M, K]``
    (one batch of contiguous rows), the weight ``[O, K]`` and out ``[M, O]``; tiles move by
    their corners, and the output tiles leave through shared memory asynchronously.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    num_n = tl.cdiv(O, BLOCK_N * COL_BLOCKS)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_batch
    x_rows = _row_offsets(batch, rows, inner, sx_b, sx_o, sx_i, X_MERGED)
    flat = batch.to(tl.int64) * rows_per_batch + rows
    if TMA:
        row0 = pid_m * BLOCK_M
        ok = row_ok[:, None] & (tl.arange(0, BLOCK_K) < K)[None, :]
        xn, mean, rstd = _layernorm_of(x_ptr.load([row0, 0]), ok, ln_w_ptr, ln_b_ptr, eps, K, BLOCK_K)
        xn = xn.to(w_ptr.dtype)
        for c in range(COL_BLOCKS):
            col0 = (pid_n * COL_BLOCKS + c) * BLOCK_N
            acc = tl.dot(xn, tl.trans(w_ptr.load([col0, 0])), input_precision=DOT_PRECISION)
            if HAS_BIAS:
                cols = col0 + tl.arange(0, BLOCK_N)
                acc += tl.load(bias_ptr + cols, mask=cols < O, other=0.0).to(tl.float32)[None, :]
            out_ptr.store([row0, col0], acc.to(out_ptr.dtype))
    elif BLOCK_K >= K:
        out_rows = out_ptr + flat[:, None] * O
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xn, mean, rstd = _layernorm_tile(x_ptr, x_rows, row_ok, sx_c, ln_w_ptr, ln_b_ptr, eps, K, BLOCK_K)
        xn = xn.to(w_ptr.dtype.element_ty)
        for c in range(COL_BLOCKS):
            cols = (pid_n * COL_BLOCKS + c) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < O
            w_t = tl.load(w_ptr + cols[None, :] * sw_o + ks[:, None] * sw_k,
                          mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(xn, w_t, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
    else:
        out_rows = out_ptr + flat[:, None] * O
        mean, rstd = _layernorm_stats(x_ptr, x_rows, row_ok, sx_c, eps, K, BLOCK_M, BLOCK_K)
        for c in range(COL_BLOCKS):
            cols = (pid_n * COL_BLOCKS + c) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < O
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xn = _layernorm_chunk(x_ptr, x_rows, row_ok, sx_c, ln_w_ptr, ln_b_ptr, mean, rstd, k0, K, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K)
                w_t = tl.load(
                    w_ptr + cols[None, :] * sw_o + ks[:, None] * sw_k,
                    mask=col_ok[None, :] & (ks < K)[:, None], other=0.0,
                )
                acc = tl.dot(xn.to(w_t.dtype), w_t, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
    if pid_n == 0:
        tl.store(mean_ptr + flat, mean, mask=row_ok)
        tl.store(rstd_ptr + flat, rstd, mask=row_ok)


@triton.jit
def _layernorm_linear_forward_rows_kernel(
    x_desc, ln_w_ptr, ln_b_ptr, w_desc, bias_ptr, out_desc, mean_ptr, rstd_ptr, M, O, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The forward for outputs of one column block (O <= BLOCK_N) and rows of one tile
    (K <= BLOCK_K), by tensor descriptors (x ``[M, K]``, the weight ``[O, K]``, out ``[M, O]``):
    this program takes row blocks pid, pid + P, ... (P programs) with the weight tile loaded
    once, and the loop's pipeline stages fetch the next blocks' x into shared memory while
    this one computes (one tile a program left x's loads exposed: session 31)."""
    ks = tl.arange(0, BLOCK_K)
    w = w_desc.load([0, 0])
    if HAS_BIAS:
        cols = tl.arange(0, BLOCK_N)
        bias = tl.load(bias_ptr + cols, mask=cols < O, other=0.0).to(tl.float32)
    for block in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        xn, mean, rstd = _layernorm_of(x_desc.load([block * BLOCK_M, 0]), row_ok[:, None] & (ks < K)[None, :],
                                       ln_w_ptr, ln_b_ptr, eps, K, BLOCK_K)
        acc = tl.dot(xn.to(w_desc.dtype), tl.trans(w), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        out_desc.store([block * BLOCK_M, 0], acc.to(out_desc.dtype))
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_linear_backward_kernel(
    x_ptr, dy_ptr, ln_w_ptr, ln_b_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, xn_ptr,
    dln_w_part_ptr, dln_b_part_ptr,
    row_start, row_end, rows_per_batch, inner, O,
    sx_b, sx_o, sx_i, sx_c, sdy_b, sdy_o, sdy_i, sdy_c, sw_o, sw_k,
    K: tl.constexpr, X_MERGED: tl.constexpr, DY_MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NEED_DX: tl.constexpr, WRITE_XN: tl.constexpr,
    XN_WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = False,
):
    """One row block of the chunk ``[row_start, row_end)``: dx, per-block partials of the
    LayerNorm parameter gradients, and LN(x) for the chunk's weight-gradient product.

    TMA: x_ptr, dy_ptr, w_ptr and dx_ptr are tensor descriptors of x ``[M, K]``, dy ``[M, O]``,
    the weight ``[O, K]`` and dx (contiguous rows); the column loop's dy and weight tiles are
    fetched ahead into shared memory. A block never reaches past its chunk but at M (the
    chunks start at multiples of BLOCK_M), where the descriptors clip.

    The whole row (BLOCK_K >= K) sits in registers: the LayerNorm backward needs two
    reductions over it. With XN_WIDTH > K, the rows of LN(x) get a column of ones at K (and
    zeros up to XN_WIDTH, which keeps cuBLAS's rows 16-byte aligned): the weight-gradient
    product ``dy^T [LN(x), 1]`` then yields the bias gradient as its column K, with no pass
    of its own over dy.
    """
    pid = tl.program_id(0)
    local, flat, row_ok, batch, rows = _chunk_rows(row_start, row_end, rows_per_batch, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ok = row_ok[:, None] & k_ok[None, :]
    x_rows = _row_offsets(batch, rows, inner, sx_b, sx_o, sx_i, X_MERGED)
    dy_rows = _row_offsets(batch, rows, inner, sdy_b, sdy_o, sdy_i, DY_MERGED)
    # Chunks start at multiples of BLOCK_M, so this block's partials have one global index.
    part = row_start // BLOCK_M + pid
    row0 = row_start + pid * BLOCK_M

    if TMA:
        xhat, rstd = _normalised(x_ptr.load([row0, 0]), mean_ptr, rstd_ptr, flat, row_ok, ok, K == BLOCK_K)
    else:
        xhat, rstd = _normalised_rows(x_ptr, x_rows, sx_c, mean_ptr, rstd_ptr, flat, row_ok, ks, ok, K == BLOCK_K)
    gamma = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    if WRITE_XN:
        beta = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        xn = xhat * gamma[None, :] + beta[None, :]
        xn_rows = xn_ptr + local[:, None].to(tl.int64) * XN_WIDTH
        tl.store(xn_rows + ks[None, :], xn.to(xn_ptr.dtype.element_ty), mask=ok)
        if XN_WIDTH > K:
            extra = tl.arange(0, XN_WIDTH - K)
            ones = tl.where(extra == 0, 1.0, 0.0)
            tl.store(xn_rows + K + extra[None, :],
                     tl.broadcast_to(ones[None, :], [BLOCK_M, XN_WIDTH - K]).to(xn_ptr.dtype.element_ty),
                     mask=row_ok[:, None])

    dxn = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, O, BLOCK_N):
        if NEED_DX:
            if TMA:
                dy = dy_ptr.load([row0, n0])
                w = w_ptr.load([n0, 0])
            else:
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < O
                dy = tl.load(
                    dy_ptr + dy_rows[:, None] + cols[None, :].to(tl.int64) * sdy_c,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                )
                w = tl.load(
                    w_ptr + cols[:, None] * sw_o + ks[None, :] * sw_k,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0,
                )
            dxn = tl.dot(dy.to(w.dtype), w, dxn, input_precision=DOT_PRECISION)

    if NEED_DX:
        _store_layernorm_grads(dxn, xhat, rstd, gamma, dx_ptr, flat, ks, ok, k_ok, part,
                               dln_w_part_ptr, dln_b_part_ptr, row0, K, TMA)


@triton.jit
def _layernorm_linear_backward_narrow_kernel(
    x_ptr, dy_ptr, ln_w_ptr, ln_b_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr,
    dln_w_part_ptr, dln_b_part_ptr, dw_part_ptr, db_part_ptr, part_width,
    M, rows_per_batch, inner, O,
    sx_b, sx_o, sx_i, sx_c, sdy_b, sdy_o, sdy_i, sdy_c, sw_o, sw_k,
    K: tl.constexpr, X_MERGED: tl.constexpr, DY_MERGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NEED_DX: tl.constexpr, NEED_BIAS: tl.constexpr, ONE_BATCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = False,
):
    """The backward for outputs that fit one column block (O <= BLOCK_N) and rows that fit
    one tile (K <= BLOCK_K), with the weight gradient: this program takes row blocks
    pid, pid + P, ... of all M rows (P programs). Per row block, dx as the chunked kernel makes
    it. Over its row blocks it accumulates, in fp32 registers, ``G = dy^T xhat`` (the
    normalised rows, one tensor-core product an iteration) and dy itself elementwise; every
    parameter gradient follows from these two after the loop, with no reduction across the
    rows inside it:
    - ``dW = G * gamma + db beta^T`` (LN(x) = xhat gamma + beta), db the column sums of dy;
    - the LayerNorm gradients ``d(gamma)_k = sum_m d(LN(x))_mk xhat_mk = sum_o W_ok G_ok``
      and ``d(beta)_k = sum_m d(LN(x))_mk = sum_o W_ok db_o`` (d(LN(x)) = dy W).
    Narrow outputs make LN(x) the widest operand of the weight product: here it is never
    written to memory and read back, nor formed. The partials of a program are one row of
    ``part_width`` floats of one buffer (one reduction for all): dW ``[O, K]``, then the bias
    gradient's O and the LayerNorm gradients' 2 K where asked (the four pointers point into
    that row's parts).

    TMA: x_ptr, dy_ptr and dx_ptr are tensor descriptors of x ``[M, K]``, dy ``[M, O]`` and dx
    (contiguous rows): the next row blocks' x and dy tiles are fetched into shared memory
    while this one computes (the loop's pipeline stages), not into registers.
    """
    pid = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < O
    gamma = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols[:, None] * sw_o + ks[None, :] * sw_k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    dy_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # summed over rows after the loop
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        # Row indices in int32 (M < 2**31 rows); batch and row within it without a division
        # where there is one batch (a division per row was a fifth of the loop's instructions).
        local = block * BLOCK_M + tl.arange(0, BLOCK_M)
        flat = local.to(tl.int64)
        row_ok = flat < M
        if ONE_BATCH:
            batch, rows = flat * 0, flat
        else:  # int32 division (the int64 one costs several times more)
            batch, rows = (local // rows_per_batch).to(tl.int64), (local % rows_per_batch).to(tl.int64)
        ok = row_ok[:, None] & k_ok[None, :]
        if TMA:
            x = x_ptr.load([block * BLOCK_M, 0])
            dy = dy_ptr.load([block * BLOCK_M, 0]).to(w.dtype)
        else:
            x_rows = _row_offsets(batch, rows, inner, sx_b, sx_o, sx_i, X_MERGED)
            dy_rows = _row_offsets(batch, rows, inner, sdy_b, sdy_o, sdy_i, DY_MERGED)
            x = tl.load(x_ptr + x_rows[:, None] + ks[None, :].to(tl.int64) * sx_c, mask=ok, other=0.0)
            dy = tl.load(dy_ptr + dy_rows[:, None] + cols[None, :].to(tl.int64) * sdy_c,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(w.dtype)
        xhat, rstd = _normalised(x, mean_ptr, rstd_ptr, flat, row_ok, ok, K == BLOCK_K)
        g = tl.dot(tl.trans(dy), xhat.to(w.dtype), g, input_precision=DOT_PRECISION)
        dy_sum += dy.to(tl.float32)
        if NEED_DX:
            dxn = tl.dot(dy, w, input_precision=DOT_PRECISION)
            dx = _layernorm_backward_rows(dxn, xhat, rstd, gamma, K)
            if TMA:
                dx_ptr.store([block * BLOCK_M, 0], dx.to(dx_ptr.dtype))
            else:
                tl.store(dx_ptr + flat[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    db = tl.sum(dy_sum, axis=0)
    part = pid.to(tl.int64) * part_width
    dw = g * gamma[None, :] + db[:, None] * beta[None, :]
    tl.store(dw_part_ptr + part + cols[:, None] * K + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])
    if NEED_BIAS:
        tl.store(db_part_ptr + part + cols, db, mask=col_ok)
    if NEED_DX:
        w32 = w.to(tl.float32)
        tl.store(dln_w_part_ptr + part + ks, tl.sum(w32 * g, axis=0), mask=k_ok)
        tl.store(dln_b_part_ptr + part + ks, tl.sum(w32 * db[:, None], axis=0), mask=k_ok)


# --------------------------------------------------------------------------- launches


def _launch_kwargs(cfg: dict) -> dict:
    return {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}


# Rows above which one program computes every output column of its row block (x read once
# from HBM): 1024 row blocks of 64 or more, ~8 per SM of a 132-SM GPU, still fill it.
ALL_COLUMNS_MIN_ROWS = 1 << 16


def _column_blocks(rows: int, out_features: int, block_n: int) -> int:
    """Output-column blocks per forward program: all of them for pair-sized inputs, else one
    (a single track's few hundred rows need the column blocks as parallelism)."""
    return cdiv(out_features, block_n) if rows >= ALL_COLUMNS_MIN_ROWS else 1


def _row_descriptors(*specs):
    """Tensor descriptors for ``(tensor, block_shape)`` pairs, each tensor seen as its rows
    ``[rows, last dim]``; None (the kernels' pointer path) where a tensor's rows are not one
    contiguous run or its layout has no descriptor."""
    descs = []
    for t, block in specs:
        d = tensor_descriptor(t.view(-1, t.shape[-1]), block) if t.is_contiguous() else None
        if d is None:
            return None
        descs.append(d)
    return descs


def layernorm_linear_forward(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``LN(x) weight^T + bias`` ``[*, O]`` in weight's dtype and the fp32 row
    statistics ``mean, rstd`` ``[M]`` (rows in x's logical order)."""
    K = x.shape[-1]
    O = weight.shape[0]
    rows, (x,) = rows_of(x)
    out = torch.empty(*x.shape[:-1], O, device=x.device, dtype=weight.dtype)
    mean = torch.empty(rows.count, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    D0, _, D2 = rows.sizes

    def launch(cfg: dict) -> None:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        col_blocks = cfg.get("COL_BLOCKS") or _column_blocks(rows.count, O, bn)
        descs = None
        if cfg.get("TMA") and bk >= K:  # descriptor kernels hold whole rows
            descs = _row_descriptors((x, (bm, bk)), (weight, (bn, bk)), (out, (bm, bn)))
        if descs is not None and cfg.get("PROGRAMS_PER_SM") and bn >= O:
            programs = min(cdiv(rows.count, bm), cfg["PROGRAMS_PER_SM"] * multiprocessors(x.device))
            launch_kernel(_layernorm_linear_forward_rows_kernel, (programs,),
                descs[0], ln_weight, ln_bias, descs[1], bias if bias is not None else weight, descs[2],
                mean, rstd, rows.count, O, eps,
                K=K, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(weight.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_launch_kwargs(cfg),
            )
            return
        if descs is None:  # TMA asked or not: the pointer path with the same tiles
            tensors = (x, weight, out)
            row_args = (rows.per_batch, D2, O, *rows.args(0), x.stride(-1), weight.stride(0), weight.stride(1))
            batches, layout = D0, {"X_MERGED": rows.merged[0]}
        else:  # one batch of contiguous rows
            tensors = descs
            row_args = (rows.count, 1, O, 0, 0, 0, 1, 0, 1)
            batches, layout = 1, {"X_MERGED": True, "TMA": True}
        grid = (cdiv(row_args[0], bm) * cdiv(O, bn * col_blocks), batches)
        launch_kernel(_layernorm_linear_forward_kernel, grid,
            tensors[0], ln_weight, ln_bias, tensors[1], bias if bias is not None else weight, tensors[2], mean, rstd,
            *row_args, eps,
            K=K, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(weight.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, COL_BLOCKS=col_blocks, **layout, **_launch_kwargs(cfg),
        )

    block_k = block_size(K, 128)
    block_n = block_size(O, 128)
    default = {"BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4}
    # COL_BLOCKS 0: the row-count rule of _column_blocks; 1: one column block per program.
    # The pipeline depth too: at 128 -> 512, N=768, 3 stages took 1.117 ms for the op against
    # 1.143 with the best 2-stage choice (benchmarks/NOTES.md, session 20).
    candidates = [
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "num_warps": nw, "COL_BLOCKS": cb, "num_stages": ns}
        for bm in (32, 64, 128) for bn in sorted({block_size(O, 64), block_n}) for nw in (4, 8) for cb in (0, 1)
        for ns in (2, 3)
    ]
    if block_k >= K and descriptors_available():
        # Tensor-descriptor tiles (TMA on Hopper): the pair-sized shapes' choices, all columns
        # a program (benchmarks/NOTES.md, session 31).
        candidates += [
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "num_warps": nw, "COL_BLOCKS": 0,
             "num_stages": ns, "TMA": True}
            for bm in (64, 128) for bn in sorted({block_size(O, 64), block_n}) for nw in (4, 8) for ns in (2, 3)
        ]
        if block_n >= O:  # one column block: programs that loop over row blocks
            candidates += [
                {"BLOCK_M": bm, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": nw, "num_stages": ns,
                 "TMA": True, "PROGRAMS_PER_SM": p}
                for bm in (32, 64, 128) for nw in (4, 8) for ns in (2, 3, 4) for p in (2, 4)
            ]
    key = (K, O, str(weight.dtype), str(x.dtype), bias is not None)
    run_tuned("layernorm_linear_fwd", key, x.device, candidates, default, launch, rows=rows.count)
    return out, mean, rstd


# Outputs up to this many columns (rounded up to a power of two), with rows of up to 128
# channels, take the narrow backward by default: dW in registers, LN(x) never stored.
# 32 rows and 8 warps: what ptxas (Triton 3.6, sm_90) compiles without spills at 16 outputs;
# 64 rows spill 0.7 KB a thread, 4 warps 0.5-2.4 KB (benchmarks/register_report.py).
NARROW_MAX_OUT = 32
NARROW_DEFAULT = {"NARROW": True, "BLOCK_M": 32, "num_warps": 8, "PROGRAMS_PER_SM": 4}

# Weight gradients are products over all rows, ``dW = G^T A`` with G the gradient of the
# layer's output and A its input, both [rows, *]. The row-parallel backward kernels write A
# (and G where it is computed there) in the compute dtype for a chunk of rows, and cuBLAS
# multiplies them: as fused Triton kernels these products kept a whole weight slice of fp32
# accumulators per program and ran at ~10-15% of tensor-core peak. The chunk bounds the
# temporaries; the fp32 sum over chunks runs in a fixed order (deterministic, no atomics).
# 256 MiB: one chunk for every pair op at N = 384 (each further chunk costs a kernel launch,
# products and additions: ~0.3 ms of host time on an H100 host), a few at N = 768.
WEIGHT_GRAD_CHUNK_BYTES = 256 << 20


def row_chunks(total: int, bytes_per_row: int, multiple: int, budget_scale: float = 1,
               min_count: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges whose temporaries of ``bytes_per_row`` stay within
    ``budget_scale * WEIGHT_GRAD_CHUNK_BYTES``: as few chunks as that allows, and at least
    ``min_count`` where ``total`` has that many multiples of ``multiple``, of equal size
    (a short last chunk would set no lower peak and still cost a launch). Every start is a
    multiple of ``multiple``: a row block, or a wave of them (``wave_rows``), so that every
    chunk but the last fills its kernel's last wave. That may take the chunk up to one wave of
    rows past the budget."""
    budget = max(1, int(budget_scale * WEIGHT_GRAD_CHUNK_BYTES))
    count = max(1, min_count, math.ceil(total * bytes_per_row / budget))
    step = max(multiple, math.ceil(math.ceil(total / count) / multiple) * multiple)
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def wave_rows(block_m: int, device: torch.device) -> int:
    """Rows of one wave of a row kernel that runs one program of ``block_m`` rows on each SM
    (the chunked backwards at their tuned choices: 8 warps, 255 registers). Chunks of whole
    waves leave no SM idle in the last wave of any chunk but the last: at N = 768 the triangle's
    input backward ran 11.6 waves a chunk, the transition's backward 8.7, each ending in a
    partly idle wave (~32 and ~66 us on an H100)."""
    return block_m * multiprocessors(device)


def add_weight_grad(acc: torch.Tensor | None, grad: torch.Tensor, act: torch.Tensor, *,
                    swapped: bool = False) -> torch.Tensor:
    """``acc + grad^T act`` into fp32 ``acc`` ``[G, A]`` (None: the first chunk, which becomes
    the accumulator), grad ``[R, G]``, act ``[R, A]``; returns the accumulator.

    ``swapped``: on the widening path, compute ``(act^T grad)^T`` instead, the same sum with the
    operands in the other order, which cuBLAS serves with other kernels; the accumulator is
    then a transposed view (strides ``(1, G)``). Pass the same value for every chunk.

    On a GPU whose torch has widening products (``torch.mm(..., out_dtype=torch.float32)``,
    CUDA, torch >= 2.8) each chunk is one cuBLAS call that writes fp32 and adds the running
    sum itself (``addmm``): no cast and no addition to launch, and no rounding of a chunk's
    product to 16 bits. Elsewhere the product runs in the operands' dtype (cuBLAS, fp32
    accumulation inside, the result rounded once per chunk, as autocast's own weight
    gradients are) and adds in fp32; the first chunk's product is only widened.
    """
    if grad.dtype in (torch.float16, torch.bfloat16) and grad.device.type not in _NO_WIDENING_MM:
        try:
            if swapped:
                if acc is None:
                    return torch.mm(act.t(), grad, out_dtype=torch.float32).t()
                return torch.addmm(acc.t(), act.t(), grad, out_dtype=torch.float32).t()
            if acc is None:
                return torch.mm(grad.t(), act, out_dtype=torch.float32)
            return torch.addmm(acc, grad.t(), act, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # NotImplementedError is a RuntimeError
            # This torch or this device has no widening product (the CPU has none; torch
            # < 2.8 takes no out_dtype): the rounded path from now on.
            _NO_WIDENING_MM.add(grad.device.type)
    product = torch.mm(grad.t(), act)
    if acc is None:
        return product.float()
    acc += product
    return acc


# Device types (``cuda``, ``cpu``) whose torch.mm took no ``out_dtype`` in this process.
_NO_WIDENING_MM: set[str] = set()


def as_row_matrix(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` ``[*, C]`` as ``[rows, C]`` in ``dtype``: a view when its layout allows, else a copy."""
    return t.reshape(-1, t.shape[-1]).to(dtype)


def layernorm_linear_backward(
    x: torch.Tensor, dy: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dx_dtype: torch.dtype,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``LN(x) weight^T + bias`` given ``dy`` ``[*, O]``: dx ``[*, K]``
    (contiguous) and the fp32 ln_weight, ln_bias ``[K]`` gradients (None unless need_input),
    the fp32 weight ``[O, K]`` (None unless need_weight) and bias ``[O]`` (None unless
    need_bias) gradients. mean, rstd: x's fp32 row statistics ``[M]``.
    """
    K = x.shape[-1]
    O = weight.shape[0]
    dtype = weight.dtype
    rows, (x, dy) = rows_of(x, dy)
    M = rows.count
    dx = torch.empty(x.shape, device=x.device, dtype=dx_dtype) if need_input else None
    dy_rows = as_row_matrix(dy, dtype) if need_weight else None
    D2 = rows.sizes[2]
    block_k = block_size(K, 1 << 30)
    # The bias gradient rides on the weight-gradient product as a column of ones (see the
    # kernel); 16 bytes of padding keep the operand's rows aligned.
    bias_in_product = need_bias and need_weight
    xn_width = K + 16 // dtype.itemsize if bias_in_product else K
    narrow_block_n = block_size(O, 1 << 30)  # the narrow kernel's one block of output columns
    grads = {}

    def launch_narrow(cfg):
        block_m = cfg["BLOCK_M"]
        num_blocks = cdiv(M, block_m)
        programs = min(num_blocks, cfg["PROGRAMS_PER_SM"] * multiprocessors(x.device))
        # Every program's partials in one row of one buffer, summed by one reduction:
        # dW [O, K], then the bias gradient [O] and the LayerNorm gradients [2, K] where asked.
        width = O * K + (O if need_bias else 0) + (2 * K if need_input else 0)
        parts = torch.empty(programs, width, device=x.device, dtype=torch.float32)
        offset = O * K
        db_part = parts[:, offset:] if need_bias else None
        offset += O if need_bias else 0
        ln_w_part, ln_b_part = (parts[:, offset:], parts[:, offset + K:]) if need_input else (None, None)
        dummy = mean
        descs = None
        if cfg.get("TMA"):
            descs = _row_descriptors((x, (block_m, block_k)), (dy, (block_m, narrow_block_n)),
                                     *([(dx, (block_m, block_k))] if need_input else []))
        if descs is None:  # TMA asked or not: the pointer path with the same tiles
            tensors = (x, dy, dx if need_input else dummy)
            row_args = (rows.per_batch, D2, O, *rows.args(0), x.stride(-1), *rows.args(1), dy.stride(-1))
            layout = {"X_MERGED": rows.merged[0], "DY_MERGED": rows.merged[1], "ONE_BATCH": rows.sizes[0] == 1}
        else:  # one batch of contiguous rows
            tensors = descs if need_input else (*descs, dummy)
            row_args = (M, 1, O, 0, 0, 0, 1, 0, 0, 0, 1)
            layout = {"X_MERGED": True, "DY_MERGED": True, "ONE_BATCH": True, "TMA": True}
        launch_kernel(_layernorm_linear_backward_narrow_kernel, (programs,),
            tensors[0], tensors[1], ln_weight, ln_bias, weight, mean, rstd, tensors[2],
            ln_w_part if need_input else dummy, ln_b_part if need_input else dummy, parts,
            db_part if need_bias else dummy, width,
            M, *row_args, weight.stride(0), weight.stride(1),
            K=K, DOT_PRECISION=dot_precision(dtype), NEED_DX=need_input, NEED_BIAS=need_bias,
            BLOCK_M=block_m, BLOCK_N=narrow_block_n, BLOCK_K=block_k, **layout, **_launch_kwargs(cfg),
        )
        total = parts.sum(0)
        grads["w"] = total[: O * K].view(O, K)
        grads["b"] = total[O * K : O * K + O] if need_bias else None
        grads["ln_w"], grads["ln_b"] = (total[offset : offset + K], total[offset + K :]) if need_input else (None, None)

    def launch(cfg):
        if cfg.get("NARROW"):
            return launch_narrow(cfg)
        block_m = cfg["BLOCK_M"]
        num_blocks = cdiv(M, block_m)
        ln_parts = torch.empty(2, num_blocks, K, device=x.device, dtype=torch.float32) if need_input else None
        ln_w_part, ln_b_part = ln_parts if need_input else (None, None)
        dw = None
        chunks = (row_chunks(M, xn_width * dtype.itemsize, wave_rows(block_m, x.device)) if need_weight
                  else [(0, M)])
        xn = torch.empty(chunks[0][1], xn_width, device=x.device, dtype=dtype) if need_weight else None
        dummy = mean
        block_n = cfg["BLOCK_N"]
        descs = None
        if cfg.get("TMA") and need_input:
            descs = _row_descriptors((x, (block_m, block_k)), (dy, (block_m, block_n)), (weight, (block_n, block_k)),
                                     (dx, (block_m, block_k)))
        if descs is None:  # TMA asked or not: the pointer path with the same tiles
            tensors = (x, dy, weight, dx if need_input else dummy)
            row_args = (rows.per_batch, D2, O, *rows.args(0), x.stride(-1), *rows.args(1), dy.stride(-1))
            layout = {"X_MERGED": rows.merged[0], "DY_MERGED": rows.merged[1]}
        else:  # one batch of contiguous rows
            tensors = descs
            row_args = (M, 1, O, 0, 0, 0, 1, 0, 0, 0, 1)
            layout = {"X_MERGED": True, "DY_MERGED": True, "TMA": True}
        for start, end in chunks:
            launch_kernel(_layernorm_linear_backward_kernel, (cdiv(end - start, block_m),),
                tensors[0], tensors[1], ln_weight, ln_bias, tensors[2], mean, rstd, tensors[3],
                xn if need_weight else dummy, ln_w_part if need_input else dummy,
                ln_b_part if need_input else dummy,
                start, end, *row_args, weight.stride(0), weight.stride(1),
                K=K, DOT_PRECISION=dot_precision(dtype), NEED_DX=need_input, WRITE_XN=need_weight,
                XN_WIDTH=xn_width, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **layout,
                **_launch_kwargs(cfg),
            )
            if need_weight:
                dw = add_weight_grad(dw, dy_rows[start:end], xn[: end - start])
        grads["ln_w"], grads["ln_b"] = ln_parts.sum(1) if need_input else (None, None)
        grads["w"] = dw[:, :K].contiguous() if bias_in_product else dw
        # Not in the kernel's column loop: a store there (with the dot accumulating across
        # iterations) made Triton 3.6's pipeliner drop one column block's dot on an H200
        # (dx off by 1/sqrt(blocks)). Without a weight gradient, torch's reduction.
        if bias_in_product:
            grads["b"] = dw[:, K].contiguous()
        else:
            grads["b"] = dy.reshape(-1, O).sum(0, dtype=torch.float32) if need_bias else None

    # The row lives in registers: fewer rows per block as K grows, so wide rows still fit.
    default = {"BLOCK_M": max(16, min(64, 8192 // block_k)),
               "BLOCK_N": max(16, min(block_size(O, 64), 16384 // block_k)),
               "num_warps": 8 if block_k >= 256 else 4}
    candidates = [
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw}
        for bm in (32, 64, 128) for bn in sorted({block_size(O, 32), block_size(O, 64), block_size(O, 128)})
        for nw in (4, 8)
    ] if block_k <= 128 else []
    if candidates and descriptors_available():  # tensor-descriptor tiles (session 31)
        candidates += [
            {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns, "TMA": True}
            for bm in (64, 128) for bn in sorted({block_size(O, 64), block_size(O, 128)}) for nw in (4, 8)
            for ns in (2, 3)
        ]
    if need_weight and block_k <= 128 and narrow_block_n <= 128:
        # The pipeline depth of its row loop too: at 128 -> 16, N = 768, three stages took
        # 0.357 ms against 0.377 for two (benchmarks/NOTES.md, session 18; 16-row blocks lost).
        candidates += [NARROW_DEFAULT | {"BLOCK_M": bm, "num_warps": nw, "PROGRAMS_PER_SM": p, "num_stages": ns}
                       for bm, nw in ((32, 8), (64, 8), (32, 4)) for p in (2, 4, 8) for ns in (2, 3, 4)]
        if block_k >= K and descriptors_available():  # tensor-descriptor tiles (session 31)
            candidates += [NARROW_DEFAULT | {"BLOCK_M": bm, "num_warps": nw, "PROGRAMS_PER_SM": p, "num_stages": ns,
                                             "TMA": True}
                           for bm, nw in ((32, 8), (64, 8), (64, 4)) for p in (2, 4) for ns in (2, 3)]
        if narrow_block_n <= NARROW_MAX_OUT:
            default = NARROW_DEFAULT
    key = (K, O, str(dtype), str(x.dtype), str(dy.dtype), need_input, need_weight, need_bias)
    run_tuned("layernorm_linear_bwd", key, x.device, candidates, default, launch, rows=M)
    return dx, grads["ln_w"], grads["ln_b"], grads["w"], grads["b"]


# --------------------------------------------------------------------------- autograd


class LayerNormLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, weight, bias, eps, compute_dtype):
        weight_c = weight.to(compute_dtype)
        out, mean, rstd = layernorm_linear_forward(x, ln_weight, ln_bias, weight_c, bias, eps)
        ctx.save_for_backward(x, ln_weight, ln_bias, weight_c, mean, rstd)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, ln_weight, ln_bias, weight_c, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dln_w, dln_b, dw, db = layernorm_linear_backward(
            x, dout, ln_weight, ln_bias, weight_c, mean, rstd, x.dtype,
            need_input=any(needs[:3]), need_weight=needs[3], need_bias=ctx.has_bias and needs[4],
        )
        return dx, dln_w, dln_b, dw, db, None, None


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

    x: ``[*, K]``, any strides; ln_weight, ln_bias: ``[K]``; weight: ``[O, K]``; bias: ``[O]``
    or None. Returns ``[*, O]`` (in autocast's dtype under autocast). LayerNorm statistics
    are fp32; weight and LayerNorm gradients are deterministic.
    """
    K, O = x.shape[-1], weight.shape[0]
    for name, tensor, shape in (("ln_weight", ln_weight, (K,)), ("ln_bias", ln_bias, (K,)),
                                ("weight", weight, (O, K)), ("bias", bias, (O,))):
        expect_shape("layernorm_linear", name, tensor, shape)
    if resolve_backend(backend, x, ln_weight, ln_bias, weight, bias) == "torch" or x.numel() == 0:
        return layernorm_linear_reference(x, ln_weight, ln_bias, weight, bias, eps)
    return _layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps)


@torch.compiler.disable  # a compiled caller breaks its graph here instead of tracing the launcher
def _layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps):
    return LayerNormLinearFunction.apply(x, ln_weight, ln_bias, weight, bias, eps, autocast_dtype(x))
