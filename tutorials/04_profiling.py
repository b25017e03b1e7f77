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
# # 04 · Profiling a training step
#
# `megafold.profile` times one training step per AF3 module (forward, backward, and the
# recomputation that activation checkpointing adds), follows memory through the step,
# compares kernel backends side by side and finds the longest crop that fits. Everything comes
# back as xarray Datasets that save to zarr. The dashboard (`notebooks/profiling_dashboard`)
# wraps the same calls in widgets.
#
# On a GPU this profiles the "paper" configuration at crop 384, torch against triton. On the
# CPU it profiles "tiny" with the eager kernels (Triton's interpreter would time the
# interpreter, not the kernels).

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
from megafold.model import preset
from megafold.profile import combine, compare, load, longest_crop, profile_step, save, summary, variants
from megafold.profile import plots

PRESET = "paper" if ON_GPU else "tiny"
CROP = 384 if ON_GPU else 16
BATCH = {} if ON_GPU else {"msa_rows": 4, "atoms_per_token": 4}  # small synthetic inputs on the CPU
KERNELS = ("torch", "triton") if ON_GPU else ("torch",)
config = preset(PRESET, kernels=KERNELS[-1])

# %% [markdown]
# ## One step, module by module
#
# How time is attributed: forward pre/post hooks on every AF3 module switch the "owner" of a
# timeline of CUDA events (perf_counter on the CPU); time is *exclusive*, so
# `TriangleAttention` inside `PairformerStack` counts once, under `TriangleAttention`. In
# backward, each autograd node is attributed to the module whose forward op created it (by the
# node's sequence number). Time outside every AF3 module (losses, recycling, glue) is
# `(other)`. Memory is sampled at every switch, with the exact peak in between.

# %%
ds = profile_step(config, crop=CROP, steps=2, warmup=1, **BATCH)
print(f"{DEVICE}: step {float(ds.step_ms.mean()):.1f} ms, {ds.attrs['parameters']:,} parameters")
summary(ds).round(2)

# %%
plots.module_time_figure(ds)

# %% [markdown]
# The stages of the step and their peak memory:

# %%
ds[["stage_ms", "stage_peak_mib"]].mean("step").to_dataframe().round(2)

# %%
plots.memory_timeline_figure(ds)

# %% [markdown]
# ## Activation checkpointing: memory for time
#
# With `checkpoint=True` each Pairformer / MSA / template block keeps only its input; its
# activations are recomputed in backward (the `recompute` phase). The peak drops, the step
# takes longer:

# %%
trade = compare({"no checkpointing": config.replace(checkpoint=False), "checkpointing": config.replace(checkpoint=True)},
                crop=CROP, warmup=1, **BATCH)
import pandas as pd

print(pd.DataFrame({"step (ms)": trade.step_ms.mean("step").to_pandas(),
                    "peak (MiB)": trade.stage_peak_mib.max("stage").to_pandas()}).round(1))
plots.memory_timeline_figure(trade)

# %%
plots.module_time_figure(trade)

# %% [markdown]
# ## Launches: CUDA graphs
#
# At small crops on a GPU the host, not the GPU, bounds a step: a "paper" step issues tens of
# thousands of small launches. Two config switches replay CUDA graphs instead, with either
# kernels setting:
# - `diffusion_cuda_graph` (on): the 48 diffusion samples run in checkpointed chunks of
#   `diffusion_chunk`; the step's second chunk is captured and every later one replays it,
#   forward and recompute-plus-backward. Smaller chunks and a checkpoint per
#   diffusion-transformer block (`diffusion_block_checkpoint`, on in "paper") then save
#   memory without costing host time.
# - `rollout_cuda_graph` (on): the sampler's denoiser, in the confidence mini-rollout and in
#   prediction.
#
# By default the per-module trace runs the chunks eagerly (its hooks must see every module),
# so on a GPU its module times add up to more than a plain step takes: a "paper" step at crop
# 384 took 2.5x the training step's time on an H200. `profile_step(..., graphed_diffusion=True)`
# (the dashboard's default) keeps the chunks' graphs and times them as one `DiffusionModule`
# region, forward and backward: the traced step came within ~30% of the training step, and the
# modules inside the diffusion module get no time from the training chunks (the mini-rollout's
# still count). For a fixed-shape step of your own
# (a trunk-only fine-tune, a benchmark), `megafold.train.graphs.GraphedStep(step, parameters)`
# captures forward and backward once and replays them. Off CUDA these switches change nothing.

# %%
print({name: getattr(config, name)
       for name in ("diffusion_cuda_graph", "rollout_cuda_graph", "diffusion_chunk", "diffusion_block_checkpoint")})

# %% [markdown]
# ## Kernels side by side
#
# `variants(config, ("torch", "triton", "compile"))` builds the standard comparison: the eager
# reference, megafold's Triton kernels and torch.compile of the eager model.
#
# The Triton rows use the launch configurations tuned for this GPU: shipped ones for the GPUs
# megafold was measured on, otherwise whatever the first steps tune (each new shape key times
# its candidates once per machine, then caches the choice). On a GPU without shipped choices,
# `tune_kernels(config, crop=384)` from `megafold.profile` (or `megafold tune` in a shell) tunes
# a whole step up front: it compiles every candidate in parallel processes first, which took
# a "paper" step's 36 new keys from more than ten minutes to about a minute and a half on an H200.
# `tune_kernels(config, crop=768, force=True, ops=["triangle_multiply"])` times the keys of the
# selected ops again (after a kernel change, say) while every other op keeps its stored choice.

# %%
kernels = compare(variants(config, KERNELS), crop=CROP, warmup=1, **BATCH)
plots.step_figure(kernels)

# %% [markdown]
# ## The longest crop that fits
#
# On a GPU `longest_crop` fits the measured peaks as a function of the crop (pass
# `known=profile_step(...)` to seed it), runs a real step at the longest crop the fit predicts,
# and refines: a step that raises `torch.OutOfMemoryError` is freed and narrows the bracket.
# `stopped_by` says what the answer rests on (a crop measured not to fit, the time budget, or
# only the fit's prediction). On the CPU nothing runs out of memory first, so the search stops
# at `max_crop` or at a memory budget (bytes of live tensors, measured as on a GPU):

# %%
if ON_GPU:
    searches = {name: longest_crop(variant, start=CROP, time_budget_s=120, label=name)
                for name, variant in variants(config, KERNELS).items()}
else:
    unlimited = longest_crop(config, start=8, step=8, max_crop=32, label="no budget", **BATCH)
    budget = float(unlimited.peak_mib.sel(crop=24)) - 0.1
    limited = longest_crop(config, start=8, step=8, max_crop=32, memory_budget_mib=budget, label="budget", **BATCH)
    searches = {"no budget": unlimited, "budget": limited}
for name, search in searches.items():
    print(f"{name}: longest crop {search.attrs['longest_crop']} (stopped by {search.attrs['stopped_by']})")
plots.longest_crop_figure(combine({}, searches))

# %% [markdown]
# ## Results are xarray, saved as zarr

# %%
path = save(kernels, "outputs/04_profiling/kernels.zarr")
again = load(path)
print(again.time_ms.sel(module=["TriangleAttention", "TriangleMultiplication", "AttentionPairBias"]).sum("phase").to_pandas())
again
