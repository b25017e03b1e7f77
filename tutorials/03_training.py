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
# # 03 · Training
#
# Train AlphaFold3 on the shipped precache with `megafold.train.Trainer`: AF3's Adam (β 0.9 /
# 0.95), warm-up and step decay, gradient clipping at 10, an EMA of the weights, a NaN guard,
# bf16 autocast and per-block activation checkpointing (config switches), and checkpoints that
# resume exactly. Then look at the loss curves (an xarray Dataset) and predict a structure.
#
# On the CPU this trains the "tiny" config for a few steps, enough to see every piece work;
# on a GPU the "small" config for a few hundred steps (`make quickstart` and the CLI,
# `megafold train`, run the same trainer).

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
from pathlib import Path

from megafold.model import AlphaFold3, model_summary, preset
from megafold.precache import open_store
from megafold.profile.widgets import find_store
from megafold.train import TrainConfig, Trainer, load_metrics

STORE = find_store()
KEYS = ("1ubq", "1ejg", "1zfd", "1sp1", "2crb", "5pti")  # small single-chain entries
PRESET = "small" if ON_GPU else "tiny"
STEPS = 300 if ON_GPU else 20
CROP = 256 if ON_GPU else 32
OUT = Path("outputs/03_training")

# On the CPU the eager kernels: Triton's interpreter is far too slow to train with.
model_config = preset(PRESET, kernels="auto" if ON_GPU else "torch")
print(model_summary(AlphaFold3(model_config), depth=1))

# %% [markdown]
# ## What one step does
#
# `model.training_loss(batch)` runs the trunk (input embedding, templates, MSA module, 48
# Pairformer blocks in "paper"; recycling draws 1..N cycles), the diffusion module on
# `diffusion_samples` noised copies of the true structure (EDM-weighted MSE after rigid
# alignment plus smooth lDDT), the distogram head, and the confidence head on a short rollout
# of the sampler. The trainer adds the optimiser, the schedule, the EMA and the checkpoints.

# %%
config = TrainConfig(
    store=str(STORE), out=str(OUT), keys=KEYS, crop_size=CROP, steps=STEPS,
    warmup_steps=max(STEPS // 10, 1), checkpoint_every=max(STEPS // 2, 1), workers=2 if ON_GPU else 0,
)
trainer = Trainer(model_config, config)
rows = trainer.fit()
print(f"{DEVICE}: {len(rows)} steps, last loss {rows[-1]['loss']:.3f}, {rows[-1]['step_s']:.2f} s per step")

# %% [markdown]
# ## Resuming
#
# The checkpoint holds the model, the optimiser, the EMA, the schedule, every random generator
# and the loader's position: a new trainer continues exactly where this one stopped.

# %%
resumed = Trainer(model_config, config.replace(steps=STEPS + 2))
resumed.resume()
print("resumed at step", resumed.step)
resumed.fit()
print("now at step", resumed.step)

# %% [markdown]
# ## Loss curves
#
# `load_metrics(out)` opens the run's metrics as an xarray Dataset (one row per step):

# %%
import plotly.graph_objects as go

metrics = load_metrics(OUT)
fig = go.Figure()
for term in ("loss", "diffusion", "smooth_lddt", "distogram"):
    if term in metrics:
        fig.add_trace(go.Scatter(x=metrics.step.values, y=metrics[term].values, mode="lines+markers", name=term))
fig.update_layout(title=f"Training loss ({PRESET}, crop {CROP}, {DEVICE})", xaxis_title="step", yaxis_type="log", height=380)
fig.show()
metrics

# %% [markdown]
# ## Predict a structure
#
# `predict` samples structures with the EMA weights and writes the best (by mean pLDDT) as
# mmCIF with pLDDT in the B-factor column, plus the PAE matrix. A few steps of "tiny" give
# noise, of course: the point here is the path from a trained model to a structure view.

# %%
from megafold.train.predict import predict

store = open_store(STORE)
prediction = predict(
    resumed.ema.module, store.load("1ubq"), OUT / "predictions",
    truth=STORE.parent / "structures" / "1ubq.cif.gz",
)
print({name: round(value, 3) for name, value in prediction.metrics.items()})
viz.show(prediction.cif_path, truth=STORE.parent / "structures" / "1ubq.cif.gz", color="plddt", width=560, height=400)
viz.pae_figure(prediction.pae)
