"""Pair track: triangle updates, triangle attention and the Pairformer (AF3 Alg. 12-17)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megafold.kernels import evo_attention, layernorm_linear, triangle_multiply
from megafold.model.config import AlphaFold3Config
from megafold.model.primitives import (
    AttentionPairBias,
    Transition,
    checkpoint_pair_block,
    init_weight_,
    lecun_normal_,
    ln_params,
    run_in_chunks,
    shared_dropout,
)

ROWWISE, COLUMNWISE = -3, -2  # shared_dropout's shared axis for [B, I, J, C]


class TriangleMultiplication(nn.Module):
    """Triangle multiplicative update, outgoing (Alg. 12) or incoming (Alg. 13) edges.

    Parameters carry the names of ``megafold.kernels.triangle_multiply`` (no biases:
    AF3 uses LinearNoBias throughout).
    """

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool = True):
        super().__init__()
        self.outgoing = outgoing
        self.norm_in_weight, self.norm_in_bias = ln_params(c_z)
        self.ab_proj_weight = nn.Parameter(lecun_normal_(torch.empty(2 * c_hidden, c_z)))
        self.ab_gate_weight = nn.Parameter(init_weight_(torch.empty(2 * c_hidden, c_z), "gate"))
        self.out_gate_weight = nn.Parameter(init_weight_(torch.empty(c_z, c_z), "gate"))
        self.norm_out_weight, self.norm_out_bias = ln_params(c_hidden)
        self.out_proj_weight = nn.Parameter(init_weight_(torch.empty(c_z, c_hidden), "final"))

    def forward(self, pair: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """pair ``[B, N, N, c_z]``, pair_mask ``[B, N, N]`` bool -> update ``[B, N, N, c_z]``."""
        params = dict(self.named_parameters(recurse=False))
        return triangle_multiply(pair, pair_mask, params, outgoing=self.outgoing)


class TriangleAttention(nn.Module):
    """Triangle attention around the starting (Alg. 14) or ending node (Alg. 15).

    Starting node: row i attends over k with ``q_ij . k_ik + b_jk``. Ending node: the same on
    the transposed pair (its projection reads the transposed view; the update is transposed
    back). One fused LayerNorm + projection gives q, k, v, gate and the per-head bias.
    """

    def __init__(self, c_z: int, heads: int = 4, head_dim: int = 32, ending: bool = False, chunk_size: int = 0):
        super().__init__()
        self.heads, self.head_dim, self.ending, self.chunk_size = heads, head_dim, ending, chunk_size
        hidden = heads * head_dim
        self.norm_weight, self.norm_bias = ln_params(c_z)
        # rows: q, k, v (LeCun), gate (zero), per-head bias (LeCun)
        in_proj = lecun_normal_(torch.empty(4 * hidden + heads, c_z))
        init_weight_(in_proj[3 * hidden : 4 * hidden], "gate")
        self.in_proj_weight = nn.Parameter(in_proj)
        self.out_proj_weight = nn.Parameter(init_weight_(torch.empty(c_z, hidden), "final"))

    def project(self, pair: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v, gate ``[B, N, N, H, D]`` and the bias ``[B, N, N, H]``: views of one fused
        LayerNorm + projection of ``pair`` ``[B, N, N, c_z]``."""
        H, D = self.heads, self.head_dim
        # The projection's width rounded up to 16 channels (zero rows): q, k, v and gate rows
        # then start 32-byte aligned, and Triton vectorises their loads.
        width = self.in_proj_weight.shape[0]
        weight = F.pad(self.in_proj_weight, (0, 0, 0, -width % 16))
        proj = layernorm_linear(pair, self.norm_weight, self.norm_bias, weight)
        q, k, v, gate = proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3)
        return q, k, v, gate, proj[..., 4 * H * D : width]

    def forward(self, pair: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """pair ``[B, N, N, c_z]``, pair_mask ``[B, N, N]`` bool -> update ``[B, N, N, c_z]``."""
        if self.ending:
            # Ending-node attention is starting-node attention on the transposed pair,
            # transposed back: projecting the transposed view gives q, k, v and gate with each
            # row's tokens adjacent, as the kernel reads them best.
            pair, pair_mask = pair.transpose(1, 2), pair_mask.transpose(1, 2)
        q, k, v, gate, bias = self.project(pair)
        # b_jk from z_jk: [B, H, N, N], contiguous. It is read once per row (N times); the
        # copy is 1 / (4 D) the size of q, k, v and gate, which stay views.
        bias = bias.permute(0, 3, 1, 2).contiguous()

        def attend(q_rows, k_rows, v_rows, gate_rows, mask_rows):
            return evo_attention(q_rows, k_rows, v_rows, bias=bias, mask=mask_rows, gate=gate_rows)

        out = run_in_chunks(attend, [q, k, v, gate, pair_mask], self.chunk_size, dim=1)
        out = F.linear(out.flatten(-2), self.out_proj_weight)
        return out.transpose(1, 2) if self.ending else out


class PairformerBlock(nn.Module):
    """AF3 Alg. 17 for one block; ``c_s = 0`` gives the pair-only block of the template and
    MSA stacks. Dropout: rowwise on the triangle multiplications and starting-node attention,
    columnwise on the ending-node attention."""

    def __init__(
        self, c_z: int, c_s: int, *, tri_mul_hidden: int, tri_attn_heads: int, tri_attn_head_dim: int,
        single_heads: int = 1, transition_n: int = 4, dropout: float = 0.25,
        transition_chunk: int = 0, attention_chunk: int = 0,
    ):
        super().__init__()
        self.dropout = dropout
        self.tri_mul_out = TriangleMultiplication(c_z, tri_mul_hidden, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_z, tri_mul_hidden, outgoing=False)
        self.tri_attn_start = TriangleAttention(c_z, tri_attn_heads, tri_attn_head_dim, False, attention_chunk)
        self.tri_attn_end = TriangleAttention(c_z, tri_attn_heads, tri_attn_head_dim, True, attention_chunk)
        self.pair_transition = Transition(c_z, transition_n, transition_chunk)
        if c_s:
            self.attention = AttentionPairBias(c_s, single_heads, c_z)
            self.single_transition = Transition(c_s, transition_n)

    def dropout_keep(self, pair: torch.Tensor) -> torch.Tensor | None:
        """The block's four dropout masks for ``pair`` ``[B, N, N, c_z]``: bool ``[4, B, N, c_z]``
        (True = keep), or None when dropout is off. The stack draws them before a checkpointed
        block, so that the recompute reuses them without saving the RNG state."""
        if not self.training or self.dropout == 0.0:
            return None
        B, N, C = pair.shape[0], pair.shape[2], pair.shape[3]
        return torch.rand(4, B, N, C, device=pair.device) >= self.dropout

    @staticmethod
    def dropout_masks(keep: torch.Tensor | None, rows: slice = slice(None)) -> tuple:
        """``keep`` (``dropout_keep``) shaped for the four updates: three rowwise masks shared by
        the rows i (``[B, 1, N, C]``), then the columnwise one of rows ``rows`` shared by the
        columns j (``[B, R, 1, C]``); four Nones without dropout."""
        if keep is None:
            return (None,) * 4
        return keep[0].unsqueeze(1), keep[1].unsqueeze(1), keep[2].unsqueeze(1), keep[3][:, rows].unsqueeze(2)

    def forward(
        self, pair: torch.Tensor, single: torch.Tensor | None, pair_mask: torch.Tensor, token_mask: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pair ``[B, N, N, c_z]``, single ``[B, N, c_s]`` or None; masks ``[B, N, N]``, ``[B, N]``;
        ``keep``: the dropout masks of ``dropout_keep`` (drawn here when None)."""
        p, training = self.dropout, self.training
        masks = self.dropout_masks(self.dropout_keep(pair) if keep is None else keep)
        pair = pair + shared_dropout(self.tri_mul_out(pair, pair_mask), p, training, ROWWISE, masks[0])
        pair = pair + shared_dropout(self.tri_mul_in(pair, pair_mask), p, training, ROWWISE, masks[1])
        pair = pair + shared_dropout(self.tri_attn_start(pair, pair_mask), p, training, ROWWISE, masks[2])
        pair = pair + shared_dropout(self.tri_attn_end(pair, pair_mask), p, training, COLUMNWISE, masks[3])
        pair = pair + self.pair_transition(pair)
        if single is not None:
            bias = self.attention.pair_bias(pair)
            update = self.attention(single.unsqueeze(1), bias, token_mask.unsqueeze(1)).squeeze(1)
            single = single + update
            single = single + self.single_transition(single)
        return pair, single


class PairformerStack(nn.Module):
    """A stack of PairformerBlocks with per-block activation checkpointing (config switches)."""

    def __init__(
        self, config: AlphaFold3Config, blocks: int, c_z: int, c_s: int, tri_mul_hidden: int | None = None
    ):
        super().__init__()
        self.checkpoint = config.checkpoint
        self.pair_bf16, self.offload = config.pair_bf16_checkpoint, config.pair_offload
        self.reentrant = config.checkpoint_reentrant
        self.blocks = nn.ModuleList(
            PairformerBlock(
                c_z, c_s, tri_mul_hidden=tri_mul_hidden or config.tri_mul_hidden,
                tri_attn_heads=config.tri_attn_heads, tri_attn_head_dim=config.tri_attn_head_dim,
                single_heads=config.single_heads, transition_n=config.transition_n,
                dropout=config.pair_dropout, transition_chunk=config.transition_chunk,
                attention_chunk=config.attention_chunk,
            )
            for _ in range(blocks)
        )

    def forward(
        self, pair: torch.Tensor, single: torch.Tensor | None, pair_mask: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for block in self.blocks:
            # Dropout masks are drawn here and passed in: the block then draws no random numbers,
            # and its checkpoint need not save the RNG state (host time; not allowed while a
            # CUDA graph of the step is captured).
            pair, single = checkpoint_pair_block(
                block, pair, single, pair_mask, token_mask, block.dropout_keep(pair),
                enabled=self.checkpoint, pair_bf16=self.pair_bf16, offload=self.offload,
                reentrant=self.reentrant, preserve_rng=False,
            )
        return pair, single
