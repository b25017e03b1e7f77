"""Validation metrics in torch: lDDT (CA and all-atom), CA RMSD after Kabsch alignment,
distogram accuracy and pLDDT calibration.

Every function takes predicted and true coordinates in the atom layout of the feature batch
(``megafold.data.features``) and computes in fp32 without gradients. "CA" means the token
centre atom of polymer residues: CA for amino acids, C1' for nucleotides (the atoms
``megafold.viz.superpose`` aligns on).

lDDT follows Mariani et al. 2013 as ``biotite.structure.lddt`` computes it: pairs of atoms in
different residues within ``cutoff`` in the truth; a pair scores the fraction of the thresholds
0.5, 1, 2, 4 A its distance error is under; global lDDT averages over all pairs.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megafold.model.heads import distogram_edges, gather_atoms
from megafold.model.losses import LDDT_THRESHOLDS, fp32, pairwise_distances, weighted_rigid_align

Batch = Mapping[str, torch.Tensor]
LDDT_CUTOFF = 15.0  # A


@torch.no_grad()
def lddt(
    pred: torch.Tensor,
    true: torch.Tensor,
    mask: torch.Tensor,
    *,
    partner_mask: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    cutoff: float = LDDT_CUTOFF,
    per_atom: bool = False,
) -> torch.Tensor:
    """lDDT of ``pred`` against ``true``.

    pred, true ``[*, A, 3]`` (broadcastable, e.g. pred ``[B, S, A, 3]``, true ``[B, 1, A, 3]``);
    mask ``[*, A]`` bool: the atoms scored (resolved ones); partner_mask ``[*, A]`` bool: the
    atoms they are compared with (default ``mask``); group ``[*, A]`` int: pairs within one
    group (residue or token) are left out (default: only an atom with itself).
    Returns ``[*]`` (mean over all pairs; NaN without pairs) or, with ``per_atom``, ``[*, A]``
    (NaN for atoms without pairs).
    """
    with fp32(pred.device):
        pred, true = pred.float(), true.float()
        partner_mask = mask if partner_mask is None else partner_mask
        d_true = pairwise_distances(true)
        error = (d_true - pairwise_distances(pred)).abs()
        score = sum((error <= t).float() for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
        if group is None:
            A = pred.shape[-2]
            different = ~torch.eye(A, dtype=torch.bool, device=pred.device)
        else:
            different = group[..., :, None] != group[..., None, :]
        counted = (d_true < cutoff) & mask[..., :, None] & partner_mask[..., None, :] & different
        counted = counted.float()
        if per_atom:
            return (score * counted).sum(-1) / counted.sum(-1)
        return (score * counted).sum((-1, -2)) / counted.sum((-1, -2))


def centre_atoms(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """CA / C1' atom index of every polymer token ``[B, N]`` and whether it counts (a resolved
    polymer token) ``[B, N]``."""
    index = batch["token_center_atom"]
    polymer = batch["token_mask"] & ~batch["is_ligand"]
    resolved = torch.gather(batch["atom_resolved"] & batch["atom_mask"], 1, index)
    return index, polymer & resolved


def _with_samples(coords: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``coords [B, (S,) A, 3]`` and ``like [B, ...]`` with a sample axis each."""
    if coords.dim() == 3:
        coords = coords[:, None]
    return coords, like[:, None]


@torch.no_grad()
def ca_lddt(coords: torch.Tensor, batch: Batch) -> torch.Tensor:
    """lDDT over the CA / C1' atoms: coords ``[B, A, 3]`` -> ``[B]`` or ``[B, S, A, 3]`` -> ``[B, S]``."""
    index, ok = centre_atoms(batch)
    pred, true = _with_samples(coords, batch["atom_pos"])
    samples = pred.shape[1]
    pred_ca = gather_atoms(pred, index)
    true_ca = gather_atoms(true, index)
    out = lddt(pred_ca, true_ca, ok[:, None].expand(-1, samples, -1))
    return out if coords.dim() == 4 else out[:, 0]


@torch.no_grad()
def all_atom_lddt(coords: torch.Tensor, batch: Batch, *, per_atom: bool = False) -> torch.Tensor:
    """lDDT over all resolved atoms, pairs within one token left out (for residues: biotite's
    ``exclude_same_residue``). coords ``[B, (S,) A, 3]`` -> ``[B, (S)]``, or per atom
    ``[B, (S,) A]``."""
    pred, true = _with_samples(coords, batch["atom_pos"])
    mask = (batch["atom_resolved"] & batch["atom_mask"])[:, None]
    out = lddt(pred, true, mask, group=batch["atom_to_token"][:, None], per_atom=per_atom)
    return out if coords.dim() == 4 else out[:, 0]


@torch.no_grad()
def plddt_target(coords: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The true per-atom lDDT that pLDDT predicts (AF3 Sec. 4.3.1): each resolved atom against
    the centre atoms of the other tokens within 15 A. coords ``[B, A, 3]`` -> ``[B, A]`` in 0..1
    (NaN where an atom has no partner)."""
    resolved = batch["atom_resolved"] & batch["atom_mask"]
    centre = torch.zeros_like(resolved)
    centre.scatter_(1, batch["token_center_atom"], batch["token_mask"])
    return lddt(coords, batch["atom_pos"], resolved, partner_mask=centre & resolved, group=batch["atom_to_token"], per_atom=True)


@torch.no_grad()
def ca_rmsd(coords: torch.Tensor, batch: Batch) -> torch.Tensor:
    """RMSD (A) over the CA / C1' atoms after optimal superposition (Kabsch, proper rotations):
    coords ``[B, (S,) A, 3]`` -> ``[B, (S)]``."""
    index, ok = centre_atoms(batch)
    pred, true = _with_samples(coords, batch["atom_pos"])
    pred_ca = gather_atoms(pred.float(), index)
    true_ca = gather_atoms(true.float(), index).expand_as(pred_ca)
    weight = ok[:, None].expand(pred_ca.shape[:-1]).float()
    aligned = weighted_rigid_align(pred_ca, true_ca, weight)
    squared = ((pred_ca - aligned).square().sum(-1) * weight).sum(-1) / weight.sum(-1)
    out = squared.sqrt()
    return out if coords.dim() == 4 else out[:, 0]


@torch.no_grad()
def distogram_accuracy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Share of token pairs (i != j, both representative atoms resolved) whose most likely
    distogram bin is the true one: logits ``[B, N, N, 64]`` -> ``[B]``."""
    with fp32(logits.device):
        rep = gather_atoms(batch["atom_pos"].float(), batch["token_rep_atom"])
        target = (pairwise_distances(rep)[..., None] > distogram_edges(logits.device)).sum(-1)
        ok = batch["token_rep_mask"] & batch["token_mask"]
        N = ok.shape[1]
        pairs = ok[:, :, None] & ok[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=ok.device)
        hits = ((logits.argmax(-1) == target) & pairs).sum((-1, -2))
        return hits.float() / pairs.sum((-1, -2)).float()


@torch.no_grad()
def plddt_calibration(
    plddt: torch.Tensor, true_lddt: torch.Tensor, mask: torch.Tensor, bins: int = 10
) -> dict[str, torch.Tensor]:
    """How well predicted per-atom confidence matches the truth.

    plddt ``[*]`` in 0..100, true_lddt ``[*]`` in 0..1 (``plddt_target``), mask ``[*]`` bool.
    Returns mae (pLDDT units, 0..100), pearson (correlation), and per pLDDT bin of width
    100 / bins: predicted (mean pLDDT), observed (mean true lDDT x 100), count ``[bins]``;
    NaN in empty bins.
    """
    ok = mask & true_lddt.isfinite() & plddt.isfinite()
    predicted, observed = plddt[ok].double(), 100.0 * true_lddt[ok].double()
    centred_p, centred_o = predicted - predicted.mean(), observed - observed.mean()
    pearson = (centred_p * centred_o).sum() / (centred_p.norm() * centred_o.norm())
    which = (predicted * bins / 100.0).floor().long().clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64, device=plddt.device).index_add_(0, which, torch.ones_like(predicted))

    def bin_mean(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(bins, dtype=torch.float64, device=plddt.device).index_add_(0, which, values)
        return total / count

    return {
        "mae": (predicted - observed).abs().mean(),
        "pearson": pearson,
        "predicted": bin_mean(predicted),
        "observed": bin_mean(observed),
        "count": count,
    }


@torch.no_grad()
def structure_metrics(
    coords: torch.Tensor,
    batch: Batch,
    *,
    plddt: torch.Tensor | None = None,
    distogram_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """The validation metrics of predicted structures ``coords [B, A, 3]``, averaged over the
    batch: ca_lddt, lddt, ca_rmsd; with distogram logits ``[B, N, N, 64]`` distogram_accuracy;
    with pLDDT ``[B, A]`` (0..100) plddt_mae and plddt_pearson."""
    out = {
        "ca_lddt": ca_lddt(coords, batch).nanmean(),
        "lddt": all_atom_lddt(coords, batch).nanmean(),
        "ca_rmsd": ca_rmsd(coords, batch).nanmean(),
    }
    if distogram_logits is not None:
        out["distogram_accuracy"] = distogram_accuracy(distogram_logits, batch).nanmean()
    if plddt is not None:
        resolved = batch["atom_resolved"] & batch["atom_mask"]
        calibration = plddt_calibration(plddt, plddt_target(coords, batch), resolved)
        out["plddt_mae"], out["plddt_pearson"] = calibration["mae"], calibration["pearson"]
    return {name: float(value) for name, value in out.items()}



@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, *, steps: int | None = None) -> dict[str, float]:
    """``structure_metrics`` of one sampled structure per example over ``batches`` (an
    iterable of feature batches), averaged over the examples. The model runs in eval mode
    (its mode is restored)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    examples = 0
    try:
        for batch in batches:
            out = model.sample(batch, steps=steps, samples=1)
            metrics = structure_metrics(
                out["coords"][:, 0], batch, plddt=out["plddt"][:, 0], distogram_logits=out["distogram_logits"]
            )
            size = batch["token_mask"].shape[0]
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * size
            examples += size
    finally:
        model.train(was_training)
    return {name: total / max(examples, 1) for name, total in totals.items()}
