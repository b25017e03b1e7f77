"""megafold.viz.structure: reading and writing structures, superposition, offline 3Dmol views.

gemmi is the independent reader: what megafold writes through biotite must read back the same.
"""

import re
import os
from pathlib import Path

import gemmi
import numpy as np
import pytest

import megafold.viz as viz
from megafold.errors import StructureError
from megafold.viz.structure import _STATIC, PLDDT_BANDS, _js_number_key, _plddt_colors, _view_model_text

STRUCTURES = Path(os.environ["MEGAFOLD_SHARED_DATA"]) / "structures"
LIBRARY_TEXT = (_STATIC / "3Dmol-min.js").read_text(encoding="utf-8")


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def prediction_of(truth, rng, *, noise: float, plddt=None):
    """A 'prediction': the truth rotated, shifted and jittered, with per-atom pLDDT."""
    coords = truth.coord @ random_rotation(rng).T + rng.normal(scale=10.0, size=3)
    coords = coords + rng.normal(scale=noise, size=coords.shape)
    if plddt is None:
        plddt = rng.uniform(0, 100, size=truth.array_length())
    return viz.atom_array(
        coords, truth.atom_name, truth.res_name, truth.chain_id, truth.res_id, truth.element, plddt=plddt
    )


def test_shipped_3dmol_matches_py3dmol():
    import py3Dmol

    assert py3Dmol.__version__ == viz.THREEDMOL_VERSION
    banner = (_STATIC / "3Dmol-min.js.LICENSE.txt").read_text()
    assert f"3dmol v{viz.THREEDMOL_VERSION}" in banner
    assert "Redistribution and use in source and binary forms" in (_STATIC / "LICENSE").read_text()
    assert viz.THREEDMOL_VERSION in (_STATIC / "README.md").read_text()
    assert len(LIBRARY_TEXT) > 400_000 and "createViewer" in LIBRARY_TEXT


def test_multi_letter_chains_show_in_the_view():
    atoms = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")
    atoms.chain_id[:] = "AB"
    assert "chain AB" in viz.view_html(atoms)


def test_superpose_recovers_the_truth():
    rng = np.random.default_rng(2)
    truth = viz.load_atoms(STRUCTURES / "2q2k.cif.gz")  # protein and DNA anchors (CA, C1')
    exact = viz.superpose(prediction_of(truth, rng, noise=0.0), truth)
    assert exact.n_pairs == 45 + 44 + 20
    assert exact.rmsd < 1e-3
    assert np.abs(exact.moved.coord - truth.coord).max() < 2e-3

    noisy = viz.superpose(prediction_of(truth, rng, noise=0.5), truth)
    assert 0.5 < noisy.rmsd < 1.2  # about sqrt(3) * 0.5

    renamed = prediction_of(truth, rng, noise=0.0)
    renamed.chain_id = np.char.add("X", renamed.chain_id)  # no keys shared: pairs in order
    assert viz.superpose(renamed, truth).rmsd < 1e-3

    with pytest.raises(StructureError, match="cannot pair"):
        viz.superpose(STRUCTURES / "1ubq.cif.gz", truth)


@pytest.mark.parametrize(
    "value, band",
    [(100.0, 0), (90.01, 0), (90.0, 1), (70.01, 1), (70.0, 2), (50.01, 2), (50.0, 3), (0.0, 3)],
)
def test_plddt_band_edges(value, band):
    truth = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")[:1]
    truth.b_factor[:] = value
    assert _plddt_colors(truth) == {_js_number_key(value): PLDDT_BANDS[band][1]}


def test_colour_keys_are_javascript_number_strings():
    # String(parseFloat(...)) in JavaScript, for the B-factor texts the view can contain.
    javascript = {"100.00": "100", "90.0": "90", "87.50": "87.5", "0.01": "0.01", "0": "0", "33.33": "33.33"}
    for text, expected in javascript.items():
        assert _js_number_key(float(text)) == expected


def test_every_atom_of_the_view_text_finds_its_plddt_colour():
    rng = np.random.default_rng(3)
    truth = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")
    prediction = prediction_of(truth, rng, noise=0.5)
    colours = _plddt_colors(prediction)
    block = gemmi.cif.read_string(_view_model_text(prediction)).sole_block()
    # 3Dmol.js does parseFloat(text) and looks the number up as a JavaScript string key.
    for text, expected in zip(block.find_values("_atom_site.B_iso_or_equiv"), prediction.b_factor):
        key = _js_number_key(float(text))
        lower_bounds = [lower for lower, _, _ in PLDDT_BANDS]
        band = next(i for i, lower in enumerate(lower_bounds) if round(float(expected), 2) > lower)
        assert colours[key] == PLDDT_BANDS[band][1]


def test_view_text_draws_polymers_as_cartoon_and_ligands_as_sticks():
    atoms = viz.load_atoms(STRUCTURES / "3mht.cif.gz")
    block = gemmi.cif.read_string(_view_model_text(atoms)).sole_block()
    groups = dict(
        zip(block.find_values("_atom_site.auth_comp_id"), block.find_values("_atom_site.group_PDB"))
    )
    assert groups["SAH"] == "HETATM"  # styled as sticks
    assert groups["DC"] == groups["DG"] == groups["LYS"] == "ATOM"  # DNA and protein: cartoon
    view = viz.structure_view(STRUCTURES / "3mht.cif.gz")
    assert '"cartoon"' in view.view.startjs and '"stick"' in view.view.startjs
    assert '"hetflag": true, "chain": "A"}' in view.view.startjs  # SAH carbons in chain A's colour


def test_view_html_is_self_contained_and_offline(parse_html):
    rng = np.random.default_rng(4)
    truth = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")
    snippet = viz.view_html(prediction_of(truth, rng, noise=0.5), truth=truth, color="plddt")
    parsed = parse_html(snippet)
    assert parsed.external == []
    assert LIBRARY_TEXT in snippet and snippet.count(LIBRARY_TEXT) == 1
    outside_library = snippet.replace(LIBRARY_TEXT, "")
    assert not re.search(r"https?://", outside_library)
    assert "$3Dmolpromise = Promise.resolve()" in snippet
    assert "RMSD" in snippet and "Very high (pLDDT &gt; 90)" in snippet
    assert "addModel" in snippet


def test_show_displays_offline_html(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects: shown.extend(objects))
    view = viz.structure_view(STRUCTURES / "2q2k.cif.gz", width=300, height=200)
    viz.show(view)
    assert len(shown) == 1 and isinstance(shown[0], IPython.display.HTML)
    assert LIBRARY_TEXT in shown[0].data and 'id="3dmolviewer_' in shown[0].data
    assert view._repr_html_().count(LIBRARY_TEXT) == 1
    with pytest.raises(ValueError, match="color must be"):
        viz.structure_view(STRUCTURES / "2q2k.cif.gz", color="rainbow")
