"""megafold.train.metrics against biotite (lDDT, superposition RMSD) and against numpy."""

import numpy as np
import pytest
import torch

from megafold.data.features import collate
from megafold.train import metrics


@pytest.fixture(scope="module")
def batch(store):
    """1a8o (70 residues, protein only, one unresolved-atom-free chain) as a batch of one."""
    return collate([store.load("1a8o")])


def _perturbed(batch, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    true = batch["atom_pos"]
    return true + scale * torch.randn(true.shape, generator=generator)


def _rigidly_moved(coords: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator))
    q = q * torch.sign(torch.linalg.det(q))  # a proper rotation
    return coords @ q.T + 10 * torch.randn(3, generator=generator)


def _atoms(batch, coords: torch.Tensor, keep: np.ndarray):
    """A biotite AtomArray of the kept atoms: one residue per token (protein)."""
    import biotite.structure as struc

    atoms = struc.AtomArray(int(keep.sum()))
    atoms.coord = coords[keep].astype(np.float64)
    atoms.chain_id[:] = "A"
    atoms.res_id = batch["atom_to_token"][0].numpy()[keep] + 1
    atoms.res_name[:] = "ALA"
    atoms.atom_name = np.arange(int(keep.sum())).astype(str)
    atoms.element[:] = "C"
    return atoms


def test_all_atom_lddt_matches_biotite(batch):
    import biotite.structure as struc

    resolved = (batch["atom_resolved"] & batch["atom_mask"])[0].numpy()
    pred = _perturbed(batch, 1.0, seed=1)
    reference = _atoms(batch, batch["atom_pos"][0].numpy(), resolved)
    expected_global = struc.lddt(reference, pred[0].numpy()[resolved].astype(np.float64))
    expected_atom = struc.lddt(reference, pred[0].numpy()[resolved].astype(np.float64), aggregation="atom")

    ours = metrics.all_atom_lddt(pred, batch)
    per_atom = metrics.all_atom_lddt(pred, batch, per_atom=True)[0].numpy()
    assert 0.3 < float(ours) < 0.95  # a real test: neither perfect nor hopeless
    assert float(ours) == pytest.approx(float(expected_global), rel=1e-5)
    np.testing.assert_allclose(per_atom[resolved], expected_atom, rtol=1e-5)
    assert float(metrics.all_atom_lddt(batch["atom_pos"], batch)) == 1.0


def test_ca_lddt_matches_biotite_on_ca_atoms(batch):
    import biotite.structure as struc

    index, ok = metrics.centre_atoms(batch)
    assert bool(ok.all())
    pred = _perturbed(batch, 2.0, seed=2)
    keep = np.zeros(batch["atom_mask"].shape[1], bool)
    keep[index[0].numpy()] = True
    reference = _atoms(batch, batch["atom_pos"][0].numpy(), keep)
    expected = struc.lddt(reference, pred[0].numpy()[keep].astype(np.float64))
    assert float(metrics.ca_lddt(pred, batch)) == pytest.approx(float(expected), rel=1e-5)
    # invariant to a rigid motion of the prediction
    moved = _rigidly_moved(pred, seed=3)
    assert float(metrics.ca_lddt(moved, batch)) == pytest.approx(float(expected), rel=1e-4)


def test_ca_rmsd_matches_biotite_superimpose(batch):
    import biotite.structure as struc

    index = metrics.centre_atoms(batch)[0][0].numpy()
    pred = _rigidly_moved(_perturbed(batch, 1.5, seed=4), seed=5)
    keep = np.zeros(batch["atom_mask"].shape[1], bool)
    keep[index] = True
    fixed = _atoms(batch, batch["atom_pos"][0].numpy(), keep)
    mobile = _atoms(batch, pred[0].numpy(), keep)
    fitted, _ = struc.superimpose(fixed, mobile)
    expected = float(struc.rmsd(fixed, fitted))
    assert 1.0 < expected < 4.0
    assert float(metrics.ca_rmsd(pred, batch)) == pytest.approx(expected, rel=1e-4)
    assert float(metrics.ca_rmsd(_rigidly_moved(batch["atom_pos"], seed=6), batch)) < 1e-3


def test_plddt_target_matches_biotite_partner_mask(batch):
    import biotite.structure as struc

    resolved = (batch["atom_resolved"] & batch["atom_mask"])[0].numpy()
    centres = np.zeros_like(resolved)
    centres[batch["token_center_atom"][0].numpy()] = True
    pred = _perturbed(batch, 1.0, seed=7)
    reference = _atoms(batch, batch["atom_pos"][0].numpy(), resolved)
    expected = struc.lddt(
        reference, pred[0].numpy()[resolved].astype(np.float64), aggregation="atom", partner_mask=centres[resolved]
    )
    ours = metrics.plddt_target(pred, batch)[0].numpy()[resolved]
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_sample_axis_scores_each_sample(batch):
    samples = torch.stack([_perturbed(batch, 0.5, seed=8), _perturbed(batch, 3.0, seed=9)], dim=1)  # [1, 2, A, 3]
    for name in ("ca_lddt", "all_atom_lddt", "ca_rmsd"):
        fn = getattr(metrics, name)
        together = fn(samples, batch)
        assert together.shape == (1, 2)
        for s in range(2):
            assert float(together[0, s]) == pytest.approx(float(fn(samples[:, s], batch)[0]), rel=1e-6)
    assert metrics.ca_lddt(samples, batch)[0, 0] > metrics.ca_lddt(samples, batch)[0, 1]


def test_distogram_accuracy_matches_numpy(batch):
    generator = torch.Generator().manual_seed(10)
    N = batch["token_mask"].shape[1]
    logits = torch.randn(1, N, N, 64, generator=generator)
    rep = batch["atom_pos"][0, batch["token_rep_atom"][0]].double().numpy()
    distance = np.linalg.norm(rep[:, None] - rep[None], axis=-1)
    true_bin = np.digitize(distance, np.linspace(2.0, 22.0, 63), right=True)
    # make about half the pairs right
    right = torch.rand(N, N, generator=generator) < 0.5
    logits[0][right] += 100 * torch.nn.functional.one_hot(torch.from_numpy(true_bin)[right], 64)
    ok = (batch["token_rep_mask"] & batch["token_mask"])[0].numpy()
    pairs = ok[:, None] & ok[None] & ~np.eye(N, dtype=bool)
    expected = ((logits[0].argmax(-1).numpy() == true_bin) & pairs).sum() / pairs.sum()
    assert 0.3 < expected < 0.7
    assert float(metrics.distogram_accuracy(logits, batch)) == pytest.approx(expected, rel=1e-6)


def test_plddt_calibration_by_hand():
    true = torch.tensor([0.05, 0.15, 0.95, 0.5, float("nan")])
    perfect = metrics.plddt_calibration(100 * torch.nan_to_num(true), true, torch.ones(5, dtype=torch.bool))
    assert float(perfect["mae"]) == pytest.approx(0.0, abs=1e-5)  # float32 inputs
    assert float(perfect["pearson"]) == pytest.approx(1.0)
    assert perfect["count"].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # the NaN target is left out
    predicted = torch.tensor([25.0, 25.0, 75.0, 75.0, 10.0])
    off = metrics.plddt_calibration(predicted, true, torch.tensor([True, True, True, True, False]))
    assert float(off["mae"]) == pytest.approx((20 + 10 + 20 + 25) / 4)
    assert off["predicted"][2].item() == 25.0 and off["observed"][2].item() == pytest.approx(10.0)
    assert off["predicted"][7].item() == 75.0 and off["observed"][7].item() == pytest.approx(72.5)
    assert torch.isnan(off["predicted"][0])


def test_structure_metrics_of_the_truth_are_perfect(batch):
    N = batch["token_mask"].shape[1]
    rep = batch["atom_pos"][0, batch["token_rep_atom"][0]]
    true_bin = (torch.cdist(rep, rep)[..., None] > torch.linspace(2.0, 22.0, 63)).sum(-1)
    logits = 50 * torch.nn.functional.one_hot(true_bin, 64).float()[None]
    out = metrics.structure_metrics(batch["atom_pos"], batch, plddt=torch.full(batch["atom_mask"].shape, 100.0), distogram_logits=logits)
    assert out["ca_lddt"] == 1.0 and out["lddt"] == 1.0 and out["distogram_accuracy"] == 1.0
    assert out["ca_rmsd"] < 1e-3 and out["plddt_mae"] == pytest.approx(0.0, abs=1e-9)
    assert N == 70 and all(isinstance(v, float) for v in out.values())


def test_a_random_structure_scores_low(batch):
    """A Gaussian blob as wide as the protein (the guess of a model that learnt nothing) scores a
    CA-lDDT near 0.15, far under the issue's 0.6; the truth moved rigidly scores 1."""
    true = batch["atom_pos"]
    radius = (true - true.mean(1, keepdim=True)).square().sum(-1).mean().sqrt()
    blob = radius / 3**0.5 * torch.randn(true.shape, generator=torch.Generator().manual_seed(3))
    assert 0.0 < float(metrics.ca_lddt(blob, batch)) < 0.3
    assert float(metrics.ca_rmsd(blob, batch)) > 5.0
    assert float(metrics.ca_lddt(_rigidly_moved(true, seed=4), batch)) == pytest.approx(1.0, abs=1e-6)
