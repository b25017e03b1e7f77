"""The Pairformer with its pair representation split across GPUs (axial, FastFold's "DAP").

One example's crop is shared by the K ranks of a process group: rank r holds rows
``[r R, (r + 1) R)`` of the pair representation (``R = P / K``, P = the crop padded up to a
multiple of K with masked tokens) and the same rows of the single representation. The
modules and weights are those of an ordinary ``PairformerStack``; only the execution is
sharded, so a sharded run gives the unsharded result (``tests/train/test_dap.py``).

    shards = AxialShards.create(n_tokens)                 # the default process group
    pair_rows = shards.split(pair, dims=(1, 2))           # [B, R, P, c_z]
    single_rows = shards.split(single, dims=(1,))         # [B, R, c_s]
    pair_rows, single_rows = pairformer_rows(stack, pair_rows, single_rows,
                                             shards.pad(pair_mask, (1, 2)), shards.pad(token_mask, (1,)), shards)
    loss = ...                                            # of this rank's rows
    loss.backward(); all_reduce_gradients(stack, shards)  # the parameter gradients, summed

What is sharded, per block (B = 1, c = c_z = c_h = 128, H = 4 triangle heads, 16 single
heads; sizes per rank; bf16 = 2 bytes):
- Kept by the per-block activation checkpoint: the block's input rows, ``R P c`` (bf16 with
  ``pair_bf16_checkpoint``) and ``R c_s``: 1 / K of the unsharded stack's.
- Outgoing triangle multiplication ``x_ij = sum_k a_ik b_jk`` (rows i local): a, b are
  projected from the local rows; b is all-gathered over its rows j, ``chunk`` channels at a
  time (never the whole ``[c_h, P, P]``), gathered again in backward (not stored), and
  backward's ``db`` is reduce-scattered back to the owners.
- Incoming ``x_ij = sum_k a_ki b_kj``: the same product after an all-to-all transpose of a.
- Starting-node attention: each local row attends along itself; the per-head bias
  ``[H, P, P]`` (1 / 32 of the pair) is all-gathered (backward: reduce-scattered).
- Ending-node attention: the starting-node formula on the transposed pair: the pair goes in
  through an all-to-all transpose (fp32, so that LayerNorm sees what the unsharded block
  sees), the update comes back through another (bf16).
- Pair transition: local. Single track: the pair-bias attention's queries need every key and
  the kernel wants as many queries as keys, so the single rows and the ``[16, P, P]`` bias
  are all-gathered and the attention runs for all P tokens on every rank (``P^2 x 384``
  multiply-adds, small), keeping this rank's rows; the single transition is local.

Collectives per block and forward pass, and what a rank receives (K = 2, P = 1792: R P = 1.6 M):
  2 all-gathers of b        2 (K - 1) R P c_h bf16      822 MB
  1 all-to-all of a         (K - 1) / K R P c_h bf16    205 MB
  2 all-to-alls (ending)    (K - 1) / K R P c (fp32 + bf16)  616 MB
  3 all-gathers of biases   (K - 1) R P (2 H + 16) bf16 + single rows   77 MB
about 1.7 GB; the checkpoint's recompute repeats it and backward sends about 1.6x as much
(b gathered again, db reduce-scattered, the duals of the rest): ~6 GB per block and step,
~0.3 TB per 48-block step, ~1-2 s at NVLink speeds against a ~30 s step.
Memory per rank: the 48 checkpoints, ``48 R P c`` bf16, and one block's recompute and
backward, the same per pair row as the unsharded block plus an fp32 copy of the transposed
pair; plus what does not shrink with K: a chunk of b and of db (``2 chunk P^2`` bf16, 0.4 GB
at P = 1792), the gathered biases and their gradients (``(2 H + 16) P^2``, ~0.4 GB) and the
pair mask (``P^2`` bool). So per-rank memory falls nearly as 1 / K and the longest crop
grows nearly as sqrt(K) (x 1.41 on two GPUs). ``pair_offload`` (the checkpoints in pinned
host memory) applies per rank as in the unsharded stack.

Collectives are autograd Functions whose backward is the dual collective (all-gather <->
reduce-scatter; the all-to-all transpose is its own dual). NCCL and gloo both serve
``all_gather_into_tensor``, ``reduce_scatter_tensor`` and ``all_to_all_single`` (gloo on the
CPU runs the tests). Every rank runs the same ops in the same order, forward, recompute and
backward, so the collectives match. Dropout masks are drawn at the global shape and sliced:
with the same seed on every rank they are the unsharded run's (when P = N).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megafold.errors import ConfigError
from megafold.kernels import evo_attention, layernorm_linear
from megafold.model.pairformer import (
    COLUMNWISE,
    ROWWISE,
    PairformerBlock,
    PairformerStack,
    TriangleAttention,
    TriangleMultiplication,
)
from megafold.model.primitives import checkpoint_pair_block, checkpointed, run_in_chunks, shared_dropout

PRODUCT_CHUNK = 32  # channels of b gathered at a time: [32, P, P] bf16 is 205 MB at P = 1792


@dataclass(frozen=True, eq=False)
class AxialShards:
    """How a crop of ``tokens`` tokens is split by rows over the ranks of ``group``.

    ``padded`` (P) is ``tokens`` rounded up to a multiple of ``size`` (K); each rank holds
    ``rows`` = P / K consecutive rows. Padding tokens must be masked (``pad`` does that for
    masks: False); they change nothing in the real tokens' results.
    """

    tokens: int
    size: int
    rank: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def create(cls, tokens: int, group: dist.ProcessGroup | None = None) -> "AxialShards":
        """Shards over ``group`` (default: the whole process group; one rank without one)."""
        if tokens < 1:
            raise ConfigError(f"axial shards: a crop of {tokens} tokens")
        if not (dist.is_available() and dist.is_initialized()):
            return cls(tokens, 1, 0, None)
        return cls(tokens, dist.get_world_size(group), dist.get_rank(group), group)

    @property
    def padded(self) -> int:
        return -(-self.tokens // self.size) * self.size

    @property
    def rows(self) -> int:
        return self.padded // self.size

    @property
    def row_slice(self) -> slice:
        return slice(self.rank * self.rows, (self.rank + 1) * self.rows)

    def pad(self, x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """``x`` with each of ``dims`` (length ``tokens``) padded to ``padded`` with 0 / False."""
        for dim in dims:
            if x.shape[dim] != self.tokens:
                raise ConfigError(f"axial shards: dim {dim} of {tuple(x.shape)} is not the crop's {self.tokens} tokens")
            if self.padded > self.tokens:
                fill = x.new_zeros((*x.shape[:dim], self.padded - self.tokens, *x.shape[dim + 1 :]))
                x = torch.cat([x, fill], dim)
        return x

    def split(self, x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """This rank's rows of a whole tensor: ``dims`` padded, the first of them sliced."""
        return self.pad(x, dims).narrow(dims[0], self.rank * self.rows, self.rows)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's rows along ``dim``, in rank order (padded length). Differentiable:
        the gradient is reduce-scattered back to the owners of the rows."""
        return x if self.size == 1 else _GatherRows.apply(x, dim, self)

    def transpose(self, x: torch.Tensor, row_dim: int = 1, col_dim: int = 2) -> torch.Tensor:
        """This rank's rows of the transpose (``row_dim`` <-> ``col_dim``) of the row-sharded
        ``x``, by one all-to-all. Differentiable (its own dual)."""
        if self.size == 1:
            return x.transpose(row_dim, col_dim)
        return _TransposeRows.apply(x, row_dim, col_dim, self)

    # ------------------------------------------------------------------ raw collectives

    def _all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        rows = x.movedim(dim, 0).contiguous()
        out = rows.new_empty((self.size * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows, group=self.group)
        return out.movedim(0, dim)

    def _reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        full = x.movedim(dim, 0).contiguous()
        out = full.new_empty((full.shape[0] // self.size, *full.shape[1:]))
        dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=self.group)
        return out.movedim(0, dim)

    def _all_to_all_transpose(self, x: torch.Tensor, row_dim: int, col_dim: int) -> torch.Tensor:
        """``0 <= row_dim < col_dim``. Block s of my columns goes to rank s; from rank s come its rows
        of my columns, ``received[s]``, whose transposes side by side are the result: for a
        ``[1, R, P, C]`` pair a view of the receive buffer (no third copy)."""
        blocks = torch.stack(x.split(self.rows, dim=col_dim))
        received = torch.empty_like(blocks)
        dist.all_to_all_single(received, blocks, group=self.group)
        received = received.transpose(row_dim + 1, col_dim + 1)  # [K, ..., my columns, ..., rows of s, ...]
        return received.movedim(0, col_dim).flatten(col_dim, col_dim + 1)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, shards):
        ctx.dim, ctx.shards = dim, shards
        return shards._all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.shards._reduce_scatter(grad, ctx.dim), None, None


class _TransposeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_dim, col_dim, shards):
        ctx.dims, ctx.shards = (row_dim, col_dim), shards
        return shards._all_to_all_transpose(x, row_dim, col_dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.shards._all_to_all_transpose(grad, *ctx.dims), None, None, None


class _RowProduct(torch.autograd.Function):
    """``x = a b_all^T`` (outgoing) or ``a b_all`` (incoming) per channel, for a's local rows.

    a: ``[B, C, R, P]`` (rows i, columns k); b: ``[B, C, R, P]``, this rank's rows of
    ``b_all [B, C, P, P]``, which is gathered ``chunk`` channels at a time in forward and
    again in backward instead of being stored. Returns x ``[B, C, R, P]`` (rows i, columns j).
    """

    @staticmethod
    def forward(ctx, a, b, outgoing, shards, chunk):
        ctx.outgoing, ctx.shards, ctx.chunk = outgoing, shards, chunk
        ctx.save_for_backward(a, b)
        x = a.new_empty(a.shape)
        for c in range(0, a.shape[1], chunk):
            b_all = shards._all_gather(b[:, c : c + chunk], 2) if shards.size > 1 else b[:, c : c + chunk]
            x[:, c : c + chunk] = a[:, c : c + chunk] @ (b_all.transpose(-1, -2) if outgoing else b_all)
        return x

    @staticmethod
    def backward(ctx, dx):
        a, b = ctx.saved_tensors
        shards, chunk = ctx.shards, ctx.chunk
        da, db = torch.empty_like(a), torch.empty_like(b)
        for c in range(0, a.shape[1], chunk):
            part = slice(c, c + chunk)
            b_all = shards._all_gather(b[:, part], 2) if shards.size > 1 else b[:, part]
            dx_c, a_c = dx[:, part].to(a.dtype), a[:, part]
            if ctx.outgoing:  # x = a b^T: da = dx b, db = dx^T a
                da[:, part] = dx_c @ b_all
                db_all = dx_c.transpose(-1, -2) @ a_c
            else:  # x = a b: da = dx b^T, db = a^T dx
                da[:, part] = dx_c @ b_all.transpose(-1, -2)
                db_all = a_c.transpose(-1, -2) @ dx_c
            del b_all
            db[:, part] = shards._reduce_scatter(db_all, 2) if shards.size > 1 else db_all
        return da, db, None, None, None


# ---------------------------------------------------------------------------- sharded ops


def triangle_multiply_rows(
    module: TriangleMultiplication, pair: torch.Tensor, mask: torch.Tensor, shards: AxialShards,
    chunk: int = PRODUCT_CHUNK,
) -> torch.Tensor:
    """``module``'s update (outgoing or incoming) for this rank's rows.

    pair ``[B, R, P, c_z]``, mask ``[B, R, P]`` bool (this rank's rows of the pair mask).
    The fused op needs the whole square pair, so this runs its three stages separately
    (AF3 Alg. 12/13, the contract of ``megafold.kernels.triangle_multiply``): the gated,
    masked projections and the output are checkpointed (recomputed in backward from the pair,
    which is kept anyway), so a block stores a, b and x, as the fused op does.
    """
    c_h = module.norm_out_weight.shape[0]
    grad = torch.is_grad_enabled()

    def project(pair_rows, mask_rows):
        weight = torch.cat([module.ab_proj_weight, module.ab_gate_weight])
        proj, gate = layernorm_linear(pair_rows, module.norm_in_weight, module.norm_in_bias, weight).chunk(2, -1)
        ab = torch.sigmoid(gate) * proj * mask_rows[..., None].to(proj.dtype)
        # a, b: [B, c_h, R, P], each its own storage (incoming keeps b but not a)
        return tuple(half.permute(0, 3, 1, 2).contiguous() for half in ab.split(c_h, dim=-1))

    def output(x, pair_rows):
        gate = layernorm_linear(pair_rows, module.norm_in_weight, module.norm_in_bias, module.out_gate_weight)
        update = layernorm_linear(x.permute(0, 2, 3, 1), module.norm_out_weight, module.norm_out_bias,
                                  module.out_proj_weight)
        return torch.sigmoid(gate) * update

    a, b = checkpointed(project, pair, mask) if grad else project(pair, mask)
    if not module.outgoing:
        a = shards.transpose(a, 2, 3)  # incoming: a_ki for this rank's i, every k
    x = _RowProduct.apply(a, b, module.outgoing, shards, chunk)
    return checkpointed(output, x, pair) if grad else output(x, pair)


def triangle_attention_rows(
    module: TriangleAttention, pair: torch.Tensor, mask: torch.Tensor, shards: AxialShards
) -> torch.Tensor:
    """Starting-node triangle attention of ``module`` for this rank's rows (the ending node is
    this on the transposed pair): pair ``[B, R, P, c_z]``, mask ``[B, R, P]`` -> ``[B, R, P, c_z]``.

    As ``TriangleAttention.forward`` with ``ending=False``, except that the bias b_jk of every
    row j is gathered from the ranks that hold them.
    """
    q, k, v, gate, bias = module.project(pair)  # [B, R, P, H, D], bias [B, R, P, H]
    bias = shards.gather(bias.permute(0, 3, 1, 2), dim=2).contiguous()  # [B, H, P, P]

    def attend(q_rows, k_rows, v_rows, gate_rows, mask_rows):
        return evo_attention(q_rows, k_rows, v_rows, bias=bias, mask=mask_rows, gate=gate_rows)

    out = run_in_chunks(attend, [q, k, v, gate, mask], module.chunk_size, dim=1)
    return F.linear(out.flatten(-2), module.out_proj_weight)


def pairformer_block_rows(
    block: PairformerBlock,
    pair: torch.Tensor,
    single: torch.Tensor | None,
    pair_mask: torch.Tensor,
    token_mask: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    shards: AxialShards,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``block`` (AF3 Alg. 17) on this rank's rows: pair ``[B, R, P, c_z]``, single ``[B, R, c_s]``
    or None; pair_mask ``[B, P, P]`` and token_mask ``[B, P]`` whole (every rank holds them);
    ``keep``: the block's dropout masks at the global shape (``PairformerBlock.dropout_keep``
    of the rows: it reads the padded size from the columns), drawn here when None."""
    p, training = block.dropout, block.training
    mask_rows = pair_mask[:, shards.row_slice]
    mask_columns = pair_mask.transpose(1, 2)[:, shards.row_slice]
    # the rowwise masks serve every row as they are; the columnwise one is cut to this rank's rows
    masks = block.dropout_masks(block.dropout_keep(pair) if keep is None else keep, shards.row_slice)
    update = triangle_multiply_rows(block.tri_mul_out, pair, mask_rows, shards)
    pair = pair + shared_dropout(update, p, training, ROWWISE, masks[0])
    update = triangle_multiply_rows(block.tri_mul_in, pair, mask_rows, shards)
    pair = pair + shared_dropout(update, p, training, ROWWISE, masks[1])
    update = triangle_attention_rows(block.tri_attn_start, pair, mask_rows, shards)
    pair = pair + shared_dropout(update, p, training, ROWWISE, masks[2])
    update = shards.transpose(triangle_attention_rows(block.tri_attn_end, shards.transpose(pair), mask_columns, shards))
    pair = pair + shared_dropout(update, p, training, COLUMNWISE, masks[3])
    pair = pair + block.pair_transition(pair)
    if single is not None:
        bias = shards.gather(block.attention.pair_bias(pair), dim=2)  # [B, H, P, P]
        every_token = shards.gather(single, dim=1)
        update = block.attention(every_token.unsqueeze(1), bias, token_mask.unsqueeze(1)).squeeze(1)
        single = single + update[:, shards.row_slice]
        single = single + block.single_transition(single)
    return pair, single


def pairformer_rows(
    stack: PairformerStack,
    pair: torch.Tensor,
    single: torch.Tensor | None,
    pair_mask: torch.Tensor,
    token_mask: torch.Tensor,
    shards: AxialShards,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``stack`` on this rank's rows, with its per-block activation checkpointing (which then
    keeps this rank's rows only, on the GPU or, with ``pair_offload``, in host memory). Shapes
    as in ``pairformer_block_rows``; returns this rank's rows of the pair ``[B, R, P, c_z]`` and
    single ``[B, R, c_s]`` outputs. Every rank must hold
    the same weights and, with dropout on, the same RNG state (seed them alike); each rank's
    parameter gradients are its rows' share until ``all_reduce_gradients`` sums them.

    Raises ConfigError when the shapes do not fit ``shards``.
    """
    B, R, P = pair.shape[0], shards.rows, shards.padded
    expected = {"pair": (pair, (B, R, P)), "pair_mask": (pair_mask, (B, P, P)), "token_mask": (token_mask, (B, P))}
    if single is not None:
        expected["single"] = (single, (B, R))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape[: len(shape)]) != shape:
            raise ConfigError(
                f"pairformer_rows: {name} has shape {tuple(tensor.shape)}; rank {shards.rank} of {shards.size} "
                f"holding rows {R} of a crop of {shards.tokens} tokens padded to {P} expects {shape}"
            )
    for block in stack.blocks:
        run = functools.partial(pairformer_block_rows, block, shards=shards)
        pair, single = checkpoint_pair_block(
            run, pair, single, pair_mask, token_mask, block.dropout_keep(pair),
            enabled=stack.checkpoint, pair_bf16=stack.pair_bf16, offload=stack.offload, preserve_rng=False,
        )
    return pair, single


def all_reduce_gradients(module: torch.nn.Module, shards: AxialShards) -> None:
    """Sum every parameter gradient over the ranks (each holds its rows' share), in one call."""
    if shards.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=shards.group)
    for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(value.view_as(grad))
