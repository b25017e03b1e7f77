"""MSA module (AF3 Alg. 8-11): outer product mean, pair-weighted averaging, pair updates."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megafold.data.features import NUM_RESTYPES
from megafold.kernels import evo_attention, layernorm_linear, outer_product_mean
from megafold.model.config import AlphaFold3Config
from megafold.model.pairformer import ROWWISE, PairformerBlock
from megafold.model.primitives import (
    LinearNoBias,
    Transition,
    checkpoint_pair_block,
    init_weight_,
    lecun_normal_,
    ln_params,
    shared_dropout,
)


class OuterProductMean(nn.Module):
    """AF3 Alg. 9: the MSA's update to the pair, ``[B, S, N, c_m] -> [B, N, N, c_z]``.

    Parameters carry the names of ``megafold.kernels.outer_product_mean``.
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int = 32):
        super().__init__()
        self.norm_weight, self.norm_bias = ln_params(c_m)
        self.proj_weight = nn.Parameter(lecun_normal_(torch.empty(2 * c_hidden, c_m)))
        self.out_weight = nn.Parameter(torch.zeros(c_z, c_hidden * c_hidden))  # final
        self.out_bias = nn.Parameter(torch.zeros(c_z))

    def forward(self, msa: torch.Tensor, msa_mask: torch.Tensor) -> torch.Tensor:
        """msa ``[B, S, N, c_m]``, msa_mask ``[B, S, N]`` bool -> update ``[B, N, N, c_z]``."""
        return outer_product_mean(msa, msa_mask, dict(self.named_parameters(recurse=False)))


class MSAPairWeightedAveraging(nn.Module):
    """AF3 Alg. 10: each MSA row averages its columns with weights ``softmax_j(b_ij)`` from the pair.

    This is EvoAttention with zero queries and keys (the logits are the pair bias alone), so
    it runs on ``megafold.kernels.evo_attention`` with the S MSA rows sharing one bias; the
    zeros are stride-0 views, never allocated.
    """

    def __init__(self, c_m: int, c_z: int, heads: int = 8, head_dim: int = 32):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        hidden = heads * head_dim
        self.msa_norm_weight, self.msa_norm_bias = ln_params(c_m)
        value_gate = lecun_normal_(torch.empty(2 * hidden, c_m))
        init_weight_(value_gate[hidden:], "gate")
        self.value_gate_weight = nn.Parameter(value_gate)
        self.pair_norm_weight, self.pair_norm_bias = ln_params(c_z)
        self.pair_bias_weight = nn.Parameter(lecun_normal_(torch.empty(heads, c_z)))
        self.out_proj_weight = nn.Parameter(init_weight_(torch.empty(c_m, hidden), "final"))

    def forward(self, msa: torch.Tensor, pair: torch.Tensor, msa_mask: torch.Tensor) -> torch.Tensor:
        """msa ``[B, S, N, c_m]``, pair ``[B, N, N, c_z]``, msa_mask ``[B, S, N]`` -> update ``[B, S, N, c_m]``."""
        H, D = self.heads, self.head_dim
        value, gate = layernorm_linear(msa, self.msa_norm_weight, self.msa_norm_bias, self.value_gate_weight).unflatten(
            -1, (2, H, D)
        ).unbind(-3)
        bias = layernorm_linear(pair, self.pair_norm_weight, self.pair_norm_bias, self.pair_bias_weight)
        bias = bias.permute(0, 3, 1, 2).contiguous()  # [B, H, N, N], read once per MSA row
        zeros = value.new_zeros(()).expand_as(value)
        out = evo_attention(zeros, zeros, value, bias=bias, mask=msa_mask, gate=gate)
        return F.linear(out.flatten(-2), self.out_proj_weight)


class MSABlock(nn.Module):
    """One MSA module block. The last block only updates the pair: its MSA updates would feed
    nothing (AF3 writes them, but they have no effect and their weights get no gradient)."""

    def __init__(self, config: AlphaFold3Config, last: bool):
        super().__init__()
        self.msa_dropout = config.msa_dropout
        self.outer_product_mean = OuterProductMean(config.c_m, config.c_z, config.opm_hidden)
        self.updates_msa = not last
        if self.updates_msa:
            self.pair_weighted_averaging = MSAPairWeightedAveraging(
                config.c_m, config.c_z, config.msa_pwa_heads, config.msa_pwa_head_dim
            )
            self.msa_transition = Transition(config.c_m, config.transition_n, config.transition_chunk)
        self.pair_stack = PairformerBlock(
            config.c_z, 0, tri_mul_hidden=config.tri_mul_hidden, tri_attn_heads=config.tri_attn_heads,
            tri_attn_head_dim=config.tri_attn_head_dim, transition_n=config.transition_n,
            dropout=config.pair_dropout, transition_chunk=config.transition_chunk,
            attention_chunk=config.attention_chunk,
        )

    def forward(
        self, pair: torch.Tensor, msa: torch.Tensor, pair_mask: torch.Tensor, msa_mask: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pair = pair + self.outer_product_mean(msa, msa_mask)
        if self.updates_msa:
            update = self.pair_weighted_averaging(msa, pair, msa_mask)
            msa = msa + shared_dropout(update, self.msa_dropout, self.training, ROWWISE)
            msa = msa + self.msa_transition(msa)
        else:
            msa = None
        pair, _ = self.pair_stack(pair, None, pair_mask, token_mask)
        return pair, msa


class MSAModule(nn.Module):
    """AF3 Alg. 8. Returns the updated pair ``[B, N, N, c_z]``.

    MSA features: one-hot residue (32), has_deletion, deletion_value; plus s_inputs. The rows
    arrive already sampled / cropped by the data pipeline.
    """

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        self.checkpoint = config.checkpoint
        self.pair_bf16, self.offload = config.pair_bf16_checkpoint, config.pair_offload
        self.reentrant = config.checkpoint_reentrant
        self.msa_proj = LinearNoBias(NUM_RESTYPES + 2, config.c_m)
        self.single_proj = LinearNoBias(config.c_s_inputs, config.c_m)
        self.blocks = nn.ModuleList(
            MSABlock(config, last=i == config.msa_blocks - 1) for i in range(config.msa_blocks)
        )

    def forward(
        self, batch: Mapping[str, torch.Tensor], pair: torch.Tensor, s_inputs: torch.Tensor,
        pair_mask: torch.Tensor, token_mask: torch.Tensor,
    ) -> torch.Tensor:
        if not len(self.blocks):
            return pair
        dtype = self.msa_proj.weight.dtype
        features = torch.cat(
            [
                F.one_hot(batch["msa"].clamp(0, NUM_RESTYPES - 1), NUM_RESTYPES).to(dtype),
                batch["has_deletion"][..., None].to(dtype),
                batch["deletion_value"][..., None].to(dtype),
            ],
            dim=-1,
        )
        msa = self.msa_proj(features) + self.single_proj(s_inputs).unsqueeze(1)
        msa_mask = batch["msa_mask"] & token_mask.unsqueeze(1)
        for block in self.blocks:
            pair, msa = checkpoint_pair_block(
                block, pair, msa, pair_mask, msa_mask, token_mask,
                enabled=self.checkpoint, pair_bf16=self.pair_bf16, offload=self.offload,
                reentrant=self.reentrant,
            )
        return pair
