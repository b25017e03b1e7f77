"""Tune every kernel shape key of one training step on this GPU: compile in parallel, then time.

    MEGAFOLD_CACHE_DIR=/tmp/tune python benchmarks/tune_step.py [--preset paper] [--crop 384]
        [--msa-rows 256] [--workers 16] [--set FIELD=VALUE ...] [--no-precompile]

A key without a stored choice is tuned the first time a step launches it: each of its 10-50
candidate configurations is compiled (one after the other, in the launching thread) and timed.
On a GPU with no shipped choices that is more than ten minutes of a "paper" step, nearly all of
it compiling. This script:

1. records a throwaway step in which every key that would be tuned launches each of its
   candidates (``precompile_kernels(..., candidates=True)``; nothing runs) and compiles those
   records in worker processes;
2. runs one step of synthetic data at ``--crop`` with tuning on (``MEGAFOLD_AUTOTUNE`` as set:
   ``1``, the default, tunes the keys without a choice, ``force`` every key), the CUDA graphs
   off so that no key is first met inside a capture: each key is now only timed, and its
   choice written to ``$MEGAFOLD_CACHE_DIR/autotune.json`` (every candidate's time beside it);
3. runs the step again with tuning off, timed, and lists the keys that still ran defaults
   (``untuned`` in the JSON; none is expected).

The JSON (``results/<gpu>/<date>-tune_step-<preset>-<crop>.json``) has the three phases' times
and one row per key tuned in this run: op, shape key, the chosen configuration, its time and
the spread of the candidates' times. To ship the choices with the package, merge that
``autotune.json`` into ``megafold/kernels/tuned/<GPU name>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import config_overrides, environment, print_table, write_json  # noqa: E402

from megafold.kernels import _common  # noqa: E402
from megafold.model import AlphaFold3, preset  # noqa: E402
from megafold.model.synthetic import synthetic_batch  # noqa: E402
from megafold.profile.profiler import precompile_kernels, variants  # noqa: E402


def step_seconds(model: AlphaFold3, batch, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    loss, _ = model.training_loss(batch, n_cycles=1)
    loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return time.perf_counter() - began


def tuned_rows(before: set, device_name: str) -> list[dict]:
    rows = []
    for record in _common.tuning_records():
        name = (record["op"], str(record["key"]), record["device"])
        if name in before or record["device"] != device_name:
            continue
        times = [trial["ms"] for trial in record["trials"] if "ms" in trial]
        rows.append({"op": record["op"], "key": record["key"], "chosen": record["chosen"], "ms": record["ms"],
                     "candidates": len(record["trials"]), "ran": len(times),
                     "slowest_ms": max(times) if times else None})
    return rows


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
    if not _common.autotune_enabled():
        sys.exit("MEGAFOLD_AUTOTUNE=0: nothing would be tuned (unset it, or set 1 or force)")
    device = torch.device("cuda")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  cache {_common.autotune_cache_path()}")
    variant = variants(preset(args.preset, **config_overrides(args.set)), ("triton",))["triton"]
    before = {(r["op"], str(r["key"]), r["device"]) for r in _common.tuning_records()}
    phases = {}

    compiled = None
    if not args.no_precompile:
        began = time.perf_counter()
        handle = precompile_kernels(variant, crop=args.crop, device=device, msa_rows=args.msa_rows,
                                    atoms_per_token=args.atoms_per_token, workers=args.workers, candidates=True)
        compiled = handle.wait() if handle is not None else {"records": 0, "compiled": 0, "problems": []}
        phases["precompile_s"] = round(time.perf_counter() - began, 1)
        print(f"precompiled {compiled['compiled']} of {compiled['records']} launches in {phases['precompile_s']} s"
              f" ({len(compiled['problems'])} problems)", flush=True)

    torch.manual_seed(0)
    config = variant.config.replace(rollout_cuda_graph=False, diffusion_cuda_graph=False)
    with torch.device(device):
        model = AlphaFold3(config).train()
    batch = synthetic_batch(args.crop, atoms_per_token=args.atoms_per_token, msa_rows=args.msa_rows,
                            device=device, seed=0)
    phases["tuning_step_s"] = round(step_seconds(model, batch, device), 1)
    rows = tuned_rows(before, env["device"])
    print(f"tuning step: {phases['tuning_step_s']} s, {len(rows)} keys tuned", flush=True)

    _common._untuned.clear()
    with mock.patch.dict(os.environ, {"MEGAFOLD_AUTOTUNE": "0"}):
        phases["tuned_step_s"] = round(step_seconds(model, batch, device), 2)
        still = _common.untuned_keys()
    print(f"step with tuning off: {phases['tuned_step_s']} s, {len(still)} keys without a choice", flush=True)

    command = " ".join(["python", "benchmarks/tune_step.py", *(argv if argv is not None else sys.argv[1:])])
    path = write_json(f"tune_step-{args.preset}-{args.crop}", env, rows,
                      {"preset": args.preset, "crop": args.crop, "msa_rows": args.msa_rows,
                       "autotune": os.environ.get("MEGAFOLD_AUTOTUNE", "1"), "phases": phases,
                       "precompile": compiled,
                       "cache": str(_common.autotune_cache_path()), "command": command},
                      args.out)
    print()
    print_table(rows, ["op", "key", "ms", "slowest_ms", "candidates", "ran"])
    print(f"\nchoices in {_common.autotune_cache_path()}\nwrote {path}")


if __name__ == "__main__":
    main()
