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
        assert memory.take_peak() >= before + 1.0
        assert memory.take_peak() == pytest.approx(before)  # the peak was reset


def test_checkpointing_recomputes_and_saves_memory(quick_config):
    plain = profile_step(quick_config, crop=16, warmup=0, **SMALL)
    checkpointed = profile_step(quick_config.replace(checkpoint=True), crop=16, warmup=0, **SMALL)
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
    ds = profile_step(quick_config, crop=8, backward=False, warmup=0, **SMALL)
    stage = ds["stage_ms"].mean("step")
    assert float(stage.sel(stage="forward")) > 0
    assert float(stage.sel(stage="backward")) == 0 and float(stage.sel(stage="optimizer")) == 0
    assert float(ds["time_ms"].sel(phase=["backward", "recompute"]).sum()) == 0
    assert ds.attrs["backward"] is False


def test_batches_from_the_shipped_store(quick_config):
    from megafold.precache.loader import loader
    from megafold.profile.widgets import find_store

    store = find_store()
    assert store is not None, "cached_data/store.zarr is shipped with the repository"
    batches = loader(store, 16, 1, workers=0, device="cpu")
    ds = profile_step(quick_config, batches=batches, warmup=0, steps=2)
    assert ds.attrs["data"] == "batches from the given source"
    assert (ds["stage_ms"].sel(stage="data") > 0).all()


def test_compile_variant_leaves_compiled_blocks_opaque(quick_config):
    ds = profile_step(Variant(quick_config, compile="eager"), crop=8, warmup=1, **SMALL)
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


def test_longest_crop_predicts_from_measured_peaks_then_bisects(quick_config, monkeypatch):
    """With a memory limit the search jumps to the predicted crop and closes the bracket: the
    exact longest grid crop in a handful of steps where stepping by 128 would take 24."""
    attempts = []

    def fake_attempt(session, crop, *args):
        attempts.append(crop)
        if crop > 2500:  # a hard out-of-memory beyond the memory model, as a GPU can have
            return None
        return types.SimpleNamespace(peaks=[1000 + 0.01 * crop**2 + 3 * crop], durations_ms=np.array([1.0]))

    monkeypatch.setattr(profiler, "_attempt", fake_attempt)
    # The budget alone would allow 2944 (peak(3000) = 100000 MiB); the out-of-memory above
    # 2500 tokens binds first: the prediction overshoots, bisection finds 2432 = 19 x 128.
    search = longest_crop(quick_config, start=128, step=128, max_crop=8192, memory_budget_mib=100_000)
    assert search.attrs["longest_crop"] == 2432
    assert search.attrs["stopped_by"] == "out of memory"
    assert 2560 in attempts and len(attempts) <= 8 and search.attrs["attempts"] == len(attempts)
    assert list(search.crop.values) == sorted(attempts)  # reported in crop order
    attempts.clear()
    search = longest_crop(quick_config, start=128, step=128, max_crop=2400, memory_budget_mib=60_000)
    # peak(N) <= 60000 up to N = 2283: 2176 fits, 2304 is over budget
    assert search.attrs["longest_crop"] == 2176 and search.attrs["stopped_by"] == "memory budget"
    assert set(search["outcome"].values) == {"fits", "over budget"} and len(attempts) <= 5
    assert attempts[:2] == [128, 256]  # two measured crops before the first prediction


# --------------------------------------------------------------------------- compare, zarr


def test_compare_runs_torch_and_triton_side_by_side(quick_config):
    """Both kernels run the same step (same weights, batch and random draws): their losses agree."""
    seen = []
    ds = compare(variants(quick_config, ("torch", "triton")), crop=8, warmup=0,
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
