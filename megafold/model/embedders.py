"""Input embedding: atom attention encoder / decoder, relative position encoding (AF3 Alg. 2-7).

Reference conformers are expressed in their own frame before they are embedded (see
``canonical_conformer_positions``): AF3 feeds ``ref_pos`` in a random orientation and learns
approximate invariance from that augmentation; here the trunk is exactly invariant to rotating
or translating any conformer, and the augmentation is unnecessary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megafold.data.features import NUM_ATOM_NAME_CHARS, NUM_ELEMENTS, NUM_RESTYPES
from megafold.kernels import layernorm_linear
from megafold.model.config import AlphaFold3Config
from megafold.model.primitives import (
    AtomWindows,
    DiffusionTransformer,
    FixedConditioning,
    LinearNoBias,
    atoms_to_tokens_mean,
    init_weight_,
    lecun_normal_,
    ln_params,
    tokens_to_atoms,
)

Batch = Mapping[str, torch.Tensor]

# ref_pos (3), ref_charge, ref_mask, ref_element (one-hot), ref_atom_name_chars (4 one-hots)
REF_FEATURES = 3 + 1 + 1 + NUM_ELEMENTS + 4 * NUM_ATOM_NAME_CHARS


def _first_index_after(after: torch.Tensor, valid: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per group, the smallest flat atom index that is valid and greater than ``after[group]``
    (``len(valid)`` where there is none)."""
    size = valid.numel()
    flat = torch.arange(size, device=valid.device)
    candidate = torch.where(valid & (flat > after[group]), flat, size)
    first = torch.full_like(after, size)
    return first.scatter_reduce(0, group, candidate, "amin")


def canonical_conformer_positions(
    ref_pos: torch.Tensor, ref_mask: torch.Tensor, ref_space_uid: torch.Tensor, atom_mask: torch.Tensor
) -> torch.Tensor:
    """Each reference conformer (atoms sharing ``ref_space_uid``) in its own frame.

    Origin: the conformer's centroid. Axes: Gram-Schmidt on its first three atoms (the backbone
    N, CA, C of an amino acid), right-handed, so chirality is kept. Conformers of one or two
    atoms, or with colinear first atoms, fall back to a fixed perpendicular axis (exact for
    colinear conformers). ``[B, A, 3]`` in, ``[B, A, 3]`` out; masked atoms get 0.
    """
    B, A = ref_mask.shape
    valid = (ref_mask & atom_mask).flatten()
    pos = ref_pos.reshape(B * A, 3).float()
    key = ref_space_uid + torch.arange(B, device=ref_pos.device)[:, None] * (ref_space_uid.max() + 1)
    _, group = torch.unique(key.flatten(), return_inverse=True)
    n_groups = int(group.max()) + 1
    none = torch.full((n_groups,), -1, dtype=torch.long, device=pos.device)
    first = _first_index_after(none, valid, group)
    second = _first_index_after(first, valid, group)
    third = _first_index_after(second, valid, group)

    weight = valid.to(pos.dtype)
    centroid = pos.new_zeros(n_groups, 3).index_add_(0, group, pos * weight[:, None])
    centroid = centroid / pos.new_zeros(n_groups).index_add_(0, group, weight).clamp(min=1)[:, None]
    padded = torch.cat([pos, pos.new_zeros(1, 3)])
    origin = padded[first]
    # A missing atom takes the origin's place, which makes its direction degenerate.
    p1 = torch.where((second < B * A)[:, None], padded[second], origin)
    p2 = torch.where((third < B * A)[:, None], padded[third], origin)

    eps = 1e-4
    ex = pos.new_tensor([1.0, 0.0, 0.0]).expand_as(origin)
    ey = pos.new_tensor([0.0, 1.0, 0.0]).expand_as(origin)
    d1 = p1 - origin
    n1 = d1.norm(dim=-1, keepdim=True)
    e1 = torch.where(n1 > eps, d1 / n1.clamp(min=eps), ex)
    d2 = p2 - origin
    d2 = d2 - (d2 * e1).sum(-1, keepdim=True) * e1
    helper = torch.where((e1[:, :1].abs() < 0.9), ex, ey)
    fallback = helper - (helper * e1).sum(-1, keepdim=True) * e1
    n2 = d2.norm(dim=-1, keepdim=True)
    e2 = torch.where(n2 > eps, d2 / n2.clamp(min=eps), fallback / fallback.norm(dim=-1, keepdim=True))
    e3 = torch.linalg.cross(e1, e2)
    axes = torch.stack([e1, e2, e3], dim=-2)  # [G, 3 axes, 3]

    local = torch.einsum("gij,gj->gi", axes[group], pos - centroid[group]) * weight[:, None]
    return local.view(B, A, 3)


class RelativePositionEncoding(nn.Module):
    """AF3 Alg. 3: one-hot relative residue, token and chain offsets -> ``[B, N, N, c_z]``.

    ``LinearNoBias(concat(one-hots))`` is computed as a sum of weight columns (an embedding
    lookup), which never materialises the ``[N, N, 139]`` one-hot tensor.
    """

    def __init__(self, c_z: int, r_max: int = 32, s_max: int = 2):
        super().__init__()
        self.r_max, self.s_max = r_max, s_max
        self.n_pos = 2 * r_max + 2
        self.n_chain = 2 * s_max + 2
        self.proj = LinearNoBias(2 * self.n_pos + 1 + self.n_chain, c_z)

    def forward(self, batch: Batch) -> torch.Tensor:
        def pairwise(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            value = batch[name]
            return value[:, :, None], value[:, None, :]

        asym_i, asym_j = pairwise("asym_id")
        res_i, res_j = pairwise("residue_index")
        tok_i, tok_j = pairwise("token_index")
        ent_i, ent_j = pairwise("entity_id")
        sym_i, sym_j = pairwise("sym_id")
        r, s = self.r_max, self.s_max
        same_chain = asym_i == asym_j
        same_residue = res_i == res_j
        d_residue = torch.where(same_chain, (res_i - res_j + r).clamp(0, 2 * r), 2 * r + 1)
        d_token = torch.where(same_chain & same_residue, (tok_i - tok_j + r).clamp(0, 2 * r), 2 * r + 1)
        d_chain = torch.where(~same_chain, (sym_i - sym_j + s).clamp(0, 2 * s), 2 * s + 1)
        table = self.proj.weight.t()  # [139, c_z]: rows = one-hot positions
        n = self.n_pos
        out = F.embedding(d_residue, table[:n]) + F.embedding(d_token, table[n : 2 * n])
        out = out + (ent_i == ent_j).unsqueeze(-1).to(table.dtype) * table[2 * n]
        return out + F.embedding(d_chain, table[2 * n + 1 :])


@dataclass
class AtomContext:
    """What the atom transformer needs that does not depend on the noised sample."""

    windows: AtomWindows
    single: torch.Tensor  # c_l  [B, A, c_atom]
    pair: torch.Tensor  # p_lm [B, K, Q, M, c_atompair]
    atom_to_token: torch.Tensor  # [B, A]
    atom_mask: torch.Tensor  # [B, A]
    n_tokens: int


class AtomAttentionEncoder(nn.Module):
    """AF3 Alg. 5. With ``c_s = c_z = 0`` it is the input embedder's encoder; with the trunk's
    widths it is the diffusion module's, which also reads the trunk and the noised positions.

    ``prepare`` builds the sample-independent atom single / pair features once per trunk pass;
    ``forward`` runs the atom transformer on ``S`` samples and pools atoms to tokens.
    """

    def __init__(
        self, c_atom: int, c_atompair: int, c_token: int, blocks: int, heads: int,
        queries: int, keys: int, c_s: int = 0, c_z: int = 0,
    ):
        super().__init__()
        self.queries, self.keys = queries, keys
        self.ref_proj = LinearNoBias(REF_FEATURES, c_atom)
        self.pair_offset = LinearNoBias(3, c_atompair)
        self.pair_distance = LinearNoBias(1, c_atompair)
        self.pair_valid = LinearNoBias(1, c_atompair)
        self.conditioned = bool(c_s)
        if self.conditioned:
            self.trunk_single_norm_weight, self.trunk_single_norm_bias = ln_params(c_s)
            self.trunk_single_weight = nn.Parameter(lecun_normal_(torch.empty(c_atom, c_s)))
            self.trunk_pair_norm_weight, self.trunk_pair_norm_bias = ln_params(c_z)
            self.trunk_pair_weight = nn.Parameter(lecun_normal_(torch.empty(c_atompair, c_z)))
            self.noisy_pos_proj = LinearNoBias(3, c_atom)
        self.pair_from_query = LinearNoBias(c_atom, c_atompair)
        self.pair_from_key = LinearNoBias(c_atom, c_atompair)
        self.pair_mlp = nn.Sequential(
            nn.ReLU(), LinearNoBias(c_atompair, c_atompair),
            nn.ReLU(), LinearNoBias(c_atompair, c_atompair),
            nn.ReLU(), LinearNoBias(c_atompair, c_atompair, init="final"),
        )
        self.transformer = DiffusionTransformer(c_atom, c_atom, c_atompair, blocks, heads)
        self.to_token = LinearNoBias(c_atom, c_token)

    def prepare(
        self, batch: Batch, s_trunk: torch.Tensor | None = None, z_trunk: torch.Tensor | None = None
    ) -> AtomContext:
        """Atom single ``c_l`` and local atom pair ``p_lm`` (Alg. 5 lines 1-6, 8-9, 11-13)."""
        atom_mask = batch["atom_mask"]
        windows = AtomWindows(atom_mask, self.queries, self.keys)
        ref_mask = batch["ref_mask"] & atom_mask
        ref_pos = canonical_conformer_positions(batch["ref_pos"], batch["ref_mask"], batch["ref_space_uid"], atom_mask)
        dtype = self.ref_proj.weight.dtype
        features = torch.cat(
            [
                ref_pos,
                batch["ref_charge"][..., None],
                ref_mask[..., None].to(ref_pos.dtype),
                F.one_hot(batch["ref_element"].clamp(0, NUM_ELEMENTS - 1), NUM_ELEMENTS),
                F.one_hot(batch["ref_atom_name_chars"].clamp(0, NUM_ATOM_NAME_CHARS - 1), NUM_ATOM_NAME_CHARS).flatten(-2),
            ],
            dim=-1,
        ).to(dtype)
        single = self.ref_proj(features)

        # Local pairs: queries of each window x its keys, within one conformer only.
        pos_q, pos_k = windows.query_blocks(ref_pos, 1), windows.key_windows(ref_pos, 1)
        uid = batch["ref_space_uid"]
        valid_q = windows.query_blocks(ref_mask, 1)
        valid_k = windows.key_windows(ref_mask, 1) & windows.key_mask
        same = windows.query_blocks(uid, 1)[..., :, None] == windows.key_windows(uid, 1)[..., None, :]
        same = (same & valid_q[..., :, None] & valid_k[..., None, :]).unsqueeze(-1).to(dtype)
        offset = (pos_q[..., :, None, :] - pos_k[..., None, :, :]).to(dtype)  # [B, K, Q, M, 3]
        inverse_sq = 1.0 / (1.0 + offset.square().sum(-1, keepdim=True))
        pair = (self.pair_offset(offset) + self.pair_distance(inverse_sq) + self.pair_valid(same)) * same

        atom_to_token = batch["atom_to_token"]
        if self.conditioned:
            trunk = layernorm_linear(s_trunk, self.trunk_single_norm_weight, self.trunk_single_norm_bias, self.trunk_single_weight)
            single = single + tokens_to_atoms(trunk, atom_to_token)
            trunk_pair = layernorm_linear(z_trunk, self.trunk_pair_norm_weight, self.trunk_pair_norm_bias, self.trunk_pair_weight)
            n_tokens = z_trunk.shape[1]
            flat_index = (
                windows.query_blocks(atom_to_token, 1)[..., :, None] * n_tokens
                + windows.key_windows(atom_to_token, 1)[..., None, :]
            )  # [B, K, Q, M]
            gathered = torch.gather(
                trunk_pair.flatten(1, 2), 1,
                flat_index.flatten(1)[..., None].expand(-1, -1, trunk_pair.shape[-1]),
            )
            pair = pair + gathered.view(*flat_index.shape, -1)

        pair = pair + self.pair_from_query(F.relu(windows.query_blocks(single, 1)))[..., :, None, :]
        pair = pair + self.pair_from_key(F.relu(windows.key_windows(single, 1)))[..., None, :, :]
        pair = pair + self.pair_mlp(pair)
        return AtomContext(windows, single, pair, atom_to_token, atom_mask, int(batch["token_mask"].shape[1]))

    def fixed_conditioning(self, ctx: AtomContext) -> FixedConditioning:
        """The atom transformer's pair biases, weights and modulations: its conditioning is
        the atom single ``c_l``, the same for every sample and noise level."""
        return self.transformer.fixed_conditioning(ctx.single.unsqueeze(1), ctx.pair)

    def forward(
        self, ctx: AtomContext, fixed: FixedConditioning, r_noisy: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, S, N, c_token]`` and the atom skip ``q [B, S, A, c_atom]``.

        fixed: ``fixed_conditioning(ctx)``, built once for all calls on ``ctx``.
        r_noisy: scaled noisy positions ``[B, S, A, 3]`` (diffusion) or None (S = 1).
        """
        query = ctx.single.unsqueeze(1)
        if r_noisy is not None:
            query = query + self.noisy_pos_proj(r_noisy.to(self.noisy_pos_proj.weight.dtype))
        query = self.transformer(
            query, None, fixed.biases, ctx.windows.key_mask, ctx.windows, fixed.weights, fixed.modulations
        )
        tokens = atoms_to_tokens_mean(F.relu(self.to_token(query)), ctx.atom_to_token, ctx.atom_mask, ctx.n_tokens)
        return tokens, query


class AtomAttentionDecoder(nn.Module):
    """AF3 Alg. 6: broadcast tokens to atoms, atom transformer, position update ``[B, S, A, 3]``."""

    def __init__(self, c_token: int, c_atom: int, c_atompair: int, blocks: int, heads: int):
        super().__init__()
        self.token_to_atom = LinearNoBias(c_token, c_atom)
        self.transformer = DiffusionTransformer(c_atom, c_atom, c_atompair, blocks, heads)
        self.out_norm_weight, self.out_norm_bias = ln_params(c_atom)
        self.out_weight = nn.Parameter(init_weight_(torch.empty(3, c_atom), "final"))

    def fixed_conditioning(self, ctx: AtomContext) -> FixedConditioning:
        """As ``AtomAttentionEncoder.fixed_conditioning``, for this decoder's transformer."""
        return self.transformer.fixed_conditioning(ctx.single.unsqueeze(1), ctx.pair)

    def forward(
        self, tokens: torch.Tensor, query_skip: torch.Tensor, ctx: AtomContext, fixed: FixedConditioning
    ) -> torch.Tensor:
        query = self.token_to_atom(tokens)
        query = tokens_to_atoms(query, ctx.atom_to_token) + query_skip
        query = self.transformer(
            query, None, fixed.biases, ctx.windows.key_mask, ctx.windows, fixed.weights, fixed.modulations
        )
        return layernorm_linear(query, self.out_norm_weight, self.out_norm_bias, self.out_weight)


class InputFeatureEmbedder(nn.Module):
    """AF3 Alg. 2: ``s_inputs = concat(AtomAttentionEncoder(f), restype, profile, deletion_mean)``."""

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        self.atom_encoder = AtomAttentionEncoder(
            config.c_atom, config.c_atompair, config.c_s, config.atom_encoder_blocks,
            config.atom_heads, config.atom_queries, config.atom_keys,
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        """``[B, N, c_s + 65]``."""
        ctx = self.atom_encoder.prepare(batch)
        tokens, _ = self.atom_encoder(ctx, self.atom_encoder.fixed_conditioning(ctx))
        tokens = tokens.squeeze(1)
        restype = F.one_hot(batch["restype"].clamp(0, NUM_RESTYPES - 1), NUM_RESTYPES).to(tokens.dtype)
        return torch.cat(
            [tokens, restype, batch["profile"].to(tokens.dtype), batch["deletion_mean"][..., None].to(tokens.dtype)],
            dim=-1,
        )
