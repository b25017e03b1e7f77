"""The kernel benchmark's own cases (benchmarks/_pair_ops.py, kernels.py's EvoAttention rows)
run on the CPU and agree with their references: a smoke run whose numbers are wrong would hide
a broken row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _pair_ops  # noqa: E402
import kernels  # noqa: E402


def test_cpu_cases_run_in_fp16():
    # Triton's interpreter mishandles bf16 arithmetic: the CPU smoke run uses fp16.
    assert _pair_ops.dtype_for("cpu") == torch.float16
    assert _pair_ops.dtype_for(torch.device("cuda", 0)) == torch.bfloat16


@pytest.mark.parametrize("op", ["layernorm_linear", "triangle_multiply"])
def test_megafold_rows_match_their_reference(op):
    rows: list[dict] = []
    _pair_ops.run([12], torch.device("cpu"), rows, ops=(op,), impls=("megafold",))
    assert rows and all("error" not in row for row in rows), rows
    # fp16 operands and outputs (2^-11 relative per rounding); a layout bug gives O(1).
    assert max(row["rel_err"] for row in rows) < 1e-2, rows


def test_evo_attention_rows_match_their_reference():
    rows: list[dict] = []
    kernels.bench_evo([12], ["tri", "pairbias24"], torch.device("cpu"), rows, impls=("megafold",))
    assert len(rows) == 2 and all("error" not in row for row in rows), rows
    # fp16 inputs against the fp32 reference; a bf16 smoke run gave errors of ~1e10.
    assert max(row["rel_err"] for row in rows) < 1e-2, rows


def test_a_stopped_benchmark_keeps_the_rows_that_finished():
    """`timeout` sends SIGTERM: the benchmarks stop measuring, not the process, so the JSON still
    gets every finished row and says it was interrupted (session 13 lost a run's rows this way)."""
    import os
    import signal

    from _harness import stop_gracefully

    rows = []
    before = signal.getsignal(signal.SIGTERM)
    with stop_gracefully() as stopped:
        rows.append({"N": 256})
        os.kill(os.getpid(), signal.SIGTERM)
        rows.append({"N": 384})  # never reached: the signal ends the block
    assert stopped["interrupted"] is True and rows == [{"N": 256}]
    assert signal.getsignal(signal.SIGTERM) == before  # the process's own handler is back
    with stop_gracefully() as stopped:
        rows.append({"N": 512})
    assert stopped["interrupted"] is False and len(rows) == 2


def test_a_table_of_no_rows_prints_its_header(capsys):
    """A run stopped before its first row finished (session 21: `timeout` during tuning) still
    prints its table and writes its JSON; the table printer once raised on no rows."""
    from _harness import print_table

    print_table([], ["op", "ms"])
    assert capsys.readouterr().out.split() == ["op", "ms"]
    print_table([{"op": "evo_attention", "ms": 1.5}], ["op", "ms"])
    assert capsys.readouterr().out.split() == ["op", "ms", "evo_attention", "1.50"]
