"""EvoAttention: attention over the last token axis with a pair bias shared by every row.

    out[s, i, h] = sigmoid(gate[s, i, h]) * sum_j softmax_j(q[s, i, h] . k[s, j, h] * scale
                                                          + bias[h, i, j] | mask[s, j]) v[s, j, h]

Triangle attention (S = N rows), single attention with pair bias (S = 1, or S = diffusion
samples sharing one bias) and MSA pair-weighted averaging are all this op.

Layout: q, k, v, gate ``[*, S, N, H, D]`` with any strides (the ending-node triangle attention
passes a transposed view: no copy is made); bias ``[*, H, N, N]``; mask ``[*, S, N]`` bool,
True = key attended. A row whose keys are all masked gives output 0 and gradient 0.

Forward: one program per (row s, query block, batch x head), online softmax over key blocks
in base 2 (log2(e) folded into the scale and the bias; the saved log-sum-exp is base 2 too).
Backward, deterministic and without atomics, in three kernels that each own what they write:
  dK, dV  one program per (row, key block), loops over query blocks;
  dQ      one program per (row, query block), loops over key blocks;
  dBias   one program per (query block, key block, batch x head), loops over the S rows and
          reduces their dS in registers before a single store. When that grid is too small
          to fill the GPU, the rows are split into chunks whose fp32 partial sums are added
          in a fixed order afterwards.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from megafold.kernels._common import (
    cdiv,
    descriptors_available,
    interpreter_active,
    launch_kernel,
    multiprocessors,
    next_power_of_2,
    resolve_backend,
    run_tuned,
    tensor_descriptor,
)
from megafold.kernels._math import sigmoid

# --------------------------------------------------------------------------- reference


def evo_attention_reference(q, k, v, bias=None, mask=None, gate=None, scale=None):
    """Plain PyTorch EvoAttention (the eager baseline): materialises ``[*, S, H, N, N]`` scores."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.movedim(-2, -3) for t in (q, k, v))  # [*, S, H, N, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.unsqueeze(-4)
    if mask is not None:
        keys = mask[..., None, None, :]
        # A finite fill keeps fully masked rows finite (NaN-free gradients); they are zeroed below.
        scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs * mask.any(-1)[..., None, None, None].to(probs.dtype)
    out = torch.matmul(probs, vh).movedim(-3, -2)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return out


# --------------------------------------------------------------------------- kernels

# The kernels keep logits in base 2: log2(e) is folded into the scale and the bias.
LOG2E = math.log2(math.e)
_LOG2E = tl.constexpr(LOG2E)
# The rows of a chunk whose first masked keys the dBias pass reduces at a time.
_CHUNK_ROWS = tl.constexpr(64)


@triton.jit
def _widen(index, WIDE: tl.constexpr):
    """``index`` as int64 where an element offset can pass 2**31: pair-sized views such as the
    ending-node attention's transposed q, k, v (a stride of N x 516 elements) at N >= ~2000."""
    if WIDE:
        index = tl.cast(index, tl.int64)  # also takes a loop counter, a plain int in the interpreter
    return index


@triton.jit
def _load_keys(k_row, v_row, mask_row, offs_n, offs_d, n_valid, d_valid,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, HAS_MASK: tl.constexpr):
    """K and V tiles ``[BLOCK_N, BLOCK_D]`` of one row and which of its keys are attended."""
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(k_row + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_row + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    key_ok = n_valid
    if HAS_MASK:
        key_ok = key_ok & (tl.load(mask_row + offs_n * stride_mn, mask=n_valid, other=0) != 0)
    return k, v, key_ok


@triton.jit
def _row_keys(k_head, v_head, mask_row, row, key_row, key_col, offs_n, offs_d, n_valid, d_valid,
              stride_ks, stride_kn, stride_kd, stride_vs, stride_vn, stride_vd, stride_mn,
              HAS_MASK: tl.constexpr, TMA: tl.constexpr):
    """``_load_keys`` of row ``row``'s key block at ``offs_n``. TMA: k_head and v_head are
    descriptors of k and v as ``[B * S * N, H * D]`` and the block starts at row ``key_row``,
    column ``key_col`` (the head's first). Keys past N then come from the next row (or zeros
    past the tensor) and columns past D from the next head: the key mask drops the former;
    the queries' zero columns and the masked stores of out and dQ drop the latter."""
    if TMA:
        k = k_head.load([key_row, key_col])
        v = v_head.load([key_row, key_col])
        key_ok = n_valid
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_row + offs_n * stride_mn, mask=n_valid, other=0) != 0)
    else:
        k, v, key_ok = _load_keys(k_head + row * stride_ks, v_head + row * stride_vs, mask_row, offs_n, offs_d,
                                  n_valid, d_valid, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, HAS_MASK)
    return k, v, key_ok


@triton.jit
def _bias_tile(bias_head, bias_row, start_n, offs_m, offs_n, m_valid, n_valid, stride_bi, stride_bj,
               TMA: tl.constexpr):
    """The bias tile of a query and a key block, fp32, in base 2. TMA: bias_head is a
    descriptor of the bias as ``[rows, N]`` and the query block's rows start at ``bias_row``:
    rows past N belong to queries that are never stored, columns past N are zeros."""
    if TMA:
        tile = bias_head.load([bias_row, start_n])
    else:
        tile = tl.load(bias_head + offs_m[:, None] * stride_bi + offs_n[None, :] * stride_bj,
                       mask=m_valid[:, None] & n_valid[None, :], other=0.0)
    return tile.to(tl.float32) * _LOG2E


@triton.jit
def _key_bases(k_ptr, v_ptr, bias_ptr, b, h, S, N, row0, row1, block_m,
               stride_kb, stride_kh, stride_vb, stride_vh, stride_bb, stride_bh, stride_bi,
               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, TMA: tl.constexpr):
    """What the key loops of the forward and dQ passes address from: k, v and bias at this
    batch and head (TMA: the descriptors themselves), and the descriptors' coordinates: the
    rows' first keys, the head's first column, the query block's first bias row (batch 0's
    where one bias serves every batch, stride_bb == 0)."""
    if TMA:
        k_head = k_ptr
        v_head = v_ptr
        bias_head = bias_ptr
    else:
        k_head = k_ptr + b * stride_kb + h * stride_kh
        v_head = v_ptr + b * stride_vb + h * stride_vh
        bias_head = bias_ptr + b * stride_bb + h * stride_bh
    bias_row = 0
    if TMA and HAS_BIAS:  # (without a bias its strides are 0)
        bias_row = (b * stride_bb + h * stride_bh) // stride_bi + block_m * BLOCK_M
    return k_head, v_head, bias_head, (b * S + row0) * N, (b * S + row1) * N, bias_row


@triton.jit
def _load_queries(q_row, do_ptr, lse_ptr, delta_ptr, bh_row, h, offs_m, offs_d, m_valid, d_valid,
                  stride_qn, stride_qd, H, N, D: tl.constexpr):
    """Q and dO tiles ``[BLOCK_M, BLOCK_D]`` of one row, with its lse and delta."""
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_row + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    # dO (of the ungated attention) is contiguous [B, S, N, H, D].
    do = tl.load(do_ptr + (bh_row // H * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + bh_row * N + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(delta_ptr + bh_row * N + offs_m, mask=m_valid, other=0.0)
    return q, do, lse, delta


@triton.jit
def _row_queries(q_head, do_ptr, lse_ptr, delta_ptr, row, query_row, bh_row, h, offs_m, offs_d, m_valid, d_valid,
                 stride_qs, stride_qn, stride_qd, H, N, D: tl.constexpr, TMA: tl.constexpr):
    """`_load_queries` of row ``row``'s query block at ``offs_m``. TMA: q_head and do_ptr are
    descriptors of q and dO as ``[B * S * N, H * D]`` and the block starts at row ``query_row``.
    Queries past N then come from the next row (or zeros past the tensor): their lse loads as
    +inf, so their p and dS are 0. Columns past D come from the next head."""
    if TMA:
        q = q_head.load([query_row, h * D])
        do = do_ptr.load([query_row, h * D])
        lse = tl.load(lse_ptr + bh_row * N + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(delta_ptr + bh_row * N + offs_m, mask=m_valid, other=0.0)
    else:
        q, do, lse, delta = _load_queries(q_head + row * stride_qs, do_ptr, lse_ptr, delta_ptr, bh_row, h, offs_m,
                                          offs_d, m_valid, d_valid, stride_qn, stride_qd, H, N, D)
    return q, do, lse, delta


@triton.jit
def _softmax_step(q, k, v, bias, key_ok, m_i, l_i, acc, scale_log2,
                  HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key block of one row's online softmax; returns the new (m_i, l_i, acc).

    Logits are kept in base 2 (log2(e) folded into the scale and the bias): exp2 is the
    hardware's exponential, so tl.exp would only add a multiply per logit.
    Invariant: after each key block, m_i is the running row max of the logits,
    l_i = sum_j exp2(logit_j - m_i) and acc = sum_j exp2(logit_j - m_i) v_j.
    """
    if IEEE:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    else:
        logits = tl.dot(q, tl.trans(k)) * scale_log2
    if HAS_BIAS:
        logits += bias
    if MASKED:  # else every key of the block is attended and inside N
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    # A row with no attended key so far keeps m = -inf; shift by 0 instead to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(logits - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _store_row(m_i, l_i, acc, out_ptr, att_ptr, lse_ptr, gate_row, bh_row, h, offs_m, offs_d,
               m_valid, d_valid, stride_gn, stride_gd, H, N, D: tl.constexpr, HAS_GATE: tl.constexpr):
    """Normalise one row's accumulator; store its output, ungated output and lse."""
    empty = l_i == 0.0
    att = acc / tl.where(empty, 1.0, l_i)[:, None]
    # lse is base 2 like the logits. Fully masked rows store lse = +inf, so the backward's
    # exp2(logit - lse) is exactly 0.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + bh_row * N + offs_m, lse, mask=m_valid)
    # out/att are written contiguous [B, S, N, H, D].
    o_offs = (bh_row // H * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    o_mask = m_valid[:, None] & d_valid[None, :]
    if HAS_GATE:
        gate = tl.load(gate_row + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                       mask=o_mask, other=0.0).to(tl.float32)
        tl.store(att_ptr + o_offs, att.to(att_ptr.dtype.element_ty), mask=o_mask)
        att = att * sigmoid(gate)
    tl.store(out_ptr + o_offs, att.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _forward_keys(start, end, q0, q1, m0, l0, acc0, m1, l1, acc1, bias_head, k_head, v_head, mask_batch,
                  row0, row1, offs_m, m_valid, offs_d, d_valid, N, scale_log2,
                  stride_bi, stride_bj, stride_ks, stride_kn, stride_kd, stride_vs, stride_vn, stride_vd,
                  stride_ms, stride_mn,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
                  TMA: tl.constexpr, key_row0, key_row1, key_col, bias_row):
    """The online softmax of the program's rows over the key blocks starting in [start, end).
    MASKED: the keys' mask and N apply; else every key of these blocks is attended and inside
    N (the blocks before the rows' first masked key, `_full_keys_end`): no mask load and no
    select.

    TMA: k_head, v_head and bias_head are tensor descriptors of k, v ``[B * S * N, H * D]`` and
    the bias ``[rows, N]``; the rows' keys start at rows ``key_row0``, ``key_row1`` and column
    ``key_col``, the query block's bias rows at ``bias_row``. Bias rows past N belong to
    queries that are never stored; bias columns past N are zeros."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = _widen(start_n, WIDE) + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        if not MASKED:
            n_valid = offs_n >= 0  # all true: the loads need no key bound
        bias = 0.0
        if HAS_BIAS:
            bias = _bias_tile(bias_head, bias_row, start_n, offs_m, offs_n, m_valid, n_valid, stride_bi, stride_bj,
                              TMA)
        k, v, key_ok = _row_keys(k_head, v_head, mask_batch + row0 * stride_ms, row0, key_row0 + start_n, key_col,
                                 offs_n, offs_d, n_valid, d_valid, stride_ks, stride_kn, stride_kd, stride_vs,
                                 stride_vn, stride_vd, stride_mn, HAS_MASK and MASKED, TMA)
        m0, l0, acc0 = _softmax_step(q0, k, v, bias, key_ok, m0, l0, acc0, scale_log2, HAS_BIAS, MASKED, IEEE)
        if ROWS == 2:
            k, v, key_ok = _row_keys(k_head, v_head, mask_batch + row1 * stride_ms, row1, key_row1 + start_n,
                                     key_col, offs_n, offs_d, n_valid, d_valid, stride_ks, stride_kn, stride_kd,
                                     stride_vs, stride_vn, stride_vd, stride_mn, HAS_MASK and MASKED, TMA)
            m1, l1, acc1 = _softmax_step(q1, k, v, bias, key_ok, m1, l1, acc1, scale_log2, HAS_BIAS, MASKED,
                                         IEEE)
    return m0, l0, acc0, m1, l1, acc1


@triton.jit
def _first_masked_key_kernel(mask_ptr, first_ptr, S, N, stride_mb, stride_ms, stride_mn,
                             BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """Each row's first masked key: int32 ``[B, S]``, N where no key is masked, -1 where every
    key is. One pass over the mask before the forward; the forward, dQ and dBias passes take
    the whole key blocks before it without the mask (`_full_keys_end`)."""
    rows = _widen(tl.program_id(0), WIDE) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = _widen(tl.program_id(1), WIDE)
    row_ptrs = mask_ptr + b * stride_mb + rows[:, None] * stride_ms
    first = tl.full([BLOCK_S, BLOCK_N], 2**31 - 1, tl.int32)
    seen = tl.zeros([BLOCK_S, BLOCK_N], tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = (rows[:, None] < S) & (offs[None, :] < N)
        attended = tl.load(row_ptrs + offs[None, :] * stride_mn, mask=valid, other=0) != 0
        first = tl.minimum(first, tl.where(attended | (offs[None, :] >= N), 2**31 - 1, offs[None, :]))
        seen = tl.maximum(seen, attended.to(tl.int32))
    first = tl.minimum(tl.min(first, axis=1), N)
    tl.store(first_ptr + b * S + rows, tl.where(tl.max(seen, axis=1) != 0, first, -1), mask=rows < S)


@triton.jit
def _full_keys_end(first_ptr, b, S, row0, row1, N, HAS_MASK: tl.constexpr, PREFIX: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the program's rows stop having whole key blocks attended and inside N: the key
    loop runs unmasked up to here and masked after. Without a mask, the blocks inside N; with
    a mask (PREFIX), the blocks before the rows' first masked key (`_first_masked_key_kernel`;
    0 for a row that attends no key); else 0 (every block masked)."""
    if not HAS_MASK:
        end = N // BLOCK_N * BLOCK_N
    elif PREFIX:
        first = tl.load(first_ptr + b * S + row0)
        if ROWS == 2:
            first = tl.minimum(first, tl.load(first_ptr + b * S + row1))
        end = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
    else:
        end = 0
    return end


@triton.jit
def _evo_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, gate_ptr, out_ptr, att_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_mb, stride_ms, stride_mn,
    stride_gb, stride_gs, stride_gn, stride_gh, stride_gd,
    S, H, N, D: tl.constexpr, scale_log2, first_ptr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GATE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, WIDE: tl.constexpr, PREFIX: tl.constexpr, TMA: tl.constexpr = False,
):
    """TMA: k_ptr, v_ptr and bias_ptr are tensor descriptors of k and v as ``[B * S * N, H * D]``
    and of the bias as ``[rows, N]`` (its ``[B * H * N, N]`` rows, or ``[H * N, N]`` where one
    bias serves every batch: stride_bb == 0); `_key_descriptors`."""
    # Query blocks vary fastest: the programs of the same rows run together and share their
    # K/V in L2. A program serves ROWS (1 or 2) rows for one query block: each bias tile it
    # loads serves all of them, and the rows' dot/exp chains overlap.
    block_m = _widen(tl.program_id(0), WIDE)
    row0 = _widen(tl.program_id(1), WIDE) * ROWS
    # With an odd S the last program takes its last row twice and stores the same values twice.
    row1 = tl.minimum(row0 + 1, S - 1)
    batch_head = _widen(tl.program_id(2), WIDE)
    b = batch_head // H
    h = batch_head % H
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < D
    q_offs = offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q_head = q_ptr + b * stride_qb + h * stride_qh
    k_head, v_head, bias_head, key_row0, key_row1, bias_row = _key_bases(
        k_ptr, v_ptr, bias_ptr, b, h, S, N, row0, row1, block_m, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_bb, stride_bh, stride_bi, HAS_BIAS, BLOCK_M, TMA)
    mask_batch = mask_ptr + b * stride_mb

    q0 = tl.load(q_head + row0 * stride_qs + q_offs, mask=qd_mask, other=0.0)
    m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q1, m1, l1, acc1 = q0, m0, l0, acc0  # one row: placeholders the key loops pass through
    if ROWS == 2:
        q1 = tl.load(q_head + row1 * stride_qs + q_offs, mask=qd_mask, other=0.0)
        m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = _full_keys_end(first_ptr, b, S, row0, row1, N, HAS_MASK, PREFIX, ROWS, BLOCK_N)
    # Whole attended key blocks first (no mask), then the rest (the mask and N applied).
    m0, l0, acc0, m1, l1, acc1 = _forward_keys(
        0, full_end, q0, q1, m0, l0, acc0, m1, l1, acc1, bias_head, k_head, v_head, mask_batch,
        row0, row1, offs_m, m_valid, offs_d, d_valid, N, scale_log2,
        stride_bi, stride_bj, stride_ks, stride_kn, stride_kd, stride_vs, stride_vn, stride_vd,
        stride_ms, stride_mn, HAS_BIAS, HAS_MASK, False, ROWS, BLOCK_N, IEEE, WIDE,
        TMA, key_row0, key_row1, h * D, bias_row)
    m0, l0, acc0, m1, l1, acc1 = _forward_keys(
        full_end, N, q0, q1, m0, l0, acc0, m1, l1, acc1, bias_head, k_head, v_head, mask_batch,
        row0, row1, offs_m, m_valid, offs_d, d_valid, N, scale_log2,
        stride_bi, stride_bj, stride_ks, stride_kn, stride_kd, stride_vs, stride_vn, stride_vd,
        stride_ms, stride_mn, HAS_BIAS, HAS_MASK, True, ROWS, BLOCK_N, IEEE, WIDE,
        TMA, key_row0, key_row1, h * D, bias_row)

    gate_head = gate_ptr + b * stride_gb + h * stride_gh
    _store_row(m0, l0, acc0, out_ptr, att_ptr, lse_ptr, gate_head + row0 * stride_gs,
               (b * S + row0) * H + h, h, offs_m, offs_d, m_valid, d_valid, stride_gn, stride_gd,
               H, N, D, HAS_GATE)
    if ROWS == 2:
        _store_row(m1, l1, acc1, out_ptr, att_ptr, lse_ptr, gate_head + row1 * stride_gs,
                   (b * S + row1) * H + h, h, offs_m, offs_d, m_valid, d_valid, stride_gn, stride_gd,
                   H, N, D, HAS_GATE)


@triton.jit
def _evo_attention_backward_prep_kernel(
    dout_ptr, gate_ptr, att_ptr, datt_ptr, dgate_ptr, delta_ptr,
    stride_ob, stride_os, stride_on, stride_oh, stride_od,
    stride_gb, stride_gs, stride_gn, stride_gh, stride_gd,
    S, N, H: tl.constexpr, D: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr,
):
    """One pass over [B, S, N, H, D]: the ungated output gradient, the gate gradient and
    delta = rowsum(dO_att * att) of the softmax backward, all from fp32 arithmetic."""
    block_n = _widen(tl.program_id(0), WIDE)
    row = _widen(tl.program_id(1), WIDE)
    b = _widen(tl.program_id(2), WIDE)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    n3 = offs_n[:, None, None]
    h3 = offs_h[None, :, None]
    d3 = offs_d[None, None, :]
    valid = (n3 < N) & (h3 < H) & (d3 < D)
    dout = tl.load(dout_ptr + b * stride_ob + row * stride_os + n3 * stride_on + h3 * stride_oh
                   + d3 * stride_od, mask=valid, other=0.0).to(tl.float32)
    contiguous = ((b * S + row) * N + n3) * (H * D) + h3 * D + d3
    att = tl.load(att_ptr + contiguous, mask=valid, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + b * stride_gb + row * stride_gs + n3 * stride_gn + h3 * stride_gh
                       + d3 * stride_gd, mask=valid, other=0.0).to(tl.float32)
        sig = sigmoid(gate)
        tl.store(dgate_ptr + contiguous, (dout * att * sig * (1.0 - sig)).to(dgate_ptr.dtype.element_ty),
                 mask=valid)
        dout = dout * sig
    tl.store(datt_ptr + contiguous, dout.to(datt_ptr.dtype.element_ty), mask=valid)
    # delta is [B, S, H, N].
    delta = tl.sum(dout * att, axis=2)
    tl.store(delta_ptr + ((b * S + row) * H + offs_h[None, :]) * N + offs_n[:, None], delta,
             mask=(offs_n[:, None] < N) & (offs_h[None, :] < H))


@triton.jit
def _recompute_ds(
    q, k, v, do, lse, delta, bias_tile, key_ok, scale_log2,
    MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    """Probabilities and logit gradient of one (query block, key block) tile.

    bias_tile and lse are in base 2 (times log2(e)), as in the forward.
    Returns (p, ds): p = exp2(logits - lse), ds = p * (dO v^T - delta), both fp32; ds is the
    gradient of the natural-base logits.
    """
    if IEEE:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    else:
        logits = tl.dot(q, tl.trans(k)) * scale_log2
    logits += bias_tile
    if MASKED:  # else every key of the block is attended and inside N
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
    p = tl.exp2(logits - lse[:, None])
    if IEEE:
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _evo_attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qs, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_mb, stride_ms, stride_mn,
    S, H, N, D: tl.constexpr, scale, scale_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr = False,
):
    """dK and dV of one key block of one row. TMA: q_ptr and do_ptr are tensor descriptors of q
    and dO as ``[B * S * N, H * D]``, bias_ptr one of the bias as ``[rows, N]``
    (`_query_descriptors`): each query block's Q, dO and bias tiles by descriptor. Queries past N
    then come from the next row (or zeros past the tensor): their lse loads as +inf, so their p
    and dS are 0. Columns past D come from the next head: they meet K's and V's zero columns in
    the logits and dP, and reach only dK's and dV's columns past D, which are not stored."""
    block_n = _widen(tl.program_id(0), WIDE)
    row = _widen(tl.program_id(1), WIDE)
    batch_head = _widen(tl.program_id(2), WIDE)
    b = batch_head // H
    h = batch_head % H
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = offs_d < D
    query_row = (b * S + row) * N  # (TMA) the row's first query in q's and dO's rows
    bias_row = 0
    if TMA and HAS_BIAS:  # (without a bias its strides are 0)
        bias_row = (b * stride_bb + h * stride_bh) // stride_bi
    k, v, key_ok = _load_keys(k_ptr + b * stride_kb + row * stride_ks + h * stride_kh,
                              v_ptr + b * stride_vb + row * stride_vs + h * stride_vh,
                              mask_ptr + b * stride_mb + row * stride_ms, offs_n, offs_d, n_valid, d_valid,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, HAS_MASK)
    bh_row = (b * S + row) * H + h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # A key block that is all padding gets zero gradients without a pass over the queries.
    m_end = tl.where(tl.max(key_ok.to(tl.int32), axis=0) > 0, N, 0)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = _widen(start_m, WIDE) + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        q, do, lse, delta = _row_queries(q_ptr if TMA else q_ptr + b * stride_qb + h * stride_qh, do_ptr, lse_ptr,
                                         delta_ptr, row, query_row + start_m, bh_row, h, offs_m, offs_d, m_valid,
                                         d_valid, stride_qs, stride_qn, stride_qd, H, N, D, TMA)
        bias_tile = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias_tile = _bias_tile(bias_ptr if TMA else bias_ptr + b * stride_bb + h * stride_bh,
                                   bias_row + start_m, block_n * BLOCK_N, offs_m, offs_n, m_valid, n_valid,
                                   stride_bi, stride_bj, TMA)
        # Tiles stay queries x keys: computing them transposed (keys x queries) saves the two
        # transposes below but, compiled for sm_90, needs more registers and spills more.
        p, ds = _recompute_ds(q, k, v, do, lse, delta, bias_tile, key_ok, scale_log2, True, IEEE)
        if IEEE:
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    out_offs = (bh_row // H * N + offs_n[:, None]) * (H * D) + h * D + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(dk_ptr + out_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_keys(start, end, q0, do0, lse0, delta0, dq0, q1, do1, lse1, delta1, dq1,
             bias_head, k_head, v_head, mask_batch, dbias_tile, row0, row1, offs_m, m_valid, offs_d, d_valid,
             N, scale_log2, stride_bi, stride_bj, stride_ks, stride_kn, stride_kd, stride_vs, stride_vn, stride_vd,
             stride_ms, stride_mn,
             HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr, WRITE_DBIAS: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
             WIDE: tl.constexpr, TMA: tl.constexpr, key_row0, key_row1, key_col, bias_row):
    """dQ of the program's rows from the key blocks starting in [start, end) (MASKED and TMA:
    as in `_forward_keys`); with WRITE_DBIAS (one row) also the bias gradient's tiles. With
    TMA, dQ's columns past D (from the next head's keys) are dropped by the masked store."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = _widen(start_n, WIDE) + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        if not MASKED:
            n_valid = offs_n >= 0  # all true: the loads need no key bound
        bias_tile = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias_tile = _bias_tile(bias_head, bias_row, start_n, offs_m, offs_n, m_valid, n_valid, stride_bi,
                                   stride_bj, TMA)
        k, v, key_ok = _row_keys(k_head, v_head, mask_batch + row0 * stride_ms, row0, key_row0 + start_n, key_col,
                                 offs_n, offs_d, n_valid, d_valid, stride_ks, stride_kn, stride_kd, stride_vs,
                                 stride_vn, stride_vd, stride_mn, HAS_MASK and MASKED, TMA)
        p, ds = _recompute_ds(q0, k, v, do0, lse0, delta0, bias_tile, key_ok, scale_log2, MASKED, IEEE)
        if WRITE_DBIAS:
            # One row (S = 1): this program owns the tile, so dS is the bias gradient itself.
            tl.store(dbias_tile + offs_n[None, :], ds.to(dbias_tile.dtype.element_ty),
                     mask=m_valid[:, None] & n_valid[None, :])
        if IEEE:
            dq0 += tl.dot(ds, k, input_precision="ieee")
        else:
            dq0 += tl.dot(ds.to(k.dtype), k)
        if ROWS == 2:
            k, v, key_ok = _row_keys(k_head, v_head, mask_batch + row1 * stride_ms, row1, key_row1 + start_n,
                                     key_col, offs_n, offs_d, n_valid, d_valid, stride_ks, stride_kn, stride_kd,
                                     stride_vs, stride_vn, stride_vd, stride_mn, HAS_MASK and MASKED, TMA)
            p, ds = _recompute_ds(q1, k, v, do1, lse1, delta1, bias_tile, key_ok, scale_log2, MASKED, IEEE)
            if IEEE:
                dq1 += tl.dot(ds, k, input_precision="ieee")
            else:
                dq1 += tl.dot(ds.to(k.dtype), k)
    return dq0, dq1


@triton.jit
def _evo_attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
    stride_qb, stride_qs, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_mb, stride_ms, stride_mn,
    S, H, N, D: tl.constexpr, scale, scale_log2, first_ptr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_DBIAS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, WIDE: tl.constexpr, PREFIX: tl.constexpr, TMA: tl.constexpr = False,
):
    """TMA: k_ptr, v_ptr and bias_ptr are tensor descriptors, as in the forward."""
    # As in the forward, a program serves ROWS (1 or 2) rows of one query block and each bias
    # tile serves all of them; with an odd S the last row is done twice (same values stored).
    block_m = _widen(tl.program_id(0), WIDE)
    row0 = _widen(tl.program_id(1), WIDE) * ROWS
    row1 = tl.minimum(row0 + 1, S - 1)
    batch_head = _widen(tl.program_id(2), WIDE)
    b = batch_head // H
    h = batch_head % H
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < D
    q_head = q_ptr + b * stride_qb + h * stride_qh
    k_head, v_head, bias_head, key_row0, key_row1, bias_row = _key_bases(
        k_ptr, v_ptr, bias_ptr, b, h, S, N, row0, row1, block_m, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_bb, stride_bh, stride_bi, HAS_BIAS, BLOCK_M, TMA)
    mask_batch = mask_ptr + b * stride_mb
    bh_row0 = (b * S + row0) * H + h
    bh_row1 = (b * S + row1) * H + h

    q0, do0, lse0, delta0 = _load_queries(q_head + row0 * stride_qs, do_ptr, lse_ptr, delta_ptr, bh_row0,
                                          h, offs_m, offs_d, m_valid, d_valid, stride_qn, stride_qd, H, N, D)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lse_min = tl.min(lse0, axis=0)
    q1, do1, lse1, delta1, dq1 = q0, do0, lse0, delta0, dq0  # one row: placeholders for the key loops
    if ROWS == 2:
        q1, do1, lse1, delta1 = _load_queries(q_head + row1 * stride_qs, do_ptr, lse_ptr, delta_ptr, bh_row1,
                                              h, offs_m, offs_d, m_valid, d_valid, stride_qn, stride_qd,
                                              H, N, D)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lse_min = tl.minimum(lse_min, tl.min(lse1, axis=0))
    n_end = N
    if not WRITE_DBIAS:
        # Query rows whose keys are all masked (lse = +inf) have zero gradients: skip the keys
        # (unless this pass also writes the bias gradient, which needs its zeros stored).
        n_end = tl.where(lse_min < float("inf"), N, 0)
    # Whole attended key blocks first (no mask), then the rest (the mask and N applied).
    full_end = tl.minimum(_full_keys_end(first_ptr, b, S, row0, row1, N, HAS_MASK, PREFIX, ROWS, BLOCK_N),
                          n_end)
    dbias_tile = dbias_ptr + (batch_head * N + offs_m[:, None]) * N
    dq0, dq1 = _dq_keys(0, full_end, q0, do0, lse0, delta0, dq0, q1, do1, lse1, delta1, dq1,
                        bias_head, k_head, v_head, mask_batch, dbias_tile, row0, row1, offs_m, m_valid,
                        offs_d, d_valid, N, scale_log2, stride_bi, stride_bj, stride_ks, stride_kn, stride_kd,
                        stride_vs, stride_vn, stride_vd, stride_ms, stride_mn,
                        HAS_BIAS, HAS_MASK, False, WRITE_DBIAS, ROWS, BLOCK_M, BLOCK_N, IEEE, WIDE,
                        TMA, key_row0, key_row1, h * D, bias_row)
    dq0, dq1 = _dq_keys(full_end, n_end, q0, do0, lse0, delta0, dq0, q1, do1, lse1, delta1, dq1,
                        bias_head, k_head, v_head, mask_batch, dbias_tile, row0, row1, offs_m, m_valid,
                        offs_d, d_valid, N, scale_log2, stride_bi, stride_bj, stride_ks, stride_kn, stride_kd,
                        stride_vs, stride_vn, stride_vd, stride_ms, stride_mn,
                        HAS_BIAS, HAS_MASK, True, WRITE_DBIAS, ROWS, BLOCK_M, BLOCK_N, IEEE, WIDE,
                        TMA, key_row0, key_row1, h * D, bias_row)
    qd_mask = m_valid[:, None] & d_valid[None, :]
    dq_offs = offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
    tl.store(dq_ptr + (bh_row0 // H * N) * (H * D) + dq_offs, (dq0 * scale).to(dq_ptr.dtype.element_ty),
             mask=qd_mask)
    if ROWS == 2:
        tl.store(dq_ptr + (bh_row1 // H * N) * (H * D) + dq_offs, (dq1 * scale).to(dq_ptr.dtype.element_ty),
                 mask=qd_mask)


@triton.jit
def _dbias_rows(start, end, dbias, q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, bias_tile,
                b, h, S, H, N, D: tl.constexpr, offs_m, offs_n, offs_d, m_valid, n_valid, d_valid, scale_log2,
                stride_qb, stride_qs, stride_qn, stride_qd, stride_kb, stride_ks, stride_kn, stride_kh,
                stride_kd, stride_vb, stride_vs, stride_vn, stride_vh, stride_vd, stride_qh,
                stride_mb, stride_ms, stride_mn,
                HAS_MASK: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
                TMA: tl.constexpr, BLOCK_D: tl.constexpr, start_m, start_n):
    """dbias plus the dS tiles of rows [start, end) (MASKED: as in `_forward_keys`). TMA: q,
    dO, k and v are descriptors of ``[B * S * N, H * D]`` rows (`_dbias_descriptors`); the tile's
    queries start at ``start_m``, its keys at ``start_n``. Both Q's and K's columns past D then
    come from the next head: Q's and dO's are zeroed, so that they add nothing to the logits
    and dP."""
    q_head = q_ptr if TMA else q_ptr + b * stride_qb + h * stride_qh
    k_head = k_ptr if TMA else k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr if TMA else v_ptr + b * stride_vb + h * stride_vh
    for row_index in range(start, end):
        row = _widen(row_index, WIDE)
        first = (b * S + row) * N  # (TMA) the row's first query and key in the rows
        q, do, lse, delta = _row_queries(q_head, do_ptr, lse_ptr, delta_ptr, row, first + start_m,
                                         (b * S + row) * H + h, h, offs_m, offs_d, m_valid, d_valid,
                                         stride_qs, stride_qn, stride_qd, H, N, D, TMA)
        if TMA and D < BLOCK_D:
            q = tl.where(d_valid[None, :], q, 0.0)
            do = tl.where(d_valid[None, :], do, 0.0)
        k, v, key_ok = _row_keys(k_head, v_head, mask_ptr + b * stride_mb + row * stride_ms, row, first + start_n,
                                 h * D, offs_n, offs_d, n_valid, d_valid, stride_ks, stride_kn, stride_kd,
                                 stride_vs, stride_vn, stride_vd, stride_mn, HAS_MASK and MASKED, TMA)
        p, ds = _recompute_ds(q, k, v, do, lse, delta, bias_tile, key_ok, scale_log2, MASKED, IEEE)
        dbias += ds
    return dbias


@triton.jit
def _evo_attention_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dbias_ptr,
    stride_qb, stride_qs, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_mb, stride_ms, stride_mn,
    S, H, N, D: tl.constexpr, scale_log2, BH, ROWS_PER_CHUNK, first_ptr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, WIDE: tl.constexpr, PREFIX: tl.constexpr, TMA: tl.constexpr = False,
):
    """dBias of one bias tile summed over a chunk of rows. TMA: q_ptr, k_ptr, v_ptr and do_ptr
    are tensor descriptors (`_dbias_descriptors`); the bias tile, loaded once, by pointer."""
    block_n = _widen(tl.program_id(0), WIDE)
    block_m = _widen(tl.program_id(1), WIDE)
    # Axis 2 is (chunk of rows, batch x head); chunk c sums rows [c, c + 1) * ROWS_PER_CHUNK.
    chunk = _widen(tl.program_id(2), WIDE) // BH
    batch_head = _widen(tl.program_id(2), WIDE) % BH
    b = batch_head // H
    h = batch_head % H
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    n_valid = offs_n < N
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & n_valid[None, :]
    # The bias tile is the same for every row: load (and take to base 2) once, reduce all rows'
    # dS in registers.
    bias_tile = tl.load(bias_ptr + b * stride_bb + h * stride_bh
                        + offs_m[:, None] * stride_bi + offs_n[None, :] * stride_bj,
                        mask=tile_mask, other=0.0).to(tl.float32) * _LOG2E
    dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_start = chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row_start + ROWS_PER_CHUNK, S)
    # The chunk's rows unmasked where this key block is whole (every key attended and inside
    # N) in each of them that attends any key (a row that attends none has p = 0 without its
    # mask), from the rows' first masked keys (`_first_masked_key_kernel`); else every row
    # with the mask.
    split = row_start
    if not HAS_MASK:
        split = tl.where((block_n + 1) * BLOCK_N <= N, row_end, row_start)
    elif PREFIX:
        lowest = tl.zeros([_CHUNK_ROWS], tl.int32) + N
        for chunk_row in range(row_start, row_end, _CHUNK_ROWS):
            rows = chunk_row + tl.arange(0, _CHUNK_ROWS)
            first = tl.load(first_ptr + b * S + rows, mask=rows < row_end, other=-1)
            lowest = tl.minimum(lowest, tl.where(first < 0, N, first))
        whole_end = tl.min(lowest, axis=0)
        split = tl.where((block_n + 1) * BLOCK_N <= whole_end, row_end, row_start)
    dbias = _dbias_rows(row_start, split, dbias, q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
                        bias_tile, b, h, S, H, N, D, offs_m, offs_n, offs_d, m_valid, n_valid, d_valid, scale_log2,
                        stride_qb, stride_qs, stride_qn, stride_qd, stride_kb, stride_ks, stride_kn, stride_kh,
                        stride_kd, stride_vb, stride_vs, stride_vn, stride_vh, stride_vd, stride_qh,
                        stride_mb, stride_ms, stride_mn, HAS_MASK, False, IEEE, WIDE, TMA, BLOCK_D,
                        block_m * BLOCK_M, block_n * BLOCK_N)
    dbias = _dbias_rows(split, row_end, dbias, q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
                        bias_tile, b, h, S, H, N, D, offs_m, offs_n, offs_d, m_valid, n_valid, d_valid, scale_log2,
                        stride_qb, stride_qs, stride_qn, stride_qd, stride_kb, stride_ks, stride_kn, stride_kh,
                        stride_kd, stride_vb, stride_vs, stride_vn, stride_vh, stride_vd, stride_qh,
                        stride_mb, stride_ms, stride_mn, HAS_MASK, True, IEEE, WIDE, TMA, BLOCK_D,
                        block_m * BLOCK_M, block_n * BLOCK_N)
    # dbias is written contiguous [chunks, B, H, N, N], rounded once from the fp32 sum.
    tl.store(dbias_ptr + ((chunk * BH + batch_head) * N + offs_m[:, None]) * N + offs_n[None, :],
             dbias.to(dbias_ptr.dtype.element_ty), mask=tile_mask)


# --------------------------------------------------------------------------- host side

def _flatten_batch(t: torch.Tensor, trailing: int, batch: int) -> torch.Tensor:
    """View ``[*, ...trailing]`` as ``[B, ...trailing]``; copies only if the leading dims cannot merge."""
    lead = t.shape[: t.dim() - trailing]
    if len(lead) == 1:
        return t
    if len(lead) == 0:
        return t.unsqueeze(0)
    try:
        return t.view(batch, *t.shape[t.dim() - trailing:])
    except RuntimeError:
        return t.reshape(batch, *t.shape[t.dim() - trailing:])


# Rows (S) from which the kernels take the mask's whole key blocks unmasked (`_Inputs.prefix`).
# Fewer rows (the pair-bias shape): a call's time is the host's, and the launch that finds the
# rows' first masked keys would add to it.
PREFIX_MIN_ROWS = 8
# Rows and keys of one program of `_first_masked_key_kernel`.
_FIRST_ROWS, _FIRST_KEYS = 8, 128


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _blocks(block_m, block_n, num_warps, num_stages):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


# Defaults for shapes with no tuned choice, per kernel, for one row (pair bias, S = 1) and
# for many rows (triangle, diffusion: S >= 8). A one-row grid has few programs, so larger
# tiles and more warps keep the SMs busy; many rows fill the GPU with small tiles.
# D <= 32: the H200's tuned choices (same SMs as the H100).
_DEFAULTS = {
    # kind: (one row, many rows)
    "fwd": (_blocks(64, 128, 8, 3), _blocks(64, 32, 4, 2)),
    "dkdv": (_blocks(128, 64, 4, 2), _blocks(64, 128, 4, 2)),
    "dq": (_blocks(128, 64, 8, 3), _blocks(64, 32, 4, 3)),
    "dbias": (_blocks(64, 32, 4, 2), _blocks(64, 32, 4, 2)),
}
# D > 32 (head dims padded to 64 or 128): 64 x 64 tiles, 4 warps, 2 stages everywhere. On the
# H100, with the kernels as they were before exp2 and two rows per program, these ran the
# diffusion shape (S=48, H=16, D=48) in 1.19 / 4.00 ms at N=384 / 768 and the pair-bias shape
# (D=64) in 1.00 / 0.62 ms; per-kernel choices picked to avoid register spills (ptxas reports
# 128 B in dK/dV and 700 B in dBias at D = 48 with these) then measured 1.52 / 4.47 and
# 1.24 / 0.81 ms (2026-11-26-session3-kernels-evo.json): the spills cost less than the
# smaller tiles and extra warps. Not yet re-measured with these defaults restored.
_DEFAULTS_WIDE = {kind: (_blocks(64, 64, 4, 2), _blocks(64, 64, 4, 2)) for kind in ("fwd", "dkdv", "dq", "dbias")}
# The interpreter runs every program serially: small blocks keep masked tails cheap.
_INTERPRETER_BLOCKS = _blocks(16, 16, 1, 1)
_CANDIDATES = [
    _blocks(bm, bn, w, st)
    for bm, bn in ((64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128))
    for w in (4, 8)
    for st in (2, 3)
] + [_blocks(bm, bn, w, 4) for bm, bn in ((64, 32), (64, 128), (128, 64)) for w in (4, 8)]


def _default_blocks(kind: str, S: int, D: int) -> dict:
    if interpreter_active():
        return _INTERPRETER_BLOCKS
    config = dict((_DEFAULTS if D <= 32 else _DEFAULTS_WIDE)[kind][S >= 8])
    if torch.version.hip:
        # AMD GPUs have 64 KiB of shared memory per CU (H100: 228 KiB): at most two stages.
        config["num_stages"] = min(config["num_stages"], 2)
    return config


def _rows_per_program(S: int, programs: int, multiprocessors: int, tile: int) -> int:
    """Rows each forward and dQ program serves: two share each bias tile where the grid of
    ``programs`` (at one row each) stays at 4+ programs per SM with two (triangle, diffusion
    with many samples, MSA) and the tiles are small (``tile`` = BLOCK_M * BLOCK_N * BLOCK_D
    at most 64 * 32 * 32: compiled for sm_90, larger tiles with two rows spill registers);
    one otherwise, and for S < 8, where an odd S's repeated last row would cost too much."""
    return 2 if S >= 8 and programs >= 8 * multiprocessors and tile <= 64 * 32 * 32 else 1


def _dbias_row_chunks(tiles: int, S: int, multiprocessors: int) -> int:
    """Chunks of rows the dBias pass splits S into, so that its ``tiles`` programs (one per
    bias tile and batch x head) become enough to give every SM about four; each chunk keeps at
    least 32 rows, since it costs a ``[B, H, N, N]`` fp32 partial sum."""
    return max(1, min(cdiv(4 * multiprocessors, tiles), S // 32))


def _tune_key(kind: str, S: int, N: int, D: int, H: int, dtype: torch.dtype, has_bias: bool):
    bucket = lambda n: next_power_of_2(n)  # noqa: E731  shapes within a factor of 2 share a choice
    return (kind, bucket(S), bucket(N), next_power_of_2(D), H, str(dtype), has_bias)


# (kind, shape, dtype, bias, interpreter) -> (tuning key, default): built once per shape, since
# a forward and backward asks three times and the pair-bias shape's calls wait on the host.
_run_args: dict[tuple, tuple[tuple, dict]] = {}


def _run(kind, launch, device, S, N, D, H, dtype, has_bias):
    """Launch with the tuned choice for this shape, else the default (a stored choice that
    overflows shared memory here falls back to the default)."""
    memo = (kind, S, N, D, H, dtype, has_bias, interpreter_active())
    found = _run_args.get(memo)
    if found is None:
        found = _run_args[memo] = (_tune_key(kind, S, N, D, H, dtype, has_bias), _default_blocks(kind, S, D))
    candidates = _CANDIDATES
    if descriptors_available():
        candidates = _CANDIDATES_TMA[kind]
        if kind == "fwd" and S >= PAIRED_ROWS_MIN:
            candidates = candidates + _FORWARD_TWO_ROWS
    run_tuned("evo_attention", found[0], device, candidates, found[1], launch)


# Every pass's candidates with tiles by tensor descriptor (TMA on Hopper) too: the forward's
# and dQ's K, V and bias tiles, dK dV's Q, dO and bias tiles (benchmarks/NOTES.md, session 33),
# dBias's Q, dO, K and V tiles (session 34: -13% at the triangle shape, N = 768; +19% at the
# diffusion shape, where D = 48 fills 64-wide boxes and the pointer path stays). dQ's
# descriptor candidates have 3+ stages: with 2, Triton 3.6's ptxas crashed (error -11,
# sm_90a) on 11 of 12 of them at the one- and four-row shapes (pair bias, the paper step's
# diffusion transformer), and where they compiled none was the best (at most 1.5% behind it).
_WITH_TMA = _CANDIDATES + [c | {"TMA": True} for c in _CANDIDATES]
_CANDIDATES_TMA = {"fwd": _WITH_TMA, "dkdv": _WITH_TMA, "dbias": _WITH_TMA,
                   "dq": [c for c in _WITH_TMA if not c.get("TMA") or c["num_stages"] > 2]}
# The forward's descriptor candidates two rows a program (`"ROWS": 2`, overriding
# `_rows_per_program`) at the tiles where that heuristic keeps pointer tiles to one row: with
# descriptors, K and V wait in shared memory, not registers. Session 34, triangle shape at N =
# 768: 64 x 64 two-row tiles 1.288 ms in the tuner against the best one-row 1.375 (dQ's and dK
# dV's two-row candidates lost there, 1.38 against 1.21 and 2.11 against 1.91 ms: not offered).
# Only from 8 rows: an odd S's last row is done twice.
PAIRED_ROWS_MIN = 8
_FORWARD_TWO_ROWS = [_blocks(bm, bn, w, st) | {"TMA": True, "ROWS": 2}
                     for bm, bn in ((64, 64), (128, 32), (128, 64)) for w in (4, 8) for st in (2, 3)]


def _row_view(t: torch.Tensor, sizes, strides, width: int) -> torch.Tensor | None:
    """``t`` as ``[prod(sizes), width]``: its dims ``sizes`` (with ``strides``) merged into
    rows, each row ``width`` unit-stride elements; None where those dims do not merge."""
    dims = [(n, step) for n, step in zip(sizes, strides) if n > 1]
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != n * inner:
            return None
    return t.as_strided((math.prod(sizes), width), (dims[-1][1] if dims else width, 1))


def _key_descriptors(inp: "_Inputs", cfg: dict, block_d: int):
    """Descriptors of k and v as ``[B * S * N, H * D]`` (their ``[B, S, N]`` dims merged, heads
    adjacent) and of the bias as ``[rows, N]`` (``[B * H * N, N]``, or ``[H * N, N]`` where one
    bias serves every batch) for a ``"TMA"`` choice; None (the pointer path, same tiles) where
    the choice has none, an offset could pass int32, a head's channels are not a multiple of
    16 bytes, or a layout has none."""
    return _head_row_descriptors(inp, cfg, (inp.k, inp.v), cfg["BLOCK_N"], block_d)


def _query_descriptors(inp: "_Inputs", cfg: dict, block_d: int, datt: torch.Tensor):
    """The dK dV pass's: q and dO (``datt``, contiguous ``[B, S, N, H, D]``) as ``[B * S * N,
    H * D]`` in query-block tiles, and the bias as in `_key_descriptors`; None as there."""
    return _head_row_descriptors(inp, cfg, (inp.q, datt), cfg["BLOCK_M"], block_d)


def _dbias_descriptors(inp: "_Inputs", cfg: dict, block_d: int, datt: torch.Tensor):
    """The dBias pass's: q and dO (``datt``) in query-block tiles, then k and v in key-block
    tiles, as ``[B * S * N, H * D]`` rows; None as in `_key_descriptors`. (Its bias tile is
    loaded once a program: by pointer.)"""
    queries = _head_row_descriptors(inp, cfg, (inp.q, datt), cfg["BLOCK_M"], block_d, with_bias=False)
    keys = _head_row_descriptors(inp, cfg, (inp.k, inp.v), cfg["BLOCK_N"], block_d, with_bias=False)
    return None if queries is None or keys is None else queries + keys


def _head_row_descriptors(inp: "_Inputs", cfg: dict, tensors, block_rows: int, block_d: int,
                          with_bias: bool = True):
    """Descriptors of ``tensors`` (``[B, S, N, H, D]``) as ``[B * S * N, H * D]`` rows in
    ``[block_rows, block_d]`` tiles, then (``with_bias``) of the bias in ``[BLOCK_M, BLOCK_N]``
    tiles."""
    if not cfg.get("TMA") or inp.wide or inp.D * inp.q.element_size() % 16:
        return None  # (a tile's first column, a head's, must be 16-byte aligned)
    B, S, N, H, D = inp.B, inp.S, inp.N, inp.H, inp.D
    descs = []
    for t in tensors:
        sb, ss, sn, sh, sd = t.stride()
        rows = _row_view(t, (B, S, N), (sb, ss, sn), H * D) if sd == 1 and (H == 1 or sh == D) else None
        descs.append(rows if rows is None else tensor_descriptor(rows, (block_rows, block_d)))
    if with_bias and inp.bias is not None:
        sb, sh, si, sj = inp.bias.stride()
        # One bias for every batch (stride 0, an expanded view): the kernel reads batch 0's rows.
        rows = _row_view(inp.bias, (B if sb else 1, H, N), (sb, sh, si), N) if sj == 1 else None
        descs.append(rows if rows is None else tensor_descriptor(rows, (cfg["BLOCK_M"], cfg["BLOCK_N"])))
    return None if None in descs else descs


def _operands(descs, *pointers):
    """What a kernel takes for ``pointers`` (tensors, then for the forward, dQ and dK dV the
    bias or its placeholder): ``descs`` from `_head_row_descriptors` or `_dbias_descriptors`
    in their place where there are some (the bias's last, if there is a bias), else
    ``pointers`` themselves."""
    return pointers if descs is None else (*descs, *pointers[len(descs):])


class _Inputs:
    """The op's inputs flattened to one batch axis ``B``, with their strides for the kernels."""

    def __init__(self, q, k, v, bias, mask, gate):
        self.lead = q.shape[:-4]
        self.B = math.prod(self.lead)
        self.S, self.N, self.H, self.D = q.shape[-4:]
        self.q = _flatten_batch(q, 4, self.B)
        self.k = _flatten_batch(k, 4, self.B)
        self.v = _flatten_batch(v, 4, self.B)
        self.gate = None if gate is None else _flatten_batch(gate, 4, self.B)
        self.bias = None
        if bias is not None:
            if bias.shape[:-3] != self.lead:  # broadcast over leading dims (an expand is a few us)
                bias = bias.expand(*self.lead, self.H, self.N, self.N)
            self.bias = _flatten_batch(bias, 3, self.B)
        self.mask = None
        if mask is not None:
            if mask.shape != (*self.lead, self.S, self.N):
                mask = mask.expand(*self.lead, self.S, self.N)
            self.mask = _flatten_batch(mask, 2, self.B).view(torch.uint8)

    def tensors(self):
        return self.q, self.k, self.v, self.bias, self.mask, self.gate

    @property
    def prefix(self) -> bool:
        """Whether the kernels take each row's leading whole key blocks without the mask: with
        a mask and from ``PREFIX_MIN_ROWS`` rows."""
        return self.mask is not None and self.S >= PREFIX_MIN_ROWS

    @functools.cached_property
    def wide(self) -> bool:
        """Whether a kernel offset can pass int32: in any input's storage or in an output
        ``[B, S, N, H, D]`` (the dBias pass also checks its row-chunk partials)."""
        elements = [t.untyped_storage().nbytes() // t.element_size() for t in self.tensors() if t is not None]
        return max(*elements, self.B * self.S * self.N * self.H * self.D) >= 2**31

    @classmethod
    def restore(cls, lead, tensors, wide: bool):
        self = cls.__new__(cls)
        self.lead = lead
        self.q, self.k, self.v, self.bias, self.mask, self.gate = tensors
        self.B, self.S, self.N, self.H, self.D = self.q.shape
        self.__dict__["wide"] = wide  # the forward's answer (the cached property's slot)
        return self

    def query_grid(self, cfg: dict, block_d: int) -> tuple[tuple[int, int, int], int]:
        """The grid of the forward and dQ passes (query blocks, row groups, batch x head) and
        the rows each program serves: the configuration's ``"ROWS"``, else
        ``_rows_per_program``'s."""
        B, S, N, H = self.B, self.S, self.N, self.H
        programs = cdiv(N, cfg["BLOCK_M"]) * S * B * H
        tile = cfg["BLOCK_M"] * cfg["BLOCK_N"] * block_d
        rows = cfg.get("ROWS") or _rows_per_program(S, programs, multiprocessors(self.q.device), tile)
        return (cdiv(N, cfg["BLOCK_M"]), cdiv(S, rows), B * H), rows

    def args(self):
        return (
            *self.q.stride(), *self.k.stride(), *self.v.stride(),
            *_strides(self.bias, 4), *_strides(self.mask, 3),
        )


def _forward(inp: _Inputs, scale: float):
    """out, the ungated output (``out`` without a gate), lse, and each row's first masked key
    (`_first_masked_key_kernel`, kept for the backward; None unless ``inp.prefix``)."""
    B, S, N, H, D = inp.B, inp.S, inp.N, inp.H, inp.D
    dtype = inp.q.dtype
    out = torch.empty((B, S, N, H, D), device=inp.q.device, dtype=dtype)
    att = torch.empty_like(out) if inp.gate is not None else out
    lse = torch.empty((B, S, H, N), device=inp.q.device, dtype=torch.float32)
    first = None
    if inp.prefix:
        first = torch.empty((B, S), device=inp.q.device, dtype=torch.int32)
        launch_kernel(_first_masked_key_kernel, (cdiv(S, _FIRST_ROWS), B), inp.mask, first, S, N,
                      *inp.mask.stride(), BLOCK_S=_FIRST_ROWS, BLOCK_N=_FIRST_KEYS, WIDE=inp.wide, num_warps=4)
    block_d = max(16, next_power_of_2(D))
    ieee = dtype == torch.float32
    dummy = inp.q

    def launch(cfg):
        grid, rows = inp.query_grid(cfg, block_d)
        descs = _key_descriptors(inp, cfg, block_d)
        k, v, bias = _operands(descs, inp.k, inp.v, inp.bias if inp.bias is not None else dummy)
        launch_kernel(_evo_attention_forward_kernel, grid,
            inp.q, k, v, bias,
            inp.mask if inp.mask is not None else dummy,
            inp.gate if inp.gate is not None else dummy,
            out, att, lse, *inp.args(), *_strides(inp.gate, 5),
            S, H, N, D, scale * LOG2E, first if first is not None else dummy,
            HAS_BIAS=inp.bias is not None, HAS_MASK=inp.mask is not None,
            HAS_GATE=inp.gate is not None, ROWS=rows,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, IEEE=ieee, WIDE=inp.wide,
            PREFIX=first is not None, TMA=descs is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    _run("fwd", launch, inp.q.device, S, N, D, H, dtype, inp.bias is not None)
    return out, att, lse, first


def _backward(inp: _Inputs, att, lse, first, dout, scale: float, dbias_dtype: torch.dtype | None):
    """Gradients of q, k, v, gate and (if ``dbias_dtype`` is given, in that dtype) the bias.
    ``first``: the forward's first masked keys, or None where the forward took every key
    block with the mask (the backward follows the forward's choice)."""
    B, S, N, H, D = inp.B, inp.S, inp.N, inp.H, inp.D
    dtype = inp.q.dtype
    if dout.shape != (B, S, N, H, D):  # (a view costs ~10 us of host time on the H100 hosts)
        dout = dout.view(B, S, N, H, D) if dout.dim() == 5 else dout.reshape(B, S, N, H, D)
    datt = torch.empty((B, S, N, H, D), device=inp.q.device, dtype=dtype)
    dgate = torch.empty_like(datt, dtype=inp.gate.dtype) if inp.gate is not None else None
    delta = torch.empty((B, S, H, N), device=inp.q.device, dtype=torch.float32)
    block_h, block_dp = next_power_of_2(H), next_power_of_2(D)
    prep_block_n = max(1, min(64, 4096 // (block_h * block_dp)))
    launch_kernel(_evo_attention_backward_prep_kernel, (cdiv(N, prep_block_n), S, B),
        dout, inp.gate if inp.gate is not None else dout, att, datt,
        dgate if dgate is not None else datt, delta,
        *dout.stride(), *_strides(inp.gate, 5), S, N, H, D,
        HAS_GATE=inp.gate is not None, BLOCK_N=prep_block_n, BLOCK_H=block_h, BLOCK_D=block_dp,
        WIDE=inp.wide,
    )
    block_d = max(16, next_power_of_2(D))
    ieee = dtype == torch.float32
    dummy = inp.q
    bias = inp.bias if inp.bias is not None else dummy
    mask = inp.mask if inp.mask is not None else dummy
    common = dict(HAS_MASK=inp.mask is not None, BLOCK_D=block_d, IEEE=ieee, WIDE=inp.wide)
    first_arg, prefix = (first, True) if first is not None else (dummy, False)
    strides = inp.args()

    need_dbias = dbias_dtype is not None
    dbias = None
    if need_dbias:
        dbias = torch.empty((B, H, N, N), device=inp.q.device, dtype=dbias_dtype)
    # With one row the dQ pass sees every dS tile exactly once: it writes the bias gradient and
    # the separate dBias pass (a third recomputation) is skipped.
    dbias_in_dq = need_dbias and S == 1

    device = inp.q.device
    has_bias = inp.bias is not None
    # The bias gradient first: its row-chunk partials (fp32 [chunks, B, H, N, N]) and their sum
    # are freed before dq, dk and dv exist, so they do not add to the backward's peak memory.
    if need_dbias and not dbias_in_dq:

        def launch_dbias(cfg):
            tiles = cdiv(N, cfg["BLOCK_N"]) * cdiv(N, cfg["BLOCK_M"]) * B * H
            rows_per_chunk = cdiv(S, _dbias_row_chunks(tiles, S, multiprocessors(device)))
            chunks = cdiv(S, rows_per_chunk)
            # Several chunks write fp32 partials, summed below in a fixed order (deterministic).
            target = dbias if chunks == 1 else torch.empty((chunks, B, H, N, N), device=device,
                                                           dtype=torch.float32)
            grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(N, cfg["BLOCK_M"]), chunks * B * H)
            descs = _dbias_descriptors(inp, cfg, block_d, datt)
            q, do, k, v = _operands(descs, inp.q, datt, inp.k, inp.v)
            launch_kernel(_evo_attention_dbias_kernel, grid,
                q, k, v, bias, mask, do, lse, delta, target, *strides,
                S, H, N, D, scale * LOG2E, B * H, rows_per_chunk, first_arg,
                PREFIX=prefix, TMA=descs is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                **{**common, "WIDE": inp.wide or target.numel() >= 2**31},
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
            if chunks > 1:
                dbias.copy_(target.sum(0))

        _run("dbias", launch_dbias, device, S, N, D, H, dtype, has_bias)
    dq = torch.empty((B, S, N, H, D), device=device, dtype=dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)

    def launch_dkdv(cfg):
        grid = (cdiv(N, cfg["BLOCK_N"]), S, B * H)
        descs = _query_descriptors(inp, cfg, block_d, datt)
        q, do, bias_arg = _operands(descs, inp.q, datt, bias)
        launch_kernel(_evo_attention_dkdv_kernel, grid,
            q, inp.k, inp.v, bias_arg, mask, do, lse, delta, dk, dv, *strides,
            S, H, N, D, scale, scale * LOG2E, HAS_BIAS=inp.bias is not None, TMA=descs is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    def launch_dq(cfg):
        grid, rows = inp.query_grid(cfg, block_d)
        descs = _key_descriptors(inp, cfg, block_d)
        k, v, bias_arg = _operands(descs, inp.k, inp.v, bias)
        launch_kernel(_evo_attention_dq_kernel, grid,
            inp.q, k, v, bias_arg, mask, datt, lse, delta, dq,
            dbias if dbias_in_dq else dq, *strides,
            S, H, N, D, scale, scale * LOG2E, first_arg,
            HAS_BIAS=inp.bias is not None, WRITE_DBIAS=dbias_in_dq, ROWS=rows, PREFIX=prefix, TMA=descs is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    _run("dkdv", launch_dkdv, device, S, N, D, H, dtype, has_bias)
    _run("dq", launch_dq, device, S, N, D, H, dtype, has_bias)

    return dq, dk, dv, dbias, dgate


class _EvoAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, gate, scale):
        inp = _Inputs(q, k, v, bias, mask, gate)
        out, att, lse, first = _forward(inp, scale)
        ctx.lead = inp.lead
        ctx.wide = inp.wide
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(*inp.tensors(), att, lse, first)
        return out if len(inp.lead) == 1 else out.view(*inp.lead, inp.S, inp.N, inp.H, inp.D)

    @staticmethod
    def backward(ctx, dout):
        *tensors, att, lse, first = ctx.saved_tensors
        inp = _Inputs.restore(ctx.lead, tensors, ctx.wide)
        shape = (*inp.lead, inp.S, inp.N, inp.H, inp.D)
        full_bias_shape = (*inp.lead, inp.H, inp.N, inp.N)
        dbias_dtype = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[3]:
            # A bias broadcast over batch dims gets the sum of their gradients, reduced in fp32;
            # an unbroadcast one is written in its own dtype (no cast pass, no fp32 copy).
            dbias_dtype = ctx.bias_dtype if tuple(ctx.bias_shape) == full_bias_shape else torch.float32
        dq, dk, dv, dbias, dgate = _backward(inp, att, lse, first, dout, ctx.scale, dbias_dtype)
        if dbias is not None:
            if dbias.shape != full_bias_shape:
                dbias = dbias.view(full_bias_shape)
            dbias = _sum_to_shape(dbias, ctx.bias_shape)
            if dbias.dtype != ctx.bias_dtype:
                dbias = dbias.to(ctx.bias_dtype)
        # Views only where the shapes differ (q with several leading dims or none): at the
        # pair-bias shape a call's time is the host's, and each view costs it ~10 us.
        if dq.shape != shape:
            dq, dk, dv = dq.view(shape), dk.view(shape), dv.view(shape)
            dgate = None if dgate is None else dgate.view(shape)
        return dq, dk, dv, dbias, None, dgate, None


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    extra = grad.dim() - len(shape)
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _check(q, k, v, bias, mask, gate):
    if q.dim() < 4:
        raise ValueError(f"evo_attention: q must be [*, S, N, H, D], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("gate", gate)):
        if t is not None and t.shape != q.shape:
            raise ValueError(f"evo_attention: {name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
    S, N, H, D = q.shape[-4:]
    if bias is not None and tuple(bias.shape[-3:]) != (H, N, N):
        raise ValueError(f"evo_attention: bias must be [*, H={H}, N={N}, N={N}], got {tuple(bias.shape)}")
    if mask is not None and tuple(mask.shape[-2:]) != (S, N):
        raise ValueError(f"evo_attention: mask must be [*, S={S}, N={N}], got {tuple(mask.shape)}")
    if any(t is not None and t.dtype != q.dtype for t in (k, v)):
        raise TypeError(f"evo_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"evo_attention: mask must be bool (True = attend), got {mask.dtype}")
    if not 1 <= D <= 128:
        raise ValueError(f"evo_attention: head dim {D} outside 1..128")


def evo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over N with a pair bias shared by all S rows, a key mask and an output gate.

    Args:
        q, k, v, gate: ``[*, S, N, H, D]``, any strides; gate gives ``sigmoid(gate) * out``.
        bias: ``[*, H, N, N]`` (leading dims broadcast), added to every row's logits.
        mask: ``[*, S, N]`` bool, True = key attended; rows with no key give 0.
        scale: logit scale, default ``D ** -0.5``.
        backend: "auto" | "triton" | "torch".

    Returns:
        ``[*, S, N, H, D]`` in q's dtype.
    """
    _check(q, k, v, bias, mask, gate)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q, k, v) == "torch":
        return evo_attention_reference(q, k, v, bias, mask, gate, scale)
    return _EvoAttentionFunction.apply(q, k, v, bias, mask, gate, scale)
