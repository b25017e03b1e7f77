"""megafold.profile on the CPU: attribution, sums, AF3 names, memory, longest crop, compare,
and the zarr round trip."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import megafold.profile.profiler as profiler
from megafold.errors import ConfigError
from megafold.model import preset
from megafold.profile import (
    MODULES,
    PHASES,
    STAGES,
    Variant,
    compare,
    load,
    longest_crop,
    profile_step,
    save,
    summary,
    variants,
)

SMALL = {"msa_rows": 4, "atoms_per_token": 4}


# --------------------------------------------------------------------------- attribution


class _Sleep(torch.autograd.Function):
    """Doubles its input, sleeping ``forward_s`` in forward and ``backward_s`` in backward."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad * 2, None, None


class TriangleAttention(nn.Module):  # named as the AF3 module the profiler watches
    def forward(self, x):
        return _Sleep.apply(x, 0.10, 0.15)


class PairformerStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.attention = TriangleAttention()

    def forward(self, x):
        return self.attention(_Sleep.apply(x * self.weight, 0.02, 0.02))


class _ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pairformer = PairformerStack()

    def training_loss(self, batch, n_cycles=None):
        return self.pairformer(batch["x"]).sum(), {}


def test_time_is_exclusive_per_module_in_forward_and_backward(quick_config):
    """The outer module's time excludes the inner one's; backward time goes to the module whose
    forward op created the autograd node; totals add up to the step."""
    with profiler._Session(Variant(quick_config), torch.device("cpu"), backward=True, n_cycles=1, seed=0) as session:
        session.model = model = _ToyModel()
        session.optimizer = torch.optim.Adam(session.model.parameters())
        tracer = profiler._Tracer(session.model, traced=True)
        batches = iter([{"x": torch.randn(4)}])
        record = session.step(batches, tracer)
        tracer.detach()
    tables = profiler._step_tables(record)
    index = {name: i for i, name in enumerate(MODULES)}
    forward, backward = PHASES.index("forward"), PHASES.index("backward")
    ms = tables["time_ms"]
    inner, outer = index["TriangleAttention"], index["PairformerStack"]
    assert ms[inner, forward] >= 100 and ms[outer, forward] >= 20
    assert ms[outer, forward] < 100, "the outer module must not include the inner one's time"
    assert ms[inner, backward] >= 150 and ms[outer, backward] >= 20
    assert ms[outer, backward] < 150
    assert tables["calls"][inner, forward] == 1 and tables["calls"][outer, forward] == 1
    # The part is the outermost module: it holds both.
    part = profiler.PARTS.index("PairformerStack")
    assert tables["part_time_ms"][part, forward] == pytest.approx(ms[inner, forward] + ms[outer, forward])
    # Every segment of forward and backward belongs to a module or "(other)": nothing is lost.
    stage = dict(zip(STAGES, tables["stage_ms"]))
    assert ms[:, forward].sum() == pytest.approx(stage["forward"])
    assert ms[:, 1:].sum() == pytest.approx(stage["backward"])
    # The hooks are gone afterwards.
    assert not model.pairformer._forward_pre_hooks and not model.pairformer._forward_hooks


def test_sequence_number_is_the_next_nodes():
    x = torch.randn(3, requires_grad=True)
    expected = profiler._next_sequence_nr()
    assert (x * 2).grad_fn._sequence_nr() == expected
    assert profiler._next_sequence_nr() == expected + 1  # reading it creates no node


def test_profile_reports_its_own_overhead(quick_config, monkeypatch):
    """A plain step of the same run is the baseline: a memory read made ~10 ms slower costs
    that much per switch of the profiled step, and overhead_ms says so."""
    sample, slept = profiler._Memory.sample, []

    def slow_sample(self):
        began = time.perf_counter()
        time.sleep(0.01)
        slept.append(time.perf_counter() - began)
        return sample(self)

    monkeypatch.setattr(profiler._Memory, "sample", slow_sample)
    ds = profile_step(quick_config, crop=8, warmup=1, **SMALL)  # the warmup keeps first-call costs out
    switches = int(ds["switches"])
    plain_reads = len(STAGES) + 2  # at the start and the ends of data, forward, hooking, backward, optimizer
    assert switches > 100 and len(slept) == 2 * plain_reads + switches + 1
    slept = slept[plain_reads:]  # the warmup's
    # A read follows its segment's end mark, so it is timed in the next segment: not the last
    # read, nor the one that opens the hooking stage (left out of step_ms). The plain step
    # times 3 reads, the profiled one switches - 2.
    plain_ms, profiled_ms = np.mean(slept[:plain_reads]) * 1e3, np.mean(slept[plain_reads:]) * 1e3
    expected_ms = (switches - 2) * profiled_ms - 3 * plain_ms
    assert float(ds["plain_step_ms"]) > 0 and float(ds["graph_hook_ms"]) > 0
    assert float(ds["overhead_ms"]) == pytest.approx(float(ds["step_ms"].mean() - ds["plain_step_ms"]))
    # Within the noise of the tiny step's own work on a busy CPU (+-0.3 s seen).
    assert float(ds["overhead_ms"]) == pytest.approx(expected_ms, abs=500)
    without = profile_step(quick_config, crop=8, warmup=0, measure_overhead=False, **SMALL)
    assert np.isnan(float(without["plain_step_ms"])) and np.isnan(float(without["overhead_ms"]))


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_profile():
    """The full "tiny" model (every stack), eager kernels, two measured steps."""
    torch.set_num_threads(1)
    return profile_step(preset("tiny", kernels="torch"), crop=16, steps=2, warmup=1, **SMALL)


def test_profile_names_and_sums(tiny_profile):
    ds = tiny_profile
    assert list(ds.module.values) == list(MODULES)
    assert {"TriangleAttention", "TriangleMultiplication", "Transition", "AttentionPairBias",
            "OuterProductMean", "DiffusionModule"} <= set(ds.module.values)  # fmt: skip
    time_ms = ds["time_ms"]
    assert np.isfinite(time_ms).all() and (time_ms >= 0).all()
    steps = ds["step_ms"].values
    # Per-module times (forward, backward, recompute) never exceed the step; with the stages
    # they account for all of it.
    assert float(time_ms.sum()) <= steps.mean() * (1 + 1e-9)
    stage_ms = ds["stage_ms"].mean("step")
    assert float(stage_ms.sum()) == pytest.approx(steps.mean())
    assert float(time_ms.sel(phase="forward").sum()) == pytest.approx(float(stage_ms.sel(stage="forward")))
    for module in ("TriangleAttention", "TriangleMultiplication", "Transition", "AttentionPairBias",
                   "OuterProductMean", "DiffusionModule", "MSAPairWeightedAveraging"):  # fmt: skip
        assert float(time_ms.sel(module=module, phase="forward")) > 0, module
        assert float(time_ms.sel(module=module, phase="backward")) > 0, module
    assert float(time_ms.sel(phase="recompute").sum()) == 0  # "tiny" does not checkpoint


def test_profile_counts_calls_as_the_model_makes_them(tiny_profile):
    c = preset("tiny")
    # Two triangle attentions per pair block: Pairformer, MSA, template (one template) and
    # confidence stacks, with one recycle.
    pair_blocks = c.pairformer_blocks + c.msa_blocks + c.template_blocks + c.confidence_blocks
    calls = tiny_profile["calls"]
    assert int(calls.sel(module="TriangleAttention", phase="forward")) == 2 * pair_blocks
    assert int(calls.sel(module="TriangleMultiplication", phase="forward")) == 2 * pair_blocks
    assert int(calls.sel(module="OuterProductMean", phase="forward")) == c.msa_blocks
    assert int(calls.sel(module="InputFeatureEmbedder", phase="forward")) == 1


def test_memory_timeline_and_peaks(tiny_profile):
    ds = tiny_profile
    ends = ds["timeline_ms"].values
    assert np.all(np.diff(ends) >= 0) and ends[-1] == pytest.approx(ds["step_ms"].values[-1])
    assert set(ds["timeline_phase"].values) == {"data", "forward", "backward", "optimizer"}
    assert set(ds["timeline_module"].values) <= set(MODULES) | {"(data)", "(optimizer)"}
    peaks = ds["stage_peak_mib"]
    parameters_mib = ds.attrs["parameters"] * 4 / 2**20
    # Weights, gradients and Adam's two moments are alive during the optimizer step.
    assert float(peaks.sel(stage="optimizer")) >= 3.9 * parameters_mib
    # Activations make the forward/backward peak higher than the weights alone.
    assert float(peaks.sel(stage="backward")) > float(ds["timeline_mib"].values[0])
    assert (ds["timeline_peak_mib"] >= ds["timeline_mib"] - 1e-9).all()


def test_cpu_memory_counts_live_tensors_exactly():
    memory = profiler._Memory(torch.device("cpu"))
    with memory:
        before = memory.allocated()
        block = torch.empty(256, 1024)  # exactly 1 MiB
        assert memory.allocated() - before == pytest.approx(1.0)
        view = block[:10]
        assert memory.allocated() - before == pytest.approx(1.0)  # a view shares the storage
        del block, view
        assert memory.allocated() == pytest.approx(before)
        assert memory.sample()[1] >= before + 1.0
        assert memory.sample()[1] == pytest.approx(before)  # the peak was reset


def test_checkpointing_recomputes_and_saves_memory(quick_config):
    options = {"crop": 16, "warmup": 0, "measure_overhead": False, **SMALL}
    plain = profile_step(quick_config, **options)
    checkpointed = profile_step(quick_config.replace(checkpoint=True), **options)
    recompute = checkpointed["time_ms"].sel(phase="recompute")
    assert float(recompute.sel(module="TriangleAttention")) > 0
    assert int(checkpointed["calls"].sel(module="TriangleAttention", phase="recompute")) == int(
        checkpointed["calls"].sel(module="TriangleAttention", phase="forward")
    )
    assert float(plain["time_ms"].sel(phase="recompute").sum()) == 0
    forward_peak = {name: float(ds["stage_peak_mib"].sel(stage="forward")) for name, ds in
                    (("plain", plain), ("checkpointed", checkpointed))}  # fmt: skip
    assert forward_peak["checkpointed"] < forward_peak["plain"]


def test_forward_only(quick_config):
    ds = profile_step(quick_config, crop=8, backward=False, warmup=0, measure_overhead=False, **SMALL)
    stage = ds["stage_ms"].mean("step")
    assert float(stage.sel(stage="forward")) > 0
    assert float(stage.sel(stage="backward")) == 0 and float(stage.sel(stage="optimizer")) == 0
    assert float(ds["time_ms"].sel(phase=["backward", "recompute"]).sum()) == 0
    assert ds.attrs["backward"] is False
    # The CPU runs the interpreter's defaults, which are not a tuning gap.
    assert ds.attrs["untuned_kernel_keys"] == 0 and ds.attrs["untuned_kernel_keys_json"] == "[]"


def test_batches_from_the_shipped_store(quick_config):
    from megafold.precache.loader import loader
    from megafold.profile.widgets import find_store

    store = find_store()
    assert store is not None, "cached_data/store.zarr is shipped with the repository"
    batches = loader(store, 16, 1, workers=0, device="cpu")
    ds = profile_step(quick_config, batches=batches, warmup=0, steps=2, measure_overhead=False)
    assert ds.attrs["data"] == "batches from the given source"
    assert (ds["stage_ms"].sel(stage="data") > 0).all()


def test_compile_variant_leaves_compiled_blocks_opaque(quick_config):
    ds = profile_step(Variant(quick_config, compile="eager"), crop=8, warmup=1, measure_overhead=False, **SMALL)
    assert ds.attrs["label"] == "torch+compile" and ds.attrs["compile"] == "eager"
    time_ms = ds["time_ms"].sum("phase", min_count=1)
    assert np.isnan(float(time_ms.sel(module="TriangleAttention")))  # inside compiled PairformerBlocks
    assert float(time_ms.sel(module="DiffusionModule")) > 0  # outside: still traced


def test_bad_settings_raise_config_errors(quick_config):
    with pytest.raises(ConfigError, match="steps"):
        profile_step(quick_config, steps=0)
    with pytest.raises(ConfigError, match="unknown profile variant"):
        variants(quick_config, ("torch", "cuda-graphs"))
    with pytest.raises(ConfigError, match="longest_crop"):
        longest_crop(quick_config, start=32, max_crop=16)
    with pytest.raises(ConfigError, match="no saved profile"):
        load("/nonexistent/profile.zarr")
    profile = xr.Dataset(attrs={"data": "synthetic", "config_json": "{}"})
    with pytest.raises(ConfigError, match="other settings.*config_json"):
        longest_crop(quick_config, start=8, max_crop=16, known=profile)
    with pytest.raises(ConfigError, match="synthetic"):
        longest_crop(quick_config, start=8, max_crop=16, known=profile.assign_attrs(data="batches"))


# --------------------------------------------------------------------------- longest crop


def test_longest_crop_on_the_cpu_stops_at_the_cap_or_the_budget(quick_config):
    capped = longest_crop(quick_config, start=8, step=8, max_crop=24, **SMALL)
    assert list(capped.crop.values) == [8, 16, 24]
    assert capped["fits"].values.all() and capped.attrs["longest_crop"] == 24
    assert capped.attrs["stopped_by"] == "max_crop"
    peaks = capped["peak_mib"].values
    assert np.all(np.diff(peaks) > 0)  # a longer crop needs more memory
    budget = (peaks[0] + peaks[1]) / 2
    limited = longest_crop(quick_config, start=8, step=8, max_crop=24, memory_budget_mib=budget, **SMALL)
    assert limited.attrs["longest_crop"] == 8 and limited.attrs["stopped_by"] == "memory budget"
    assert list(limited["outcome"].values) == ["fits", "over budget"]


def test_longest_crop_recovers_from_out_of_memory(quick_config, monkeypatch):
    """A step that raises torch.OutOfMemoryError ends the search cleanly (as on a GPU)."""
    original = profiler.AlphaFold3.training_loss
    sessions = []

    def loss_or_oom(model, batch, n_cycles=None):
        sessions.append(model)
        if batch["token_mask"].shape[1] >= 16:
            raise profiler._OOM_ERROR("CUDA out of memory (simulated)")
        return original(model, batch, n_cycles)

    monkeypatch.setattr(profiler.AlphaFold3, "training_loss", loss_or_oom)
    search = longest_crop(quick_config, start=8, step=8, max_crop=32, **SMALL)
    assert search.attrs["longest_crop"] == 8 and search.attrs["stopped_by"] == "out of memory"
    assert list(search["outcome"].values) == ["fits", "out of memory"]
    assert np.isnan(search["peak_mib"].values[1])
    assert all(p.grad is None for p in sessions[-1].parameters())  # the failed step was cleaned up


class _FakeGpu:
    """A measuring function for ``profiler._search``: peak(N) = base + b N + c N^2 + d N^3 MiB,
    out of memory above ``limit``, steps that take ``ms_per_token2 * N^2`` ms on a fake clock."""

    def __init__(self, base=1000.0, b=3.0, c=0.01, d=0.0, limit=100_000.0, ms_per_token2=0.01):
        self.base, self.b, self.c, self.d, self.limit = base, b, c, d, limit
        self.ms_per_token2 = ms_per_token2
        self.now = 0.0
        self.attempts = []

    def peak(self, crop):
        return self.base + self.b * crop + self.c * crop**2 + self.d * crop**3

    def longest(self, grid):
        return max(c for c in range(grid.start, grid.last + 1, grid.step) if self.peak(c) <= self.limit)

    def measure(self, crop):
        self.attempts.append(crop)
        ms = self.ms_per_token2 * crop**2
        self.now += ms / 1e3
        if self.peak(crop) > self.limit:
            return profiler._Trial("out of memory")
        return profiler._Trial("fits", self.peak(crop), ms)

    def known(self, crop):
        return {crop: profiler._Trial("fits", self.peak(crop), self.ms_per_token2 * crop**2)}

    def search(self, grid, deadline=None, known=None, base=None):
        return profiler._search(
            self.measure, grid, self.limit, self.base if base is None else base, known or {}, deadline,
            clock=lambda: self.now,
        )  # fmt: skip


GPU_GRID = profiler._Grid(start=128, step=128, last=8192)


# The H100 "paper" triton search (session 5): the fit of its four measured peaks, in MiB.
H100_TRITON = {"base": 5771.62, "b": 14.824, "c": 0.0083979, "d": 7.262e-6, "limit": 77835.84}


def test_search_seeded_with_a_profile_verifies_the_predicted_crop_then_closes_the_bracket():
    """From one profiled crop the first step already goes to the prediction of the
    linear-plus-quadratic prior, the second to the two-point fit's, the third confirms the
    crop above does not fit: 3 steps where stepping by 128 from 384 would take 10. A quadratic
    prior (all of the peak above the base in N^2) would have started at 1152 and walked up."""
    gpu = _FakeGpu(**H100_TRITON)
    assert gpu.longest(GPU_GRID) == 1536
    result = gpu.search(GPU_GRID, known=gpu.known(384))
    assert gpu.attempts == [1408, 1536, 1664]
    assert max(c for c, t in result.tried.items() if t.outcome == "fits") == 1536
    assert result.stopped_by == "out of memory"
    # The prior: the peak above the base at 384 split equally between N and N^2.
    one = profiler._fit_peaks(gpu.known(384), gpu.base)
    above = gpu.peak(384) - gpu.base
    np.testing.assert_allclose(one, [gpu.base, above / 2 / 384, above / 2 / 384**2, 0.0], rtol=1e-12)


def test_search_within_a_time_budget_says_what_the_answer_rests_on():
    # Time for the verification at 1536 (23.6 s on the fake clock) but not for the confirmation.
    gpu = _FakeGpu(**H100_TRITON)
    result = gpu.search(GPU_GRID, deadline=60.0, known=gpu.known(384))
    assert gpu.attempts == [1408, 1536]
    assert result.stopped_by == "memory (predicted)" and result.predicted == 1536
    # No time to verify the prediction: the answer is the crop that fit, and says so.
    gpu = _FakeGpu(**H100_TRITON)
    result = gpu.search(GPU_GRID, deadline=20.0, known=gpu.known(384))
    assert gpu.attempts == [1408]
    assert result.stopped_by == "time budget" and result.predicted == 1536
    # A step that runs past the deadline (stopped by the module hooks) ends the search too.
    gpu = _FakeGpu(**H100_TRITON)
    result = profiler._search(
        lambda crop: profiler._Trial("out of time"), GPU_GRID, gpu.limit, gpu.base, gpu.known(384), 1e9
    )
    assert result.stopped_by == "time budget" and result.tried[1408].outcome == "out of time"


def test_search_recovers_when_the_prediction_overshoots():
    """N^3 memory that the config does not announce: the linear-plus-quadratic prior
    overshoots, the step runs out of memory, the search bisects the bracket, and the cubic fit
    of three points lands on the longest crop."""
    gpu = _FakeGpu(b=1.0, c=0.005, d=4e-6)
    result = gpu.search(GPU_GRID, known=gpu.known(384))
    assert gpu.attempts[:2] == [4352, 2304]  # out of memory, then the middle of 384..4352
    assert result.tried[4352].outcome == "out of memory"
    longest = max(c for c, t in result.tried.items() if t.outcome == "fits")
    assert longest == gpu.longest(GPU_GRID) == 2432
    assert result.stopped_by == "out of memory" and len(gpu.attempts) <= 6


def test_search_of_an_eager_config_assumes_cubic_growth_and_verifies_without_running_out_of_memory():
    """The H100 dashboard's eager "paper" search (peaks measured at 384 and 640 on an 80 GB
    card, base 6036 MiB): a quadratic first jump went to 896 and ran out of memory, leaving no
    time to verify 768 (the linear-plus-quadratic prior overshoots further, to 1152). A cubic
    first jump steps at 640, the two-point fit (grown faster than
    N^2: c and d) at 768, and the search stops there predicting that 896 does not fit."""
    gpu = _FakeGpu(base=6036.0, b=0.0, c=0.0564, d=5.58e-5, limit=77836.0)
    assert gpu.longest(GPU_GRID) == 768
    assert gpu.search(GPU_GRID, known=gpu.known(384)).tried[1152].outcome == "out of memory"
    assert gpu.attempts[0] == 1152  # without the cubic prior: the overshoot
    gpu = _FakeGpu(base=6036.0, b=0.0, c=0.0564, d=5.58e-5, limit=77836.0)
    ms_768 = gpu.ms_per_token2 * 768**2
    result = profiler._search(
        gpu.measure, GPU_GRID, gpu.limit, gpu.base, gpu.known(384),
        deadline=gpu.now + (gpu.ms_per_token2 * 640**2 + ms_768) / 1e3 + 1.0, clock=lambda: gpu.now, cubic=True,
    )  # fmt: skip
    assert gpu.attempts == [640, 768]
    assert result.stopped_by == "memory (predicted)" and result.predicted == 768
    assert max(c for c, t in result.tried.items() if t.outcome == "fits") == 768


def test_search_without_a_known_point_starts_at_the_grid_start():
    gpu = _FakeGpu()
    result = gpu.search(GPU_GRID)
    assert gpu.attempts[0] == 128 and max(c for c, t in result.tried.items() if t.outcome == "fits") == 2944
    too_small = _FakeGpu(base=200_000.0)
    result = too_small.search(GPU_GRID)
    assert too_small.attempts == [128] and result.stopped_by == "out of memory"
    capped = _FakeGpu()
    result = capped.search(profiler._Grid(128, 128, 1024), known=capped.known(384))
    assert capped.attempts == [1024] and result.stopped_by == "max_crop"


def test_fit_of_peaks_is_non_negative_and_exact_for_as_many_points_as_unknowns():
    gpu = _FakeGpu(b=2.0, c=0.003, d=1e-6)
    tried = {n: profiler._Trial("fits", gpu.peak(n)) for n in (256, 512, 1024)}
    np.testing.assert_allclose(profiler._fit_peaks(tried, gpu.base), [1000, 2.0, 0.003, 1e-6], rtol=1e-6)
    # Peaks that fall with N would need a negative coefficient: clamped to a flat fit.
    falling = {256: profiler._Trial("fits", 5000.0), 512: profiler._Trial("fits", 4000.0)}
    fit = profiler._fit_peaks(falling, 1000.0)
    assert (fit >= 0).all() and fit[1:].sum() > 0
    assert profiler._fit_peaks({256: profiler._Trial("out of memory")}, 0.0) is None


# --------------------------------------------------------------------------- compare, zarr


def test_compare_runs_torch_and_triton_side_by_side(quick_config):
    """Both kernels run the same step (same weights, batch and random draws): their losses agree."""
    seen = []
    ds = compare(variants(quick_config, ("torch", "triton")), crop=8, warmup=0, measure_overhead=False,
                 on_result=lambda label, partial: seen.append((label, partial.sizes["config"])), **SMALL)  # fmt: skip
    assert list(ds.config.values) == ["torch", "triton"]
    assert list(ds["kernels"].values) == ["torch", "triton"]
    assert seen == [("torch", 1), ("triton", 2)]
    assert np.isfinite(ds["step_ms"]).all()
    for label in ("torch", "triton"):
        assert float(ds["time_ms"].sel(config=label, module="TriangleAttention", phase="forward")) > 0
    losses = ds["loss"].sel(step=0).values
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert list(summary(ds).columns) == ["torch", "triton"]


def test_zarr_round_trip(quick_config, tmp_path):
    ds = compare({"eager": quick_config, "checkpointed": quick_config.replace(checkpoint=True)}, crop=8,
                 warmup=0, longest=True, longest_options={"start": 8, "step": 8, "max_crop": 16}, **SMALL)  # fmt: skip
    assert ds.sizes["config"] == 2 and list(ds.search_crop.values) == [8, 16]
    # The profile at crop 8 seeded each search: only crop 16 was stepped.
    assert ds["crop_source"].values.tolist() == [["known", "search"]] * 2
    assert list(ds["longest_stopped_by"].values) == ["max_crop"] * 2
    assert list(ds["crop"].values) == [8, 8]
    assert set(ds["timeline_module"].dims) == {"config", "sample"}
    assert (ds["longest_crop"].values == 16).all()
    path = save(ds, tmp_path / "profile.zarr")
    loaded = load(path)
    xr.testing.assert_identical(ds, loaded)
    assert loaded["timeline_module"].dtype.kind == "U"
    # Saving again replaces the store atomically.
    save(ds.isel(config=[0]), path)
    assert load(path).sizes["config"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_search_step_past_its_deadline_stops_even_inside_backward(quick_config, monkeypatch):
    """The deadline hooks raise at the next AF3 module a step enters; with checkpointing that
    includes the recomputation inside backward, from where autograd hands the error back."""
    in_backward = []
    with profiler._Session(
        Variant(quick_config.replace(checkpoint=True)), torch.device("cpu"), backward=True, n_cycles=1, seed=0
    ) as session:  # fmt: skip

        def count(self, module, args):
            in_backward.append(torch._C._current_graph_task_id() != -1)

        monkeypatch.setattr(profiler._Deadline, "_check", count)
        assert profiler._measure(session, 8, 1e18, None, 4, 4, 0).outcome == "fits"
        assert not in_backward[0] and in_backward[-1]  # the last module entered is a recomputation
        entries, seen = len(in_backward), []

        def past_deadline_at_the_last_entry(self, module, args):
            seen.append(module)
            if len(seen) == entries:
                self.passed = True
                raise profiler._OutOfTime("past the deadline")

        monkeypatch.setattr(profiler._Deadline, "_check", past_deadline_at_the_last_entry)
        trial = profiler._measure(session, 8, 1e18, None, 4, 4, 0)
        assert trial.outcome == "out of time" and np.isnan(trial.peak_mib) and len(seen) == entries
        assert all(p.grad is None for p in session.model.parameters())
        assert profiler._measure(session, 8, None, None, 4, 4, 0).outcome == "fits"  # the session goes on


def test_graphed_diffusion_times_the_chunk_denoiser_as_one_region(quick_config):
    """``graphed_diffusion=True`` lets the training diffusion chunks run through
    ``GraphedChunkDenoiser`` in the traced step (on the CPU: eagerly, the same checkpoints and
    gradient sums) and gives all of their time, forward and backward, to DiffusionModule; the
    same step otherwise traces the modules inside. The loss is the same either way."""
    from megafold.model.diffusion import GraphedChunkDenoiser

    config = quick_config.replace(diffusion_samples=3, diffusion_chunk=1)  # three chunks: the runner
    runs = []
    original = GraphedChunkDenoiser.backward_chunk

    def counting(self, *args):
        runs.append(self)
        return original(self, *args)

    options = dict(crop=8, warmup=0, steps=1, measure_overhead=False, **SMALL)
    GraphedChunkDenoiser.backward_chunk = counting
    try:
        eager = profile_step(config, **options)
        assert not runs, "without graphed_diffusion the traced step runs the chunks as plain checkpoints"
        graphed = profile_step(config, graphed_diffusion=True, **options)
        assert len(runs) == 3
    finally:
        GraphedChunkDenoiser.backward_chunk = original
    assert not hasattr(GraphedChunkDenoiser.forward_chunk, "__wrapped__")  # the region is gone afterwards
    assert graphed.attrs["graphed_diffusion"] is True and eager.attrs["graphed_diffusion"] is False
    np.testing.assert_allclose(graphed["loss"].values, eager["loss"].values, rtol=1e-5)
    inner = "AtomAttentionDecoder"  # only inside the chunk denoiser (and the rollout, no gradients)
    for ds in (eager, graphed):
        assert float(ds["time_ms"].sel(module="DiffusionModule", phase="backward")) > 0
        assert float(ds["time_ms"].sel(module=inner, phase="forward")) > 0  # the mini-rollout's
    assert float(eager["time_ms"].sel(module=inner, phase="backward")) > 0
    assert float(graphed["time_ms"].sel(module=inner, phase="backward")) == 0
    assert float(graphed["calls"].sel(module=inner, phase="backward")) == 0
    # Nothing is lost: the modules' time adds up to the forward and backward stages.
    stage_ms = graphed["stage_ms"].mean("step")
    assert float(graphed["time_ms"].sel(phase="forward").sum()) == pytest.approx(float(stage_ms.sel(stage="forward")))
    assert float(graphed["time_ms"].sel(phase=["backward", "recompute"]).sum()) == pytest.approx(
        float(stage_ms.sel(stage="backward")), rel=1e-6
    )
