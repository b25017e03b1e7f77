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


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAFOLD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_common, "device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_common, "_memory_cache", {})
    monkeypatch.setattr(_common, "_untuned", [])
    monkeypatch.setattr(_common, "_fitted", {})
    monkeypatch.setattr(_common, "packaged_tuning_path", lambda device: tmp_path / "none.json")
    monkeypatch.setattr(_common, "device_capability", lambda device: None)
    return torch.device("cuda")


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
    assert best == {"BLOCK": 64} and calls == [32, 64, 128, 256]
    again = pick_config("op", (1, 2), fake_gpu, candidates, {"BLOCK": 32}, bench)
    assert again == best and len(calls) == 4  # the second call reads the cache
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert stored == {json.dumps(["op", [1, 2], "Fake GPU 80GB"]): {"BLOCK": 64}}
    trials = json.loads((tmp_path / "autotune-trials.json").read_text())[json.dumps(["op", [1, 2], "Fake GPU 80GB"])]
    assert [t.get("ms") for t in trials] == [3.0, 1.0, 2.0, None]
    assert [t["config"] for t in trials] == candidates and "out of shared memory" in trials[3]["error"]
    (record,) = tuning_records(tmp_path)
    assert record["op"] == "op" and record["key"] == [1, 2] and record["chosen"] == {"BLOCK": 64}
    assert record["ms"] == 1.0 and record["trials"] == [trials[1], trials[2], trials[0], trials[3]]  # fastest first
    _common._memory_cache.clear()  # a new process reads the choice from disk
    assert pick_config("op", (1, 2), fake_gpu, candidates, {"BLOCK": 32}, bench) == best
    assert len(calls) == 4


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


def test_a_stored_choice_that_does_not_fit_falls_back_to_the_default(fake_gpu):
    from megafold.kernels._common import run_tuned

    launched = []

    def launch(config):
        launched.append(config["BLOCK"])
        if config["BLOCK"] == 128:
            raise RuntimeError("out of resource: shared memory, Required: 264192")
        return config["BLOCK"]

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
    a program; the transition's default backward needs 104 KiB with two stages, 88 with one,
    benchmarks/register_report.py --arch 89 --defaults) launches the default with one stage."""
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
