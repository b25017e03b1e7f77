"""Backend choice and the on-disk autotune cache."""

from __future__ import annotations

import json

import pytest
import torch

from megafold.kernels import _common
from megafold.kernels._common import pick_config, resolve_backend, tuning_records, use_kernels


def test_auto_resolves_to_triton_under_the_interpreter_and_torch_on_request():
    cpu = torch.zeros(1)
    assert _common.interpreter_active()
    assert resolve_backend("auto", cpu) == "triton"
    with use_kernels("torch"):
        assert resolve_backend("auto", cpu) == "torch"
        assert resolve_backend("triton", cpu) == "triton"  # an explicit argument wins
    assert resolve_backend("torch", cpu) == "torch"


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


def test_tuning_picks_the_fastest_config_once_and_stores_it(fake_gpu, tmp_path):
    candidates = [{"BLOCK": 32}, {"BLOCK": 64}, {"BLOCK": 128}, {"BLOCK": 256}]
    timings = {32: 3.0, 64: 1.0, 128: 2.0}
    calls = []

    def bench(config):
        calls.append(config["BLOCK"])
        if config["BLOCK"] == 256:
            raise RuntimeError("out of shared memory")  # not a candidate on this GPU
        return timings[config["BLOCK"]]

    best = pick_config("op", (1, 2), fake_gpu, candidates, {"BLOCK": 32}, bench)
    # One pass over every candidate, then the three fastest again, round-robin, three times.
    assert best == {"BLOCK": 64} and calls == [32, 64, 128, 256] + [64, 128, 32] * 3
    calls.clear()
    again = pick_config("op", (1, 2), fake_gpu, candidates, {"BLOCK": 32}, bench)
    assert again == best and calls == []  # the second call reads the cache
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert stored == {json.dumps(["op", [1, 2], "Fake GPU 80GB"]): {"BLOCK": 64}}
    trials = json.loads((tmp_path / "autotune-trials.json").read_text())[json.dumps(["op", [1, 2], "Fake GPU 80GB"])]
    assert [t.get("ms") for t in trials] == [3.0, 1.0, 2.0, None]
    assert [t["config"] for t in trials] == candidates and "out of shared memory" in trials[3]["error"]
    (record,) = tuning_records(tmp_path)
    assert record["op"] == "op" and record["key"] == [1, 2] and record["chosen"] == {"BLOCK": 64}
    assert record["ms"] == 1.0 and record["trials"] == [trials[1], trials[2], trials[0], trials[3]]  # fastest first
    assert record["chosen"] == {"BLOCK": 64} and trials[1]["chosen"] and trials[1]["first_ms"] == 1.0
    _common._memory_cache.clear()  # a new process reads the choice from disk
    assert pick_config("op", (1, 2), fake_gpu, candidates, {"BLOCK": 32}, bench) == best
    assert calls == []


def test_tuning_ranks_the_fastest_few_by_their_median_time(fake_gpu, tmp_path):
    # BLOCK 32's first time was a lucky one (0.9); timed again it takes 2.0. BLOCK 64 is
    # steady at 1.2; BLOCK 128 (1.5, then 1.4) ranks third; BLOCK 256 (3.0) is not timed again.
    times = {32: iter([0.9, 2.0, 2.0, 2.0]), 64: iter([1.2] * 4), 128: iter([1.5, 1.4, 1.4, 1.4]),
             256: iter([3.0])}
    candidates = [{"BLOCK": b} for b in times]
    best = pick_config("op", (7,), fake_gpu, candidates, {"BLOCK": 32}, lambda c: next(times[c["BLOCK"]]))
    assert best == {"BLOCK": 64}
    (record,) = tuning_records(tmp_path)
    assert record["chosen"] == {"BLOCK": 64} and record["ms"] == 1.2
    by_block = {t["config"]["BLOCK"]: t for t in record["trials"]}
    assert by_block[32]["first_ms"] == 0.9 and by_block[32]["ms"] == 2.0
    assert by_block[128]["ms"] == 1.4 and "first_ms" not in by_block[256]
    # A record written before the refining step (no "chosen" mark) still names its fastest trial.
    path = tmp_path / "autotune-trials.json"
    path.write_text(json.dumps({json.dumps(["op", [8], "Fake GPU 80GB"]): [{"config": {"BLOCK": 16}, "ms": 2.0},
                                                                             {"config": {"BLOCK": 8}, "ms": 1.0}]}))
    assert tuning_records(tmp_path)[0]["chosen"] == {"BLOCK": 8}


def test_tuning_only_the_selected_ops(fake_gpu, tmp_path, monkeypatch):
    candidates = [{"BLOCK": 32}, {"BLOCK": 64}]
    timed = []

    def bench(config):
        timed.append(config["BLOCK"])
        return 1.0 if config["BLOCK"] == 64 else 2.0

    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({json.dumps([op, [1], "Fake GPU 80GB"]): {"BLOCK": 32}
                                   for op in ("alpha_fwd", "beta")}))
    monkeypatch.setattr(_common, "packaged_tuning_path", lambda device: shipped)
    monkeypatch.setenv("MEGAFOLD_AUTOTUNE_OPS", "alpha, gamma")
    # Tuning on: a selected op with a stored choice keeps it; one without is tuned; an op left
    # out runs its default untimed, listed as untuned.
    assert pick_config("alpha_fwd", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert pick_config("alpha_bwd", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert timed == [32, 64, 64, 32, 64, 32, 64, 32]
    timed.clear()
    for _ in range(2):
        assert pick_config("delta", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert timed == [] and _common.untuned_keys() == [{"op": "delta", "key": [1], "device": "Fake GPU 80GB"}]
    # Its answer is remembered under the selection (a repeat is one lookup), not the tuning-on key.
    assert _common._memory_cache[("delta", (1,), None, ("alpha", "gamma"))] == {"BLOCK": 32}
    # Forced: the selected ops are timed again, the others keep their stored choices.
    monkeypatch.setenv("MEGAFOLD_AUTOTUNE", "force")
    _common.forget_choices(_common.autotune_ops())
    assert ("delta", (1,), None, True) not in _common._memory_cache  # a left-out op was not remembered
    assert pick_config("beta", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert timed == []
    assert pick_config("alpha_fwd", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert timed[:2] == [32, 64]
    # The selection lifted: the left-out op is tuned now.
    monkeypatch.delenv("MEGAFOLD_AUTOTUNE_OPS")
    monkeypatch.setenv("MEGAFOLD_AUTOTUNE", "1")
    timed.clear()
    assert pick_config("delta", (1,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert timed[:2] == [32, 64]


def test_forget_choices_drops_only_the_selected_ops(monkeypatch):
    monkeypatch.setattr(_common, "_memory_cache", {
        ("alpha_fwd", (1,), 0, True): {"BLOCK": 1}, json.dumps(["alpha_fwd", [1], "GPU"]): {"BLOCK": 1},
        ("beta", (1,), 0, True): {"BLOCK": 2}, json.dumps(["beta", [1], "GPU"]): {"BLOCK": 2}, "_loaded": {}})
    _common.forget_choices(("alpha",))
    assert set(_common._memory_cache) == {("beta", (1,), 0, True), json.dumps(["beta", [1], "GPU"]), "_loaded"}
    _common.forget_choices()
    assert _common._memory_cache == {}


def test_an_op_part_with_a_key_part_selects_only_those_keys(fake_gpu, tmp_path, monkeypatch):
    """``OP:KEY`` (``megafold tune --ops evo_attention:dkdv``): only that op's keys whose JSON
    contains KEY are tuned; forced, only their choices are forgotten and timed again."""
    candidates = [{"BLOCK": 32}, {"BLOCK": 64}]
    timed = []

    def bench(config):
        timed.append(config["BLOCK"])
        return 1.0 if config["BLOCK"] == 64 else 2.0

    monkeypatch.setenv("MEGAFOLD_AUTOTUNE_OPS", "evo:dkdv,beta")
    assert pick_config("evo", ("fwd", 8), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert timed == []  # left out: the default, untimed
    assert pick_config("evo", ("dkdv", 8), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert pick_config("beta", ("fwd", 8), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert pick_config("gamma", ("dkdv", 8), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert [k["op"] + ":" + k["key"][0] for k in _common.untuned_keys()] == ["evo:fwd", "gamma:dkdv"]
    monkeypatch.setattr(_common, "_memory_cache", {
        ("evo", ("dkdv", 8), 0, True): {"BLOCK": 1}, json.dumps(["evo", ["dkdv", 8], "GPU"]): {"BLOCK": 1},
        ("evo", ("fwd", 8), 0, True): {"BLOCK": 2}, json.dumps(["evo", ["fwd", 8], "GPU"]): {"BLOCK": 2},
        "_loaded": {}})
    _common.forget_choices(("evo:dkdv",))
    assert set(_common._memory_cache) == {("evo", ("fwd", 8), 0, True), json.dumps(["evo", ["fwd", 8], "GPU"]),
                                          "_loaded"}


def test_graph_timing_is_the_default_and_falls_back_to_plain_calls(monkeypatch):
    graphed, plain = [], []
    monkeypatch.setattr(_common, "bench_graph_ms", lambda fn: graphed.append(fn) or 0.5)
    monkeypatch.setattr(_common, "bench_ms", lambda fn: plain.append(fn) or 2.0)
    launch = lambda cfg: None  # noqa: E731
    monkeypatch.setenv("MEGAFOLD_TUNE_GRAPHS", "0")
    assert _common._bench_launch(launch, {}) == 2.0 and not graphed  # switched off
    monkeypatch.delenv("MEGAFOLD_TUNE_GRAPHS", raising=False)
    assert _common._bench_launch(launch, {}) == 0.5 and len(plain) == 1  # on by default

    def uncapturable(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_common, "bench_graph_ms", uncapturable)
    assert _common._bench_launch(launch, {}) == 2.0 and len(plain) == 2  # plain calls instead

    def too_big(fn):
        raise RuntimeError("out of resource: shared memory, Required: 262144")

    monkeypatch.setattr(_common, "bench_graph_ms", too_big)
    with pytest.raises(RuntimeError, match="out of resource"):  # not a candidate: no plain try
        _common._bench_launch(launch, {})
    assert len(plain) == 2


def test_tuning_off_uses_a_stored_choice_or_the_default(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "autotune_enabled", lambda: False)

    def bench(config):
        raise AssertionError("no tuning when it is off")

    candidates = [{"BLOCK": 32}, {"BLOCK": 64}]
    assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    # The default ran for want of a stored choice: listed once, however often it launches.
    assert _common.untuned_keys() == [{"op": "op", "key": [5], "device": "Fake GPU 80GB"}]
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({json.dumps(["op", [5], "Fake GPU 80GB"]): {"BLOCK": 64}}))
    monkeypatch.setattr(_common, "packaged_tuning_path", lambda device: shipped)
    _common._memory_cache.clear()
    _common._untuned.clear()
    assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
    assert pick_config("op", (6,), fake_gpu, candidates[:1], {"BLOCK": 32}, bench) == {"BLOCK": 32}
    assert _common.untuned_keys() == []  # a stored choice, and a key with nothing to choose from


def _launcher(launched: list, too_big: int):
    """A launch that records each config's BLOCK and fails, as Triton does on shared memory,
    for ``BLOCK == too_big``; it returns the BLOCK it ran."""

    def launch(config):
        launched.append(config["BLOCK"])
        if config["BLOCK"] == too_big:
            raise RuntimeError("out of resource: shared memory, Required: 264192")
        return config["BLOCK"]

    return launch


def test_recording_candidates_launches_each_once_then_tunes_later(fake_gpu, tmp_path, monkeypatch):
    """Inside ``record_launches(candidates=True)`` a key that would be tuned launches each
    candidate once (a failing one is skipped) and then its default, and stores nothing: the
    same key is tuned for real afterwards."""
    from megafold.kernels.precompile import record_launches

    candidates = [{"BLOCK": 16}, {"BLOCK": 32}, {"BLOCK": 64}]
    launched = []
    launch = _launcher(launched, too_big=64)
    with record_launches([], candidates=True):
        assert _common._record_candidates
        assert _common.run_tuned("op", (3,), fake_gpu, candidates, {"BLOCK": 8}, launch) == 8
    assert not _common._record_candidates
    assert launched == [16, 32, 64, 8]
    assert not (tmp_path / "autotune.json").exists()

    times = {16: 2.0, 32: 1.0}

    def timed(launch, cfg):
        launch(cfg)
        if cfg["BLOCK"] not in times:
            raise RuntimeError("out of resource: shared memory")
        return times[cfg["BLOCK"]]

    monkeypatch.setattr(_common, "_bench_launch", timed)
    assert _common.run_tuned("op", (3,), fake_gpu, candidates, {"BLOCK": 8}, launch) == 32
    assert '"BLOCK": 32' in (tmp_path / "autotune.json").read_text()


def test_a_stored_choice_that_does_not_fit_falls_back_to_the_default(fake_gpu):
    from megafold.kernels._common import run_tuned

    launched = []
    launch = _launcher(launched, too_big=128)
    _common._memory_cache[json.dumps(["op", [7], "Fake GPU 80GB"])] = {"BLOCK": 128}
    assert run_tuned("op", (7,), fake_gpu, [{"BLOCK": 32}, {"BLOCK": 128}], {"BLOCK": 32}, launch) == 32
    assert launched == [128, 32]
    launched.clear()  # remembered: the stored choice is not tried again
    assert run_tuned("op", (7,), fake_gpu, [{"BLOCK": 32}, {"BLOCK": 128}], {"BLOCK": 32}, launch) == 32
    assert launched == [32]
    with pytest.raises(RuntimeError, match="illegal memory"):
        run_tuned("op", (8,), fake_gpu, [], {"BLOCK": 32},
                  lambda config: (_ for _ in ()).throw(RuntimeError("illegal memory access")))


def test_a_default_that_does_not_fit_runs_with_one_pipeline_stage(fake_gpu):
    """A GPU with less shared memory than the defaults were sized on (an RTX 4090 or L40: 99 KiB
    a program; the outer product mean's default left gradient needs 144 KiB there,
    benchmarks/register_report.py --arch 89 --defaults) launches the default with fewer stages."""
    from megafold.kernels._common import run_tuned

    launched = []
    default = {"BLOCK": 64, "num_stages": 2}

    def launch(config):
        launched.append(config["num_stages"])
        if config["num_stages"] > 1:
            raise RuntimeError("out of resource: shared memory, Required: 106496, Hardware limit: 101376")
        return "ran"

    assert run_tuned("op", (9,), fake_gpu, [], default, launch) == "ran"
    assert launched == [2, 1]
    launched.clear()
    assert run_tuned("op", (9,), fake_gpu, [], default, launch) == "ran"
    assert launched == [1]  # the fitting configuration is remembered
    # nothing fits: the last attempt's error, not a silent skip
    with pytest.raises(RuntimeError, match="out of resource"):
        run_tuned("op", (10,), fake_gpu, [], default, lambda config: (_ for _ in ()).throw(
            RuntimeError("out of resource: shared memory")))
    # a deeper default steps down one stage at a time (3 does not fit, 2 does)
    launched.clear()

    def launch_two(config):
        launched.append(config["num_stages"])
        if config["num_stages"] > 2:
            raise RuntimeError("out of resource: shared memory, Required: 110592, Hardware limit: 101376")
        return "ran"

    assert run_tuned("op", (11,), fake_gpu, [], {"BLOCK": 64, "num_stages": 3}, launch_two) == "ran"
    assert launched == [3, 2]


def test_a_gpu_without_its_own_file_borrows_one_of_the_same_architecture(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "autotune_enabled", lambda: False)
    monkeypatch.setattr(_common, "TUNED_DIR", tmp_path)
    shipped = {
        "_capability": [9, 0],
        json.dumps(["op", [5], "Other GPU 141GB"]): {"BLOCK": 64},
    }
    (tmp_path / "Other_GPU_141GB.json").write_text(json.dumps(shipped))

    def bench(config):
        raise AssertionError("no tuning when it is off")

    candidates = [{"BLOCK": 32}, {"BLOCK": 64}]
    for capability, expected in (([8, 0], {"BLOCK": 32}), ([9, 0], {"BLOCK": 64})):
        monkeypatch.setattr(_common, "device_capability", lambda device, c=capability: c)
        _common._memory_cache.clear()
        assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, bench) == expected
    _common._memory_cache.clear()


def test_a_gpu_with_its_own_file_borrows_only_the_keys_it_lacks(fake_gpu, tmp_path, monkeypatch):
    """Its own choices win; a key missing from its file comes from a same-architecture file."""
    monkeypatch.setattr(_common, "autotune_enabled", lambda: False)
    monkeypatch.setattr(_common, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(_common, "device_capability", lambda device: [9, 0])
    other = {
        "_capability": [9, 0],
        json.dumps(["op", [5], "Other GPU 141GB"]): {"BLOCK": 64},
        json.dumps(["op", [6], "Other GPU 141GB"]): {"BLOCK": 64},
    }
    older = {"_capability": [8, 0], json.dumps(["op", [7], "Older GPU"]): {"BLOCK": 128}}
    own = {"_capability": [9, 0], json.dumps(["op", [5], "Fake GPU 80GB"]): {"BLOCK": 16}}
    (tmp_path / "Other_GPU_141GB.json").write_text(json.dumps(other))
    (tmp_path / "Older_GPU.json").write_text(json.dumps(older))
    (tmp_path / "Fake_GPU_80GB.json").write_text(json.dumps(own))
    monkeypatch.setattr(_common, "packaged_tuning_path", lambda device: tmp_path / "Fake_GPU_80GB.json")

    def bench(config):
        raise AssertionError("no tuning when it is off")

    candidates = [{"BLOCK": 16}, {"BLOCK": 32}, {"BLOCK": 64}, {"BLOCK": 128}]
    _common._memory_cache.clear()
    try:
        assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 16}
        assert pick_config("op", (6,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 64}
        assert pick_config("op", (7,), fake_gpu, candidates, {"BLOCK": 32}, bench) == {"BLOCK": 32}
    finally:
        _common._memory_cache.clear()


def test_a_key_with_a_row_bucket_falls_back_to_its_legacy_choice_only_when_tuning_is_off(fake_gpu, monkeypatch):
    """Choices shipped before a key grew its row-count bucket keep serving with tuning off;
    tuning tunes (and stores) the bucketed key instead of reusing the legacy choice."""
    _common._memory_cache[json.dumps(["op", [5], "Fake GPU 80GB"])] = {"BLOCK": 64}
    candidates = [{"BLOCK": 32}, {"BLOCK": 64}, {"BLOCK": 128}]
    bucketed = (5, _common.rows_bucket(384 * 384))
    assert bucketed == (5, 2**18) and _common.rows_bucket(512 * 512) == 2**18 and _common.rows_bucket(1) == 1
    monkeypatch.setattr(_common, "autotune_enabled", lambda: False)

    def no_bench(config):
        raise AssertionError("no tuning when it is off")

    stored = pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, no_bench, rows=384 * 384)
    assert stored == {"BLOCK": 64}
    assert pick_config("op", (6,), fake_gpu, candidates, {"BLOCK": 32}, no_bench, rows=384 * 384) == {"BLOCK": 32}
    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    timings = {32: 3.0, 64: 2.0, 128: 1.0}
    assert pick_config("op", (5,), fake_gpu, candidates, {"BLOCK": 32}, lambda c: timings[c["BLOCK"]],
                       rows=384 * 384) == {"BLOCK": 128}  # fmt: skip
    assert _common._memory_cache[json.dumps(["op", list(bucketed), "Fake GPU 80GB"])] == {"BLOCK": 128}


def test_every_shipped_choice_is_keyed_for_its_own_file_and_names_block_sizes():
    """A shipped file serves only the GPU its name says (a key with another device name would
    never be read), and each choice is a launch configuration."""
    files = sorted(_common.TUNED_DIR.glob("*.json"))
    assert {path.name for path in files} >= {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"}
    for path in files:
        data = json.loads(path.read_text())
        assert data["_capability"] == [9, 0]
        for key, choice in data.items():
            if key.startswith("_"):
                continue
            op, shape, device = json.loads(key)
            assert "".join(c if c.isalnum() or c in "._-" else "_" for c in device) + ".json" == path.name
            assert isinstance(op, str) and isinstance(shape, list)
            assert "num_warps" in choice and any(name.startswith("BLOCK_") for name in choice), (key, choice)


# --------------------------------------------------------------------------- launch_kernel

# Host tensor descriptors came with Triton 3.4 (the CI's Triton has them).
needs_descriptors = pytest.mark.skipif(not _common.descriptors_available(),
                                       reason="this Triton has no host tensor descriptors (< 3.4)")


class _Param:
    def __init__(self, name, default=None):
        self.name, self.default = name, default


class _FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "function-handle", "packed-metadata"

    def run(self, *launch_args):
        self.log.append(("fast", launch_args))


class _FakeKernel:
    """Stands in for a JITFunction: ``kernel[grid](...)`` logs a Triton launch."""

    def __init__(self):
        self.params = [_Param("x"), _Param("n"), _Param("scale"), _Param("BLOCK"), _Param("FLAG", True)]
        self.pre_run_hooks, self.log = [], []

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append(("triton", grid, args, kwargs))
        return _FakeCompiled(self.log)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


@pytest.fixture
def fake_launcher(monkeypatch):
    hooks = []
    streams = []

    def stream(device):
        streams.append(device)
        return 1234

    monkeypatch.setattr(_common, "_fast", [(lambda: 0, stream, lambda: bool(hooks), _FakeKernel.run, False)])
    monkeypatch.setattr(_common, "_launchers", {})
    return hooks


def test_launch_kernel_calls_the_compiled_launcher_with_every_parameter_in_order(fake_launcher):
    kernel, x = _FakeKernel(), torch.zeros(64)
    _common.launch_kernel(kernel, (3, 2), x, 48, 0.5, BLOCK=16, num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["triton"]
    _common.launch_kernel(kernel, (5,), x, 48, 0.25, BLOCK=16, num_warps=4)  # a float is not specialized on
    assert kernel.log[-1] == ("fast", (5, 1, 1, 1234, "function-handle", "packed-metadata", None, None, None,
                                       x, 48, 0.25, 16, True))  # fmt: skip


@pytest.mark.parametrize(
    "change",
    ["int", "int one", "bool for int", "dtype", "alignment", "constexpr", "option", "hook", "patched run"],
)
def test_launch_kernel_goes_through_triton_when_the_specialization_may_differ(fake_launcher, monkeypatch, change):
    kernel, x = _FakeKernel(), torch.zeros(64)
    args, meta = [x, 1 if change == "bool for int" else 48, 0.5], {"BLOCK": 16, "num_warps": 4}
    _common.launch_kernel(kernel, (1,), *args, **meta)
    _common.launch_kernel(kernel, (1,), *args, **meta)
    assert [entry[0] for entry in kernel.log] == ["triton", "fast"]
    if change == "int":
        args[1] = 49
    elif change == "int one":
        args[1] = 1
    elif change == "bool for int":
        args[1] = True  # == 1, but Triton types it as a bool
    elif change == "dtype":
        args[0] = x.half()
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        meta["BLOCK"] = 32
    elif change == "option":
        meta["num_warps"] = 8
    elif change == "hook":
        fake_launcher.append("a profiler's launch hook")
    else:
        monkeypatch.setattr(_FakeKernel, "run", lambda self, *a, grid, warmup, **k: self.log.append(("patched",)))
    _common.launch_kernel(kernel, (1,), *args, **meta)
    assert kernel.log[-1][0] in ("triton", "patched")


@needs_descriptors
def test_tensor_descriptor_made_from_its_tiles_fields_is_the_constructed_one(monkeypatch):
    """From a tile's second descriptor on, ``tensor_descriptor`` fills the fields of the first
    (which keeps no tensor) and the tensor's own; the result is what Triton's constructor makes,
    and a tensor the constructor would refuse is still None."""
    cls = _common._descriptor_class()
    monkeypatch.setattr(_common, "_descriptor_fields", {})
    first = torch.zeros(64, 32, dtype=torch.float16)
    _common.tensor_descriptor(first, (16, 32))
    assert _common._descriptor_fields[(torch.float16, (16, 32))]["base"] is None
    for t in (torch.ones(48, 40, dtype=torch.float16)[:, :32], torch.zeros(3, 8, dtype=torch.float16)):
        made = _common.tensor_descriptor(t, (16, 32))
        built = cls(t, list(t.shape), list(t.stride()), [16, 32])
        assert type(made) is cls and made.base is t
        assert made.block_shape is not _common._descriptor_fields[(torch.float16, (16, 32))]["block_shape"]
        assert {k: v for k, v in vars(made).items() if k != "base"} == {k: v for k, v in vars(built).items() if k != "base"}
    other_tile = _common.tensor_descriptor(first, (32, 32))
    assert list(other_tile.block_shape) == [32, 32]
    assert _common.tensor_descriptor(torch.zeros(65, dtype=torch.float16)[1:].view(8, 8), (8, 8)) is None  # 2 bytes off
    assert _common.tensor_descriptor(torch.zeros(8, 6, dtype=torch.float16)[:, :4], (8, 8)) is None  # 12-byte rows
    assert _common.tensor_descriptor(torch.zeros(8, 8).t(), (8, 8)) is None  # strided last dim


@needs_descriptors
def test_tensor_descriptor_with_fields_it_does_not_know_is_always_constructed(monkeypatch):
    """A Triton whose descriptor has a field this code does not know (one that might depend on
    the tensor) gets every descriptor from its constructor."""
    import dataclasses


    @dataclasses.dataclass
    class Extended(_common._descriptor_class()):
        element_strides: list | None = None

        def __post_init__(self):
            super().__post_init__()
            self.element_strides = [1] * len(self.shape)

    monkeypatch.setattr(_common, "_descriptor_class", lambda: Extended)
    monkeypatch.setattr(_common, "_descriptor_fields", {})
    for rows in (64, 48, 32):
        made = _common.tensor_descriptor(torch.zeros(rows, 32, dtype=torch.float16), (16, 32))
        assert type(made) is Extended and made.shape == [rows, 32] and made.element_strides == [1, 1]
    assert _common._descriptor_fields == {}


@needs_descriptors
@pytest.mark.parametrize("change", ["none", "block shape", "dtype", "rank", "padding"])
def test_launch_kernel_launches_tensor_descriptors_directly(fake_launcher, change):
    """Host tensor descriptors (an unhashable dataclass) take the direct path from their second
    launch on, keyed by what Triton types them by (base dtype, block shape) and their rank and
    padding; shape, strides and base pointer are runtime arguments and may change."""
    cls = _common._descriptor_class()
    x = torch.zeros(64, 32)

    def desc(t, block=(16, 32), **extra):
        return cls(t, list(t.shape), list(t.stride()), list(block), **extra)

    kernel = _FakeKernel()
    _common.launch_kernel(kernel, (1,), desc(x), 48, 0.5, BLOCK=16)
    other = torch.ones(128, 32)  # another tensor and shape, same type
    _common.launch_kernel(kernel, (2,), desc(other), 48, 0.5, BLOCK=16)
    assert [entry[0] for entry in kernel.log] == ["triton", "fast"]
    launched = kernel.log[-1][1][9]
    assert isinstance(launched, cls) and launched.base is other
    changed = {
        "none": desc(torch.zeros(32, 32)),
        "block shape": desc(x, (32, 32)),
        "dtype": desc(x.half()),
        "rank": cls(x.view(2, 32, 32), [2, 32, 32], [1024, 32, 1], [1, 16, 32]),
        "padding": desc(x, padding="nan"),
    }[change]
    _common.launch_kernel(kernel, (1,), changed, 48, 0.5, BLOCK=16)
    assert kernel.log[-1][0] == ("fast" if change == "none" else "triton")


def test_launch_hooks_count_as_set_only_with_something_to_call():
    class Chain:  # Triton 3.6's HookChain: the hook attributes are never None
        def __init__(self, calls):
            self.calls = calls

    assert not _common._hook_active(None) and not _common._hook_active(Chain([]))
    assert _common._hook_active(Chain([print])) and _common._hook_active(print)


def test_launch_kernel_set_up_while_triton_run_is_patched_waits_for_the_real_one(monkeypatch):
    from triton.runtime.jit import JITFunction

    from megafold.kernels.precompile import record_launches

    import triton

    monkeypatch.setattr(_common, "interpreter_active", lambda: False)
    monkeypatch.setattr(_common, "_fast", [])
    kernel = _FakeKernel()
    # Triton < 3.3 (3.2 is the oldest supported) has no direct launches: the setup says so
    # at once (None, Triton's own path for good), patched or not.
    old_triton = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 3)
    with record_launches([]):  # patches JITFunction.run
        assert _common._fast_setup() is (None if old_triton else _common._NOT_YET)
        _common.launch_kernel(kernel, (1,), torch.zeros(4), 4, 0.5, BLOCK=16)
        assert _common._fast == ([None] if old_triton else [])  # else nothing decided yet
        assert kernel.log[-1][0] == "triton"
    assert JITFunction.run.__module__ == "triton.runtime.jit"


def test_launch_kernel_is_triton_own_path_under_the_interpreter():
    assert _common.interpreter_active()
    assert _common._fast_setup() is None


@pytest.mark.gpu
@pytest.mark.parametrize("descriptors", [False, pytest.param(True, marks=needs_descriptors)])
def test_launch_kernel_direct_launches_compute_what_triton_launches_compute(request, monkeypatch, descriptors):
    """On the GPU: EvoAttention's forward and backward (five kernels) give bitwise the same
    output and gradients through Triton's launch path and the direct one, for aligned and
    unaligned inputs and another scale; with ``descriptors``, every pass at a tensor-descriptor
    (TMA) candidate, whose launches go direct too."""
    import triton

    from megafold.kernels import evo_attention

    used = request.getfixturevalue("key_descriptors") if descriptors else []

    torch.manual_seed(0)
    B, S, N, H, D = 1, 2, 80, 4, 32
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v, gate = (torch.randn(B, S, N, H, D, device=dev, dtype=dt) for _ in range(4))
    bias = torch.randn(B, H, N, N, device=dev, dtype=dt)
    mask = torch.rand(B, S, N, device=dev) > 0.2

    def unaligned(t):  # the same values, 2 bytes past a 16-byte boundary
        flat = torch.empty(t.numel() + 1, device=dev, dtype=t.dtype)
        flat[1:].copy_(t.flatten())
        return flat[1:].view_as(t)

    def run(inputs, scale=None):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = evo_attention(*leaves[:3], leaves[3], mask, leaves[4], scale=scale)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        return [out, *grads]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    inputs = [q, k, v, bias, gate]
    _common._launchers.clear()
    reference = run(inputs)  # Triton's path: each kernel's launcher is recorded
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3):
        assert len(_common._launchers) >= 4
        descriptor_class = _common._descriptor_class()
        keyed = [key for key in _common._launchers
                 if any(isinstance(part, tuple) and part[:1] == (descriptor_class,) for part in key[2])]
        assert len(keyed) >= (4 if descriptors else 0)
    assert all(used) and len(used) == (4 if descriptors else 0)  # every pass of the aligned inputs took them
    assert same(run(inputs), reference)  # direct launches
    misaligned = [unaligned(t) for t in inputs]
    assert misaligned[0].data_ptr() % 16 != 0
    assert same(run(misaligned), reference) and same(run(misaligned), reference)
    other_scale = run(inputs, scale=0.3)
    monkeypatch.setattr(_common, "_fast", [None])  # Triton's path only
    assert same(run(inputs, scale=0.3), other_scale) and not same(other_scale, reference)


@pytest.mark.gpu
def test_graph_timing_leaves_the_loaders_copy_thread_alone():
    """The tuner captures inside a training step while the loader's prefetch thread pins host
    memory, allocates on the GPU and copies on its own stream. A global-mode capture forbids
    that thread's allocations; the tuner's thread-local capture must leave them alone."""
    from megafold.precache.loader import _CudaPrefetcher

    def batches():  # growing sizes: each batch makes the allocators ask the driver again
        for i in range(1, 49):
            yield {"x": torch.ones(i << 18).pin_memory()}  # i MiB of fp32

    x = torch.randn(1 << 20, device="cuda")
    prefetcher = _CudaPrefetcher(batches(), torch.device("cuda", torch.cuda.current_device()))
    seen = 0
    try:
        for batch in iter(prefetcher.__next__, None):
            assert batch["x"].sum().item() == batch["x"].numel()
            assert _common.bench_graph_ms(lambda: (x * 2).sum()) > 0
            seen += 1
    finally:
        prefetcher.close()
    assert seen == 48


@pytest.mark.gpu
def test_graph_timing_of_a_real_op_and_of_one_that_syncs():
    """On the GPU: a LayerNorm+Linear forward + backward times from a graph (a positive time
    below its plain calls' at this small size, where the host's launches dominate); a function
    with a host sync inside cannot be captured and raises."""
    from megafold.kernels import layernorm_linear

    x = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ln_w = torch.ones(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ln_b = torch.zeros(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        torch.autograd.grad(layernorm_linear(x, ln_w, ln_b, w).sum(), [x, w, ln_w, ln_b])

    graphed, plain = _common.bench_graph_ms(step), _common.bench_ms(step)
    assert 0 < graphed < plain
    stream = torch.cuda.current_stream()
    with pytest.raises(Exception):
        _common.bench_graph_ms(lambda: x.sum().item())
    # The failed capture leaves the process as it was: the caller's stream, and CUDA random
    # draws work (they raised "Offset increment outside graph capture" before the fix).
    assert torch.cuda.current_stream() == stream
    assert torch.randn(1000, device="cuda").std() > 0.5
    assert torch.cuda.is_current_stream_capturing() is False
