"""Template embedder (AF3 Alg. 16): each template's pair features through a small pair-only
Pairformer, averaged over the real templates and projected to an update of the pair."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megafold.data.features import NUM_RESTYPES
from megafold.kernels import layernorm_linear
from megafold.model.config import AlphaFold3Config
from megafold.model.pairformer import PairformerStack
from megafold.model.primitives import LayerNorm, LinearNoBias, lecun_normal_, ln_params

DGRAM_BINS = 39  # template distogram: 39 bins with lower edges 3.25 .. 50.75 A (as AF2)
TEMPLATE_FEATURES = DGRAM_BINS + 1 + 3 + 1 + 2 * NUM_RESTYPES


def backbone_frames(backbone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AF2 rigid frames from N, CA, C ``[*, 3, 3]``: rotation ``[*, 3, 3]`` (columns = axes)
    and origin CA ``[*, 3]``. e1 along C - CA, e2 the N - CA direction made orthogonal."""
    n, ca, c = backbone.unbind(-2)
    e1 = F.normalize(c - ca, dim=-1, eps=1e-6)
    u2 = n - ca
    e2 = F.normalize(u2 - (u2 * e1).sum(-1, keepdim=True) * e1, dim=-1, eps=1e-6)
    e3 = torch.linalg.cross(e1, e2)
    return torch.stack([e1, e2, e3], dim=-1), ca


def template_pair_features(template: Mapping[str, torch.Tensor], asym_id: torch.Tensor) -> torch.Tensor:
    """Pair features of one template ``[B, N, N, 108]`` (AF3 Alg. 16 lines 1-6).

    template: restype ``[B, N]``, pos / pos_mask (representative atom), backbone ``[B, N, 3, 3]``
    (N, CA, C) / backbone_mask. Geometric features are kept within chains only.
    """
    pos = template["pos"].float()
    pos_mask = template["pos_mask"]
    pb_pair = (pos_mask[:, :, None] & pos_mask[:, None, :]).unsqueeze(-1)
    dist2 = (pos[:, :, None] - pos[:, None, :]).square().sum(-1, keepdim=True)
    lower = torch.linspace(3.25, 50.75, DGRAM_BINS, device=pos.device) ** 2
    upper = torch.cat([lower[1:], lower.new_tensor([float("inf")])])
    dgram = (dist2 > lower) & (dist2 < upper) & pb_pair

    rotation, origin = backbone_frames(template["backbone"].float())
    bb_mask = template["backbone_mask"]
    bb_pair = (bb_mask[:, :, None] & bb_mask[:, None, :]).unsqueeze(-1)
    local = torch.einsum("bixy,bijx->bijy", rotation, origin[:, None, :, :] - origin[:, :, None, :])
    unit = F.normalize(local, dim=-1, eps=1e-6) * bb_pair

    same_chain = (asym_id[:, :, None] == asym_id[:, None, :]).unsqueeze(-1)
    geometric = torch.cat([dgram.float(), pb_pair.float(), unit, bb_pair.float()], dim=-1) * same_chain
    restype = F.one_hot(template["restype"].clamp(0, NUM_RESTYPES - 1), NUM_RESTYPES).float()
    N = restype.shape[1]
    return torch.cat(
        [geometric, restype[:, :, None].expand(-1, -1, N, -1), restype[:, None, :].expand(-1, N, -1, -1)], dim=-1
    )


class TemplateEmbedder(nn.Module):
    """``u = LinearNoBias(relu(mean_t LN(PairformerStack(LinearNoBias(LN(z)) + LinearNoBias(a_t)))))``.

    Returns the pair update ``[B, N, N, c_z]`` (zero when the batch holds no templates).
    """

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        c = config.c_template
        self.pair_norm_weight, self.pair_norm_bias = ln_params(config.c_z)
        self.pair_weight = nn.Parameter(lecun_normal_(torch.empty(c, config.c_z)))
        self.feature_proj = LinearNoBias(TEMPLATE_FEATURES, c)
        self.stack = PairformerStack(config, config.template_blocks, c, 0, tri_mul_hidden=c)
        self.out_norm = LayerNorm(c)
        self.out_proj = LinearNoBias(c, config.c_z, init="final")

    def forward(
        self, batch: Mapping[str, torch.Tensor], pair: torch.Tensor, pair_mask: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        template_mask = batch["template_mask"]
        present = [t for t in range(template_mask.shape[1]) if bool(template_mask[:, t].any())]
        if not present:
            return pair.new_zeros(pair.shape)
        pair_in = layernorm_linear(pair, self.pair_norm_weight, self.pair_norm_bias, self.pair_weight)
        total = 0.0
        for t in present:
            template = {
                name: batch[f"template_{name}"][:, t]
                for name in ("restype", "pos", "pos_mask", "backbone", "backbone_mask")
            }
            features = template_pair_features(template, batch["asym_id"]).to(self.feature_proj.weight.dtype)
            embedded = pair_in + self.feature_proj(features)
            embedded, _ = self.stack(embedded, None, pair_mask, token_mask)
            total = total + self.out_norm(embedded) * template_mask[:, t, None, None, None]
        mean = total / template_mask.sum(1).clamp(min=1)[:, None, None, None]
        return self.out_proj(F.relu(mean))
