"""AF3 losses (Sec. 4): diffusion (weighted rigid alignment + weighted MSE + smooth LDDT + bonds),
distogram and confidence. Every function computes in fp32 with autocast off.

Diffusion weight: ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``, EDM's loss weight
(Karras et al. 2022), which is what Boltz and Protenix train with. The SI's Eq. 6 prints
``(t^2 + sigma_data^2) / (t + sigma_data)^2``, a typo for EDM's weight.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from megafold.model.heads import PAE_BINS, PDE_BINS, PLDDT_BINS, distogram_edges, gather_atoms

LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
BOND_CUTOFF = 2.4  # A: a bonded token pair's atoms closer than this in the truth are bonded


@contextlib.contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, enabled=False):
        yield


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Exact Euclidean distances ``[*, A, 3], [*, M, 3] -> [*, A, M]`` (no ``|x|^2 + |y|^2 - 2xy``)."""
    return torch.cdist(x, x if y is None else y, compute_mode="donot_use_mm_for_euclid_dist")


def weighted_rigid_align(x: torch.Tensor, x_true: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """AF3 Alg. 28: ``x_true`` rigidly moved onto ``x`` minimising ``sum_l w_l |R x_true_l + t - x_l|^2``.

    x, x_true ``[*, A, 3]``; weight ``[*, A]`` (0 leaves an atom out). Proper rotations only
    (reflections are corrected). Returns ``[*, A, 3]`` with the gradient stopped.
    """
    with fp32(x.device), torch.no_grad():
        x, x_true = x.float(), x_true.float()
        w = weight.float()[..., None]
        total = w.sum(-2, keepdim=True).clamp(min=1e-8)
        mu, mu_true = (w * x).sum(-2, keepdim=True) / total, (w * x_true).sum(-2, keepdim=True) / total
        xc, tc = x - mu, x_true - mu_true
        cov = torch.einsum("...ai,...aj->...ij", w * tc, xc)  # H = sum_l w_l t_l x_l^T
        u, _, vh = torch.linalg.svd(cov)
        v = vh.transpose(-1, -2)
        sign = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        fix = torch.ones(*sign.shape, 3, device=x.device)
        fix[..., 2] = sign
        rotation = (v * fix[..., None, :]) @ u.transpose(-1, -2)
        return tc @ rotation.transpose(-1, -2) + mu


def smooth_lddt_loss(
    x: torch.Tensor,
    x_true: torch.Tensor,
    is_nucleotide: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """AF3 Alg. 27: ``1 - smooth LDDT``, per structure.

    x, x_true ``[*, A, 3]``; is_nucleotide, mask ``[*, A]`` bool (broadcast over leading dims).
    Pairs l != m count when the true distance is under 30 A (l a nucleotide atom) or 15 A.
    Over every [A, A] pair: the reference for ``smooth_lddt_loss_on_pairs``, which the training
    loss uses.
    """
    with fp32(x.device):
        d_true = pairwise_distances(x_true.float())
        score = _smooth_score((d_true - pairwise_distances(x.float())).abs())
        cutoff = torch.where(is_nucleotide, 30.0, 15.0)[..., :, None]
        A = x.shape[-2]
        not_self = ~torch.eye(A, dtype=torch.bool, device=x.device)
        counted = (d_true < cutoff) & mask[..., :, None] & mask[..., None, :] & not_self
        counted = counted.float()
        return 1.0 - (score * counted).sum((-1, -2)) / counted.sum((-1, -2)).clamp(min=1)


def _smooth_score(delta: torch.Tensor) -> torch.Tensor:
    """AF3 Alg. 27's per-pair score: the mean of sigmoid(t - delta) over the four thresholds."""
    return sum(torch.sigmoid(t - delta) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)


class LddtPairs(NamedTuple):
    """The atom pairs that smooth LDDT counts, from the truth (``smooth_lddt_pairs``): unordered
    pairs l < m with ``weight`` 1 or 2 (how many of (l, m), (m, l) count: the cutoff depends on
    the first atom's kind), their true distances, and the ordered-pair count per structure."""

    batch: torch.Tensor  # [P] long
    first: torch.Tensor  # [P] long, l
    second: torch.Tensor  # [P] long, m > l
    weight: torch.Tensor  # [P] float
    distance: torch.Tensor  # [P] float, true |l - m|
    count: torch.Tensor  # [B] float, ordered pairs counted


def smooth_lddt_pairs(x_true: torch.Tensor, is_nucleotide: torch.Tensor, mask: torch.Tensor) -> LddtPairs:
    """Once per step: the pairs ``smooth_lddt_loss`` counts, for x_true ``[B, A, 3]`` and
    is_nucleotide, mask ``[B, A]``. Only pairs within 15 A (30 A from a nucleotide atom) of each
    other in the truth count (about a tenth of all pairs in a 384-token crop), so the loss over
    the diffusion samples is computed on those alone instead of on every [A, A] pair."""
    with fp32(x_true.device), torch.no_grad():
        d_true = pairwise_distances(x_true.float())
        cutoff = torch.where(is_nucleotide, 30.0, 15.0)[..., :, None]
        counted = (d_true < cutoff) & mask[..., :, None] & mask[..., None, :]
        counted &= ~torch.eye(x_true.shape[-2], dtype=torch.bool, device=x_true.device)
        weight = (counted.float() + counted.transpose(-1, -2).float()).triu(1)  # unordered pairs l < m
        batch, first, second = weight.nonzero(as_tuple=True)
        return LddtPairs(
            batch, first, second, weight[batch, first, second], d_true[batch, first, second], counted.sum((-1, -2)).float()
        )


def smooth_lddt_loss_on_pairs(x: torch.Tensor, pairs: LddtPairs) -> torch.Tensor:
    """``smooth_lddt_loss`` of x ``[B, S, A, 3]`` on the counted pairs alone (``pairs`` from
    ``smooth_lddt_pairs`` of the truth): the same values ``[B, S]``, a fraction of the work."""
    with fp32(x.device):
        x = x.float()
        diff = x[pairs.batch, :, pairs.first] - x[pairs.batch, :, pairs.second]  # [P, S, 3]
        # |diff| with a zero gradient where two atoms coincide (as cdist's), not NaN
        d_pred = diff.square().sum(-1).clamp(min=1e-12).sqrt()
        score = _smooth_score((pairs.distance[:, None] - d_pred).abs())
        total = x.new_zeros(x.shape[0], x.shape[1]).index_add(0, pairs.batch, pairs.weight[:, None] * score)
        return 1.0 - total / pairs.count.clamp(min=1)[:, None]


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def weighted_mse(x: torch.Tensor, x_aligned: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1/3 mean_l w_l |x_l - x_aligned_l|^2`` over the masked atoms, per structure ``[*]``."""
    with fp32(x.device):
        sq = (x.float() - x_aligned.float()).square().sum(-1)
        maskf = mask.float()
        return (weight * maskf * sq).sum(-1) / (3.0 * maskf.sum(-1).clamp(min=1))


def bonded_atom_pairs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Atom pairs ``[P, 3]`` (batch, l, m; l < m) of the bond loss: atoms of bonded tokens
    (``token_bonds``: ligand-ligand and polymer-ligand) within 2.4 A in the truth, both resolved."""
    atom_to_token = batch["atom_to_token"]
    resolved = batch["atom_resolved"] & batch["atom_mask"]
    B, A = atom_to_token.shape
    bonded_tokens = batch["token_bonds"]
    batch_index = torch.arange(B, device=atom_to_token.device)[:, None, None]
    bonded = bonded_tokens[batch_index, atom_to_token[:, :, None], atom_to_token[:, None, :]]
    bonded = bonded & resolved[:, :, None] & resolved[:, None, :]
    bonded = bonded & torch.ones(A, A, dtype=torch.bool, device=bonded.device).triu(1)
    if not bonded.any():
        return torch.zeros(0, 3, dtype=torch.long, device=bonded.device)
    with fp32(atom_to_token.device):
        close = pairwise_distances(batch["atom_pos"].float()) < BOND_CUTOFF
    return (bonded & close).nonzero()


def bond_loss(x: torch.Tensor, x_true: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean squared bond-length error over ``pairs`` (from ``bonded_atom_pairs``), per ``[B, S]``.

    x ``[B, S, A, 3]``; x_true ``[B, A, 3]``; structures without bonds get 0.
    """
    B, S = x.shape[:2]
    if pairs.shape[0] == 0:
        return x.new_zeros(B, S)
    with fp32(x.device):
        b, l, m = pairs.unbind(-1)
        d_pred = (x[b, :, l].float() - x[b, :, m].float()).norm(dim=-1)  # [P, S]
        d_true = (x_true[b, l].float() - x_true[b, m].float()).norm(dim=-1)[:, None]
        err = (d_pred - d_true).square()
        total = x.new_zeros(B, S, dtype=torch.float32).index_add_(0, b, err)
        count = x.new_zeros(B, dtype=torch.float32).index_add_(0, b, torch.ones_like(d_true[:, 0]))
        return total / count.clamp(min=1)[:, None]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the True entries of ``mask`` of each example, then over the
    examples that have any (0 if none). Per-example means keep an example's weight independent
    of its size and of which examples share its batch (or data-parallel rank)."""
    with fp32(logits.device):
        ce = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
        maskf = mask.float().flatten(1)
        count = maskf.sum(1)
        per_example = (ce.flatten(1) * maskf).sum(1) / count.clamp(min=1)
        present = (count > 0).float()
        return (per_example * present).sum() / present.sum().clamp(min=1)


def distogram_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the distogram ``[B, N, N, 64]`` against true representative-atom distances."""
    rep = gather_atoms(batch["atom_pos"].float(), batch["token_rep_atom"])
    rep_mask = batch["token_rep_mask"] & batch["token_mask"]
    with fp32(logits.device):
        target = (pairwise_distances(rep)[..., None] > distogram_edges(logits.device)).sum(-1)
    return masked_cross_entropy(logits, target, rep_mask[:, :, None] & rep_mask[:, None, :])


# ---------------------------------------------------------------------------- confidence targets


def _name_code(name: str) -> list[int]:
    return [ord(c) - 32 for c in name.ljust(4)]


def _find_atom(batch: Mapping[str, torch.Tensor], name: str, token_ok: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its atom called ``name`` (-1 where it has none or ``token_ok`` is False)."""
    chars = batch["ref_atom_name_chars"]
    atom_to_token = batch["atom_to_token"]
    B, A = atom_to_token.shape
    match = (chars == chars.new_tensor(_name_code(name))).all(-1) & batch["atom_mask"]
    match = match & torch.gather(token_ok, 1, atom_to_token)
    index = torch.where(match, torch.arange(A, device=chars.device), -1)
    found = torch.full(token_ok.shape, -1, dtype=torch.long, device=chars.device)
    return found.scatter_reduce(1, atom_to_token, index, "amax")


def token_frame_atoms(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame atoms (a, b, c) per token ``[B, N, 3]`` and their validity ``[B, N]``.

    Proteins: N, CA, C; nucleic acids: C1', C3', C4' (AF3 Sec. 4.3.2), found by atom name.
    Ligand tokens get no frame (AF3 builds one from the nearest atoms): no PAE target there.
    """
    protein = batch["is_protein"] & batch["token_mask"]
    nucleic = (batch["is_dna"] | batch["is_rna"]) & batch["token_mask"]
    frames = []
    for protein_name, nucleic_name in (("N", "C1'"), ("CA", "C3'"), ("C", "C4'")):
        frames.append(torch.maximum(_find_atom(batch, protein_name, protein), _find_atom(batch, nucleic_name, nucleic)))
    frames = torch.stack(frames, dim=-1)
    return frames.clamp(min=0), (frames >= 0).all(-1)


def express_in_frames(x: torch.Tensor, frame_atoms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """AF3 Alg. 29/30: ``points [B, M, 3]`` in the frame of every token: ``[B, N, M, 3]``.

    Frame from atoms (a, b, c) of ``x [B, A, 3]``: origin b, e1 along the bisector of (a - b)
    and (c - b), e2 along their difference, e3 = e1 x e2.
    """
    a, b, c = (gather_atoms(x, frame_atoms[..., k]) for k in range(3))
    w1 = F.normalize(a - b, dim=-1, eps=1e-6)
    w2 = F.normalize(c - b, dim=-1, eps=1e-6)
    e1 = F.normalize(w1 + w2, dim=-1, eps=1e-6)
    e2 = F.normalize(w2 - w1, dim=-1, eps=1e-6)
    e3 = torch.linalg.cross(e1, e2)
    axes = torch.stack([e1, e2, e3], dim=-2)  # [B, N, 3, 3]
    return torch.einsum("bnkx,bnmx->bnmk", axes, points[:, None, :, :] - b[:, :, None, :])


def _bins(value: torch.Tensor, width: float, bins: int) -> torch.Tensor:
    return (value / width).floor().long().clamp(0, bins - 1)


def confidence_targets(
    x: torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Bin targets and masks of the confidence heads for a predicted structure ``x [B, A, 3]``.

    plddt: per atom, LDDT against the token centre atoms (other tokens, within 15 A or
    30 A of a nucleotide centre) at 0.5 / 1 / 2 / 4 A, 50 bins over [0, 1]. pde: centre-atom
    distance error; pae: error of centre atom j in the frame of token i; both 64 bins of
    0.5 A. resolved: ``atom_resolved``.
    """
    with fp32(x.device), torch.no_grad():
        x = x.float()
        x_true = batch["atom_pos"].float()
        atom_mask = batch["atom_mask"]
        resolved = batch["atom_resolved"] & atom_mask
        token_mask = batch["token_mask"]
        centre = batch["token_center_atom"]
        centre_ok = token_mask & torch.gather(resolved, 1, centre)
        nucleotide = batch["is_dna"] | batch["is_rna"]

        d_true = pairwise_distances(x_true, gather_atoms(x_true, centre))  # [B, A, N]
        d_pred = pairwise_distances(x, gather_atoms(x, centre))
        cutoff = torch.where(nucleotide, 30.0, 15.0)[:, None, :]
        other_token = batch["atom_to_token"][:, :, None] != torch.arange(centre.shape[1], device=x.device)
        counted = (d_true < cutoff) & centre_ok[:, None, :] & resolved[:, :, None] & other_token
        error = (d_true - d_pred).abs()
        score = sum((error < t).float() for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
        n_counted = counted.sum(-1)
        lddt = (score * counted).sum(-1) / n_counted.clamp(min=1)
        plddt = (_bins(lddt, 1.0 / PLDDT_BINS, PLDDT_BINS), resolved & (n_counted > 0))

        c_true, c_pred = gather_atoms(x_true, centre), gather_atoms(x, centre)
        pair_ok = centre_ok[:, :, None] & centre_ok[:, None, :]
        pde_error = (pairwise_distances(c_true) - pairwise_distances(c_pred)).abs()
        pde = (_bins(pde_error, 0.5, PDE_BINS), pair_ok)

        frames, frame_ok = token_frame_atoms(batch)
        frame_ok = frame_ok & torch.gather(resolved, 1, frames.flatten(1)).view(frames.shape).all(-1)
        pae_error = (express_in_frames(x, frames, c_pred) - express_in_frames(x_true, frames, c_true)).norm(dim=-1)
        pae = (_bins(pae_error, 0.5, PAE_BINS), frame_ok[:, :, None] & centre_ok[:, None, :])
        resolved_target = (batch["atom_resolved"].long(), atom_mask)
    return {"plddt": plddt, "pae": pae, "pde": pde, "resolved": resolved_target}


def confidence_losses(
    logits: Mapping[str, torch.Tensor], x: torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Cross-entropies of the four confidence heads for the structure ``x [B, A, 3]`` they saw."""
    targets = confidence_targets(x, batch)
    return {
        name: masked_cross_entropy(logits[f"{name}_logits"], target, mask)
        for name, (target, mask) in targets.items()
    }
