"""benchmarks/ncu_ops.py reads Nsight Compute's text pages back into numbers: per launch the
duration, registers, occupancy and spills, the stall reasons, and a kernel's SASS hot spots.
Excerpts in the layout of ncu 2025 (the H100 machine's), shortened."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ncu_ops  # noqa: E402

DETAILS = """\
  _triangle_input_forward_kernel (4608, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %            36.95
    Duration                         ns          352,320
    Compute (SM) Throughput           %            51.18
    Local Memory Spilling Requests                                        0
    Local Memory Spilling Request Overhead           %               0
    Registers Per Thread             register/thread               125
    Achieved Occupancy                        %        24.49
  _triangle_input_backward_kernel (1536, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         ns          421,792
    Local Memory Spilling Requests                                  245,760
    Local Memory Spilling Request Overhead           %               105.26
    Registers Per Thread             register/thread               255
"""

RAW = """\
  _triangle_input_forward_kernel (4608, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio            ratio         1.08
    smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio    ratio         0.97
  _triangle_input_backward_kernel (1536, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio            ratio         1.24
    smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio    ratio         1.42
"""

SASS = """\
"Kernel Name","_triangle_input_backward_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","# Samples","Instructions Executed"
"0x10","      BAR.SYNC.DEFER_BLOCKING 0x0","300","280","300","4"
"0x20","      FMUL R1, R2, R3","100","50","100","1000"
"0x30","@!P0  FMUL R4, R2, R3","60","10","60","800"
"0x40","      STL [R1+0x8], R5","40","40","40","8"
"""


def test_details_give_one_record_per_launch():
    first, second = ncu_ops.parse_details(DETAILS)
    assert first["kernel"] == "_triangle_input_forward_kernel"
    assert first["duration_ns"] == 352320 and first["registers"] == 125
    assert first["achieved_occupancy_pct"] == 24.49 and first["spill_requests"] == 0
    # the overhead line (a percentage) does not overwrite the request count
    assert second["spill_requests"] == 245760 and second["registers"] == 255
    assert "achieved_occupancy_pct" not in second


def test_stalls_are_per_launch_and_largest_first():
    forward, backward = ncu_ops.parse_stalls(RAW)
    assert list(forward) == ["barrier", "long_scoreboard"] and forward["barrier"] == 1.08
    assert list(backward) == ["long_scoreboard", "barrier"] and backward["long_scoreboard"] == 1.42


def test_sass_hot_spots_by_opcode():
    summary = ncu_ops.parse_sass(SASS)
    assert summary["stall_samples"] == 500 and summary["instructions"] == 4
    by_op = {row["opcode"]: row for row in summary["by_opcode"]}
    assert by_op["BAR"]["stall_share"] == 0.6
    assert by_op["FMUL"]["stall_share"] == 0.32 and by_op["FMUL"]["executed"] == 1800  # predicated one counted
    assert summary["hottest"][0] == {"sass": "BAR.SYNC.DEFER_BLOCKING 0x0", "samples": 300}


RAW_CSV = """\
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","launch__registers_per_thread"
"","","","","","","","","","","","ratio","ratio","register/thread"
"0","771","python3.12","127.0.0.1","_triangle_input_forward_kernel","1","7","(256, 1, 1)","(4608, 1, 1)","0","9.0","1.08","0.41","125"
"1","771","python3.12","127.0.0.1","_triangle_output_forward_kernel (a name with spaces)","1","7","(256, 1, 1)","(9216, 1, 1)","0","9.0","0.50","0.82","254"
"""


def test_stalls_from_the_csv_page_one_row_a_launch():
    forward, output = ncu_ops.parse_stalls(RAW_CSV)
    assert forward == {"barrier": 1.08, "wait": 0.41}
    assert list(output) == ["wait", "barrier"] and output["barrier"] == 0.5


def test_text_pages_count_launch_headers_only():
    # an indented line with parentheses that is not a launch (the session-18 misalignment)
    noisy = "  [771] python3.12 (pid 771)\n" + RAW
    assert len(ncu_ops.parse_stalls(noisy)) == 2
    assert [r["kernel"] for r in ncu_ops.parse_details("  note (x)\n" + DETAILS)] == [
        "_triangle_input_forward_kernel", "_triangle_input_backward_kernel"]


def test_sass_of_several_launches_reads_the_first_table():
    repeated = SASS + SASS  # one table a launch of the kernel (three chunks: three tables)
    assert ncu_ops.parse_sass(repeated) == ncu_ops.parse_sass(SASS)


def test_run_profiles_evo_attention_and_a_variant_in_place_of_the_op(tmp_path):
    # `run --ops evo_attention --variant <op>@<commit>.py`: the case's fwd+bwd goes through the
    # variant's function (here a wrapper that counts its calls), so ncu sees its kernels.
    variant = tmp_path / "evo_attention@fake.py"
    variant.write_text(
        "from megafold.kernels import evo_attention as _real\n"
        "CALLS = []\n"
        "def evo_attention(*args, **kwargs):\n"
        "    CALLS.append(kwargs.get('backend'))\n"
        "    return _real(*args, **kwargs)\n"
    )
    done = ncu_ops.run(["evo_attention"], [12], "tri", variant, device="cpu")
    assert done == ["evo_attention tri N=12"]
    assert sys.modules["megafold.kernels._variant_ncu"].CALLS == ["triton"]
    with pytest.raises(SystemExit, match="does not run"):
        ncu_ops.run(["triangle_multiply"], [12], None, variant, device="cpu")
    with pytest.raises(SystemExit, match="not an EvoAttention shape"):
        ncu_ops.run(["evo_attention"], [12], "no-such-shape", None, device="cpu")
    with pytest.raises(SystemExit, match="no case"):
        ncu_ops.run(["transition"], [12], "no-such-shape", None, device="cpu")
