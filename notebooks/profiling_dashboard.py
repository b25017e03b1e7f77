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
# # Profiling dashboard
#
# Time and memory of one AlphaFold3 training step, per AF3 module (TriangleAttention,
# TriangleMultiplication, Transition, AttentionPairBias, OuterProductMean, DiffusionModule, ...),
# with megafold's Triton kernels against the eager PyTorch reference, and the longest crop each
# fits in memory.
#
# On a GPU the dashboard starts at the "paper" configuration (AF3's sizes, bf16, activation
# checkpointing) at crop 384. On the CPU it runs "tiny" with one block per stack, and the
# Triton kernels run in Triton's interpreter: correct, but slow, so the timings there say
# nothing about speed. Choose the settings and press **Run**; the figures update as each
# configuration finishes.

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

# %% [markdown]
# ## The dashboard
#
# Settings: preset, crop (tokens), dtype (bf16 autocast or fp32), activation checkpointing,
# a training step or the forward alone, which kernels to compare (torch.compile compiles the
# repeated blocks of the eager model), and whether to search the longest crop. The search fits
# each configuration's peak memory as a function of the crop, seeded by its profile at the
# chosen crop, runs one real step at the longest crop the fit predicts and refines from there;
# one time budget covers the whole run. The figure says for each result whether a step
# verified it or only the fit predicts it. "one block per stack" keeps the structure of a step
# at a fraction of its cost.

# %%
from megafold.profile.widgets import Dashboard

dash = Dashboard()
dash

# %% [markdown]
# Run it from code too (this is what the Run button does):

# %%
result = dash.run()

# %% [markdown]
# ## The results as an xarray Dataset
#
# `time_ms[config, module, phase]` is the exclusive time of each AF3 module (forward,
# backward, and recomputation under checkpointing), `stage_ms` the data / forward / backward
# / optimizer split, `timeline_*` the memory timeline, `crop_*` the longest-crop search.

# %%
result

# %%
from megafold.profile import save, summary

print(f"{DEVICE}: exclusive ms per step")
summary(result).round(2)

# %%
path = save(result, "outputs/profiling_dashboard.zarr")
print("saved to", path)
