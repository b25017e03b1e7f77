"""The SwiGLU transition of AF3 (Alg. 11): LayerNorm -> Linear -> SwiGLU -> Linear, fused.

The hidden activation is ``n`` times wider than the input (n = 4 in AF3). The fused path
never stores it whole: the forward walks the hidden dimension in chunks, each chunk going
straight into the output product; the backward recomputes them in a row-parallel kernel for
dx, which also writes the weight gradients' operands for a bounded chunk of rows at a time
(cuBLAS multiplies those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megafold.kernels._common import (
    cdiv,
    descriptors_available,
    launch_kernel,
    resolve_backend,
    run_tuned,
    tensor_descriptor,
)
from megafold.kernels._math import sigmoid
from megafold.kernels.layernorm_linear import (
    _chunk_rows,
    _layernorm_backward_rows,
    _layernorm_chunk,
    _layernorm_chunk_of,
    _layernorm_of,
    _layernorm_tile,
    _row_descriptors,
    _row_offsets,
    add_weight_grad,
    as_row_matrix,
    autocast_dtype,
    block_size,
    dot_precision,
    expect_shape,
    row_chunks,
    rows_of,
    wave_rows,
)


# The weight gradients' operands are 13 times as wide as a row of x ([rows, c + 3h]): twice
# the common chunk budget halves the launches at N = 768 (each ends in a partly filled last
# wave). Below ~N = 400 that budget held every row in one chunk: the backward then held the
# whole hidden and its gradient, and the op's peak was 0.54x eager's at N = 384 (546 against
# 1010 MiB, benchmarks/NOTES.md, session 22). At least MIN_CHUNKS chunks keep each of them
# to about half the rows: 347 MiB, 0.34x eager's peak at 384 on the H200 (session 23), for one
# more launch and three more cuBLAS products (+3% time at 384).
CHUNK_BUDGET_SCALE = 2
MIN_CHUNKS = 2


@triton.jit
def _swiglu_chunk(xn, w_in_ptr, h0, H, sw_h, sw_c, C: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, TMA: tl.constexpr):
    """Hidden units [h0, h0 + BLOCK_H) of ``a`` and ``b`` (fp32) and the ``w_in`` tiles they came from.
    TMA: w_in_ptr is a descriptor of w_in ``[2H, C]`` and BLOCK_H divides H."""
    if TMA:
        w_a = w_in_ptr.load([h0, 0])
        w_b = w_in_ptr.load([H + h0, 0])
    else:
        hs = h0 + tl.arange(0, BLOCK_H)
        cs = tl.arange(0, BLOCK_C)
        ok = (hs < H)[:, None] & (cs < C)[None, :]
        w_a = tl.load(w_in_ptr + hs[:, None] * sw_h + cs[None, :] * sw_c, mask=ok, other=0.0)
        w_b = tl.load(w_in_ptr + (hs + H)[:, None] * sw_h + cs[None, :] * sw_c, mask=ok, other=0.0)
    a = tl.dot(xn, tl.trans(w_a), input_precision=DOT_PRECISION)
    b = tl.dot(xn, tl.trans(w_b), input_precision=DOT_PRECISION)
    return a, b, w_a, w_b


@triton.jit
def _transition_forward_kernel(
    x_ptr, ln_w_ptr, ln_b_ptr, w_in_ptr, w_out_ptr, out_ptr, mean_ptr, rstd_ptr,
    rows_per_batch, inner, H, C_OUT,
    sx_b, sx_o, sx_i, sx_c, sw_in_h, sw_in_c, sw_out_c, sw_out_h, eps,
    C: tl.constexpr, X_MERGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_H: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """TMA: x_ptr, w_in_ptr, w_out_ptr and out_ptr are tensor descriptors of x ``[M, C]`` (one
    batch of contiguous rows), w_in ``[2H, C]``, w_out ``[C_OUT, H]`` and out ``[M, C_OUT]``,
    and BLOCK_H divides H: tiles move by their corners, the weight tiles of the hidden loop
    are fetched ahead into shared memory, and the output tile leaves through it."""
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_batch
    if TMA:
        ok = row_ok[:, None] & (tl.arange(0, BLOCK_C) < C)[None, :]
        xn, mean, rstd = _layernorm_of(x_ptr.load([pid * BLOCK_M, 0]), ok, ln_w_ptr, ln_b_ptr, eps, C, BLOCK_C)
        xn = xn.to(w_in_ptr.dtype)
    else:
        x_rows = _row_offsets(batch, rows, inner, sx_b, sx_o, sx_i, X_MERGED)
        xn, mean, rstd = _layernorm_tile(x_ptr, x_rows, row_ok, sx_c, ln_w_ptr, ln_b_ptr, eps, C, BLOCK_C)
        xn = xn.to(w_in_ptr.dtype.element_ty)

    cos = tl.arange(0, BLOCK_CO)
    acc = tl.zeros([BLOCK_M, BLOCK_CO], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        a, b, _, _ = _swiglu_chunk(xn, w_in_ptr, h0, H, sw_in_h, sw_in_c, C, DOT_PRECISION, BLOCK_C, BLOCK_H,
                                   TMA)
        # silu(a) * b in fp32; only this BLOCK_H-wide slice of the hidden ever exists.
        hidden = a * sigmoid(a) * b
        if TMA:
            w_out_t = tl.trans(w_out_ptr.load([0, h0]))
        else:
            hs = h0 + tl.arange(0, BLOCK_H)
            w_out_t = tl.load(
                w_out_ptr + hs[:, None] * sw_out_h + cos[None, :] * sw_out_c,
                mask=(hs < H)[:, None] & (cos < C_OUT)[None, :], other=0.0,
            )
        acc = tl.dot(hidden.to(w_out_t.dtype), w_out_t, acc, input_precision=DOT_PRECISION)

    flat = batch.to(tl.int64) * rows_per_batch + rows
    if TMA:
        out_ptr.store([pid * BLOCK_M, 0], acc.to(out_ptr.dtype))
    else:
        tl.store(out_ptr + flat[:, None] * C_OUT + cos[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cos < C_OUT)[None, :])
    tl.store(mean_ptr + flat, mean, mask=row_ok)
    tl.store(rstd_ptr + flat, rstd, mask=row_ok)


@triton.jit
def _swiglu_backward_chunk(xn, dy, w_in_ptr, w_out_ptr, h0, H, C_OUT, sw_in_h, sw_in_c, sw_out_c, sw_out_h,
                           C: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_H: tl.constexpr, TMA: tl.constexpr):
    """Recompute one hidden chunk; return d(a), d(b) (fp32), silu(a) * b and the w_in tiles.
    TMA: the weights by descriptor (``_swiglu_chunk``)."""
    a, b, w_a, w_b = _swiglu_chunk(xn, w_in_ptr, h0, H, sw_in_h, sw_in_c, C, DOT_PRECISION, BLOCK_C, BLOCK_H,
                                   TMA)
    if TMA:
        w_out = w_out_ptr.load([0, h0])
    else:
        hs = h0 + tl.arange(0, BLOCK_H)
        cos = tl.arange(0, BLOCK_CO)
        w_out = tl.load(
            w_out_ptr + cos[:, None] * sw_out_c + hs[None, :] * sw_out_h,
            mask=(cos < C_OUT)[:, None] & (hs < H)[None, :], other=0.0,
        )
    d_hidden = tl.dot(dy, w_out, input_precision=DOT_PRECISION)
    sig = sigmoid(a)
    silu = a * sig
    da = d_hidden * b * sig * (1.0 + a * (1.0 - sig))
    db = d_hidden * silu
    return da, db, silu * b, w_a, w_b


@triton.jit
def _transition_backward_kernel(
    x_ptr, dy_ptr, ln_w_ptr, ln_b_ptr, w_in_ptr, w_out_ptr, mean_ptr, rstd_ptr,
    dx_ptr, xn_ptr, dab_ptr, hidden_ptr, dln_w_part_ptr, dln_b_part_ptr,
    row_start, row_end, rows_per_batch, inner, H, C_OUT,
    sx_b, sx_o, sx_i, sx_c, sdy_b, sdy_o, sdy_i, sdy_c, sw_in_h, sw_in_c, sw_out_c, sw_out_h,
    C: tl.constexpr, X_MERGED: tl.constexpr, DY_MERGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_H: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """One row block of the chunk ``[row_start, row_end)``: dx, per-block partials of the
    LayerNorm parameter gradients, and the operands of the weight gradients for the chunk:
    LN(x) ``[rows, C]``, d(a, b) ``[rows, 2H]`` and silu(a) * b ``[rows, H]``.

    TMA: every 2-D operand is a tensor descriptor (x, dy and dx of one batch of contiguous
    rows; the weights as in the forward; the chunk's LN(x), d(a, b) and silu(a) * b buffers),
    and BLOCK_H divides H: the hidden loop's weight tiles are fetched ahead into shared memory
    and its three stores leave through it asynchronously."""
    pid = tl.program_id(0)
    local, flat, row_ok, batch, rows = _chunk_rows(row_start, row_end, rows_per_batch, BLOCK_M)
    mean = tl.load(mean_ptr + flat, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + flat, mask=row_ok, other=0.0)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    ok = row_ok[:, None] & c_ok[None, :]
    # The block's first row: in the chunk's buffers and in x, dy and dx.
    local0 = pid * BLOCK_M
    row0 = row_start + local0
    if TMA:
        dtype = w_in_ptr.dtype
        xn = _layernorm_chunk_of(x_ptr.load([row0, 0]), ok, cs, c_ok, ln_w_ptr, ln_b_ptr, mean, rstd).to(dtype)
        xn_ptr.store([local0, 0], xn)
        dy = dy_ptr.load([row0, 0]).to(dtype)
    else:
        dtype = w_in_ptr.dtype.element_ty
        x_rows = _row_offsets(batch, rows, inner, sx_b, sx_o, sx_i, X_MERGED)
        xn = _layernorm_chunk(x_ptr, x_rows, row_ok, sx_c, ln_w_ptr, ln_b_ptr, mean, rstd, 0, C, BLOCK_C).to(dtype)
        tl.store(xn_ptr + local[:, None] * C + cs[None, :], xn, mask=ok)
        dy_rows = _row_offsets(batch, rows, inner, sdy_b, sdy_o, sdy_i, DY_MERGED)
        cos = tl.arange(0, BLOCK_CO)
        dy = tl.load(dy_ptr + dy_rows[:, None] + cos[None, :].to(tl.int64) * sdy_c,
                     mask=row_ok[:, None] & (cos < C_OUT)[None, :], other=0.0).to(dtype)

    dxn = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        da, db, hidden, w_a, w_b = _swiglu_backward_chunk(
            xn, dy, w_in_ptr, w_out_ptr, h0, H, C_OUT, sw_in_h, sw_in_c, sw_out_c, sw_out_h,
            C, DOT_PRECISION, BLOCK_C, BLOCK_CO, BLOCK_H, TMA,
        )
        da = da.to(dtype)
        db = db.to(dtype)
        if TMA:
            dab_ptr.store([local0, h0], da)
            dab_ptr.store([local0, H + h0], db)
            hidden_ptr.store([local0, h0], hidden.to(dtype))
        else:
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = row_ok[:, None] & (hs < H)[None, :]
            dab_rows = dab_ptr + local[:, None].to(tl.int64) * (2 * H)
            hidden_rows = hidden_ptr + local[:, None].to(tl.int64) * H
            tl.store(dab_rows + hs[None, :], da, mask=h_ok)
            tl.store(dab_rows + (H + hs)[None, :], db, mask=h_ok)
            tl.store(hidden_rows + hs[None, :], hidden.to(dtype), mask=h_ok)
        dxn = tl.dot(da, w_a, dxn, input_precision=DOT_PRECISION)
        dxn = tl.dot(db, w_b, dxn, input_precision=DOT_PRECISION)

    if TMA:  # x again (from L2) rather than held through the loop
        x = x_ptr.load([row0, 0]).to(tl.float32)
    else:
        x = tl.load(x_ptr + x_rows[:, None] + cs[None, :].to(tl.int64) * sx_c, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    gamma = tl.load(ln_w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    dx = _layernorm_backward_rows(dxn, xhat, rstd, gamma, C)
    if TMA:
        dx_ptr.store([row0, 0], dx.to(dx_ptr.dtype))
    else:
        tl.store(dx_ptr + flat[:, None] * C + cs[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    # Chunks start at multiples of BLOCK_M, so this block's partials have one global index.
    part = row_start // BLOCK_M + pid
    tl.store(dln_w_part_ptr + part * C + cs, tl.sum(dxn * xhat, axis=0), mask=c_ok)
    tl.store(dln_b_part_ptr + part * C + cs, tl.sum(dxn, axis=0), mask=c_ok)


# --------------------------------------------------------------------------- launches


def _blocks(C: int, C_OUT: int) -> tuple[int, int, int]:
    """Full-row widths of the input and output channels, and the wider of the two (which
    bounds the register tiles: fewer rows per program as rows widen)."""
    block_c, block_co = block_size(C, 1 << 30), block_size(C_OUT, 1 << 30)
    return block_c, block_co, max(block_c, block_co)


def _descriptors(cfg: dict, H: int, w_in, w_out, block_c: int, block_co: int, *rows):
    """Tensor descriptors for a ``"TMA"`` choice: the weights' (w_in ``[2H, C]`` in
    ``[BLOCK_H, C]`` tiles, w_out ``[C_OUT, H]`` in ``[C_OUT, BLOCK_H]`` tiles) and, after them,
    those of the ``(tensor, block_shape)`` pairs ``rows`` (``_row_descriptors``). None (the
    pointer path, same tiles) where the choice has none, BLOCK_H does not divide H (a tile of
    ``a`` would run into ``b``'s rows, a store of d(a) into d(b)'s columns) or a layout has no
    descriptor."""
    bh = cfg["BLOCK_H"]
    if not cfg.get("TMA") or H % bh:
        return None
    weights = [tensor_descriptor(w_in, (bh, block_c)), tensor_descriptor(w_out, (block_co, bh))]
    others = _row_descriptors(*rows)
    if None in weights or others is None:
        return None
    return weights + others


def _with_descriptors(candidates: list[dict]) -> list[dict]:
    """``candidates`` and, where this Triton has tensor descriptors, each again with ``"TMA"``,
    and deeper pipelines of narrow hidden chunks: their weight tiles wait in shared memory, not
    registers (3 stages of 32 units beat 2, and 64 units, at c = 128 on the H200:
    benchmarks/NOTES.md, session 32)."""
    if not descriptors_available():
        return candidates
    deep = [{"BLOCK_M": 64, "BLOCK_H": bh, "num_warps": nw, "num_stages": ns}
            for bh in (16, 32) for nw in (4, 8) for ns in (4, 5)]
    deep += [{"BLOCK_M": 64, "BLOCK_H": 16, "num_warps": 4, "num_stages": 3},
             {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 4}]
    return candidates + [c | {"TMA": True} for c in candidates + deep]


def default_configs(C: int, C_OUT: int) -> dict[str, dict]:
    """Each kernel's configuration where no choice is shipped or tuned ("fwd", "bwd").

    Register budget: the [BLOCK_M, C] row tile and the [BLOCK_M, C_OUT] accumulator. The
    backward's is the H100's tuned choice at c = 128 (3 stages): a GPU whose shared memory
    does not hold them gets fewer from ``run_tuned`` (an AMD GPU's 64 KiB of LDS, an RTX 4090's
    99 KiB)."""
    wide = _blocks(C, C_OUT)[2]
    rows = max(16, min(64, 8192 // wide))
    return {"fwd": {"BLOCK_M": rows, "BLOCK_H": max(16, min(64, 8192 // wide)), "num_warps": 4},
            "bwd": {"BLOCK_M": rows, "BLOCK_H": max(16, min(32, 4096 // wide)), "num_warps": 4, "num_stages": 3}}


def transition_forward(x, ln_weight, ln_bias, w_in, w_out, eps):
    """Output ``[*, C_OUT]`` in w_in's dtype and x's fp32 row statistics ``mean, rstd`` ``[M]``."""
    C, H, C_OUT = x.shape[-1], w_out.shape[1], w_out.shape[0]
    rows, (x,) = rows_of(x)
    out = torch.empty(*x.shape[:-1], C_OUT, device=x.device, dtype=w_in.dtype)
    mean = torch.empty(rows.count, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_c, block_co, wide = _blocks(C, C_OUT)

    def launch(cfg):
        bm = cfg["BLOCK_M"]
        descs = _descriptors(cfg, H, w_in, w_out, block_c, block_co, (x, (bm, block_c)), (out, (bm, block_co)))
        if descs is None:  # TMA asked or not: the pointer path with the same tiles
            tensors = (x, w_in, w_out, out)
            row_args = (rows.per_batch, rows.sizes[2], H, C_OUT, *rows.args(0), x.stride(-1))
            batches, layout = rows.sizes[0], {"X_MERGED": rows.merged[0]}
        else:  # one batch of contiguous rows
            w_in_d, w_out_d, x_d, out_d = descs
            tensors = (x_d, w_in_d, w_out_d, out_d)
            row_args = (rows.count, 1, H, C_OUT, 0, 0, 0, 1)
            batches, layout = 1, {"X_MERGED": True, "TMA": True}
        launch_kernel(_transition_forward_kernel, (cdiv(row_args[0], bm), batches),
            tensors[0], ln_weight, ln_bias, tensors[1], tensors[2], tensors[3], mean, rstd, *row_args,
            w_in.stride(0), w_in.stride(1), w_out.stride(0), w_out.stride(1), eps,
            C=C, DOT_PRECISION=dot_precision(w_in.dtype),
            BLOCK_M=bm, BLOCK_C=block_c, BLOCK_CO=block_co, BLOCK_H=cfg["BLOCK_H"], **layout,
            num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2),
        )

    default = default_configs(C, C_OUT)["fwd"]
    # Tensor-descriptor tiles (TMA on Hopper) as candidates too (benchmarks/NOTES.md, session 32).
    candidates = _with_descriptors([
        {"BLOCK_M": bm, "BLOCK_H": bh, "num_warps": nw, "num_stages": ns}
        for bm in (64, 128) for bh in (32, 64, 128) for nw in (4, 8) for ns in (2, 3)
    ]) if wide <= 128 else []
    key = (C, H, C_OUT, str(w_in.dtype), str(x.dtype))
    run_tuned("transition_fwd", key, x.device, candidates, default, launch, rows=rows.count)
    return out, mean, rstd


def transition_backward(x, dy, ln_weight, ln_bias, w_in, w_out, mean, rstd, dx_dtype):
    """dx and the fp32 gradients of ln_weight, ln_bias, w_in, w_out.

    One row-parallel kernel per chunk of rows recomputes the hidden, chunk by chunk of it,
    for dx and writes the operands of the weight gradients, which cuBLAS then multiplies:
    ``dw_in += d(a, b)^T LN(x)`` and ``dw_out += dy^T (silu(a) * b)``.
    """
    C, H, C_OUT = x.shape[-1], w_out.shape[1], w_out.shape[0]
    dtype = w_in.dtype
    rows, (x, dy) = rows_of(x, dy)
    M = rows.count
    dx = torch.empty(x.shape, device=x.device, dtype=dx_dtype)
    dy_rows = as_row_matrix(dy, dtype)
    block_c, block_co, wide = _blocks(C, C_OUT)
    grads = {}

    def launch(cfg):
        block_m = cfg["BLOCK_M"]
        num_blocks = cdiv(M, block_m)
        ln_parts = torch.empty(2, num_blocks, C, device=x.device, dtype=torch.float32)  # one reduction
        ln_w_part, ln_b_part = ln_parts
        dw_in = dw_out = None
        chunks = row_chunks(M, (C + 3 * H) * dtype.itemsize, wave_rows(block_m, x.device), CHUNK_BUDGET_SCALE,
                            MIN_CHUNKS)
        chunk = chunks[0][1]
        xn = torch.empty(chunk, C, device=x.device, dtype=dtype)
        dab = torch.empty(chunk, 2 * H, device=x.device, dtype=dtype)
        hidden = torch.empty(chunk, H, device=x.device, dtype=dtype)
        bh = cfg["BLOCK_H"]
        descs = _descriptors(cfg, H, w_in, w_out, block_c, block_co, (x, (block_m, block_c)),
                             (dy, (block_m, block_co)), (dx, (block_m, block_c)), (xn, (block_m, block_c)),
                             (dab, (block_m, bh)), (hidden, (block_m, bh)))
        weight_strides = (w_in.stride(0), w_in.stride(1), w_out.stride(0), w_out.stride(1))
        if descs is None:  # TMA asked or not: the pointer path with the same tiles
            tensors = (x, dy, w_in, w_out, dx, xn, dab, hidden)
            row_args = (rows.per_batch, rows.sizes[2], H, C_OUT, *rows.args(0), x.stride(-1),
                        *rows.args(1), dy.stride(-1), *weight_strides)
            layout = {"X_MERGED": rows.merged[0], "DY_MERGED": rows.merged[1]}
        else:  # one batch of contiguous rows
            w_in_d, w_out_d, *others = descs
            tensors = (others[0], others[1], w_in_d, w_out_d, *others[2:])
            row_args = (M, 1, H, C_OUT, 0, 0, 0, 1, 0, 0, 0, 1, *weight_strides)
            layout = {"X_MERGED": True, "DY_MERGED": True, "TMA": True}
        meta = dict(C=C, DOT_PRECISION=dot_precision(dtype), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co,
                    BLOCK_H=bh, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2), **layout)
        for start, end in chunks:
            launch_kernel(_transition_backward_kernel, (cdiv(end - start, block_m),),
                tensors[0], tensors[1], ln_weight, ln_bias, tensors[2], tensors[3], mean, rstd, *tensors[4:],
                ln_w_part, ln_b_part, start, end, *row_args, **meta,
            )
            dw_in = add_weight_grad(dw_in, dab[: end - start], xn[: end - start])
            dw_out = add_weight_grad(dw_out, dy_rows[start:end], hidden[: end - start])
        ln_w, ln_b = ln_parts.sum(1)
        grads.update(ln_w=ln_w, ln_b=ln_b, w_in=dw_in, w_out=dw_out)

    default = default_configs(C, C_OUT)["bwd"]
    # The pipeline depth matters: at N=768 and c = 128, 64 rows, 32 hidden units, 4 warps and
    # 3 stages took 3.41 ms for the whole op against 3.81 for the best 2-stage choice
    # (benchmarks/NOTES.md, session 19). One stage is not a candidate: a variant of this kernel
    # compiled by Triton 3.6 with one stage faulted (illegal memory access) on an H100.
    candidates = _with_descriptors([
        {"BLOCK_M": bm, "BLOCK_H": bh, "num_warps": nw, "num_stages": ns}
        for bm in (64, 128) for bh in (32, 64) for nw in (4, 8) for ns in (2, 3)
    ]) if wide <= 128 else []
    key = (C, H, C_OUT, str(dtype), str(x.dtype), str(dy.dtype))
    run_tuned("transition_bwd", key, x.device, candidates, default, launch, rows=M)
    return dx, grads["ln_w"], grads["ln_b"], grads["w_in"], grads["w_out"]


# --------------------------------------------------------------------------- autograd


class TransitionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w_in, w_out, eps, compute_dtype):
        w_in_c, w_out_c = w_in.to(compute_dtype), w_out.to(compute_dtype)
        out, mean, rstd = transition_forward(x, ln_weight, ln_bias, w_in_c, w_out_c, eps)
        ctx.save_for_backward(x, ln_weight, ln_bias, w_in_c, w_out_c, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, ln_weight, ln_bias, w_in_c, w_out_c, mean, rstd = ctx.saved_tensors
        grads = transition_backward(x, dout, ln_weight, ln_bias, w_in_c, w_out_c, mean, rstd, x.dtype)
        return (*grads, None, None)


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

    x: ``[*, c]``, any strides; ln_weight, ln_bias: ``[c]``; w_in: ``[2 * h, c]`` (rows: a
    then b); w_out: ``[c_out, h]`` with h = n * c. Returns ``[*, c_out]`` (in autocast's dtype
    under autocast). The ``[*, 2 * h]`` hidden activation is never stored.
    """
    C, (C_OUT, H) = x.shape[-1], w_out.shape
    for name, tensor, shape in (("ln_weight", ln_weight, (C,)), ("ln_bias", ln_bias, (C,)),
                                ("w_in", w_in, (2 * H, C)), ("w_out", w_out, (C_OUT, H))):
        expect_shape("transition", name, tensor, shape)
    if resolve_backend(backend, x, ln_weight, ln_bias, w_in, w_out) == "torch" or x.numel() == 0:
        return transition_reference(x, ln_weight, ln_bias, w_in, w_out, eps)
    return _transition_triton(x, ln_weight, ln_bias, w_in, w_out, eps)


@torch.compiler.disable  # a compiled caller breaks its graph here instead of tracing the launcher
def _transition_triton(x, ln_weight, ln_bias, w_in, w_out, eps):
    return TransitionFunction.apply(x, ln_weight, ln_bias, w_in, w_out, eps, autocast_dtype(x))
