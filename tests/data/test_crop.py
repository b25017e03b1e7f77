import numpy as np
import pytest

from megafold.data.crop import CROP_WEIGHTS, INTERFACE_DISTANCE, apply_crop, choose_crop, crop_example, random_rotate_conformers
from megafold.data.features import validate_example
from megafold.data.pipeline import make_example


@pytest.fixture(scope="module")
def complex_example(structure):
    """1hvr: HIV protease dimer (2 x 99 residues) and its XK2 inhibitor, 256 tokens."""
    return make_example(structure("1hvr"))


def _centers(example):
    return example["atom_pos"][example["token_center_atom"]]


@pytest.mark.parametrize("seed", range(4))
def test_contiguous_crop_is_one_stretch_per_chain(complex_example, seed):
    rng = np.random.default_rng(seed)
    tokens, method = choose_crop(complex_example, 100, rng, method="contiguous")
    assert method == "contiguous" and len(tokens) == 100
    asym = complex_example["asym_id"][tokens]
    for chain in np.unique(asym):
        stretch = tokens[asym == chain]
        assert (np.diff(stretch) == 1).all()


@pytest.mark.parametrize("seed", range(4))
def test_spatial_crop_takes_the_nearest_tokens(complex_example, seed):
    rng = np.random.default_rng(seed)
    tokens, _ = choose_crop(complex_example, 80, rng, method="spatial")
    assert len(tokens) == 80
    centers = _centers(complex_example)
    resolved = complex_example["atom_resolved"][complex_example["token_center_atom"]]
    chosen = np.zeros(len(centers), bool)
    chosen[tokens] = True
    # some token of the crop is the reference: every chosen token is at least as near it
    # as every resolved token left out (up to the 1e-3 A per index tie-break)
    ok = False
    for reference in tokens:
        distance = np.linalg.norm(centers - centers[reference], axis=-1)
        if distance[chosen & resolved].max() <= distance[~chosen & resolved].min() + 1e-3 * len(centers):
            ok = True
            break
    assert ok


def test_spatial_interface_crop_centres_on_an_interface(complex_example):
    centers = _centers(complex_example)
    asym = complex_example["asym_id"]
    for seed in range(4):
        tokens, method = choose_crop(complex_example, 60, np.random.default_rng(seed), method="spatial_interface")
        assert method == "spatial_interface" and len(tokens) == 60
        # the crop contains tokens of two chains within the interface distance
        sub_centers, sub_asym = centers[tokens], asym[tokens]
        distance = np.linalg.norm(sub_centers[:, None] - sub_centers[None], axis=-1)
        assert ((distance < INTERFACE_DISTANCE) & (sub_asym[:, None] != sub_asym[None])).any()


def test_single_chain_interface_falls_back_to_spatial(structure):
    example = make_example(structure("1a8o"))
    tokens, method = choose_crop(example, 30, np.random.default_rng(0), method="spatial_interface")
    assert method == "spatial" and len(tokens) == 30


def test_cropped_example_is_consistent(complex_example):
    rng = np.random.default_rng(7)
    tokens, _ = choose_crop(complex_example, 120, rng, method="spatial")
    cropped = apply_crop(complex_example, tokens)
    sizes = validate_example(cropped, "cropped")
    assert sizes["token"] == 120
    kept_atoms = np.isin(complex_example["atom_to_token"], tokens)
    assert sizes["atom"] == kept_atoms.sum()
    np.testing.assert_array_equal(cropped["atom_pos"], complex_example["atom_pos"][kept_atoms])
    np.testing.assert_array_equal(cropped["restype"], complex_example["restype"][tokens])
    # index features point within the crop, at atoms of their own token
    n = sizes["token"]
    assert cropped["atom_to_token"].max() < n
    assert (cropped["atom_to_token"][cropped["token_center_atom"]] == np.arange(n)).all()
    assert (cropped["atom_to_token"][cropped["token_rep_atom"]] == np.arange(n)).all()
    np.testing.assert_array_equal(cropped["token_bonds"], complex_example["token_bonds"][np.ix_(tokens, tokens)])
    assert cropped["msa"].shape[1] == n and cropped["template_restype"].shape[1] == n


def test_small_examples_are_kept_whole_and_weights_are_af3s(structure):
    example = make_example(structure("1znf"))
    cropped = crop_example(example, 384, np.random.default_rng(0))
    for name, value in example.items():
        np.testing.assert_array_equal(cropped[name], value)
    assert CROP_WEIGHTS == {"contiguous": 0.2, "spatial": 0.4, "spatial_interface": 0.4}
    methods = [choose_crop(example, 10, np.random.default_rng(s))[1] for s in range(300)]
    assert abs(methods.count("contiguous") / 300 - 0.2) < 0.08


def test_msa_rows_are_subsampled_keeping_the_query():
    rng = np.random.default_rng(0)
    example = {"msa": rng.integers(0, 20, (50, 8)), "restype": np.zeros(8, np.int64), "atom_to_token": np.arange(8)}
    from megafold.data.crop import _msa_rows

    rows = _msa_rows(example["msa"], rng, 10)
    assert rows[0] == 0 and len(rows) == 10 and len(set(rows.tolist())) == 10


def test_conformer_rotation_keeps_internal_geometry(complex_example):
    rotated = random_rotate_conformers(complex_example, np.random.default_rng(3))
    uid = complex_example["ref_space_uid"]
    for u in np.unique(uid)[:20]:
        before, after = complex_example["ref_pos"][uid == u], rotated["ref_pos"][uid == u]
        d_before = np.linalg.norm(before[:, None] - before[None], axis=-1)
        d_after = np.linalg.norm(after[:, None] - after[None], axis=-1)
        np.testing.assert_allclose(d_after, d_before, atol=1e-4)
    assert not np.allclose(rotated["ref_pos"], complex_example["ref_pos"])
