"""predict(): mmCIF with pLDDT in the B-factor column and the truth's author labels, PAE .npy."""

import json

import numpy as np
import pytest
import torch

from megafold.data.features import collate
from megafold.errors import StructureError
from megafold.train.predict import _chain_name, predict


@pytest.fixture(scope="module")
def model():
    from megafold.model import AlphaFold3, preset

    torch.manual_seed(0)
    config = preset("tiny", kernels="torch", bf16=False, diffusion_samples=2, sampler_steps=2, rollout_steps=2)
    return AlphaFold3(config).eval()


def test_prediction_from_a_file_keeps_author_numbering(model, structures, tmp_path):
    from megafold.viz import load_atoms, superpose

    source = structures / "1a8o.cif.gz"  # author residues 151..220, MSE at the N-terminus
    prediction = predict(model, source, tmp_path, steps=2, samples=2)
    assert prediction.cif_path == tmp_path / "1a8o.cif"
    atoms = load_atoms(prediction.cif_path)
    truth = load_atoms(source)
    ca, true_ca = atoms[atoms.atom_name == "CA"], truth[truth.atom_name == "CA"]
    assert ca.res_id.tolist() == true_ca.res_id.tolist() == list(range(151, 221))
    assert set(ca.chain_id) == {"A"} and ca.res_name[0] == "MSE"
    np.testing.assert_allclose(atoms.b_factor, prediction.plddt, atol=0.01)
    assert 0 <= atoms.b_factor.min() and atoms.b_factor.max() <= 100
    assert superpose(prediction.cif_path, source).n_pairs == 70

    pae = np.load(prediction.pae_path, allow_pickle=False)
    assert pae.shape == (70, 70) and np.isfinite(pae).all() and np.array_equal(pae, prediction.pae)
    summary = json.loads(prediction.summary_path.read_text())
    assert summary["sample"] == int(np.argmax(prediction.ranking)) and len(summary["ranking_mean_plddt"]) == 2
    assert set(summary["metrics"]) == {"ca_lddt", "lddt", "ca_rmsd", "distogram_accuracy", "plddt_mae", "plddt_pearson"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1a8o.cif", "1a8o_pae.npy", "1a8o_summary.json"]


def test_prediction_from_store_features_names_ligands_like_the_truth(model, store, structures, tmp_path):
    from megafold.viz import load_atoms, superpose

    source = structures / "5pti.cif.gz"  # BPTI + PO4 + UNX ligands in author chain A
    prediction = predict(model, store.load("5pti"), tmp_path, truth=source, steps=2, samples=1)
    atoms, truth = load_atoms(prediction.cif_path), load_atoms(source)
    for ligand in ("PO4", "UNX"):
        ours = atoms[atoms.res_name == ligand]
        theirs = truth[truth.res_name == ligand]
        assert sorted(set(zip(ours.chain_id, ours.res_id))) == sorted(set(zip(theirs.chain_id, theirs.res_id)))
    assert set(atoms.hetero[np.isin(atoms.res_name, ["PO4", "UNX"])]) == {True}
    assert superpose(prediction.cif_path, source).n_pairs == 58


def test_features_alone_name_chains_by_asym_id(model, store, tmp_path):
    from megafold.viz import load_atoms

    example = store.load("2beg")  # five chains
    prediction = predict(model, example, tmp_path, name="features", steps=2, samples=1)
    atoms = load_atoms(prediction.cif_path)
    assert sorted(set(atoms.chain_id)) == ["A", "B", "C", "D", "E"]
    ca = atoms[atoms.atom_name == "CA"]
    assert ca.res_id.tolist() == [int(i) for i in example["residue_index"]]
    assert [_chain_name(i) for i in (0, 25, 26, 61, 62, 63)] == ["A", "Z", "a", "9", "AA", "AB"]


def test_inputs_that_cannot_be_predicted(model, store, structures, tmp_path):
    from megafold.data.crop import crop_example

    cropped = crop_example(store.load("1a8o"), 20, np.random.default_rng(0))
    with pytest.raises(StructureError, match="1a8o.cif.gz: the features hold 20 tokens"):
        predict(model, cropped, tmp_path, truth=structures / "1a8o.cif.gz", steps=2, samples=1)
    with pytest.raises(StructureError, match="one structure at a time"):
        predict(model, collate([store.load("1znf"), store.load("1zfd")]), tmp_path, steps=2, samples=1)
    with pytest.raises(StructureError, match="token_mask"):
        predict(model, {"restype": np.zeros(3)}, tmp_path)
    with pytest.raises(StructureError, match="missing.cif: no such file"):
        predict(model, tmp_path / "missing.cif", tmp_path)
