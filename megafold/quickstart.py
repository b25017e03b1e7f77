"""``megafold quickstart``: the whole kit on the shipped data, in a few minutes, into one report.

1. precache the shipped structures (``cached_data/structures``, with their shipped MSAs: no
   search) into ``OUT/store``;
2. train "tiny" on the CPU ("small" on a GPU) on all but one entry, for ``minutes``;
3. predict the entry held aside (mmCIF with pLDDT, PAE) and score it against the truth;
4. profile one step with kernels torch vs triton (``megafold.profile``). On the CPU "triton"
   is the Triton interpreter, about a hundred times slower than torch: that comparison is
   a forward pass at a handful of tokens, to show that both give the same loss, not a speed;
5. write ``OUT/report.html`` (``megafold.viz.write_report``): loss curves, the profile, the
   prediction on the truth coloured by pLDDT and the PAE, all offline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megafold.errors import CacheError

HOLDOUT = "1a8o"  # HIV capsid C-terminal domain, 70 tokens: quick to sample on a CPU
CPU_PROFILE_CROP = 8  # tokens: the Triton interpreter runs one forward there in seconds


@dataclass(frozen=True)
class QuickstartOptions:
    data: str = "cached_data"
    out: str = "outputs/quickstart"
    minutes: float = 2.0  # training time
    steps: int | None = None  # stop training earlier, after this many steps
    crop: int | None = None  # default: 48 on the CPU, 256 on a GPU
    predict_steps: int | None = None  # sampler steps (default: 50 on the CPU, 200 on a GPU)
    profile: bool = True
    workers: int = 1  # precache processes (the loader uses 0 on the CPU)
    holdout: str = HOLDOUT


def quickstart(options: QuickstartOptions = QuickstartOptions()) -> Path:
    """Run the five stages and return the path of the report."""
    from megafold.precache import build
    from megafold.precache.build import entry_key, find_sources

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if not gpu:
        # The tiny model's ops are too small to gain from intra-op threads, and spinning
        # OpenMP threads slow a step tenfold when anything else wants the cores.
        torch.set_num_threads(1)
    out = Path(options.out)
    data = Path(options.data)
    structures, msas = data / "structures", data / "msas"
    if not structures.is_dir():
        raise CacheError(f"{structures}: no shipped structures here (run from the repository root, or pass --data)")
    sources = {entry_key(path): path for path in find_sources([structures])}
    seconds: dict[str, float] = {}

    print(f"[1/5] precache {len(sources)} structures from {structures} into {out / 'store'}")
    started = time.perf_counter()
    report = build(
        sorted(sources.values()), out / "store", msa_dir=msas if msas.is_dir() else None,
        search=False, workers=options.workers,
    )  # fmt: skip
    seconds["precache"] = time.perf_counter() - started
    print(report)
    built = sorted(set(report.built) | set(report.reused))
    holdout = options.holdout if options.holdout in built else min(built, key=lambda k: sources[k].stat().st_size)
    train_keys = [key for key in built if key != holdout]
    if not train_keys:
        raise CacheError(f"{out / 'store'}: no entries to train on")

    print(f"[2/5] train on {len(train_keys)} entries ({holdout} held aside), {options.minutes:g} min on the {device}")
    started = time.perf_counter()
    trainer = _train(options, out, train_keys, device)
    seconds["train"] = time.perf_counter() - started

    print(f"[3/5] predict {holdout}")
    started = time.perf_counter()
    prediction = _predict(trainer, out, holdout, sources[holdout], gpu, options)
    seconds["predict"] = time.perf_counter() - started

    profile = None
    if options.profile:
        print("[4/5] profile one step, kernels torch vs triton")
        started = time.perf_counter()
        profile = _profile(trainer.model_config, options, gpu)
        seconds["profile"] = time.perf_counter() - started

    print("[5/5] write the report")
    path = _report(out, trainer, prediction, sources[holdout], profile, seconds, device)
    return path


def _train(options: QuickstartOptions, out: Path, keys: list[str], device: str):
    from megafold.model import preset
    from megafold.train.trainer import TrainConfig, Trainer

    gpu = device == "cuda"
    model_config = preset("small") if gpu else preset("tiny", kernels="torch", bf16=False)
    run = out / "train"
    for stale in (run / "checkpoint.pt", run / "metrics.csv", run / "eval.csv"):
        stale.unlink(missing_ok=True)  # a quickstart always starts a fresh run
    config = TrainConfig(
        store=str(out / "store"),
        out=str(run),
        keys=tuple(keys),
        crop_size=options.crop or (256 if gpu else 48),
        steps=options.steps or 100_000,
        max_minutes=options.minutes,
        lr=1e-3,
        warmup_steps=50,  # AF3's 1,000 is longer than the whole quickstart
        checkpoint_every=1_000_000,  # once, at the end
        workers=2 if gpu else 0,
        max_msa_rows=256,  # bounds the cost of the deepest MSAs (hundreds of rows) on a CPU
        device=device,
    )
    trainer = Trainer(model_config, config)
    trainer.fit()
    return trainer


def _predict(trainer, out: Path, key: str, source: Path, gpu: bool, options: QuickstartOptions):
    from megafold.precache import open_store
    from megafold.train.predict import predict

    example = open_store(out / "store").load(key)
    steps = options.predict_steps or (200 if gpu else 50)
    prediction = predict(trainer.ema.module, example, out / "predictions", name=key, truth=source, steps=steps, samples=2)
    scores = ", ".join(f"{name} {value:.3f}" for name, value in prediction.metrics.items())
    print(f"  {prediction.cif_path}: mean pLDDT {max(prediction.ranking):.1f}; {scores}")
    return prediction


def _profile(model_config, options: QuickstartOptions, gpu: bool):
    """``megafold.profile.compare`` of kernels torch vs triton: a training step at the training
    crop on a GPU; on the CPU one forward at a few tokens (the Triton interpreter is slow), or
    torch alone when the interpreter is off."""
    from megafold.kernels._common import interpreter_active, triton_available
    from megafold.profile import compare, variants

    if gpu:
        return compare(variants(model_config, ("torch", "triton")), crop=options.crop or 256, steps=1, warmup=1)
    names = ("torch", "triton") if interpreter_active() and triton_available() else ("torch",)
    return compare(
        variants(model_config, names), crop=CPU_PROFILE_CROP, backward=False, steps=1, warmup=0,
        msa_rows=4, atoms_per_token=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------- report


def _loss_figure(history: list[dict[str, float]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = np.array([row["step"] for row in history])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Total loss", "Loss terms"), horizontal_spacing=0.1)
    loss = np.array([row["loss"] for row in history])
    fig.add_trace(go.Scatter(x=steps, y=loss, mode="lines", name="loss", line={"color": "#c8c8c8"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=_smooth(loss), mode="lines", name="loss (smoothed)", line={"color": "#1f77b4"}), row=1, col=1)
    for term in ("diffusion", "smooth_lddt", "distogram", "confidence"):
        if term in history[0]:
            values = np.array([row[term] for row in history])
            fig.add_trace(go.Scatter(x=steps, y=_smooth(values), mode="lines", name=f"{term} (smoothed)"), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=420, plot_bgcolor="white", title="Training loss")
    return fig


def _smooth(values: np.ndarray, span: int = 20) -> np.ndarray:
    """Exponential moving average, as TensorBoard draws it."""
    out = np.empty_like(values, dtype=np.float64)
    average, weight = 0.0, 0.0
    decay = 1.0 - 1.0 / span
    for i, value in enumerate(values):
        if np.isfinite(value):
            average = decay * average + (1 - decay) * value
            weight = decay * weight + (1 - decay)
        out[i] = average / weight if weight else np.nan
    return out


def profile_rows(profile) -> list[dict]:
    """One row per config of a ``megafold.profile.compare`` result: step, forward and backward
    time (ms), peak memory (MiB) and the loss."""
    rows = []
    for config in profile.config.values:
        ds = profile.sel(config=config)
        stage = ds["stage_ms"].mean("step")
        rows.append({
            "kernels": str(config),
            "device": profile.attrs.get("device", ""),
            "crop (tokens)": int(ds["crop"]) if "crop" in ds.coords else profile.attrs.get("crop"),
            "backward": bool(profile.attrs.get("backward", True)),
            "step (ms)": float(ds["step_ms"].mean()),
            "forward (ms)": float(stage.sel(stage="forward")),
            "backward (ms)": float(stage.sel(stage="backward")),
            "peak (MiB)": float(ds["stage_peak_mib"].max()),
            "loss": float(ds["loss"].mean()),
        })  # fmt: skip
    return rows


def _report(out: Path, trainer, prediction, truth: Path, profile, seconds: dict[str, float], device: str) -> Path:
    from megafold.viz import Section, pae_figure, structure_view, write_report

    history = trainer.history
    config = trainer.config
    last = history[-1]
    mean_plddt = max(prediction.ranking)
    metrics = prediction.metrics
    sections = [
        Section(
            "Summary",
            text=(
                f"Device: {device}. Model preset {'small' if device == 'cuda' else 'tiny'} "
                f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters), kernels "
                f"{trainer.model_config.kernels}, crop {config.crop_size} tokens.\n\n"
                f"Trained {trainer.step} steps on {len(trainer.train_keys)} shipped entries in "
                f"{trainer.elapsed_s / 60:.1f} min ({trainer.skipped_steps} skipped by the NaN guard); "
                f"final loss {last['loss']:.3f}.\n\n"
                f"Prediction of {prediction.name} (held aside): mean pLDDT {mean_plddt:.1f}, "
                f"CA-lDDT {metrics.get('ca_lddt', float('nan')):.3f}, CA RMSD {metrics.get('ca_rmsd', float('nan')):.1f} A. "
                "A few minutes of CPU training do not fold a protein: this report shows the machinery "
                "working, not accuracy. Train longer or on a GPU for that."
            ),
            table=[{"stage": stage, "seconds": value} for stage, value in seconds.items()],
        ),
        Section("Training loss", figure=_loss_figure(history)),
        Section(
            f"Prediction of {prediction.name} on the truth",
            text=(
                f"The sampled structure (coloured by pLDDT) superposed on the experimental one (grey) by "
                f"its CA atoms. Files: {prediction.cif_path}, {prediction.pae_path}."
            ),
            view=structure_view(prediction.cif_path, truth=truth, color="plddt"),
            table=[{"metric": name, "value": value} for name, value in metrics.items()],
        ),
        Section(
            "Predicted aligned error",
            figure=pae_figure(prediction.pae, chain_ids=list(prediction.labels.token_chain_id)),
        ),
    ]
    if profile is not None:
        from megafold.profile.plots import module_time_figure

        if device == "cuda":
            note = "One training step at the training crop, after one warm-up step."
        elif "triton" in profile.config.values:
            note = (
                "On the CPU the triton row runs the Triton interpreter (TRITON_INTERPRET=1), which executes "
                "every kernel in Python: it shows that the kernels give the same loss as torch, not their speed. "
                "Run `megafold quickstart` on a GPU, or `megafold profile`, for a real comparison."
            )
        else:
            note = "Triton kernels run on the CPU only under the Triton interpreter (not available in this run): torch alone."
        sections.append(Section("Profile: kernels torch vs triton", text=note, table=profile_rows(profile), figure=module_time_figure(profile)))
    path = write_report(out / "report.html", sections, title="megafold quickstart")
    return path
