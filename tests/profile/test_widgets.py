"""The profiling dashboard without a browser: settings from the widgets, a run, errors."""

from __future__ import annotations

import re

from megafold.profile import load
from megafold.profile.widgets import (
    QUICK_OVERRIDES,
    Dashboard,
    DashboardSettings,
    _summary_table,
    example_view,
    run_profile,
)


def test_settings_by_device():
    gpu = DashboardSettings.for_device("cuda")
    assert (gpu.preset, gpu.crop, gpu.quick, gpu.longest) == ("paper", 384, False, True)
    cpu = DashboardSettings.for_device("cpu")
    assert (cpu.preset, cpu.quick, cpu.warmup) == ("tiny", True, 0)


def test_settings_build_the_config():
    settings = DashboardSettings(preset="paper", crop=384, checkpoint=False, dtype="fp32")
    config = settings.config()
    assert (config.checkpoint, config.bf16, config.pair_bf16_checkpoint) == (False, False, False)
    assert config.pairformer_blocks == 48 and config.c_z == 128
    quick = DashboardSettings(preset="tiny", crop=8, quick=True, dtype="bf16", checkpoint=True).config()
    assert quick.pair_bf16_checkpoint and quick.bf16
    assert all(getattr(quick, name) == value for name, value in QUICK_OVERRIDES.items())
    both = DashboardSettings(preset="tiny", crop=8, kernels=("torch", "compile")).variants()
    assert list(both) == ["torch", "compile"] and both["compile"].compile is True


def test_dashboard_runs_and_redraws(tmp_path):
    dash = Dashboard(device="cpu", kernels=("torch",), crop=8)
    assert dash.settings().kernels == ("torch",)
    dash.crop.value = 12
    dash.checkpoint.value = True
    dash.longest.value = True
    dash.max_crop.value = 24
    settings = dash.settings()
    assert (settings.crop, settings.checkpoint, settings.longest, settings.max_crop) == (12, True, True, 24)
    assert settings.graphed_diffusion is True  # the default: the chunks keep their CUDA graphs
    dash.graphed_diffusion.value = False
    assert dash.settings().graphed_diffusion is False
    result = dash.run()
    assert "done" in dash.status.value and "(run 1)" in dash.status.value
    assert list(result.config.values) == ["torch"] and int(result["crop"].values[0]) == 12
    assert float(result["time_ms"].sel(phase="recompute").sum()) > 0  # checkpointing was on
    assert list(result.search_crop.values) == [12, 24]  # the CPU search steps by the crop
    assert list(result["crop"].values) == [12]  # the profiled crop, per config
    assert set(dash.figures) == {"modules", "step", "memory", "longest"}
    table = _summary_table(result)
    assert table.loc["plain step (no hooks)", "torch"] == float(result["plain_step_ms"].sel(config="torch"))
    assert "3Dmol" in dash.input_view.html()
    dash.save_path.value = str(tmp_path / "dash.zarr")
    assert load(dash.save()).sizes["config"] == 1


def test_dashboard_reports_errors_instead_of_raising():
    dash = Dashboard(device="cpu", crop=8)
    for box in dash.kernels.values():
        box.value = False
    assert dash.run() is None and "at least one" in dash.status.value
    dash.kernels["torch"].value = True
    dash.crop.value = 4
    dash.data.value = "synthetic"
    dash.defaults = dash.defaults.__class__(**{**dash.defaults.__dict__, "atoms_per_token": 99})
    assert dash.run() is None
    assert "failed" in dash.status.value and "atoms_per_token" in dash.status.value


def test_run_profile_reports_progress():
    statuses, results = [], []
    settings = DashboardSettings.for_device("cpu", kernels=("torch",), longest=True, max_crop=16)
    ds = run_profile(settings, on_result=lambda label, partial: results.append(label), on_status=statuses.append)
    assert statuses[0] == "profiling torch (1/1) at crop 8"
    assert re.fullmatch(r"longest crop of torch \(1/1\), up to 16 within \d+ s", statuses[1])
    assert results == ["torch", "torch"]
    assert int(ds["longest_crop"].sel(config="torch")) == 16
    assert ds["crop_source"].sel(config="torch").values.tolist() == ["known", "search"]  # seeded by the profile


def test_run_profile_keeps_to_its_time_budget():
    """A budget the profile alone uses up leaves the search no step: the answer is the
    profiled crop, and says the time budget ended it."""
    settings = DashboardSettings.for_device("cpu", kernels=("torch",), longest=True, max_crop=16, time_budget_s=0.1)
    ds = run_profile(settings)
    assert int(ds["longest_crop"].sel(config="torch")) == 8
    assert str(ds["longest_stopped_by"].sel(config="torch").values) == "time budget"
    assert ds["crop_source"].sel(config="torch").values.tolist() == ["known"]


def test_example_view_of_a_feature_batch():
    from megafold.model import synthetic_batch

    view = example_view(synthetic_batch(10, atoms_per_token=5))
    assert "3Dmol" in view.html() and "chain A" in view.legend_html


def test_run_profile_passes_the_diffusion_graph_setting(monkeypatch):
    import megafold.profile.widgets as widgets

    seen = []
    real = widgets.profile_step

    def spy(*args, **kwargs):
        seen.append(kwargs["graphed_diffusion"])
        return real(*args, **kwargs)

    monkeypatch.setattr(widgets, "profile_step", spy)
    for graphed in (True, False):
        settings = DashboardSettings.for_device("cpu", kernels=("torch",), longest=False, graphed_diffusion=graphed)
        run_profile(settings)
    assert seen == [True, False]
