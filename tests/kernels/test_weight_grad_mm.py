"""benchmarks/weight_grad_mm.py records every add_weight_grad call of the pair ops' fwd+bwd with
the options each op passes (the timing itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import weight_grad_mm  # noqa: E402


def test_records_every_weight_gradient_call_with_its_options():
    calls = weight_grad_mm.record_calls(torch.device("cpu"), [8])
    assert {call["op"] for call in calls} == set(weight_grad_mm.MODULES)
    # the triangle's 4 c_h-wide product asks for the swapped order; the recorder passes it on
    assert any(call["op"] == "triangle_multiply" and call.get("swapped") for call in calls)
    assert all(len(call["grad"]) == 2 and call["grad"][0] == call["act"][0] for call in calls)
    assert set(weight_grad_mm.WAYS) >= {"widening", "widening_swapped", "rounded"}
