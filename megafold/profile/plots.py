"""Plotly figures of profiles (``megafold.profile.profile_step`` / ``compare`` Datasets).

Every function takes a single profile or a comparison (a ``config`` dimension) and returns a
``plotly.graph_objects.Figure``; ``figures(ds)`` gives all that apply. In a notebook, call
``megafold.viz.init_notebook()`` once so they render offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from megafold.profile.profiler import MODULES, OTHER, PHASES, SEARCH_DIM, STAGES, combine

if TYPE_CHECKING:
    import plotly.graph_objects as go
    import xarray as xr

# One colour per module, stable across figures; "(other)" in grey.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5",
)  # fmt: skip
MODULE_COLORS = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(m for m in MODULES if m != OTHER)}
MODULE_COLORS[OTHER] = "#9e9e9e"
STAGE_COLORS = {"data": "#8c564b", "forward": "#1f77b4", "backward": "#ff7f0e", "optimizer": "#2ca02c"}
# A memory timeline with more samples than this is thinned (keeping each window's peak).
MAX_TIMELINE_POINTS = 4000


def as_comparison(ds: xr.Dataset) -> xr.Dataset:
    """A single profile as a comparison of one config (its label)."""
    if "config" in ds.dims:
        return ds
    return ds.expand_dims(config=[str(ds.attrs.get("label", "profile"))])


def _title(text: str, ds: xr.Dataset, with_crop: bool = True) -> str:
    """``text`` over a line naming the crop and the device."""
    details = []
    if with_crop and "crop" in ds.coords and ds["crop"].ndim <= 1:
        details.append("crop " + "/".join(str(c) for c in dict.fromkeys(np.ravel(ds["crop"].values).tolist())))
    if ds.attrs.get("device"):
        details.append(str(ds.attrs["device"]))
    untuned = ds.attrs.get("untuned_kernel_keys", 0)
    if untuned:
        details.append(f"{untuned} kernel shapes ran untuned (megafold tune, or MEGAFOLD_AUTOTUNE=1, tunes them)")
    return f"{text}<br><sup>{', '.join(details)}</sup>" if details else text


def module_time_figure(ds: xr.Dataset) -> go.Figure:
    """Stacked bars of exclusive time per AF3 module (ms per step), one bar per config and
    phase (forward, backward, recompute); phases without time are left out."""
    import plotly.graph_objects as go

    ds = as_comparison(ds)
    time_ms = ds["time_ms"].fillna(0.0)
    phases = [p for p in PHASES if float(time_ms.sel(phase=p).sum()) > 0] or ["forward"]
    configs = [str(c) for c in ds.config.values]
    x = [[c for c in configs for _ in phases], [p for _ in configs for p in phases]]
    fig = go.Figure()
    for module in ds.module.values:
        values = time_ms.sel(module=module, phase=phases).transpose("config", "phase").values.ravel()
        if not np.any(values > 0):
            continue
        fig.add_trace(
            go.Bar(
                x=x, y=values, name=str(module), marker_color=MODULE_COLORS.get(str(module), "#444"),
                hovertemplate=f"{module}<br>%{{x}}: %{{y:.2f}} ms<extra></extra>",
            )
        )  # fmt: skip
    fig.update_layout(
        barmode="stack", title=_title("Time per AF3 module (exclusive, ms per step)", ds),
        yaxis_title="ms", height=480, legend={"traceorder": "normal"}, plot_bgcolor="white",
    )  # fmt: skip
    fig.update_yaxes(gridcolor="#e5e5e5")
    return fig


def _thin(ends: np.ndarray, peaks: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most MAX_TIMELINE_POINTS samples: each window keeps its highest one."""
    if len(ends) <= MAX_TIMELINE_POINTS:
        return ends, peaks, labels
    windows = np.array_split(np.arange(len(ends)), MAX_TIMELINE_POINTS)
    keep = np.array([w[np.argmax(peaks[w])] for w in windows])
    return ends[keep], peaks[keep], labels[keep]


def memory_timeline_figure(ds: xr.Dataset) -> go.Figure:
    """Memory over one step, one line per config: the peak of each timeline segment (MiB)
    against the time the segment ends (ms); hover names the module and phase."""
    import plotly.graph_objects as go

    ds = as_comparison(ds)
    fig = go.Figure()
    for config in ds.config.values:
        one = ds.sel(config=config)
        valid = np.isfinite(one["timeline_ms"].values)
        ends = one["timeline_ms"].values[valid]
        peaks = one["timeline_peak_mib"].values[valid]
        labels = np.char.add(
            np.char.add(one["timeline_module"].values[valid].astype(str), " / "),
            one["timeline_phase"].values[valid].astype(str),
        )
        ends, peaks, labels = _thin(ends, peaks, labels)
        fig.add_trace(
            go.Scatter(
                x=np.r_[0.0, ends], y=np.r_[peaks[:1], peaks], mode="lines", line_shape="vh", name=str(config),
                text=np.r_[labels[:1], labels],
                hovertemplate="%{text}<br>%{x:.1f} ms: %{y:.1f} MiB<extra>" + str(config) + "</extra>",
            )
        )  # fmt: skip
    fig.update_layout(
        title=_title("Memory during one step (peak of each segment)", ds),
        xaxis_title="time since the step began (ms)", yaxis_title="MiB", height=420, plot_bgcolor="white",
    )  # fmt: skip
    fig.update_yaxes(gridcolor="#e5e5e5", rangemode="tozero")
    return fig


def step_figure(ds: xr.Dataset, baseline: str | None = None) -> go.Figure:
    """Step time by stage (stacked, with the speedup over ``baseline``, default "torch" when
    present, and the time of a plain step without the profiler's hooks: its overhead) and peak
    memory by stage, one bar per config."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ds = as_comparison(ds)
    configs = [str(c) for c in ds.config.values]
    if baseline is None:
        baseline = "torch" if "torch" in configs else configs[0]
    stage_ms = ds["stage_ms"].mean("step")
    step_ms = ds["step_ms"].mean("step")
    base_ms = float(step_ms.sel(config=baseline)) if baseline in configs else float("nan")
    plain_ms = ds["plain_step_ms"] if "plain_step_ms" in ds else None
    measured_plain = plain_ms is not None and bool(np.isfinite(plain_ms.values).any())
    # Without a plain step the bars are profiled steps only: module hooks and non-reentrant
    # checkpoints (the traced step's). On a "paper" step at crop 384 (H200) that was ~30% over
    # the training step with graphed_diffusion, 2.5x without (eager diffusion chunks).
    step_title = f"{'Step' if measured_plain else 'Profiled step'} time (speedup vs {baseline})"
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(step_title, "Peak memory (MiB)"),
    )  # fmt: skip
    for stage in STAGES:
        fig.add_trace(
            go.Bar(
                x=configs, y=stage_ms.sel(stage=stage).values, name=stage, legendgroup=stage,
                marker_color=STAGE_COLORS[stage], hovertemplate=f"{stage}: %{{y:.1f}} ms<extra>%{{x}}</extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
        # One bar per (config, stage) category: side by side although the layout stacks.
        fig.add_trace(
            go.Bar(
                x=[configs, [stage] * len(configs)], y=ds["stage_peak_mib"].sel(stage=stage).values,
                name=stage, legendgroup=stage, showlegend=False, marker_color=STAGE_COLORS[stage],
                hovertemplate=f"{stage}: %{{y:.0f}} MiB<extra></extra>",
            ),
            row=1, col=2,
        )  # fmt: skip
    if measured_plain:
        fig.add_trace(
            go.Scatter(
                x=configs, y=plain_ms.values, mode="markers", name="plain step (no hooks)",
                marker={"symbol": "line-ew", "size": 36, "color": "black", "line": {"width": 3, "color": "black"}},
                hovertemplate="plain step: %{y:.1f} ms<extra>%{x}</extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
    for config in configs:
        total = float(step_ms.sel(config=config))
        data_share = float(stage_ms.sel(config=config, stage="data")) / total if total > 0 else float("nan")
        text = f"{base_ms / total:.2f}x<br>data {data_share:.1%}"
        plain = float(plain_ms.sel(config=config)) if plain_ms is not None else float("nan")
        if np.isfinite(plain) and plain > 0 and ds.attrs.get("warmup", 1) >= 1:  # else it carries one-off costs
            text += f"<br>profiler {total / plain - 1:+.0%}"
        fig.add_annotation(x=config, y=total, text=text, showarrow=False, yshift=26, row=1, col=1)
    fig.update_layout(
        barmode="stack", title=_title("Training step by stage", ds), height=440, plot_bgcolor="white",
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
    )  # fmt: skip
    fig.update_yaxes(title_text="ms", gridcolor="#e5e5e5", row=1, col=1)
    fig.update_yaxes(title_text="MiB", gridcolor="#e5e5e5", row=1, col=2)
    return fig


def longest_crop_figure(ds: xr.Dataset) -> go.Figure:
    """Peak memory against crop size for each config: the crops a step was measured at (filled;
    an x where it did not fit), the fitted peak the search predicted from (dotted), and the
    predicted longest crop where no step was measured there (open circle). The legend gives each
    config's longest crop and what it rests on. Takes a ``longest_crop`` Dataset or a
    comparison made with ``longest=True``."""
    import plotly.graph_objects as go

    if "fits" in ds and "crop" in ds["fits"].dims:  # one longest_crop() search
        ds = combine({}, {str(ds.attrs.get("label", "search")): ds})
    if "crop_peak_mib" not in ds:
        raise ValueError("longest_crop_figure needs a longest_crop() result or compare(..., longest=True)")
    fig = go.Figure()
    for index, config in enumerate(ds.config.values):
        color = _PALETTE[index % len(_PALETTE)]
        one = ds.sel(config=config)
        crops = one[SEARCH_DIM].values
        tried = one["crop_outcome"].values.astype(str) != ""
        fits = one["crop_fits"].values.astype(bool)
        peak = one["crop_peak_mib"].values
        longest = int(one["longest_crop"].values)
        predicted = int(one["longest_predicted"].values) if "longest_predicted" in one else 0
        fig.add_trace(
            go.Scatter(
                x=crops[fits], y=peak[fits], mode="lines+markers", name=f"{config}: {_longest_text(one)}",
                line={"color": color}, hovertemplate="crop %{x}: %{y:.0f} MiB<extra>" + str(config) + "</extra>",
            )
        )  # fmt: skip
        failed = tried & ~fits
        if failed.any():
            fig.add_trace(
                go.Scatter(
                    x=crops[failed], y=np.where(np.isfinite(peak[failed]), peak[failed], 0.0),
                    mode="markers", marker={"symbol": "x", "size": 12, "color": color},
                    name=f"{config}: does not fit", text=one["crop_outcome"].values[failed],
                    hovertemplate="crop %{x}: %{text}<extra></extra>",
                )
            )  # fmt: skip
        fit = one["longest_fit_mib"].values if "longest_fit_mib" in one else np.full(4, np.nan)
        if np.isfinite(fit).all() and tried.any():
            right = max([longest, predicted, *crops[tried].tolist()]) * 1.1
            grid = np.linspace(0.0, right, 60)
            fig.add_trace(
                go.Scatter(
                    x=grid, y=np.polyval(fit[::-1], grid), mode="lines", line={"dash": "dot", "color": color},
                    name=f"{config}: fitted peak", hoverinfo="skip",
                )
            )  # fmt: skip
            if predicted > longest and predicted not in crops[tried]:  # a measured crop shows its outcome
                fig.add_trace(
                    go.Scatter(
                        x=[predicted], y=[np.polyval(fit[::-1], predicted)], mode="markers",
                        marker={"symbol": "circle-open", "size": 14, "color": color, "line": {"width": 2}},
                        name=f"{config}: predicted {predicted} (not verified)",
                        hovertemplate="crop %{x}: %{y:.0f} MiB predicted<extra></extra>",
                    )
                )  # fmt: skip
    total = ds.attrs.get("device_memory_mib")
    if isinstance(total, (int, float)) and total > 0:
        fig.add_hline(y=total, line={"dash": "dot", "color": "black"}, annotation_text="device memory")
    budgets = ds["longest_budget_mib"].values if "longest_budget_mib" in ds else []
    for budget in sorted({float(b) for b in np.ravel(budgets) if np.isfinite(b)}):
        fig.add_hline(y=budget, line={"dash": "dash", "color": "#d62728"}, annotation_text="memory budget")
    if not len(budgets) or not np.isfinite(budgets).any():
        limits = ds["longest_limit_mib"].values if "longest_limit_mib" in ds else []
        for limit in sorted({float(b) for b in np.ravel(limits) if np.isfinite(b)}):
            fig.add_hline(y=limit, line={"dash": "dash", "color": "#7f7f7f"}, annotation_text="search limit",
                          annotation_position="bottom right")  # fmt: skip
    fig.update_layout(
        title=_title("Longest crop that fits", ds, with_crop=False),
        xaxis_title="crop (tokens)", yaxis_title="peak MiB", height=420, plot_bgcolor="white",
    )  # fmt: skip
    fig.update_yaxes(gridcolor="#e5e5e5", rangemode="tozero")
    return fig


# What a search's longest crop rests on, by its stopped_by.
_GROUNDS = {
    "out of memory": "measured: the next crop ran out of memory",
    "memory budget": "measured: the next crop was over budget",
    "max_crop": "max_crop reached",
    "memory (predicted)": "verified; the next crop is predicted not to fit",
    "time budget": "verified; time budget",
}


def _longest_text(one: xr.Dataset) -> str:
    """``longest N (grounds)`` for one config of a comparison with a search."""
    longest = int(one["longest_crop"].values)
    stopped_by = str(one["longest_stopped_by"].values)
    predicted = int(one["longest_predicted"].values) if "longest_predicted" in one else 0
    grounds = _GROUNDS.get(stopped_by, stopped_by)
    if stopped_by == "time budget" and predicted > longest:
        grounds = f"verified; ~{predicted} predicted, not verified in the time budget"
    return f"longest {longest} ({grounds})"


def figures(ds: xr.Dataset) -> dict[str, go.Figure]:
    """Every figure that applies to ``ds``: modules, memory, step and (with a search) longest."""
    out = {"modules": module_time_figure(ds), "memory": memory_timeline_figure(ds), "step": step_figure(ds)}
    if "crop_peak_mib" in ds:
        out["longest"] = longest_crop_figure(ds)
    return out
