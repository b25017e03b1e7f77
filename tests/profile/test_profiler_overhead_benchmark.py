"""benchmarks/profiler_overhead.py: training, plain and profiled runs alternate, each step is
timed, the profiled runs hook the modules and the others do not, only the training runs use the
model's own checkpoint mode, and the overheads are what the recorded steps say. (The figure that matters needs a GPU host; this checks the bookkeeping.)"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import profiler_overhead  # noqa: E402


def test_rounds_alternate_and_the_overhead_comes_from_the_recorded_steps(tmp_path):
    result = profiler_overhead.main(
        ["--preset", "tiny", "--crop", "8", "--quick", "--kernels", "torch", "--steps", "2", "--rounds", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = result["rows"]
    modes = profiler_overhead.MODES
    assert modes == ("training", "plain", "profiled", "graphed")
    assert [(row["round"], row["mode"]) for row in rows] == [(r, mode) for r in range(2) for mode in modes]
    for row in rows:
        assert len(row["step_ms"]) == 2 and all(ms > 0 for ms in row["step_ms"])
        assert row["median_ms"] == statistics.median(row["step_ms"])
        assert row["rise"] == pytest.approx(row["step_ms"][-1] / row["step_ms"][0] - 1)
    # Module hooks only in the profiled runs: many more timeline segments than stage boundaries.
    training, plain, profiled, graphed = (rows[i]["switches"] for i in range(4))
    assert training == plain < 10 < 10 * plain < profiled and 10 * plain < graphed
    steps = {mode: [ms for row in rows if row["mode"] == mode for ms in row["step_ms"]] for mode in profiler_overhead.MODES}
    median = {mode: statistics.median(values) for mode, values in steps.items()}
    expected = {
        "overhead_frac": median["profiled"] / median["plain"] - 1,
        "mode_frac": median["plain"] / median["training"] - 1,
        "total_frac": median["profiled"] / median["training"] - 1,
        "graphed_total_frac": median["graphed"] / median["training"] - 1,
    }
    written = json.loads(Path(result["path"]).read_text())
    assert written["benchmark"] == "profiler-overhead" and written["rows"] == rows
    for name, value in expected.items():
        assert result[name] == pytest.approx(value) and written["config"][name] == pytest.approx(value)
    assert len(result["overhead_frac_per_round"]) == len(result["mode_frac_per_round"]) == 2


def test_only_the_training_runs_leave_the_traced_checkpoint_mode(monkeypatch):
    """The plain and profiled runs are the traced step's mode (non-reentrant checkpoints, no
    graphed diffusion chunks); the training run is the model's own; the graphed run keeps the
    chunks' graphs and asks the profiler to time them as one region."""
    from megafold.model.primitives import gradients_may_bypass_autograd, graphed_chunks_allowed

    seen = []

    def fake_profile_step(config, *, modules, graphed_diffusion, **kwargs):
        seen.append((modules, graphed_diffusion, gradients_may_bypass_autograd(), graphed_chunks_allowed()))
        import xarray as xr

        return xr.Dataset({"step_ms": ("step", [1.0, 2.0]), "switches": ((), 5.0)})

    monkeypatch.setattr(profiler_overhead, "profile_step", fake_profile_step)
    modes = [profiler_overhead.run("tiny", 8, 2, mode)["mode"] for mode in profiler_overhead.MODES]
    assert modes == list(profiler_overhead.MODES)
    assert seen == [
        (False, False, True, True), (False, False, False, False), (True, False, False, False), (True, True, False, True)
    ]


def test_bad_counts_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        profiler_overhead.parse_args(["--steps", "0"])
    assert "--steps and --rounds must be at least 1" in capsys.readouterr().err
