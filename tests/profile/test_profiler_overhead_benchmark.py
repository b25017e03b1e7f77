"""benchmarks/profiler_overhead.py: plain and profiled runs alternate, each step is timed, the
profiled runs hook the modules and the plain ones do not, and the overhead is what the
recorded steps say. (The figure that matters needs a GPU host; this checks the bookkeeping.)"""

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
    assert [(row["round"], row["mode"]) for row in rows] == [
        (0, "plain"), (0, "profiled"), (1, "plain"), (1, "profiled")
    ]
    for row in rows:
        assert len(row["step_ms"]) == 2 and all(ms > 0 for ms in row["step_ms"])
        assert row["median_ms"] == statistics.median(row["step_ms"])
        assert row["rise"] == pytest.approx(row["step_ms"][-1] / row["step_ms"][0] - 1)
    # Module hooks only in the profiled runs: many more timeline segments than stage boundaries.
    plain, profiled = rows[0]["switches"], rows[1]["switches"]
    assert plain < 10 < 10 * plain < profiled
    steps = {mode: [ms for row in rows if row["mode"] == mode for ms in row["step_ms"]] for mode in ("plain", "profiled")}
    expected = statistics.median(steps["profiled"]) / statistics.median(steps["plain"]) - 1
    assert result["overhead_frac"] == pytest.approx(expected)
    assert len(result["overhead_frac_per_round"]) == 2
    written = json.loads(Path(result["path"]).read_text())
    assert written["benchmark"] == "profiler-overhead" and written["rows"] == rows
    assert written["config"]["overhead_frac"] == pytest.approx(expected)


def test_bad_counts_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        profiler_overhead.parse_args(["--steps", "0"])
    assert "--steps and --rounds must be at least 1" in capsys.readouterr().err
