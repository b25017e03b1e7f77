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
# # 02 · The precache: features computed once, read in milliseconds
#
# Turning an mmCIF into AF3 features means parsing it, tokenizing it against the Chemical
# Component Dictionary, searching MSAs and templates: seconds per structure, far too slow to
# do in every training step. `megafold precache` does it once and writes the features into a
# zarr store; the training loader then only reads, crops and collates arrays.
#
# This tutorial builds a small store from structures shipped with megafold, looks inside it,
# shows that it catches corruption, measures loading against featurizing on the fly, and
# feeds the loader.

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
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from megafold.precache import build, open_store
from megafold.profile.widgets import find_store

SHIPPED = find_store().parent  # cached_data/: structures/, msas/ and the ready store.zarr
KEYS = ["1ubq", "2crb", "4zey", "2q2k"] + (["3mht", "1hvr", "1a28"] if ON_GPU else [])
WORK = Path("outputs/02_precache")
shutil.rmtree(WORK, ignore_errors=True)
# The shipped MSAs, copied so that the build reads them instead of searching (and writes nothing
# into cached_data/).
for key in KEYS:
    shutil.copytree(SHIPPED / "msas" / key, WORK / "msas" / key)
sources = [SHIPPED / "structures" / f"{key}.cif.gz" for key in KEYS]

# %% [markdown]
# ## Build
#
# `build` takes structure files (or directories), featurizes each in worker processes and
# writes one zarr group per entry, atomically: a temporary group renamed into place when
# complete, so an interrupted build leaves only whole entries and resumes where it stopped.

# %%
report = build(sources, WORK / "store.zarr", msa_dir=WORK / "msas", workers=1, progress=False)
print(report)

# %% [markdown]
# A second build finds every entry's inputs unchanged (structure, MSAs and database hashes are
# stored with it) and does nothing:

# %%
print(build(sources, WORK / "store.zarr", msa_dir=WORK / "msas", workers=1, progress=False))

# %% [markdown]
# ## Inside the store
#
# Plain zarr v3: any zarr or xarray client reads it. Each entry holds one array per feature
# of the schema (`megafold.data.features.FEATURES`, AF3's Table 5), with named dimensions,
# plus JSON attributes: versions, input hashes, per-array checksums and metadata.

# %%
store = open_store(WORK / "store.zarr")
example = store.load("2q2k")
metadata = store.attrs("2q2k")["metadata"]
print(store, {name: metadata[name] for name in ("pdb_id", "method", "resolution")})
pd.DataFrame(
    [{"feature": name, "shape": tuple(value.shape), "dtype": str(value.dtype)} for name, value in example.items()]
).set_index("feature").head(12)

# %%
store.dataset("2q2k")

# %% [markdown]
# ## Corruption is caught
#
# Every array's sha256 is stored with the entry. Flip one byte of one chunk and `verify()`
# names the entry (training would otherwise silently learn from garbage):

# %%
print("before:", store.verify())
chunk = next(p for p in sorted((WORK / "store.zarr" / "1ubq" / "atom_pos").rglob("*")) if p.is_file() and p.name != "zarr.json")
data = bytearray(chunk.read_bytes())
data[len(data) // 2] ^= 0xFF
chunk.write_bytes(bytes(data))
print("after flipping a byte of", chunk.relative_to(WORK), ":", store.verify())
# A build reuses only entries whose inputs are unchanged *and* that verify: it rebuilds 1ubq alone.
print(build(sources, WORK / "store.zarr", msa_dir=WORK / "msas", workers=1, progress=False))
print("rebuilt:", store.verify())

# %% [markdown]
# ## Reading from the store against featurizing on the fly
#
# The loader reads an entry and crops it (AF3's contiguous / spatial / spatial-interface
# crops). `OnTheFlySource` is the same source interface without a cache: every load parses the
# structure and searches MSAs and templates again.

# %%
from megafold.data.crop import crop_example
from megafold.precache.loader import OnTheFlySource

CROP = 384 if ON_GPU else 64
rng = np.random.default_rng(0)
read_ms = []
for _ in range(3):
    for key in store.keys():
        started = time.perf_counter()
        crop_example(store.load(key), CROP, rng)
        read_ms.append(1e3 * (time.perf_counter() - started))
on_the_fly = OnTheFlySource([SHIPPED / "structures" / "1ubq.cif.gz"], templates=False)
started = time.perf_counter()
on_the_fly.load("1ubq")
fly_ms = 1e3 * (time.perf_counter() - started)
print(f"{DEVICE}: load + crop from the store: median {np.median(read_ms):.1f} ms; "
      f"featurize 1ubq on the fly (MSA search, no templates): {fly_ms:.0f} ms")

# %% [markdown]
# ## The loader
#
# `loader(store, crop_size, batch_size)` yields collated batches (padding masks included),
# loads and crops in worker processes with a per-sample random generator (the crop of a
# sample does not depend on the worker count, and a resumed run sees the same batches),
# prefetches to the GPU on a side stream, and measures how long the consumer waited.

# %%
from megafold.precache.loader import loader

batches = loader(store, crop_size=CROP, batch_size=2, workers=0 if not ON_GPU else 2)
for batch in batches:
    print({name: tuple(batch[name].shape) for name in ("token_mask", "atom_pos", "msa", "template_pos")},
          "tokens per example:", batch["token_mask"].sum(1).tolist())
print(batches.stats())
