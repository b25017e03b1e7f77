"""The profiler's own cost: training, plain and profiled steps, in alternating runs, one process.

    PYTHONPATH=. python benchmarks/profiler_overhead.py                    # "paper", crop 384, triton (GPU)
    PYTHONPATH=. python benchmarks/profiler_overhead.py --rounds 3 --steps 6
    PYTHONPATH=. python benchmarks/profiler_overhead.py --preset tiny --crop 16 --quick --kernels torch  # CPU

``profile_step`` reports ``overhead_ms`` against one plain step taken before the profiled
ones. On a GPU host a single baseline is fragile: session 26's "paper" step at crop 384 gave
a plain 4370 ms and profiled steps of 4726, 5307 and 5528 ms, a series that rose step by
step. This script separates what the hooks cost from what drifts:
- each round runs ``--steps`` training steps (below), then ``--steps`` plain steps
  (``profile_step(modules=False)``: stage boundaries only, no module or autograd hooks) and
  then ``--steps`` profiled ones, each run after its own warmup step, the rounds one after
  the other;
- every plain and profiled step runs with non-reentrant checkpoints
  (``nonreentrant_checkpoints``), which the profiled step needs for its backward hooks. A plain step would otherwise checkpoint
  reentrantly, so both sides carry the same checkpoint mode and the difference is the hooks
  alone (``dashboard_screenshot.py --overhead`` compares against a reentrant plain step);
- per run it records every step's time. ``rise`` is the run's last step over its first: a
  profiled series that rises where the plain one does not points at the hooks (something
  that piles up across steps), both rising at the host or the GPU.

The overhead is the median profiled step over the median plain step, minus one, over all
rounds, and per round.

The traced step is not the step training runs. Inside ``nonreentrant_checkpoints()`` the
blocks checkpoint non-reentrantly (an autograd graph and saved-tensor hooks for every
recomputed block) and the diffusion chunks run eagerly instead of replaying CUDA graphs
(``gradients_may_bypass_autograd``), so a launch-bound step slows down before any hook runs.
Each round therefore also runs ``--steps`` steps as training runs them (``mode`` "training":
the config's own checkpoints, graphed chunks, no hooks): ``mode_frac`` is the median plain
step over the median training step, minus one, and ``total_frac`` the median profiled step
over it. A fourth run per round ("graphed") profiles with ``graphed_diffusion=True``, which
keeps the chunks' CUDA graphs in the traced step: ``graphed_total_frac`` is its median step
over the median training step, minus one. Writes
``results/<gpu-name>/<date>-profiler-overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json  # noqa: E402

from megafold.model import preset  # noqa: E402
from megafold.model.primitives import graphed_chunks_under_trace, nonreentrant_checkpoints  # noqa: E402
from megafold.profile import profile_step  # noqa: E402
from megafold.profile.widgets import QUICK_OVERRIDES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper" if gpu else "tiny")
    parser.add_argument("--crop", type=int, default=384 if gpu else 16)
    parser.add_argument("--kernels", choices=("torch", "triton"), default="triton" if gpu else "torch")
    parser.add_argument("--quick", action="store_true", help="one block per stack")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="training, plain, profiled and graphed runs, this many times")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be at least 1, got {args.steps} and {args.rounds}")
    return args


MODES = ("training", "plain", "profiled", "graphed")


def run(config, crop: int, steps: int, mode: str) -> dict:
    """One run: a warmup step, then ``steps`` measured ones, in one of ``MODES``: "training"
    (the config's own checkpoints and CUDA graphs, stage boundaries only), "plain" (the traced
    step's mode, stage boundaries only), "profiled" (the traced step, module hooks) or
    "graphed" (the traced step with ``graphed_diffusion=True``: the diffusion chunks replay
    their CUDA graphs, timed as one region)."""
    with contextlib.ExitStack() as modes:
        if mode != "training":
            modes.enter_context(nonreentrant_checkpoints())
        if mode == "graphed":
            modes.enter_context(graphed_chunks_under_trace())
        ds = profile_step(config, crop=crop, warmup=1, steps=steps, modules=mode in ("profiled", "graphed"),
                          graphed_diffusion=mode == "graphed", measure_overhead=False)
    step_ms = [float(ms) for ms in ds["step_ms"].values]
    return {
        "mode": mode,
        "step_ms": step_ms,
        "median_ms": statistics.median(step_ms),
        "rise": step_ms[-1] / step_ms[0] - 1,
        "switches": int(ds["switches"]),
    }


def overhead(rows: list[dict], over: str = "profiled", base: str = "plain") -> float:
    """Median step of mode ``over`` over the median step of mode ``base``, minus one."""
    steps = {mode: [ms for row in rows if row["mode"] == mode for ms in row["step_ms"]] for mode in (over, base)}
    return statistics.median(steps[over]) / statistics.median(steps[base]) - 1


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = preset(args.preset, kernels=args.kernels, **(QUICK_OVERRIDES if args.quick else {}))
    env = environment()
    print(f"{env['device']}: {args.preset}{' (quick)' if args.quick else ''}, crop {args.crop}, "
          f"kernels {args.kernels}, {args.rounds} rounds of {args.steps} steps in each mode ({', '.join(MODES)})")
    rows = []
    for index in range(args.rounds):
        for mode in MODES:
            row = {"round": index, **run(config, args.crop, args.steps, mode)}
            rows.append(row)
            print(f"round {index} {row['mode']:8s} " + " ".join(f"{ms:.0f}" for ms in row["step_ms"]) + " ms")
    per_round = [[r for r in rows if r["round"] == i] for i in range(args.rounds)]
    summary = {
        "overhead_frac": overhead(rows),
        "overhead_frac_per_round": [overhead(round_rows) for round_rows in per_round],
        "mode_frac": overhead(rows, "plain", "training"),
        "mode_frac_per_round": [overhead(round_rows, "plain", "training") for round_rows in per_round],
        "total_frac": overhead(rows, "profiled", "training"),
        "graphed_total_frac": overhead(rows, "graphed", "training"),
    }
    print_table(rows, ["round", "mode", "median_ms", "rise", "switches"])
    print(f"hooks (median profiled / median plain - 1): {summary['overhead_frac']:+.1%}; per round "
          + ", ".join(f"{frac:+.1%}" for frac in summary["overhead_frac_per_round"]))
    print(f"traced mode (median plain / median training - 1): {summary['mode_frac']:+.1%}; per round "
          + ", ".join(f"{frac:+.1%}" for frac in summary["mode_frac_per_round"]))
    print(f"profiled step over the training step: {summary['total_frac']:+.1%}; with graphed_diffusion: "
          f"{summary['graphed_total_frac']:+.1%}")
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    path = write_json("profiler-overhead", env, rows, {**settings, **summary}, out_dir=args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": path, **summary}


if __name__ == "__main__":
    main()
