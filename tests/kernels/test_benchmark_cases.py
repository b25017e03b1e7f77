"""The pair-op benchmark's own cases (benchmarks/_pair_ops.py) run on the CPU and agree with
their float64 references: a smoke run whose numbers are wrong would hide a broken row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _pair_ops  # noqa: E402


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
