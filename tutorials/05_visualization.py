# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Visualization
#
# `megafold.viz` draws structures with 3Dmol.js (shipped inside the package: nothing comes
# from a CDN, so views work offline and in exported reports) and heatmaps with plotly:
# predicted aligned error, distograms and contact maps. Inputs are mmCIF/PDB paths or text,
# or biotite AtomArrays (`viz.atom_array` builds one from plain arrays, such as model output).

# %%
# Setup: works locally and in a fresh Colab runtime (there it clones and installs megafold).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("megafold") is None:
    repository = os.environ.get("MEGAFOLD_REPO", "https://github.com/megafold/megafold.git")
    subprocess.check_call(["git", "clone", "--depth", "1", repository, "megafold"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", "megafold[data,notebooks]"])
    sys.path.insert(0, os.path.abspath("megafold"))

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in the interpreter
    torch.set_num_threads(1)  # the CPU configs are tiny: more threads only add overhead

import megafold.viz as viz
from megafold.profile import describe_device

viz.init_notebook()  # plotly and 3Dmol.js render offline
DEVICE = describe_device()
print(f"running on {DEVICE}")

# %%
import numpy as np

from megafold.profile.widgets import find_store

STRUCTURES = find_store().parent / "structures"

# %% [markdown]
# ## Structures, coloured by chain
#
# Polymers as cartoon, ligands as sticks (carbons in their chain's colour), ions as spheres.
# HhaI methyltransferase bound to DNA and its cofactor SAH:

# %%
viz.show(STRUCTURES / "3mht.cif.gz", width=640, height=420)

# %% [markdown]
# ParR dimer on DNA (with a modified nucleotide and a HEPES molecule). A view is also a value:
# `viz.structure_view(...)` displays itself and takes further py3Dmol calls.

# %%
view = viz.structure_view(STRUCTURES / "2q2k.cif.gz", width=640, height=420)
view.view.spin(False)
view

# %% [markdown]
# ## A prediction on its true structure, coloured by pLDDT
#
# To show the view without training a model here, we make a mock prediction of ubiquitin:
# the true coordinates, rotated and shifted, with errors that grow towards the C-terminus,
# and a pLDDT that follows the error (as a calibrated model's would). `structure_view`
# superposes the prediction on the truth (grey) and reports the RMSD.

# %%
truth = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")
rng = np.random.default_rng(0)
error_scale = 0.2 + 3.0 * (truth.res_id / truth.res_id.max()) ** 3  # Angstrom, per atom
noise = rng.normal(size=truth.coord.shape) * error_scale[:, None]
rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
mock_coords = (truth.coord + noise) @ rotation.T + 10.0
plddt = np.clip(100 * np.exp(-np.linalg.norm(noise, axis=-1) / 3.0), 0, 100)
prediction = viz.atom_array(
    mock_coords, truth.atom_name, truth.res_name, truth.chain_id, truth.res_id, truth.element, plddt=plddt
)
view = viz.structure_view(prediction, truth=truth, color="plddt", width=640, height=420)
print(f"RMSD after superposition: {view.rmsd:.2f} A")
view

# %% [markdown]
# ## Heatmaps: PAE, distogram, contacts
#
# `pae_figure` takes an `[N, N]` matrix (row i: aligned on token i). As a stand-in for a
# model's PAE we use the mock's distance errors between representative atoms.

# %%
true_rep, labels = viz.representative_atoms(truth)
mock_rep, _ = viz.representative_atoms(prediction)
distance = lambda x: np.linalg.norm(x[:, None] - x[None, :], axis=-1)  # noqa: E731
chains = [label.split(":")[0] for label in labels]  # labels: "A:LYS48:CB"
viz.pae_figure(np.abs(distance(mock_rep) - distance(true_rep)), chain_ids=chains)

# %% [markdown]
# `distogram_figure` takes logits or probabilities over AF3's 64 distance bins (2-22 Å) and
# shows the expected distance and the contact probability. Here: a distogram peaked at the
# true distances.

# %%
centres = (viz.plots.AF3_DISTOGRAM_EDGES[1:] + viz.plots.AF3_DISTOGRAM_EDGES[:-1]) / 2
logits = -((distance(true_rep)[..., None] - centres) ** 2) / (2 * 1.5**2)
viz.distogram_figure(logits)

# %% [markdown]
# Contact maps compare two structures over the same tokens: truth above the diagonal, the mock
# prediction below.

# %%
viz.contact_map(truth, compare=prediction)

# %% [markdown]
# ## A self-contained report
#
# `write_report` puts views, figures, tables and text into one HTML file that carries
# 3Dmol.js and plotly.js itself: it opens offline, anywhere.

# %%
report = viz.write_report(
    "outputs/05_visualization/report.html",
    [
        viz.Section("3MHT (chains)", view=viz.structure_view(STRUCTURES / "3mht.cif.gz")),
        viz.Section("Mock prediction of 1UBQ (pLDDT)", view=viz.structure_view(prediction, truth=truth, color="plddt"),
                    text=f"RMSD {view.rmsd:.2f} A after superposition; labelled on {DEVICE}."),
        viz.Section("Contacts", figure=viz.contact_map(truth, compare=prediction)),
    ],
    title="megafold visualization tutorial",
)
print(f"{report} ({report.stat().st_size / 2**20:.1f} MiB, offline)")
