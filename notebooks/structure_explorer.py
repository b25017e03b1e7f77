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
# # Structure explorer
#
# Browse the precache shipped with megafold (`cached_data/store.zarr`, 22 real PDB entries):
# pick an entry to see its structure in 3D (chains coloured, ligands as sticks), its contact
# map, the depth of its MSA along the sequence, and its features as an xarray Dataset (the
# arrays the model is trained on).

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
import pandas as pd

from megafold.data.features import MSA_GAP
from megafold.precache import open_store
from megafold.profile.widgets import find_store

store = open_store(find_store())
STRUCTURES = store.path.parent / "structures"  # the mmCIF sources, shipped beside the store


def entry_row(key: str) -> dict:
    meta = store.attrs(key)["metadata"]
    chains = meta.get("chains", [])
    return {
        "key": key,
        "method": meta.get("method", ""),
        "resolution (A)": meta.get("resolution"),
        "chains": " ".join(f"{c['auth_chain_id']}:{c['kind']}" for c in chains),  # author chain ids
        "tokens": sum(c.get("tokens", 0) for c in chains),
        "max MSA depth": max((c.get("msa_depth", 0) for c in chains), default=0),
        "templates": sum(len(c.get("templates", [])) for c in chains),
    }


entries = pd.DataFrame([entry_row(key) for key in store.keys()]).set_index("key")
print(f"{len(entries)} entries in {store.path}")
entries

# %% [markdown]
# ## One entry
#
# `show(key)` draws everything for one entry; the dropdown below calls it.

# %%
import plotly.graph_objects as go
from IPython.display import HTML, display


def msa_depth_figure(example: dict, key: str) -> go.Figure:
    """Rows of the MSA with a residue (not a gap) at each token, per chain."""
    present = example["msa_mask"] & (example["msa"] != MSA_GAP)
    depth = present.sum(0)
    chains = example["asym_id"]
    names = [f"{c['auth_chain_id']} ({c['kind']})" for c in store.attrs(key)["metadata"]["chains"]]  # asym_id order
    fig = go.Figure()
    for chain in np.unique(chains):
        tokens = np.flatnonzero(chains == chain)
        name = names[chain - 1] if chain - 1 < len(names) else str(chain)
        fig.add_trace(go.Scatter(x=tokens, y=depth[tokens], mode="lines", name=f"chain {name}"))
    fig.update_layout(
        title=f"{key}: MSA depth ({example['msa'].shape[0]} rows)", xaxis_title="token",
        yaxis_title="rows with a residue", height=320, plot_bgcolor="white",
    )
    return fig


def show(key: str) -> None:
    source = STRUCTURES / f"{key}.cif.gz"
    example = store.load(key)
    display(HTML(f"<h3>{key}</h3>" + entries.loc[[key]].to_html()))
    viz.show(source, color="chain", width=560, height=400)
    display(viz.contact_map(source, title=f"{key}: contacts < 8 \u00c5"))
    display(msa_depth_figure(example, key))
    display(store.dataset(key))


# %%
import ipywidgets as widgets

choice = widgets.Dropdown(options=list(entries.index), value="1y57", description="entry")
view = widgets.interactive_output(show, {"key": choice})
display(choice, view)

# %% [markdown]
# A protein-DNA complex with a cofactor, drawn directly (the same as picking it above):

# %%
show("3mht")

# %% [markdown]
# ## Features as xarray
#
# Every entry is one zarr group; `store.dataset(key)` names its dimensions (token, atom,
# msa_row, template, ...), so features are selected by name:

# %%
features = store.dataset("1ubq")
print(f"{features.sizes['token']} tokens, {features.sizes['atom']} atoms, {features.sizes['msa_row']} MSA rows")
features["profile"].isel(token=slice(0, 5)).round(2).to_pandas()
