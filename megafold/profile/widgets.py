"""An ipywidgets dashboard for profiling training steps, with live plotly figures.

    from megafold.profile.widgets import Dashboard
    dash = Dashboard()          # "paper" at crop 384 on a GPU, "tiny" (one block per stack) on the CPU
    dash                        # choose preset, crop, kernels, checkpointing, dtype; press Run
    dash.run()                  # or run from code; dash.result is the xarray Dataset

The figures (time per AF3 module, the memory timeline, step time / speedup / peak memory per
config with the profiler's own overhead, the longest crop each config fits) are redrawn as each
config finishes. The whole run keeps to ``time_budget_s`` (on a GPU 112 s: "paper" at crop 384,
torch vs triton, with their longest crops, in under two minutes; there the profiler's own
overhead, one more step per variant, is left out unless ``overhead=True``). A 3Dmol view
shows the structure being profiled. ``DashboardSettings`` + ``run_profile`` are the same
logic without widgets (``benchmarks/dashboard_screenshot.py`` uses them headless).
"""

from __future__ import annotations

import dataclasses
import html
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megafold.errors import CacheError
from megafold.model import PRESETS, AlphaFold3Config, preset, synthetic_batch
from megafold.profile import plots
from megafold.profile.profiler import (
    Batch,
    Variant,
    combine,
    describe_device,
    longest_crop,
    precompile_kernels,
    profile_step,
    resolve_device,
    variants,
)

if TYPE_CHECKING:
    import xarray as xr

# One block per stack, one diffusion sample, one rollout step: the structure of a training
# step at a fraction of its cost (for the CPU, where Triton runs in its interpreter).
QUICK_OVERRIDES: dict[str, int] = {
    "pairformer_blocks": 1,
    "msa_blocks": 1,
    "template_blocks": 0,
    "confidence_blocks": 0,
    "diffusion_blocks": 1,
    "atom_encoder_blocks": 1,
    "atom_decoder_blocks": 1,
    "diffusion_samples": 1,
    "rollout_steps": 1,
}
KERNEL_CHOICES = {"torch": "torch (eager)", "triton": "triton (megafold)", "compile": "torch.compile"}
DATA_CHOICES = {"synthetic": "synthetic protein", "store": "cached_data store (real, cropped)"}


def find_store() -> Path | None:
    """The shipped precache ``cached_data/store.zarr`` next to the package or the working
    directory (or its parent: notebooks run from notebooks/), if there is one."""
    here = Path(__file__).resolve().parents[2]
    for root in (here, Path.cwd(), Path.cwd().parent):
        candidate = root / "cached_data" / "store.zarr"
        if (candidate / "zarr.json").is_file():
            return candidate
    return None


@dataclass
class DashboardSettings:
    """What to profile. Defaults by device: "paper" at crop 384 on a GPU, "tiny" with one block
    per stack at crop 8 on the CPU."""

    preset: str
    crop: int
    kernels: tuple[str, ...] = ("torch", "triton")
    checkpoint: bool | None = None  # None: the preset's
    dtype: str | None = None  # "bf16" | "fp32"; None: the preset's
    backward: bool = True
    quick: bool = False
    longest: bool = True
    max_crop: int = 2048
    time_budget_s: float | None = 112.0  # the whole run (each profile and its search); None: no limit
    overhead: bool = True  # one plain step per variant: the profiler's own cost
    # The training diffusion chunks keep their CUDA graphs in the profiled step, timed as one
    # DiffusionModule region (profile_step's graphed_diffusion): a step as long as training's
    # within ~30% on a "paper" step, where running them eagerly for per-module detail took
    # 2.5x (benchmarks/NOTES.md, session 27). No effect below three diffusion chunks.
    graphed_diffusion: bool = True
    steps: int = 1
    warmup: int = 1
    data: str = "synthetic"
    msa_rows: int = 64
    atoms_per_token: int = 8
    device: str | None = None

    @classmethod
    def for_device(cls, device: str | torch.device | None = None, **overrides: Any) -> DashboardSettings:
        if (torch.device(device) if device is not None else resolve_device()).type == "cuda":
            # the plain step's ~8 s ("paper", torch + triton) go to verifying the longest crops
            base = cls(preset="paper", crop=384, overhead=False)
        else:
            base = cls(
                preset="tiny", crop=8, quick=True, longest=False, max_crop=16, warmup=0, msa_rows=4,
                atoms_per_token=4,
            )  # fmt: skip
        return dataclasses.replace(base, device=None if device is None else str(device), **overrides)

    def config(self) -> AlphaFold3Config:
        base = preset(self.preset)
        checkpoint = base.checkpoint if self.checkpoint is None else self.checkpoint
        bf16 = base.bf16 if self.dtype is None else self.dtype == "bf16"
        quick = QUICK_OVERRIDES if self.quick else {}
        return preset(self.preset, checkpoint=checkpoint, bf16=bf16, pair_bf16_checkpoint=checkpoint and bf16, **quick)

    def variants(self) -> dict[str, Variant]:
        return variants(self.config(), self.kernels)


def _store_batches(crop: int, device: torch.device) -> Iterable[Batch]:
    from megafold.precache import open_store
    from megafold.precache.loader import loader

    store = find_store()
    if store is None:
        raise CacheError("cached_data/store.zarr: not found next to the package or the working directory")
    return loader(open_store(store), crop, 1, workers=0 if device.type == "cpu" else 2, device=device)


def run_profile(
    settings: DashboardSettings,
    on_result: Callable[[str, xr.Dataset], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> xr.Dataset:
    """Profile each kernel variant of ``settings`` and search its longest crop, one variant
    after the other, calling ``on_result(label, results so far)`` after each profile and search
    and ``on_status(text)`` before each.

    The searches start from each profile (its crop and peak on synthetic batches are the first
    point of the memory fit) and share what is left of ``settings.time_budget_s`` equally, less
    a reserve for the later variants' profiles (half the first profile's time, for each), a
    later variant inheriting what an earlier one did not use.

    On a GPU, once the first variant is profiled, worker processes compile the Triton kernels
    of the later variants (``precompile_kernels``) while the first variant's search runs: a
    fresh machine would otherwise compile them at the triton variant's first step (~90 s on an
    H100). The first profile runs before the workers start, so its step time is not measured
    beside them."""
    began = time.perf_counter()
    device = resolve_device(settings.device)
    todo = settings.variants()
    results: dict[str, xr.Dataset] = {}
    searches: dict[str, xr.Dataset] = {}
    batches = _store_batches(settings.crop, device) if settings.data == "store" else None
    options = {
        "device": device, "backward": settings.backward, "msa_rows": settings.msa_rows,
        "atoms_per_token": settings.atoms_per_token,
    }  # fmt: skip
    pending: dict[str, object] = {}
    try:
        profile_s = 0.0
        for number, (label, variant) in enumerate(todo.items(), 1):
            if label in pending:
                if on_status:
                    on_status(f"waiting for the kernels of {label}")
                compiled = pending.pop(label).wait()
                if on_status:
                    on_status(f"{compiled['compiled']} of {compiled['records']} kernel launches precompiled "
                              f"in {compiled['seconds']:.0f} s")  # fmt: skip
            if on_status:
                on_status(f"profiling {label} ({number}/{len(todo)}) at crop {settings.crop}")
            profile_began = time.perf_counter()
            results[label] = profile_step(
                variant, crop=settings.crop, batches=batches, steps=settings.steps, warmup=settings.warmup,
                measure_overhead=settings.overhead, graphed_diffusion=settings.graphed_diffusion, label=label,
                **options,
            )  # fmt: skip
            if number == 1:
                profile_s = time.perf_counter() - profile_began
            if on_result:
                on_result(label, combine(results, searches))
            if number == 1 and device.type == "cuda" and len(todo) > 1:
                pending.update(_start_precompiling(dict(list(todo.items())[1:]), settings, options, on_status))
            if settings.longest:
                later = len(todo) - number
                share_s = None
                if settings.time_budget_s is not None:
                    # Each later profile is reserved half the first one's time: triton's "paper"
                    # step at crop 384 takes 0.5-0.7x eager's on an H100, and a longer reserve
                    # starved eager's search of its closing step (cold H100 run, 02dd817).
                    left_s = settings.time_budget_s - (time.perf_counter() - began) - later * profile_s / 2
                    share_s = max(left_s, 0.0) / (later + 1)
                if on_status:
                    within = "" if share_s is None else f" within {share_s:.0f} s"
                    on_status(f"longest crop of {label} ({number}/{len(todo)}), "
                              f"up to {settings.max_crop}{within}")  # fmt: skip
                searches[label] = longest_crop(
                    variant, start=settings.crop, step=settings.crop if device.type == "cpu" else 128,
                    max_crop=settings.max_crop, time_budget_s=share_s,
                    known=results[label] if batches is None else None, label=label, **options,
                )  # fmt: skip
                if on_result:
                    on_result(label, combine(results, searches))
    finally:
        for handle in pending.values():  # a run that failed leaves no compile workers behind
            handle.cancel()
    return combine(results, searches)


def _start_precompiling(
    later: dict[str, Variant], settings: DashboardSettings, options: dict, on_status: Callable[[str], None] | None
) -> dict[str, object]:
    """Start the Triton compile workers for each of ``later``; {label: handle to wait on}."""
    # leave cores to the step profiled or searched meanwhile (it is host-bound)
    workers = max(1, min(12, (os.cpu_count() or 1) - 2))
    pending: dict[str, object] = {}
    for label, variant in later.items():
        if on_status:
            on_status(f"compiling the kernels of {label} in the background")
        try:
            handle = precompile_kernels(variant, crop=settings.crop, n_cycles=1, workers=workers, **options)
        except Exception as error:  # noqa: BLE001  only a speed-up: the kernels compile at first use
            handle = None
            if on_status:
                on_status(f"precompiling failed ({type(error).__name__}: {error}); kernels compile at first use")
        if handle is not None:
            pending[label] = handle
    return pending


def example_view(batch: Batch, *, width: int = 420, height: int = 320):
    """A 3Dmol view of the first structure of a feature batch (true atom positions, chains
    coloured), via ``megafold.train.predict.feature_labels``."""
    import megafold.viz as viz
    from megafold.train.predict import feature_labels

    cpu = {name: value.detach().cpu() for name, value in batch.items()}
    labels = feature_labels(cpu)
    atoms = cpu["atom_mask"][0] & cpu["atom_resolved"][0]
    keep = atoms[cpu["atom_mask"][0]].numpy()
    coords = cpu["atom_pos"][0][cpu["atom_mask"][0]].numpy()[keep]
    # Principal axes along x, y, z: 3Dmol looks down z, so the longest extent lies across the view.
    centred = coords - coords.mean(0)
    coords = centred @ np.linalg.svd(centred, full_matrices=False)[2].T
    structure = viz.atom_array(
        coords, labels.atom_name[keep], labels.res_name[keep], labels.chain_id[keep], labels.res_id[keep],
        labels.element[keep],
    )  # fmt: skip
    return viz.structure_view(structure, color="chain", width=width, height=height)


class Dashboard:
    """The profiling dashboard (see the module docstring). Keyword arguments override
    ``DashboardSettings.for_device()``; ``device`` picks the device."""

    def __init__(self, device: str | torch.device | None = None, **settings: Any):
        import ipywidgets as w

        import megafold.viz as viz

        viz.init_notebook()
        self.defaults = DashboardSettings.for_device(device, **settings)
        self.device = resolve_device(device)
        self.result: xr.Dataset | None = None
        self.figures: dict[str, Any] = {}  # the plotly figures drawn last
        self.input_view: Any = None  # the 3Dmol view of the profiled input
        self.runs = 0
        d = self.defaults
        base = preset(d.preset)
        interpreter_or_gpu = self.device.type == "cuda" or _interpreter_active()
        style = {"description_width": "initial"}
        self.preset = w.Dropdown(options=list(PRESETS), value=d.preset, description="preset", style=style)
        self.crop = w.BoundedIntText(value=d.crop, min=4, max=8192, step=8, description="crop", style=style,
                                     layout=w.Layout(width="150px"))  # fmt: skip
        self.dtype = w.Dropdown(options=["bf16", "fp32"], value=d.dtype or ("bf16" if base.bf16 else "fp32"),
                                description="dtype", style=style, layout=w.Layout(width="150px"))  # fmt: skip
        self.checkpoint = w.Checkbox(value=base.checkpoint if d.checkpoint is None else d.checkpoint,
                                     description="activation checkpointing", indent=False)  # fmt: skip
        self.backward = w.ToggleButtons(options=[("train step", True), ("forward only", False)], value=d.backward)
        self.kernels = {
            name: w.Checkbox(
                value=name in d.kernels and (name != "triton" or interpreter_or_gpu), description=text, indent=False,
                disabled=name == "triton" and not interpreter_or_gpu, layout=w.Layout(width="auto"),
            )
            for name, text in KERNEL_CHOICES.items()
        }  # fmt: skip
        self.quick = w.Checkbox(value=d.quick, description="one block per stack (quick)", indent=False)
        self.graphed_diffusion = w.Checkbox(
            value=d.graphed_diffusion, indent=False, layout=w.Layout(width="auto"),
            description="diffusion chunks as CUDA graphs (one DiffusionModule bar; off: modules inside, slower step)",
        )  # fmt: skip
        self.data = w.Dropdown(
            options=[(text, key) for key, text in DATA_CHOICES.items() if key != "store" or find_store()],
            value=d.data, description="data", style=style,
        )  # fmt: skip
        self.longest = w.Checkbox(value=d.longest, description="longest crop, up to", indent=False,
                                  layout=w.Layout(width="auto"))  # fmt: skip
        self.max_crop = w.BoundedIntText(value=d.max_crop, min=8, max=16384, step=128, layout=w.Layout(width="90px"))
        self.time_budget = w.BoundedFloatText(value=d.time_budget_s or 3600, min=1, max=3600,
                                              description="s for the whole run", style=style,
                                              layout=w.Layout(width="200px"))  # fmt: skip
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.run_button.on_click(lambda _: self.run())
        self.status = w.HTML(value="ready")
        self.save_path = w.Text(value="outputs/profile.zarr", layout=w.Layout(width="260px"))
        self.save_button = w.Button(description="Save results", icon="save", disabled=True)
        self.save_button.on_click(lambda _: self.save())
        out = {"width": "50%", "min_height": "120px"}
        self.outputs = {name: w.Output(layout=w.Layout(**out)) for name in ("modules", "step", "memory", "longest")}
        self.structure = w.Output(layout=w.Layout(width="440px"))
        self.table = w.Output(layout=w.Layout(width="auto", overflow="auto"))
        self.log = w.Output()
        header = w.HTML(
            "<h3 style='margin:4px 0'>megafold profiling dashboard</h3>"
            f"<i>{html.escape(describe_device(self.device))}</i>"
        )
        self.widget = w.VBox([
            header,
            w.HBox([self.preset, self.crop, self.dtype, self.data]),
            w.HBox([self.checkpoint, self.quick, self.backward]),
            self.graphed_diffusion,
            w.HBox([w.Label("kernels:"), *self.kernels.values()]),
            w.HBox([self.longest, self.max_crop, self.time_budget]),
            w.HBox([self.run_button, self.status]),
            w.HBox([self.outputs["modules"], self.outputs["step"]]),
            w.HBox([self.outputs["memory"], self.outputs["longest"]]),
            w.HBox([self.structure, self.table]),
            w.HBox([self.save_path, self.save_button]),
            self.log,
        ])  # fmt: skip

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def settings(self) -> DashboardSettings:
        """The settings the widgets show now."""
        return dataclasses.replace(
            self.defaults,
            preset=self.preset.value,
            crop=int(self.crop.value),
            kernels=tuple(name for name, box in self.kernels.items() if box.value),
            checkpoint=self.checkpoint.value,
            dtype=self.dtype.value,
            backward=self.backward.value,
            quick=self.quick.value,
            graphed_diffusion=self.graphed_diffusion.value,
            longest=self.longest.value,
            max_crop=int(self.max_crop.value),
            time_budget_s=float(self.time_budget.value),
            data=self.data.value,
        )

    def run(self) -> xr.Dataset | None:
        """Profile with the current settings, drawing as results arrive; returns the Dataset
        (also ``self.result``), or None if the run failed (the error is shown)."""
        settings = self.settings()
        if not settings.kernels:
            self._set_status("choose at least one kernels variant", error=True)
            return None
        self.run_button.disabled = True
        self.log.clear_output()
        began = time.perf_counter()
        try:
            self._show_input(settings)
            self.result = run_profile(settings, on_result=lambda _, ds: self.draw(ds), on_status=self._set_status)
        except Exception as error:
            self._set_status(f"failed: {type(error).__name__}: {error}", error=True)
            with self.log:
                traceback.print_exc()
            return None
        finally:
            self.run_button.disabled = False
        self.runs += 1
        self.save_button.disabled = False
        steps = ", ".join(
            f"{label} {float(ms):.0f} ms"
            for label, ms in zip(self.result.config.values, self.result.step_ms.mean("step").values)
        )  # fmt: skip
        self._set_status(f"<b>done</b> (run {self.runs}) in {time.perf_counter() - began:.1f} s: {steps}")
        return self.result

    def draw(self, ds: xr.Dataset) -> None:
        """Redraw every figure that ``ds`` has data for."""
        from IPython.display import HTML, display

        self.figures = plots.figures(ds)
        for name, figure in self.figures.items():
            figure.update_layout(height=420, margin={"l": 50, "r": 10, "t": 95, "b": 40})
            with self.outputs[name]:
                self.outputs[name].clear_output(wait=True)
                display(figure)
        with self.table:
            self.table.clear_output(wait=True)
            table = _summary_table(ds)
            caption = "<b>Exclusive time per module (ms per step)</b>"
            display(HTML(caption + table.to_html(float_format="{:.1f}".format)))

    def save(self) -> Path | None:
        from megafold.profile import save

        if self.result is None:
            return None
        path = save(self.result, self.save_path.value)
        self._set_status(f"saved to {html.escape(str(path))}")
        return path

    def _show_input(self, settings: DashboardSettings) -> None:
        from IPython.display import HTML, display

        device = torch.device("cpu")
        if settings.data == "store":
            batch = next(iter(_store_batches(settings.crop, device)))
        else:
            batch = synthetic_batch(settings.crop, atoms_per_token=settings.atoms_per_token, msa_rows=settings.msa_rows)
        view = self.input_view = example_view(batch)
        with self.structure:
            self.structure.clear_output(wait=True)
            display(HTML(f"<b>Profiled input</b> ({int(batch['token_mask'].sum())} tokens)"))
            display(HTML(view.html()))

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "inherit"
        self.status.value = f"<span style='color:{color}'>{text if not error else html.escape(text)}</span>"


def _summary_table(ds: xr.Dataset):
    """Time per module (ms) per config plus the step totals, for display."""
    from megafold.profile.profiler import summary

    ds = plots.as_comparison(ds)
    table = summary(ds)
    table.loc["step (all stages)"] = ds["step_ms"].mean("step").to_pandas()
    if "plain_step_ms" in ds:
        table.loc["plain step (no hooks)"] = ds["plain_step_ms"].to_pandas()
    return table


def _interpreter_active() -> bool:
    from megafold.kernels._common import interpreter_active

    return interpreter_active()

