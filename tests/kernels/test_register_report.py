"""benchmarks/register_report.py compiles a kernel for an H100, or an AMD MI300X, without a
GPU and reads its register and spill report (the tool behind the spill figures in
benchmarks/NOTES.md, and the check that the kernels build for AMD GPUs), specialized as a
real launch is (unit strides constant, 16-divisible arguments marked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_offline_compile_reports_registers_and_spills(tmp_path):
    # A child process: the kernels must be defined without TRITON_INTERPRET, which this
    # test session sets before they are imported.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "register_report.py"),
                          "--only", "layernorm_linear fwd 128->16", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (report,) = tmp_path.glob("sm_90-offline/*-register_report-triton*.json")
    (row,) = json.loads(report.read_text())["rows"]
    assert "error" not in row, row
    # compiled with the specialization of a real launch (arguments captured from the op)
    assert row["specialized"] is True, row
    assert 0 < row["registers"] <= 255, row
    assert row["spill_stores"] is not None and row["spill_stores"] >= 0, row
    assert row["shared_kib"] > 0 and row["wgmma"] > 0 and row["wgmma_serialized"] is None, row


def test_sass_loops_are_backward_branches_with_their_bodies():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import register_report

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FADD.FTZ R2, R2, R3 ;
        /*0020*/              @!P0 LDG.E R4, desc[UR4][R6.64] ;
.L_x_1:
        /*0030*/                   FADD R2, R2, R4 ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/                   MUFU.EX2 R5, R2 ;
        /*0060*/              @!P2 BRA `(.L_x_0) ;
        /*0070*/                   BRA `(.L_x_2);
.L_x_2:
        /*0080*/                   EXIT ;
"""
    inner, outer = register_report.sass_loops(sass)
    assert (inner["start"], inner["end"], inner["instructions"]) == ("0x30", "0x40", 2)
    assert inner["opcodes"] == {"FADD": 1, "BRA": 1}
    assert (outer["start"], outer["end"], outer["instructions"]) == ("0x10", "0x60", 6)
    assert outer["opcodes"] == {"FADD": 2, "BRA": 2, "LDG": 1, "MUFU": 1}


def test_serialized_wgmma_is_read_from_ptxas_notes():
    # ptxas's C7515 note: the kernel's wgmma instructions wait for one another (a dK/dV
    # variant with fewer instructions ran 12% slower for it, session 22).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import register_report

    note = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
            "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of "
            "the pipeline stage in the function '_kernel'\nptxas info    : Used 255 registers")
    assert register_report.wgmma_serialized(note) == ("non wgmma instructions defining accumulator registers "
                                                      "of a wgmma between start and end of the pipeline stage")
    assert register_report.wgmma_serialized("ptxas info    : Used 128 registers") is None


def test_offline_compile_reports_each_loops_instructions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "register_report.py"),
                          "--only", "evo_attention fwd", "--loops", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (report,) = tmp_path.glob("sm_90-offline/*-register_report-triton*.json")
    (row,) = json.loads(report.read_text())["rows"]
    # The key-block loops: whole blocks without the mask, then the rest with it (a select
    # of the logits in each iteration).
    unmasked, masked = row["loops"]
    for loop in (unmasked, masked):
        assert loop["instructions"] > 100 and loop["opcodes"].get("MUFU", 0) > 0, loop  # exp2
    assert unmasked["instructions"] < masked["instructions"], row["loops"]


def test_offline_compile_for_an_amd_gpu_reports_registers_and_lds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "register_report.py"), "--hip", "gfx942",
                          "--defaults", "--only", "evo_attention prep", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (report,) = tmp_path.glob("gfx942-offline/*-register_report-triton*-defaults.json")
    data = json.loads(report.read_text())
    assert data["config"]["defaults"] is True
    (row,) = data["rows"]
    if "ld.lld" in row.get("error", ""):
        # Triton 3.2 links AMD code objects with ROCm's ld.lld (later Triton links in-process):
        # the kernel compiled and assembled; only the link step needs ROCm.
        import triton

        assert tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 3), row
        return
    assert "error" not in row, row
    assert row["registers"] > 0 and row["vgpr_spills"] is not None and row["scratch_b"] is not None, row
    assert 0 < row["shared_kib"] <= 64 and row["fits_lds"] is True, row


def test_the_report_specializes_every_kernel_as_the_launcher_does():
    """Each kernel's arguments are captured from the ops and specialized by Triton's own
    launcher (constants equal to 1, arguments divisible by 16): without that the report
    compiles kernels that never run (no vectorized or pipelined loads)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "register_report.py"), "--check"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) >= 20 and all("as launched" in line for line in lines), run.stdout[-3000:]
    # the EvoAttention kernels' head-dim strides are unit strides: constants, as launched
    assert all(" 0 constants" not in line for line in lines), run.stdout[-3000:]
