"""Why a pair op's kernels are slow: Nsight Compute's view of one fwd + bwd, summarised.

    ncu --kernel-name regex:'_triangle|_transition' --set full -o REPORT \\
        python benchmarks/ncu_ops.py run --ops triangle_multiply --ns 768
    ncu --kernel-name regex:_evo_attention_dkdv --set full -o REPORT \\
        python benchmarks/ncu_ops.py run --ops evo_attention --shape tri --ns 768 \\
        [--variant scratch/v/evo_attention@<commit>.py]
    python benchmarks/ncu_ops.py summarise REPORT.ncu-rep [--sass KERNEL] [--out DIR]

``run`` calls each named case of benchmarks/_pair_ops.py (the shapes kernels.py times; ``--shape``
picks one of an op's shapes) once, forward and backward, with the shipped tuning choices and
nothing else on the GPU, so that ncu sees exactly the op's launches. ``summarise`` reads the
report back with ``ncu --import`` (no GPU needed, only ncu) and writes, per profiled launch, its
duration, registers, occupancy, spill requests and the warp stall reasons (cycles per issued
instruction, largest first: ``smsp__average_warps_issue_stalled_*_per_issue_active``); with
``--sass KERNEL`` also that kernel's SASS hot spots: stall samples by opcode and the hottest
instructions. ncu locks the clocks, so its durations are longer than a plain run's; compare
kernels with each other, not with kernels.py. The `ncu` stage of benchmarks/gpu_suite.sh runs
both. JSON: results/<gpu>/<date>-ncu-<report name>.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DETAIL_METRICS = {  # name in `ncu --page details` -> key in the summary
    "Duration": "duration_ns",
    "Registers Per Thread": "registers",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Local Memory Spilling Requests": "spill_requests",
    "DRAM Throughput": "dram_throughput_pct",
    "Compute (SM) Throughput": "sm_throughput_pct",
    "Issue Slots Busy": "issue_slots_busy_pct",
}
# A launch in the text pages: "  name (grid)x(block), Context c, Stream s, ...".
LAUNCH_HEADER = re.compile(r"^  (\S+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context \d+, Stream \d+")
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")


def run(ops: list[str], ns: list[int], shape: str | None, variant: Path | None = None,
        device: str = "cuda") -> list[str]:
    """One fwd+bwd of each selected case; ``evo_attention`` among ``ops`` adds EvoAttention's
    case (``shape``: one of kernels.py's EVO_SHAPES, default ``tri``). ``variant``: a kernel
    module exported by ``variant_ab.py export`` (``<op>@<commit>.py``), run in place of the
    package's op, so that ncu profiles the variant's kernels. Returns what was run."""
    import contextlib

    import torch

    import _pair_ops

    cases = [case for case in _pair_ops.cases(False, device, ns)
             if case.op in ops and (not shape or case.shape == shape)]
    if "evo_attention" in ops:
        import kernels

        if (shape or "tri") not in kernels.EVO_SHAPES:
            raise SystemExit(f"--shape {shape}: not an EvoAttention shape (one of {', '.join(kernels.EVO_SHAPES)})")
        cases += [_pair_ops.evo_case(n, torch.device(device), shape or "tri") for n in ns]
    if not cases:
        raise SystemExit(f"no case of {ops} with shape {shape!r} at N={ns}")
    swap = contextlib.nullcontext()
    if variant is not None:
        import variant_ab

        op = Path(variant).stem.split("@")[0]
        if op not in ops:
            raise SystemExit(f"--variant {variant}: a module of {op}, which --ops {','.join(ops)} does not run")
        module = variant_ab.load_variant("ncu", Path(variant))
        swap = variant_ab.public_function(op, getattr(module, op))
    done = []
    with swap:
        for case in cases:
            out = case.implementations["megafold"](case.make_inputs())
            out.backward(torch.randn_like(out) * 0.1)
            if device == "cuda":
                torch.cuda.synchronize()
            done.append(f"{case.op} {case.shape} N={case.N}")
            print(f"{done[-1]}: one fwd+bwd" + (f" ({variant})" if variant else ""), flush=True)
    return done


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_details(text: str) -> list[dict]:
    """One record per launch from ``ncu --page details --print-units base``."""
    launches: list[dict] = []
    for line in text.splitlines():
        if LAUNCH_HEADER.match(line):
            launches.append({"kernel": line.split()[0], "launch": line.strip()})
            continue
        if not launches:
            continue
        for name, key in DETAIL_METRICS.items():
            match = re.match(rf"\s+{re.escape(name)}\s+(?:[^\d\s]\S*\s+)?([\d,.]+)\s*$", line)
            if match and key not in launches[-1]:
                launches[-1][key] = _number(match.group(1))
    return launches


def parse_stalls(text: str) -> list[dict[str, float]]:
    """Per launch, in order, the stall reasons of ``ncu --page raw``, largest first. Either
    ``--csv`` (a header row naming "Kernel Name" and the metrics, a units row, one row a
    launch) or the text page (a launch header line, then its metrics)."""
    per_launch: list[dict[str, float]] = []
    if text.lstrip().startswith('"'):
        rows = list(csv.reader(io.StringIO(text)))
        header_at = next(i for i, row in enumerate(rows) if "Kernel Name" in row)
        header = rows[header_at]
        columns = [(i, m.group(1)) for i, name in enumerate(header) if (m := STALL.fullmatch(name))]
        for row in rows[header_at + 1:]:
            if not row or not row[0].strip().isdigit():  # the units row
                continue
            per_launch.append({reason: _number(row[i]) for i, reason in columns if i < len(row) and row[i]})
    else:
        for line in text.splitlines():
            if LAUNCH_HEADER.match(line):
                per_launch.append({})
                continue
            match = STALL.search(line)
            if match and per_launch:
                per_launch[-1][match.group(1)] = _number(line.split()[-1])
    return [dict(sorted(s.items(), key=lambda kv: -kv[1])) for s in per_launch]


def parse_sass(text: str, top: int = 20) -> dict:
    """Stall samples by opcode and the hottest instructions from ``--page source --csv``."""
    rows = list(csv.reader(io.StringIO(text)))
    header_at = next(i for i, row in enumerate(rows) if "Source" in row)
    header = rows[header_at]
    src, samples, executed = (header.index(k) for k in
                              ("Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"))
    body = []
    for row in rows[header_at + 1:]:  # the first launch's table: later launches repeat it
        if "Kernel Name" in row or row == header:
            break
        if len(row) > max(src, samples, executed):
            body.append(row)
    total = sum(_number(row[samples] or "0") for row in body) or 1.0
    by_op, count = Counter(), Counter()
    for row in body:
        tokens = row[src].split()
        if not tokens:
            continue
        opcode = (tokens[1] if tokens[0].startswith("@") and len(tokens) > 1 else tokens[0]).split(".")[0]
        by_op[opcode] += _number(row[samples] or "0")
        count[opcode] += _number(row[executed] or "0")
    hottest = sorted(body, key=lambda row: -_number(row[samples] or "0"))[:top]
    return {
        "stall_samples": total,
        "instructions": len(body),
        "by_opcode": [{"opcode": op, "stall_share": round(s / total, 4), "executed": int(count[op])}
                      for op, s in by_op.most_common(top)],
        "hottest": [{"sass": row[src].strip()[:80], "samples": int(_number(row[samples] or "0"))} for row in hottest],
    }


def _ncu(report: Path, *args: str) -> str:
    return subprocess.run(["ncu", "--import", str(report), *args], capture_output=True, text=True, check=True).stdout


def summarise(report: Path, sass: str | None, out: Path | None) -> None:
    from _harness import environment, write_json

    launches = parse_details(_ncu(report, "--page", "details", "--print-units", "base"))
    for launch, stalls in zip(launches, parse_stalls(_ncu(report, "--page", "raw", "--csv", "--print-units", "base"))):
        launch["stalls_per_issued_instruction"] = stalls
    for launch in launches:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(launch.get("stalls_per_issued_instruction", {}).items())[:5])
        print(f"{launch['kernel'][:44]:44s} {launch.get('duration_ns', 0) / 1e3:8.1f} us  "
              f"regs {launch.get('registers', 0):.0f}  occ {launch.get('achieved_occupancy_pct', 0):.1f}%  "
              f"spills {launch.get('spill_requests', 0):.0f}  stalls: {top}")
    extra = {}
    if sass:
        extra["sass"] = {"kernel": sass, **parse_sass(_ncu(report, "--page", "source", "--print-source", "sass",
                                                           "--csv", "--kernel-name", sass))}
        for row in extra["sass"]["by_opcode"][:10]:
            print(f"  {row['opcode']:12s} {100 * row['stall_share']:5.1f}% of stall samples, {row['executed']} executed")
    write_json(f"ncu-{report.name.removesuffix('.ncu-rep')}", environment(), launches,
               {"report": report.name, **extra}, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="one fwd+bwd of each op (under ncu)")
    run_p.add_argument("--ops", default="triangle_multiply")
    run_p.add_argument("--ns", default="768")
    run_p.add_argument("--shape", default=None, help="one of the op's shapes, e.g. 128->128 or tri")
    run_p.add_argument("--variant", type=Path, default=None,
                       help="a module from variant_ab.py export, run in place of its op")
    sum_p = sub.add_parser("summarise", help="stall reasons and SASS hot spots of a report")
    sum_p.add_argument("report", type=Path)
    sum_p.add_argument("--sass", default=None, help="kernel name for the SASS hot spots")
    sum_p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.ops.split(","), [int(n) for n in args.ns.split(",")], args.shape, args.variant)
    else:
        summarise(args.report, args.sass, args.out)


if __name__ == "__main__":
    main()
