"""Row-sharded trunk (megafold.train.dap): step time, memory per GPU and the longest crop, 1 GPU vs K.

    python benchmarks/dap.py [--gpus 2] [--ns 768] [--max-crop 4096] [--time-budget 450]

The 48-block Pairformer of the "paper" preset, bf16 autocast, per-block checkpointing with
bf16 pair storage, Triton kernels, fwd + bwd of ``mean(pair^2) + mean(single^2)``, as
``benchmarks/trunk.py`` measures it: on 1 GPU the ordinary ``PairformerStack``, on K GPUs the
same stack with its pair rows split over the K ranks (``pairformer_rows``; the parameter
gradients all-reduced as a step needs them). Every trial (GPU count, N) is its own
``torchrun`` launch: a rank that runs out of memory exits and torchrun stops the others,
which would otherwise wait in a collective for ever.

Rows: step time (median of ``--reps`` steps after a warm-up step) and peak memory above the
inputs and weights (the largest over the ranks; ``total_gib`` with them) at each of ``--ns``;
then the longest crop, each size tried with one step (its time is ``first_step_s``, kernel
loading included): predict, then verify. The first size tried is the longest on the grid
(``--step``, 128) whose peak, scaled from the largest timed crop of the same GPU count as
(pair rows per rank) x (crop), stays within 96% of the GPU's memory (with nothing timed:
``--start`` on 1 GPU, ``sqrt(K) x`` the 1-GPU longest on K); then up a step until out of
memory, or down until one fits (``--k1-longest`` skips the 1-GPU search). ``--time-budget``
(seconds, all trials together; the 1-GPU search may use 40% of what is left) stops a search,
and its row says so. ``--memory-gib`` caps each rank's allocator (an H200 searched as an 80 GB
H100). JSON: ``results/<gpu>/<date>-dap.json`` (written after every trial).
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
OOM_EXIT = 3


def worker(args) -> None:
    """One rank of one trial: a warm-up step, ``reps`` timed steps; rank 0 writes the result."""
    import torch

    from benchmarks._harness import config_overrides, is_oom
    from megafold.kernels import use_kernels
    from megafold.model import preset
    from megafold.model.pairformer import PairformerStack
    from megafold.train import distributed
    from megafold.train.dap import AxialShards, all_reduce_gradients, pairformer_rows

    device = distributed.init(args.device)
    cuda = device.type == "cuda"
    if cuda and args.memory_gib:
        # An allocator limit makes a larger GPU behave like a smaller one (an H200 like an H100's
        # 80 GB): out-of-memory happens where it would there. NCCL's own buffers are not counted.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total), device)
    config = preset(args.preset, kernels=args.kernels, pairformer_blocks=args.blocks, **config_overrides(args.set))
    torch.manual_seed(0)
    stack = PairformerStack(config, config.pairformer_blocks, config.c_z, config.c_s).to(device)
    shards = AxialShards.create(args.crop)
    sharded = args.impl == "dap"
    rows, padded = (shards.rows, shards.padded) if sharded else (args.crop, args.crop)
    pair = torch.randn(1, rows, padded, config.c_z, device=device, requires_grad=True)
    single = torch.randn(1, rows, config.c_s, device=device, requires_grad=True)
    token_mask = torch.zeros(1, padded, dtype=torch.bool, device=device)
    token_mask[:, : args.crop - max(1, args.crop // 20)] = True  # crop padding, as benchmarks/trunk.py
    pair_mask = token_mask[:, :, None] & token_mask[:, None, :]

    def step():
        with use_kernels(config.kernels), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            if sharded:
                pair_out, single_out = pairformer_rows(stack, pair, single, pair_mask, token_mask, shards)
            else:
                pair_out, single_out = stack(pair, single, pair_mask, token_mask)
        loss = pair_out.float().square().mean() + single_out.float().square().mean()
        loss.backward()
        if sharded:
            all_reduce_gradients(stack, shards)
        stack.zero_grad(set_to_none=True)
        pair.grad = single.grad = None

    def synchronize():
        if cuda:
            torch.cuda.synchronize()
        distributed.barrier()

    def start_measuring() -> int:
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if cuda else 0

    result_path = Path(args.result)
    try:
        base = start_measuring()
        start = time.perf_counter()
        step()  # warm-up: kernel loading, tuning (with --reps 0 the only step, as a crop search needs)
        synchronize()
        first_step_s = time.perf_counter() - start
        times = []
        if args.reps:
            base = start_measuring()
        for _ in range(args.reps):
            start = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - start)
    except Exception as error:
        if not is_oom(error):
            raise
        result_path.with_suffix(f".rank{shards.rank}.oom").write_text(str(error)[:300])
        sys.exit(OOM_EXIT)
    total = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = distributed.gather((total, total - base / 2**30))  # every rank's: the largest is reported
    if distributed.is_main():
        result_path.write_text(json.dumps({
            "step_s": statistics.median(times) if times else None,
            "first_step_s": first_step_s,
            "peak_gib": max(above for _, above in peaks) if cuda else None,
            "total_gib": max(total for total, _ in peaks) if cuda else None,
            "device_gib": (min(args.memory_gib or math.inf, torch.cuda.get_device_properties(device).total_memory / 2**30)
                           if cuda else None),
        }))  # fmt: skip


def trial(args, gpus: int, n: int, reps: int, timeout: float) -> dict:
    """One torchrun launch; {"step_s", "peak_gib", "total_gib"} or {"error": "OOM" | "timeout" | ...}."""
    impl = "dap" if gpus > 1 or args.k1_dap else "stack"
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   __file__, "--worker", "--crop", str(n), "--reps", str(reps), "--impl", impl,
                   "--blocks", str(args.blocks), "--kernels", args.kernels, "--preset", args.preset,
                   "--device", args.device, "--result", str(result), "--memory-gib", str(args.memory_gib),
                   *(f"--set={item}" for item in args.set)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        log = Path(folder) / "log.txt"
        with log.open("w") as output:
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
            try:
                process.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                # torchrun's ranks run in sessions of their own: SIGTERM lets torchrun stop them
                # (it escalates to SIGKILL after 30 s) rather than orphan them on the GPUs.
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                return {"error": "timeout"}
        if list(Path(folder).glob("*.oom")):
            return {"error": "OOM"}
        if process.returncode != 0 or not result.exists():
            print(log.read_text()[-3000:], file=sys.stderr)
            return {"error": f"exit {process.returncode}"}
        return json.loads(result.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="K of the sharded runs")
    parser.add_argument("--ns", default="768", help="crops timed on 1 and K GPUs ('' for none)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--start", type=int, default=1280, help="first crop of a search with nothing timed")
    parser.add_argument("--max-crop", type=int, default=4096)
    parser.add_argument("--step", type=int, default=128, help="crop grid of the search (64: finer, more trials)")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds for all trials")
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--kernels", default="triton")
    parser.add_argument("--preset", default="paper", help="model widths (\"tiny\" with --device cpu: a smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) | cpu (gloo, no memory figures)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a model config override for every run, e.g. --set attention_chunk=256")
    parser.add_argument("--k1-dap", action="store_true", help="1 GPU runs the sharded code too (its overhead)")
    parser.add_argument("--no-longest", action="store_true")
    parser.add_argument("--k1-longest", type=int, default=0,
                        help="the 1-GPU longest crop, if measured (trunk.py --longest): no 1-GPU search")
    parser.add_argument("--memory-gib", type=float, default=0.0,
                        help="GPU memory each rank may use (0: all): compare GPUs of one size on larger ones")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from benchmarks._harness import environment, print_table, write_json

    env, rows, started = environment(), [], time.perf_counter()
    config = {"preset": args.preset, "blocks": args.blocks, "bf16": True, "checkpoint": True, "kernels": args.kernels,
              "gpus": args.gpus, "time_budget_s": args.time_budget, "k1_dap": args.k1_dap,
              "k1_longest_given": args.k1_longest or None, "overrides": args.set,
              "search_step": args.step, "memory_gib": args.memory_gib or None}  # fmt: skip
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}", flush=True)

    def left() -> float:
        return args.time_budget - (time.perf_counter() - started)

    def record(row: dict) -> None:
        rows.append(row)
        print("  ", row, flush=True)
        write_json("dap", env, rows, config, args.out)

    def impl(gpus: int) -> str:
        return "dap" if gpus > 1 or args.k1_dap else "stack"

    for n in [int(n) for n in args.ns.split(",") if n]:
        for gpus in (1, args.gpus):
            if left() <= 0:
                break
            record({"gpus": gpus, "impl": impl(gpus), "N": n, **trial(args, gpus, n, args.reps, left())})

    step = args.step

    def predicted(gpus: int) -> int | None:
        """The longest crop on the ``--step`` grid whose per-rank peak, scaled from the largest timed
        crop as (pair rows per rank) x P, stays within 96% of the GPU's memory."""
        timed = [r for r in rows if r.get("gpus") == gpus and r.get("impl") == impl(gpus) and r.get("peak_gib")]
        if not timed:
            return None
        row = max(timed, key=lambda r: r["N"])
        padded = -(-row["N"] // gpus) * gpus
        per_pair = row["peak_gib"] / (padded * padded / gpus)
        room = 0.96 * row["device_gib"] - (row["total_gib"] - row["peak_gib"])
        return int(math.sqrt(gpus * room / per_pair)) // step * step

    longest: dict[int, int | None] = {1: args.k1_longest} if args.k1_longest else {}
    for gpus in ([] if args.no_longest else [g for g in (1, args.gpus) if g not in longest]):
        # the 1-GPU search may use 40% of what is left, so that the K-GPU search gets its turn
        until = time.perf_counter() + (0.4 if gpus == 1 else 1.0) * left()
        n = predicted(gpus)
        if n is None:  # nothing timed: --start, or sqrt(K) x the 1-GPU longest (memory per rank ~ 1 / K)
            n = args.start if gpus == 1 or not longest.get(1) else int(math.sqrt(gpus) * longest[1]) // step * step
        n = min(max(n, step), args.max_crop)
        fits, fails, stopped = None, None, "max-crop"
        while step <= n <= args.max_crop:
            if until - time.perf_counter() <= 0:
                stopped = "budget"
                break
            outcome = trial(args, gpus, n, 0, until - time.perf_counter())
            record({"gpus": gpus, "impl": impl(gpus), "N": n, "fits": "error" not in outcome, **outcome})
            if outcome.get("error") == "timeout":
                stopped = "budget"
                break
            if "error" in outcome and outcome["error"] != "OOM":
                stopped = outcome["error"]
                break
            if "error" in outcome:
                fails = n if fails is None else min(fails, n)
            else:
                fits = n if fits is None else max(fits, n)
            if fits is not None and fails is not None and fails - fits <= step:
                stopped = "OOM"
                break
            n = n + step if "error" not in outcome else n - step
        longest[gpus] = fits
        record({"gpus": gpus, "impl": impl(gpus), "longest_N": fits, "first_oom_N": fails, "stopped": stopped})
    if longest.get(1) and longest.get(args.gpus):
        record({"gpus": args.gpus, "longest_ratio": longest[args.gpus] / longest[1]})
    path = write_json("dap", env, rows, config, args.out)
    print()
    print_table(rows, ["gpus", "impl", "N", "step_s", "first_step_s", "peak_gib", "total_gib", "error",
                       "longest_N", "first_oom_N", "stopped", "longest_ratio"])  # fmt: skip
    print(f"\nwrote {path}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
