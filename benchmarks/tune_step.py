"""Tune every kernel shape key of one training step on this GPU: compile in parallel, then time.

    MEGAFOLD_CACHE_DIR=/tmp/tune python benchmarks/tune_step.py [--preset paper] [--crop 384]
        [--msa-rows 256] [--workers 16] [--set FIELD=VALUE ...] [--no-precompile]

``megafold.profile.tune_kernels`` (also ``megafold tune``) does the work: a recorded step
launches every candidate of each key that would be tuned, worker processes compile them, one
step with tuning on times them, and a step with tuning off checks that no key is left
without a choice. This script writes what it did as a benchmark JSON
(``results/<gpu>/<date>-tune_step-<preset>-<crop>.json``): the three phases' times, the compile
report and one row per key tuned in this run (op, shape key, the chosen configuration, its
time, the candidates' count and the slowest one's time); ``untuned`` lists the keys the last
step ran without a choice. To ship the choices with the package, merge
``$MEGAFOLD_CACHE_DIR/autotune.json`` into ``megafold/kernels/tuned/<GPU name>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import config_overrides, environment, print_table, write_json  # noqa: E402

from megafold.kernels._common import autotune_cache_path  # noqa: E402
from megafold.model import preset  # noqa: E402
from megafold.profile import tune_kernels  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--msa-rows", type=int, default=256, help="as train_step.py's synthetic batches")
    parser.add_argument("--atoms-per-token", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: CPUs, at most 16)")
    parser.add_argument("--no-precompile", action="store_true", help="tune compiling in the step, as before")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config override")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tune_step.py tunes for a GPU: there is none here")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  cache {autotune_cache_path()}")
    result = tune_kernels(preset(args.preset, **config_overrides(args.set)), crop=args.crop, msa_rows=args.msa_rows,
                          atoms_per_token=args.atoms_per_token, workers=args.workers,
                          precompile=not args.no_precompile)
    phases, compiled = result["phases"], result["precompile"]
    if compiled is not None:
        print(f"precompiled {compiled['compiled']} of {compiled['records']} launches in {phases['precompile_s']} s"
              f" ({len(compiled['problems'])} problems)")
    print(f"tuning step: {phases['tuning_step_s']} s, {len(result['tuned'])} keys tuned; step with tuning off: "
          f"{phases['tuned_step_s']} s, {len(result['untuned'])} keys without a choice")
    command = " ".join(["python", "benchmarks/tune_step.py", *(argv if argv is not None else sys.argv[1:])])
    path = write_json(f"tune_step-{args.preset}-{args.crop}", env, result["tuned"],
                      {"preset": args.preset, "crop": args.crop, "msa_rows": args.msa_rows,
                       "autotune": os.environ.get("MEGAFOLD_AUTOTUNE", "1"), "phases": phases,
                       "precompile": compiled, "cache": str(autotune_cache_path()), "command": command},
                      args.out)
    print()
    print_table(result["tuned"], ["op", "key", "ms", "slowest_ms", "candidates", "ran"])
    print(f"\nchoices in {autotune_cache_path()}\nwrote {path}")


if __name__ == "__main__":
    main()
