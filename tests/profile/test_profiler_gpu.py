"""megafold.profile on a GPU: real sizes, bf16, CUDA events, a real out-of-memory, and the
dashboard's target ("paper" at crop 384, torch vs triton with their longest crops, in under
two minutes)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from megafold.model import preset
from megafold.profile import compare, longest_crop, profile_step, variants

pytestmark = pytest.mark.gpu


def test_paper_step_on_the_gpu():
    ds = profile_step(preset("paper"), crop=256, steps=1, warmup=1)
    assert ds.attrs["timing"].startswith("CUDA events") and torch.cuda.get_device_name() in ds.attrs["device"]
    time_ms, step_ms = ds["time_ms"], float(ds["step_ms"].mean())
    assert np.isfinite(time_ms).all() and float(time_ms.sum()) <= step_ms
    # "paper" checkpoints every pair block: their modules are recomputed in backward.
    assert float(time_ms.sel(module="TriangleAttention", phase="recompute")) > 0
    assert int(ds["calls"].sel(module="TriangleAttention", phase="forward")) == 2 * (48 + 4 + 2 + 4)
    weights_gib = ds.attrs["parameters"] * 4 / 2**30
    peaks = ds["stage_peak_mib"] / 1024
    assert float(peaks.sel(stage="optimizer")) >= 3.9 * weights_gib  # weights, grads, Adam moments
    assert float(peaks.max()) < ds.attrs["device_memory_mib"] / 1024


def test_torch_and_triton_compute_the_same_step():
    ds = compare(variants(preset("paper"), ("torch", "triton")), crop=128, warmup=0)
    losses = ds["loss"].sel(step=0).values
    assert np.isfinite(losses).all() and losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16
    for phase in ("forward", "backward"):
        assert (ds["time_ms"].sel(module="TriangleAttention", phase=phase) > 0).all()


def test_longest_crop_recovers_from_a_real_out_of_memory():
    device = torch.device("cuda", torch.cuda.current_device())  # set_per_process_memory_fraction wants an index
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, 6 * 2**30 / total)  # a ~6 GiB card: "small" runs out within a few steps
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        search = longest_crop(preset("small", checkpoint=False), start=256, step=256, max_crop=8192)
        assert search.attrs["stopped_by"] == "out of memory"
        assert search.attrs["longest_crop"] >= 256 and search["outcome"].values[-1] == "out of memory"
        # Everything of the failed step was freed: a new step at the longest crop runs.
        left = torch.cuda.memory_allocated(device)
        if left >= 2**28:  # say what holds it: live blocks per stream and pool
            held: dict[tuple, int] = {}
            for segment in torch.cuda.memory_snapshot():
                key = (segment.get("stream"), str(segment.get("segment_pool_id")))
                live = sum(b["size"] for b in segment["blocks"] if b["state"] == "active_allocated")
                held[key] = held.get(key, 0) + live
            print("allocated after the search (stream, pool) -> MiB:",
                  {k: round(v / 2**20, 1) for k, v in held.items() if v})  # fmt: skip
        assert left < 2**28
        again = profile_step(preset("small", checkpoint=False), crop=int(search.attrs["longest_crop"]), warmup=0)
        assert np.isfinite(again["step_ms"]).all()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_profiler_overhead_is_measured_on_the_paper_step():
    """The profiled "paper" step at crop 384 on a GPU, with its plain step of the same run as
    the baseline: every profiled step is timed, thousands of switches are counted, and
    ``overhead_ms`` is the mean profiled step minus the plain one.

    No bound on the overhead itself: it is a speed figure of the host, and the brief puts those
    in benchmarks (``benchmarks/profiler_overhead.py`` records it over alternating plain and
    profiled runs). This test prints it; ``benchmarks/dashboard_screenshot.py --overhead``'s
    ``overhead_frac`` is not the same figure (its plain step checkpoints reentrantly, so it
    also holds the checkpoint mode's cost). A 25% bound here failed on slow hosts in sessions
    13, 16 and 25 (+27% and +29% in the first two: the hooks' host time grows faster than the
    step's own) and passed on others (+17-20%). One event and one allocator read per switch,
    the cost that matters, is asserted by count on the CPU
    (``test_profile_reports_its_own_overhead``).

    Both steps run in the traced mode (non-reentrant checkpoints and eager diffusion chunks,
    which the traced step needs for its backward hooks; a plain step otherwise checkpoints
    reentrantly and replays the chunks' CUDA graphs, 2.4x faster on "paper" on an H200), so
    the difference is the hooks alone."""
    from megafold.model.primitives import nonreentrant_checkpoints

    with nonreentrant_checkpoints():
        ds = profile_step(preset("paper", kernels="triton"), crop=384, warmup=1, steps=3)
    plain, steps = float(ds["plain_step_ms"]), ds["step_ms"].values
    print(f"paper, crop 384, triton: plain {plain:.0f} ms, profiled {steps.round()} ms "
          f"(fastest {steps.min() / plain - 1:+.1%}), {int(ds['switches'])} switches")  # fmt: skip
    assert np.isfinite(steps).all() and np.isfinite(plain) and plain > 0
    assert int(ds["switches"]) > 1000
    assert float(ds["overhead_ms"]) == pytest.approx(float(steps.mean()) - plain)


@pytest.mark.slow
def test_dashboard_target_paper_at_384_within_two_minutes():
    from megafold.profile.widgets import DashboardSettings, run_profile

    began = time.perf_counter()
    ds = run_profile(DashboardSettings.for_device("cuda"))
    seconds = time.perf_counter() - began
    assert list(ds.config.values) == ["torch", "triton"]
    summary = {
        str(c): (int(ds["longest_crop"].sel(config=c)), str(ds["longest_stopped_by"].sel(config=c).values),
                 int(ds["longest_predicted"].sel(config=c)))
        for c in ds.config.values
    }  # fmt: skip
    print(f"dashboard run: {seconds:.1f} s; longest crops (verified, grounds, predicted) {summary}")
    assert seconds < 120
    # Each search verified a crop beyond the profiled one with a real step.
    assert (ds["longest_crop"] > 384).all()
    # "max_crop": the dashboard's cap (2048), which an H200's 141 GB lets triton's search reach
    # (session 27, with the profiled steps' diffusion chunks graphed).
    assert set(ds["longest_stopped_by"].values) <= {"out of memory", "memory (predicted)", "time budget", "max_crop"}
    if torch.cuda.get_device_properties(0).total_memory < 100 * 2**30:
        # On an 80 GB card both searches verify the crop their memory fit predicts (torch's with
        # the cubic first jump: H100, 640 then 768; triton 1152 then 1536).
        assert (ds["longest_crop"] == ds["longest_predicted"]).all(), summary


def test_tune_kernels_tunes_a_step_after_compiling_its_candidates(tmp_path, monkeypatch):
    """A fresh tuning cache: every key of a "tiny" step at crop 64 is tuned (its candidates
    compiled in worker processes first), and the step with tuning off finds a choice for each.
    Each key keeps its first 3 candidates: all of them (66 keys, forced) took more than 200 s
    on a cold Triton cache on an H200 (session 29), 38 s on a warm one."""
    from megafold.kernels import _common
    from megafold.profile import tune_kernels

    pick_config = _common.pick_config
    monkeypatch.setattr(_common, "pick_config", lambda op, key, device, candidates, *args, **kwargs:
                        pick_config(op, key, device, list(candidates)[:3], *args, **kwargs))
    monkeypatch.setenv("MEGAFOLD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MEGAFOLD_AUTOTUNE", "force")  # the shipped choices would leave nothing to tune
    monkeypatch.setattr(_common, "_memory_cache", {})
    result = tune_kernels(preset("tiny"), crop=64, msa_rows=16)  # a worker a CPU, at most 16
    print(f"tune_kernels: {result['phases']}, {len(result['tuned'])} keys tuned")
    assert result["precompile"]["compiled"] > 0 and result["tuned"] and result["untuned"] == []
    assert all(row["chosen"] is not None and row["ran"] >= 1 for row in result["tuned"])
    assert all(row["candidates"] <= 3 for row in result["tuned"])
    assert (tmp_path / "autotune.json").is_file()


def test_tune_kernels_forced_for_selected_ops(tmp_path, monkeypatch):
    """``force=True, ops=[...]``: only the selected ops' keys are timed again, and the step with
    tuning off finds a choice for every key (the others' shipped choices or defaults)."""
    from megafold.kernels import _common
    from megafold.profile import tune_kernels

    monkeypatch.setenv("MEGAFOLD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_common, "_memory_cache", {})
    result = tune_kernels(preset("tiny"), crop=64, msa_rows=16, force=True, ops="triangle_multiply_out_fwd")
    print(f"tune_kernels, forced out_fwd: {result['phases']}, {len(result['tuned'])} keys tuned")
    assert result["tuned"] and all(row["op"] == "triangle_multiply_out_fwd" for row in result["tuned"])
    assert all(row["chosen"] is not None for row in result["tuned"])
