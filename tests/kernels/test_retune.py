"""benchmarks/retune.py: which keys ``--only`` tunes, and the per-key summary of the trials."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import retune  # noqa: E402

DKDV = ["dkdv", 1024, 1024, 32, 4, "torch.bfloat16", True]
FWD = ["fwd", 1024, 1024, 32, 4, "torch.bfloat16", True]


def selected(module_op: str, op: str, key, only: list[str]) -> bool:
    """Whether ``retune.py --op module_op --only *only`` tunes ``op``'s ``key``."""
    from megafold.kernels._common import op_selected

    return op_selected(op, key, retune.tune_parts(module_op, only))


def test_only_selects_by_the_keys_json():
    assert selected("evo_attention", "evo_attention", DKDV, [])
    assert selected("evo_attention", "evo_attention", DKDV, ["dkdv"])
    assert not selected("evo_attention", "evo_attention", FWD, ["dkdv"])
    assert selected("transition", "transition_bwd", (128, 512, 128), ["transition_bwd", "dkdv"])
    assert not selected("transition", "transition_fwd", (128, 512, 128), ["transition_bwd"])


def test_only_launches_the_default_for_keys_not_selected(fake_gpu, monkeypatch):
    from megafold.kernels._common import pick_config

    monkeypatch.setenv("MEGAFOLD_AUTOTUNE_OPS", ",".join(retune.tune_parts("evo_attention", ["dkdv"])))
    tuned = []
    launched = []

    def bench(kind):
        return lambda config: tuned.append(kind) or 1.0

    for kind in ("fwd", "dkdv"):
        launched.append(pick_config("evo_attention", [kind], fake_gpu, [{"x": 1}, {"x": 2}], {"x": 0}, bench(kind)))
    assert set(tuned) == {"dkdv"}
    assert launched[0] == {"x": 0}  # the forward's default, untimed


def test_where_offers_only_the_candidates_with_its_settings(monkeypatch):
    import importlib

    assert retune.parse_where(["TMA=true", "ROWS=2"]) == {"TMA": True, "ROWS": 2}
    for bad in ("TMA", "=1", "TMA=yes"):
        with pytest.raises(SystemExit, match="expected NAME=JSON"):
            retune.parse_where([bad])
    module = importlib.import_module("megafold.kernels.evo_attention")
    tuned = []
    monkeypatch.setattr(module, "run_tuned",
                        lambda op, key, device, candidates, default, launch, rows=None: tuned.append(candidates))
    for name in retune.KERNEL_MODULES:
        other = importlib.import_module(f"megafold.kernels.{name}")
        monkeypatch.setattr(other, "run_tuned", other.run_tuned)
    retune.offer_only({"TMA": True})
    candidates = [{"x": 1}, {"x": 2, "TMA": True}, {"x": 3, "TMA": True, "ROWS": 2}]
    launched = []
    module.run_tuned("evo_attention", ["dkdv"], None, candidates, {"x": 0}, launched.append)
    module.run_tuned("evo_attention", ["fwd"], None, [{"x": 1}], {"x": 0}, launched.append)
    assert tuned == [candidates[1:]]
    assert launched == [{"x": 0}]  # a key with no such candidate: its default, untimed


def test_summary_has_the_choice_and_the_best_of_each_kind():
    name = lambda op, key: json.dumps([op, key, "NVIDIA H200"])  # noqa: E731
    trials = {
        name("evo_attention", DKDV): [
            {"config": {"BLOCK_M": 128, "TMA": True}, "ms": 1.9, "chosen": True},
            {"config": {"BLOCK_M": 64}, "ms": 2.2},
            {"config": {"BLOCK_M": 64, "TMA": True}, "ms": 2.0},
            {"config": {"BLOCK_M": 32}, "ms": 2.1},
            {"config": {"BLOCK_M": 16, "TMA": True}, "error": "PTXASError: ..."},
        ],
        name("evo_attention", FWD): [{"config": {"BLOCK_M": 64}, "ms": 1.3, "chosen": True}],
        name("transition_fwd", [128, 512, 128]): [{"config": {"BLOCK_M": 64}, "ms": 0.5, "chosen": True}],
    }
    rows = retune.summarize(trials, "evo_attention", ["dkdv"])
    assert rows == [{"op": "evo_attention", "key": DKDV, "chosen": {"BLOCK_M": 128, "TMA": True}, "ms": 1.9,
                     "candidates": 5, "failed": 1, "pointer_ms": 2.1, "pointer_config": {"BLOCK_M": 32},
                     "descriptor_ms": 1.9, "descriptor_config": {"BLOCK_M": 128, "TMA": True}}]
    everything = retune.summarize(trials, "evo_attention", [])
    assert [r["key"][0] for r in everything] == ["dkdv", "fwd"]
    assert everything[1]["descriptor_ms"] is None


def test_it_refuses_to_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(retune.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="there is none here"):
        retune.main(["--op", "transition"])
