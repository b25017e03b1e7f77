"""Plotly figures of profiles: what each shows, for one profile and for a comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megafold.profile import MODULES, STAGES, combine, longest_crop, plots, profile_step

SMALL = {"msa_rows": 4, "atoms_per_token": 4}


@pytest.fixture(scope="module")
def profiles():
    torch.set_num_threads(1)
    from megafold.model import preset
    from megafold.profile.widgets import QUICK_OVERRIDES

    config = preset("tiny", kernels="torch", **QUICK_OVERRIDES)
    results = {
        "torch": profile_step(config, crop=8, warmup=0, label="torch", **SMALL),
        "checkpointed": profile_step(config.replace(checkpoint=True), crop=8, warmup=0, label="checkpointed", **SMALL),
    }
    searches = {label: longest_crop(config, start=8, step=8, max_crop=16, label=label, **SMALL) for label in results}
    return combine(results, searches), searches


@pytest.fixture
def comparison(profiles):
    return profiles[0]


def _without_search(ds):
    return ds.drop_vars([name for name in ds.data_vars if name.startswith(("crop_", "longest_"))])


def test_module_time_figure_stacks_af3_modules_per_config_and_phase(comparison):
    fig = plots.module_time_figure(comparison)
    names = [trace.name for trace in fig.data]
    assert names and set(names) <= set(MODULES)
    assert "TriangleAttention" in names
    x_configs, x_phases = fig.data[0].x
    assert set(x_configs) == {"torch", "checkpointed"}
    assert set(x_phases) == {"forward", "backward", "recompute"}  # the checkpointed run recomputes
    total = sum(np.nansum(trace.y) for trace in fig.data)
    assert total == pytest.approx(float(comparison["time_ms"].sum()))


def test_step_figure_shows_stages_speedup_and_the_profilers_overhead(comparison):
    fig = plots.step_figure(comparison, baseline="torch")
    stage_traces = [t for t in fig.data if t.xaxis == "x" and t.type == "bar"]
    assert [t.name for t in stage_traces] == list(STAGES)
    texts = [a.text for a in fig.layout.annotations if "x<br>" in a.text]
    assert len(texts) == 2 and texts[0].startswith("1.00x")
    plain = next(t for t in fig.data if t.name == "plain step (no hooks)")
    assert list(plain.y) == pytest.approx(comparison["plain_step_ms"].values.tolist())
    assert "profiler" not in texts[0]  # without a warmup the plain step carries the first step's one-off costs
    warm = plots.step_figure(comparison.assign_attrs(warmup=1), baseline="torch")
    texts = [a.text for a in warm.layout.annotations if "x<br>" in a.text]
    overhead = float(comparison["step_ms"].sel(config="torch").mean() / comparison["plain_step_ms"].sel(config="torch"))
    assert f"profiler {overhead - 1:+.0%}" in texts[0]
    titles = [a.text for a in fig.layout.annotations]
    assert "Step time (speedup vs torch)" in titles
    # Without a plain step the bars are profiled steps, and the title says so.
    profiled_only = plots.step_figure(comparison.drop_vars("plain_step_ms"), baseline="torch")
    assert "Profiled step time (speedup vs torch)" in [a.text for a in profiled_only.layout.annotations]
    assert not any(t.name == "plain step (no hooks)" for t in profiled_only.data)


def test_memory_timeline_has_one_line_per_config(comparison):
    fig = plots.memory_timeline_figure(comparison)
    assert [t.name for t in fig.data] == ["torch", "checkpointed"]
    for trace, config in zip(fig.data, ("torch", "checkpointed")):
        peaks = comparison["timeline_peak_mib"].sel(config=config).values
        assert max(trace.y) == pytest.approx(np.nanmax(peaks))


def test_memory_timeline_is_thinned_keeping_peaks(comparison, monkeypatch):
    monkeypatch.setattr(plots, "MAX_TIMELINE_POINTS", 10)
    fig = plots.memory_timeline_figure(comparison.sel(config=["torch"]))
    assert len(fig.data[0].y) == 11
    assert max(fig.data[0].y) == pytest.approx(float(comparison["timeline_peak_mib"].sel(config="torch").max()))


def test_longest_crop_figure(profiles):
    comparison, searches = profiles
    fig = plots.longest_crop_figure(comparison)
    assert [t.name for t in fig.data] == [f"{c}: longest 16 (max_crop reached)" for c in ("torch", "checkpointed")]
    assert list(fig.data[0].x) == [8, 16]
    single = plots.longest_crop_figure(searches["torch"])  # one search, without a comparison
    assert [t.name for t in single.data] == ["torch: longest 16 (max_crop reached)"]
    assert list(single.data[0].y) == list(searches["torch"]["peak_mib"].values)


def test_longest_crop_figure_shows_the_fit_and_an_unverified_prediction(profiles):
    comparison, _ = profiles
    torch_only = comparison.sel(config=["torch"])
    peaks = torch_only["crop_peak_mib"].values[0]
    fit = np.array([peaks[0] - 4.0, 0.0, 4.0 / 64, 0.0])  # through the crop-8 peak, growing as N^2
    unverified = torch_only.assign(
        longest_crop=("config", [8]), longest_stopped_by=("config", ["time budget"]),
        longest_predicted=("config", [24]), longest_fit_mib=(("config", "power"), fit[None]),
    )  # fmt: skip
    fig = plots.longest_crop_figure(unverified)
    names = [t.name for t in fig.data]
    assert names[0] == "torch: longest 8 (verified; ~24 predicted, not verified in the time budget)"
    assert "torch: fitted peak" in names and "torch: predicted 24 (not verified)" in names
    circle = fig.data[names.index("torch: predicted 24 (not verified)")]
    assert list(circle.x) == [24] and circle.y[0] == pytest.approx(peaks[0] - 4.0 + 4.0 / 64 * 24**2)
    # A prediction that a step then refuted (it ran out of memory there) is the x, not a circle.
    fits, outcome = torch_only["crop_fits"].values.copy(), torch_only["crop_outcome"].values.astype(object)
    crops = list(torch_only[plots.SEARCH_DIM].values)
    fits[0, crops.index(16)], outcome[0, crops.index(16)] = False, "out of memory"
    refuted = unverified.assign(
        crop_fits=(torch_only["crop_fits"].dims, fits), crop_outcome=(torch_only["crop_outcome"].dims, outcome.astype(str)),
        longest_stopped_by=("config", ["out of memory"]), longest_predicted=("config", [16]),
    )  # fmt: skip
    names = [t.name for t in plots.longest_crop_figure(refuted).data]
    assert "torch: does not fit" in names and not any("predicted" in name for name in names), names
    with pytest.raises(ValueError, match="longest_crop"):
        plots.longest_crop_figure(_without_search(comparison))


def test_figures_of_a_single_profile(comparison):
    one = _without_search(comparison).sel(config="torch")
    figures = plots.figures(one.drop_vars("config"))
    assert set(figures) == {"modules", "memory", "step"}
    assert set(plots.figures(comparison)) == {"modules", "memory", "step", "longest"}


def test_titles_say_when_kernel_shapes_ran_untuned(comparison):
    one = _without_search(comparison).sel(config="torch").drop_vars("config")
    assert "untuned" not in plots.module_time_figure(one).layout.title.text
    one.attrs["untuned_kernel_keys"] = 3
    title = plots.module_time_figure(one).layout.title.text
    assert "3 kernel shapes ran untuned (megafold tune, or MEGAFOLD_AUTOTUNE=1, tunes them)" in title
