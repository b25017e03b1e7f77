"""Output heads: distogram (on the trunk pair) and confidence (AF3 Alg. 31)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megafold.model.config import AlphaFold3Config
from megafold.model.pairformer import PairformerStack
from megafold.model.primitives import LinearNoBias, init_weight_, tokens_to_atoms

DISTOGRAM_BINS = 64  # 2 .. 22 A
PLDDT_BINS = 50
PAE_BINS = 64  # 0.5 A wide, 0 .. 32 A
PDE_BINS = 64
RESOLVED_BINS = 2
# Alg. 31 one-hot of the predicted representative-atom distances, nearest centre (Alg. 4).
# The SI lists [3 3/8, 5 1/8, ..., 21 3/8] A, which is not evenly spaced as printed; these are
# 11 even centres over that range.
CONFIDENCE_DISTANCE_CENTRES = torch.linspace(3.375, 21.375, 11)


def distogram_edges(device: torch.device | None = None) -> torch.Tensor:
    """The 63 inner bin edges of the distogram: 64 bins over 2 .. 22 A."""
    return torch.linspace(2.0, 22.0, DISTOGRAM_BINS - 1, device=device)


def gather_atoms(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, *, A, 3]`` at atom indices ``index [B, N]`` -> ``[B, *, N, 3]``."""
    B, N = index.shape
    lead = x.shape[1:-2]
    expanded = index.view(B, *([1] * len(lead)), N, 1).expand(B, *lead, N, x.shape[-1])
    return torch.gather(x, -2, expanded)


def atom_slot(atom_to_token: torch.Tensor, atom_mask: torch.Tensor, n_tokens: int, slots: int) -> torch.Tensor:
    """Position of each atom within its token (0 for the first atom), clipped to ``slots - 1``."""
    B, A = atom_to_token.shape
    index = torch.arange(A, device=atom_to_token.device).expand(B, A)
    first = torch.full((B, n_tokens), A, dtype=torch.long, device=atom_to_token.device)
    first = first.scatter_reduce(1, atom_to_token, torch.where(atom_mask, index, A), "amin")
    return (index - torch.gather(first, 1, atom_to_token)).clamp(0, slots - 1)


class DistogramHead(nn.Module):
    """Symmetrised ``LinearNoBias(z)`` -> distogram logits ``[B, N, N, 64]``."""

    def __init__(self, c_z: int):
        super().__init__()
        self.proj = LinearNoBias(c_z, DISTOGRAM_BINS, init="final")

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        logits = self.proj(pair)
        return logits + logits.transpose(1, 2)


class ConfidenceHead(nn.Module):
    """AF3 Alg. 31: pLDDT (per atom, 50 bins), PAE and PDE (per token pair, 64 bins),
    experimentally resolved (per atom, 2 bins) from the trunk and one predicted structure.

    The caller detaches the trunk's outputs and the structure: no gradient reaches the trunk.
    Per-atom logits use one weight slot per atom position within its token
    (``LinearNoBias^{token_atom_idx(l)}``).
    """

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        self.slots = config.max_atoms_per_token
        self.inputs_i = LinearNoBias(config.c_s_inputs, config.c_z)
        self.inputs_j = LinearNoBias(config.c_s_inputs, config.c_z)
        self.distance_proj = LinearNoBias(len(CONFIDENCE_DISTANCE_CENTRES), config.c_z)
        self.stack = PairformerStack(config, config.confidence_blocks, config.c_z, config.c_s)
        self.pae_proj = LinearNoBias(config.c_z, PAE_BINS, init="final")
        self.pde_proj = LinearNoBias(config.c_z, PDE_BINS, init="final")
        self.plddt_weight = nn.Parameter(init_weight_(torch.empty(self.slots, config.c_s, PLDDT_BINS), "final"))
        self.resolved_weight = nn.Parameter(init_weight_(torch.empty(self.slots, config.c_s, RESOLVED_BINS), "final"))

    def forward(
        self, batch: Mapping[str, torch.Tensor], s_inputs: torch.Tensor, single: torch.Tensor,
        pair: torch.Tensor, coords: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """s_inputs ``[B, N, c_s_inputs]``, single ``[B, N, c_s]``, pair ``[B, N, N, c_z]``,
        coords ``[B, A, 3]`` -> logits: plddt ``[B, A, 50]``, pae / pde ``[B, N, N, 64]``,
        resolved ``[B, A, 2]``."""
        token_mask = batch["token_mask"]
        pair = pair + self.inputs_i(s_inputs)[:, :, None] + self.inputs_j(s_inputs)[:, None, :]
        rep = gather_atoms(coords.float(), batch["token_rep_atom"])
        distance = torch.cdist(rep, rep, compute_mode="donot_use_mm_for_euclid_dist")
        centres = CONFIDENCE_DISTANCE_CENTRES.to(distance.device)
        nearest = (distance[..., None] - centres).abs().argmin(-1)
        pair = pair + F.embedding(nearest, self.distance_proj.weight.t())
        pair_mask = token_mask[:, :, None] & token_mask[:, None, :]
        pair, single = self.stack(pair, single, pair_mask, token_mask)

        pae = self.pae_proj(pair)
        pde = self.pde_proj(pair + pair.transpose(1, 2))
        atom_to_token = batch["atom_to_token"]
        slot = atom_slot(atom_to_token, batch["atom_mask"], token_mask.shape[1], self.slots)

        def per_atom(weight: torch.Tensor) -> torch.Tensor:
            per_token = torch.einsum("bnc,kcx->bnkx", single, weight.to(single.dtype))  # [B, N, slots, X]
            per_token = tokens_to_atoms(per_token.flatten(-2), atom_to_token).unflatten(-1, weight.shape[::2])
            return torch.gather(per_token, 2, slot[..., None, None].expand(-1, -1, 1, weight.shape[-1])).squeeze(2)

        return {
            "plddt_logits": per_atom(self.plddt_weight),
            "pae_logits": pae,
            "pde_logits": pde,
            "resolved_logits": per_atom(self.resolved_weight),
        }
