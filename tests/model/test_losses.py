import math

import pytest
import torch

from megafold.model.diffusion import random_rotations
from megafold.model.heads import gather_atoms
from megafold.model.losses import (
    bond_loss,
    bonded_atom_pairs,
    confidence_targets,
    distogram_loss,
    edm_weight,
    smooth_lddt_loss,
    token_frame_atoms,
    weighted_mse,
    weighted_rigid_align,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _epsilon(delta: float) -> float:
    return sum(_sigmoid(t - delta) for t in (0.5, 1.0, 2.0, 4.0)) / 4


def test_rigid_align_recovers_a_rotation_by_90_degrees():
    x_true = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 3]])
    # 90 degrees about z, then shifted: (x, y, z) -> (-y, x, z) + (5, 5, 5)
    x = torch.stack([-x_true[:, 1], x_true[:, 0], x_true[:, 2]], dim=-1) + 5.0
    aligned = weighted_rigid_align(x, x_true, torch.ones(5))
    torch.testing.assert_close(aligned, x, atol=1e-5, rtol=0)


def test_rigid_align_ignores_zero_weight_atoms_and_stops_gradient():
    x_true = torch.randn(12, 3, dtype=torch.float64).float()
    rotation = random_rotations((), torch.device("cpu"))
    x = x_true @ rotation.T + torch.tensor([1.0, -2.0, 3.0])
    weight = torch.rand(12) + 0.5
    x[-3:] += 10 * torch.randn(3, 3)  # outliers ...
    weight[-3:] = 0.0  # ... that do not count
    x.requires_grad_(True)
    aligned = weighted_rigid_align(x, x_true, weight)
    assert not aligned.requires_grad
    torch.testing.assert_close(aligned[:-3], x[:-3].detach(), atol=1e-4, rtol=0)


def test_rigid_align_never_reflects():
    x_true = torch.randn(20, 3)
    mirrored = x_true * torch.tensor([1.0, 1.0, -1.0])  # det -1: no rotation reaches it
    aligned = weighted_rigid_align(mirrored, x_true, torch.ones(20))
    # A proper rigid motion of x_true: distances and chirality (signed volume) kept.
    torch.testing.assert_close(torch.cdist(aligned, aligned), torch.cdist(x_true, x_true), atol=1e-4, rtol=0)
    volume = torch.linalg.det(torch.stack([x_true[i] - x_true[0] for i in (1, 2, 3)]))
    aligned_volume = torch.linalg.det(torch.stack([aligned[i] - aligned[0] for i in (1, 2, 3)]))
    assert aligned_volume == pytest.approx(float(volume), rel=1e-3)
    assert (aligned - mirrored).abs().max() > 0.1


def test_smooth_lddt_by_hand():
    # Atoms 0 and 1: true distance 3 A, predicted 4 A. Atom 2: about 20 A from both
    # (beyond the 15 A inclusion radius, within the 30 A one of nucleotides).
    x_true = torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 20, 0]])
    x = torch.tensor([[0.0, 0, 0], [4, 0, 0], [0, 21, 0]])
    mask = torch.ones(3, dtype=torch.bool)
    protein = torch.zeros(3, dtype=torch.bool)
    assert float(smooth_lddt_loss(x, x_true, protein, mask)) == pytest.approx(1 - _epsilon(1.0), abs=1e-6)

    # Atom 2 a nucleotide: its pairs (2, 0) and (2, 1) count too; (0, 2) and (1, 2) do not.
    deltas = [1.0, 1.0, 21.0 - 20.0, math.sqrt(16 + 441) - math.sqrt(9 + 400)]
    expected = 1 - sum(_epsilon(d) for d in deltas) / 4
    nucleotide_2 = torch.tensor([False, False, True])
    assert float(smooth_lddt_loss(x, x_true, nucleotide_2, mask)) == pytest.approx(expected, abs=1e-6)

    # Masking atom 1 leaves no pair within 15 A: LDDT 0, loss 1 (and no gradient).
    assert float(smooth_lddt_loss(x, x_true, protein, torch.tensor([True, False, True]))) == 1.0


def test_losses_are_invariant_to_moving_the_truth():
    A = 40
    x_true = 8 * torch.randn(2, 3, A, 3)
    x = x_true + torch.randn_like(x_true)
    weight = 1 + 5 * (torch.rand(2, 1, A) < 0.3).float()
    mask = torch.rand(2, 1, A) < 0.9
    nucleotide = torch.rand(2, 1, A) < 0.5

    def losses(truth):
        aligned = weighted_rigid_align(x, truth, weight * mask)
        return weighted_mse(x, aligned, weight, mask), smooth_lddt_loss(x, truth, nucleotide, mask)

    rotation = random_rotations((2, 3), torch.device("cpu"))
    moved = torch.einsum("bsij,bsaj->bsai", rotation, x_true) + 30 * torch.randn(2, 3, 1, 3)
    for before, after in zip(losses(x_true), losses(moved)):
        assert before.shape == (2, 3)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    mse, _ = losses(x_true)
    assert (mse > 0).all()


def test_weighted_mse_by_hand():
    x = torch.zeros(1, 4, 3)
    aligned = torch.tensor([[[1.0, 0, 0], [0, 2, 0], [0, 0, 0], [9, 9, 9]]])
    weight = torch.tensor([[1.0, 5.0, 10.0, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    # (1 * 1 + 5 * 4 + 10 * 0) / (3 * 3 atoms)
    assert float(weighted_mse(x, aligned, weight, mask)) == pytest.approx(21 / 9)


def test_edm_weight():
    assert float(edm_weight(torch.tensor(16.0), 16.0)) == pytest.approx(2 / 256)
    assert float(edm_weight(torch.tensor(1.0), 16.0)) == pytest.approx((1 + 256) / 256)


def _token_batch(positions: torch.Tensor) -> dict:
    N = positions.shape[1]
    return {
        "atom_pos": positions,
        "token_rep_atom": torch.arange(N)[None],
        "token_rep_mask": torch.ones(1, N, dtype=torch.bool),
        "token_mask": torch.ones(1, N, dtype=torch.bool),
    }


def test_distogram_bins_by_hand():
    # Three tokens at 1, 2.1 and 30 A: pair distances 1.1 (bin 0), 29 (bin 63), 28 (bin 63).
    positions = torch.tensor([[[0.0, 0, 0], [1.1, 0, 0], [30, 0, 0]]])
    edges = torch.linspace(2, 22, 63)
    target = torch.tensor([[0, 0, 63], [0, 0, 63], [63, 63, 0]])
    assert int((torch.tensor(10.0) > edges).sum()) == 25  # 10 A: (10 - 2) / (20 / 62) = 24.8
    logits = torch.full((1, 3, 3, 64), -30.0)
    logits.scatter_(-1, target[None, ..., None], 30.0)
    assert float(distogram_loss(logits, _token_batch(positions))) < 1e-12
    uniform = torch.zeros(1, 3, 3, 64)
    assert float(distogram_loss(uniform, _token_batch(positions))) == pytest.approx(math.log(64))


def test_confidence_targets_of_a_perfect_and_a_moved_prediction(make_batch):
    batch = make_batch(("1ubq", 12), ("2q2k", 16, "dna"))
    x_true = batch["atom_pos"]
    rotation = random_rotations((2,), torch.device("cpu"))
    moved = torch.einsum("bij,baj->bai", rotation, x_true) + 5.0
    for x in (x_true, moved):
        targets = confidence_targets(x, batch)
        plddt, plddt_mask = targets["plddt"]
        assert plddt_mask.any() and (plddt[plddt_mask] == 49).all()
        for name in ("pae", "pde"):
            bins, mask = targets[name]
            assert mask.any() and (bins[mask] == 0).all(), name
    # Frames exist for protein and nucleotide tokens, not for one-atom tokens (ligands and
    # modified residues such as 2q2k's 5IU) nor padding.
    _, frame_ok = token_frame_atoms(batch)
    atoms_per_token = torch.zeros_like(batch["token_mask"], dtype=torch.long).scatter_add_(
        1, batch["atom_to_token"], batch["atom_mask"].long()
    )
    polymer = (batch["is_protein"] | batch["is_dna"]) & (atoms_per_token > 1)
    assert torch.equal(frame_ok, polymer) and (batch["is_dna"][1] & polymer[1]).any()

    # Moving one centre atom by 3 A along x: PDE of its pairs near 3 A (bin 6 = [3, 3.5)).
    shifted = x_true.clone()
    centre = batch["token_center_atom"][0, 5]
    shifted[0, centre] += torch.tensor([3.0, 0, 0])
    bins, mask = confidence_targets(shifted, batch)["pde"]
    c = gather_atoms(x_true, batch["token_center_atom"])[0]
    far = (c - c[5]).norm(dim=-1) > 30
    assert bins[0, 5, 5] == 0 and (bins[0, 5][far & mask[0, 5]] <= 6).all()
    assert (bins[0, 5] > 0).sum() > 5


def test_bond_loss_on_a_ligand(make_batch):
    batch = make_batch(("3mht", 24, "ligand"))
    pairs = bonded_atom_pairs(batch)
    assert len(pairs) >= 10
    b, l, m = pairs.unbind(-1)
    assert (l < m).all()
    tokens = batch["atom_to_token"][0]
    assert batch["token_bonds"][0, tokens[l], tokens[m]].all()
    x_true = batch["atom_pos"]
    assert ((x_true[0, l] - x_true[0, m]).norm(dim=-1) < 2.4).all()
    exact = bond_loss(x_true[:, None], x_true, pairs)
    assert exact.shape == (1, 1) and float(exact) < 1e-10
    stretched = x_true.clone()
    stretched[0, m[0]] += (x_true[0, m[0]] - x_true[0, l[0]]) * 0.5  # one bond 1.5x as long
    d = float((x_true[0, m[0]] - x_true[0, l[0]]).norm())
    loss = float(bond_loss(stretched[:, None], x_true, pairs))
    assert loss >= (0.5 * d) ** 2 / len(pairs) - 1e-6


def test_cross_entropy_weighs_examples_equally_whatever_their_size():
    from megafold.model.losses import masked_cross_entropy

    logits = torch.randn(2, 10, 5)
    target = torch.randint(0, 5, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :2] = True  # a small example
    mask[1, :9] = True  # a large one
    alone = [masked_cross_entropy(logits[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(2)]
    together = masked_cross_entropy(logits, target, mask)
    assert torch.allclose(together, (alone[0] + alone[1]) / 2)
    empty = torch.zeros_like(mask)
    empty[0] = mask[0]  # an example with no valid entry does not dilute the other
    assert torch.allclose(masked_cross_entropy(logits, target, empty), alone[0])


def test_smooth_lddt_on_the_counted_pairs_equals_the_dense_loss():
    """The training loss computes smooth LDDT on the pairs within the cutoffs only (from the
    untransformed truth, once per step): the same values and gradients as over all pairs, with
    nucleotide atoms (30 A, so (l, m) and (m, l) can count differently), padding
    and samples that are rotated copies of the truth plus noise."""
    from megafold.model.losses import smooth_lddt_loss_on_pairs, smooth_lddt_pairs

    torch.manual_seed(0)
    B, S, A = 2, 3, 37
    x_true = torch.randn(B, A, 3, dtype=torch.float64) * 12.0  # spread: some pairs beyond 15 and 30 A
    nucleotide = torch.rand(B, A) < 0.3
    mask = torch.rand(B, A) < 0.85
    mask[1, -5:] = False
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    x_aug = (x_true @ rotation.T + 4.0)[:, None].expand(B, S, A, 3)  # what the model compares against
    x = (x_aug + 1.5 * torch.randn(B, S, A, 3, dtype=torch.float64)).requires_grad_()

    dense = smooth_lddt_loss(x, x_aug, nucleotide[:, None], mask[:, None])
    (dense_grad,) = torch.autograd.grad(dense.sum(), x)
    pairs = smooth_lddt_pairs(x_true, nucleotide, mask)
    sparse = smooth_lddt_loss_on_pairs(x, pairs)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), x)
    assert sparse.shape == dense.shape == (B, S)
    # Both compute in fp32 (as every loss here) and sum in other orders: fp32 rounding apart.
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    assert float((sparse_grad - dense_grad).norm() / dense_grad.norm()) < 1e-5
    assert (pairs.weight == 1).any() and (pairs.weight == 2).any()  # asymmetric and symmetric pairs
    assert len(pairs.batch) < B * A * (A - 1) / 2  # pairs beyond the cutoff are left out

    # Two predicted atoms on top of each other: a finite gradient (zero for that pair), not NaN.
    x_same = x.detach().clone()
    x_same[:, :, 1] = x_same[:, :, 0]
    x_same.requires_grad_()
    smooth_lddt_loss_on_pairs(x_same, pairs).sum().backward()
    assert torch.isfinite(x_same.grad).all()
