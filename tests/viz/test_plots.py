"""megafold.viz.plots: PAE, distogram and contact heatmaps, offline notebook rendering."""

import re
import os
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

import megafold.viz as viz
from megafold.errors import StructureError
from megafold.viz.plots import AF3_DISTOGRAM_EDGES

STRUCTURES = Path(os.environ["MEGAFOLD_SHARED_DATA"]) / "structures"


def test_pae_figure_shows_the_matrix_with_chain_boundaries():
    pae = torch.rand(1, 30, 30, dtype=torch.bfloat16) * 30
    fig = viz.pae_figure(pae, chain_ids=["A"] * 12 + ["B"] * 18)
    heatmap = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heatmap.z), pae[0].float().numpy())
    assert (heatmap.zmin, heatmap.zmax) == (0.0, 32.0)
    assert fig.layout.yaxis.range == (29.5, -0.5)  # row 0 on top
    assert len(fig.layout.shapes) == 2 and fig.layout.shapes[0].x0 == 11.5
    assert list(fig.layout.xaxis.ticktext) == ["A", "B"]
    with pytest.raises(ValueError, match=r"pae must have shape \[N, N\], got \[30, 29\]"):
        viz.pae_figure(np.ones((30, 29)))
    broken = np.ones((5, 5))
    broken[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN/inf"):
        viz.pae_figure(broken)
    with pytest.raises(ValueError, match="one entry per token"):
        viz.pae_figure(np.ones((5, 5)), chain_ids=["A"] * 4)


def test_distogram_probabilities_from_logits_and_probabilities():
    logits = torch.randn(7, 7, 64) * 3
    expected = torch.softmax(logits.double(), -1).numpy()
    np.testing.assert_allclose(viz.distogram_probabilities(logits), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(viz.distogram_probabilities(expected), expected, rtol=0, atol=0)


def test_distogram_figure_expected_distance_and_contact_probability():
    n, n_bins = 9, 64
    rng = np.random.default_rng(5)
    chosen = rng.integers(0, n_bins, size=(n, n))
    one_hot = np.eye(n_bins)[chosen]  # all mass in one bin per pair
    centres = (AF3_DISTOGRAM_EDGES[1:] + AF3_DISTOGRAM_EDGES[:-1]) / 2
    fig = viz.distogram_figure(one_hot)
    expected, contact = (np.asarray(trace.z) for trace in fig.data)
    np.testing.assert_allclose(expected, centres[chosen], atol=1e-12)
    np.testing.assert_array_equal(contact, (centres[chosen] < 8.0).astype(float))
    # centres, edges and AlphaFold-style breaks describe the same bins
    breaks = AF3_DISTOGRAM_EDGES[1:-1]
    for bins in (centres, AF3_DISTOGRAM_EDGES, breaks):
        np.testing.assert_allclose(
            np.asarray(viz.distogram_figure(one_hot, bins).data[0].z), expected, atol=1e-9
        )
    with pytest.raises(ValueError, match="bins must hold 64 centres, 65 edges or 63 breaks"):
        viz.distogram_figure(one_hot, np.arange(10))
    with pytest.raises(ValueError, match=r"distogram must have shape \[N, N, bins\]"):
        viz.distogram_figure(np.ones((4, 5, 64)))


def gemmi_representative_coords(path: Path) -> np.ndarray:
    """CB (CA for glycine) per amino acid, C4 per purine, C2 per pyrimidine: gemmi, by hand."""
    structure = gemmi.read_structure(str(path))
    structure.remove_alternative_conformations()
    coords = []
    for chain in structure[0]:
        for residue in chain:
            names = [atom.name for atom in residue]
            info = gemmi.find_tabulated_residue(residue.name)
            if info is not None and info.is_amino_acid():
                wanted = "CB" if "CB" in names else "CA"
            elif (info is not None and info.is_nucleic_acid()) or "C1'" in names:  # + modified, e.g. 5IU
                wanted = "C4" if "N9" in names else "C2"
            else:
                continue
            coords.append(residue[wanted][0].pos.tolist())
    return np.array(coords)


@pytest.mark.parametrize("pdb_id", ["1ubq", "2q2k"])
def test_contact_map_matches_an_independent_count(pdb_id):
    path = STRUCTURES / f"{pdb_id}.cif.gz"
    coords, labels = viz.representative_atoms(path)
    reference = gemmi_representative_coords(path)
    polymer = [i for i, label in enumerate(labels) if ":EPE" not in label]  # 2q2k's ligand
    np.testing.assert_allclose(coords[polymer], reference, atol=1e-3)
    fig = viz.contact_map(path, cutoff=8.0)
    contacts = np.asarray(fig.data[0].z)
    distances = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.testing.assert_array_equal(contacts, (distances < 8.0).astype(float))
    assert (contacts == contacts.T).all()


def test_contact_map_compares_two_structures_by_triangle():
    path = STRUCTURES / "1ubq.cif.gz"
    atoms = viz.load_atoms(path)
    moved = atoms.copy()
    moved.coord = moved.coord * 1.3  # stretched: fewer contacts
    fig = viz.contact_map(path, compare=moved)
    z = np.asarray(fig.data[0].z, dtype=float)
    coords, _ = viz.representative_atoms(path)
    upper = np.triu_indices(len(coords), k=1)
    lower = np.tril_indices(len(coords), k=-1)
    distances = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.testing.assert_array_equal(z[upper], (distances < 8.0)[upper])
    np.testing.assert_array_equal(z[lower], (1.3 * distances < 8.0)[lower])
    assert np.isnan(np.diag(z)).all()
    with pytest.raises(StructureError, match="share"):
        viz.contact_map(path, compare=STRUCTURES / "2q2k.cif.gz")


@pytest.fixture
def restore_plotly_renderer():
    import plotly.io as pio

    default = pio.renderers.default
    yield
    pio.renderers.default = default


def test_init_notebook_renders_figures_without_a_cdn(restore_plotly_renderer):
    import plotly.io as pio

    viz.init_notebook()
    assert pio.renderers.default == "plotly_mimetype+megafold_offline"
    bundle = pio.renderers["megafold_offline"].to_mimebundle(viz.pae_figure(np.ones((4, 4))).to_dict())
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html
    assert not re.search(r"https?://", html)  # no plotly.js or MathJax from a CDN
    assert "mathjax" not in html.lower()
