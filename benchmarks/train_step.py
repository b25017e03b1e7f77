"""Whole-model benchmark: one AlphaFold3 training step ("paper" by default: trunk with 1
recycle, the 48-sample diffusion batch, every loss including the confidence mini-rollout).

    python benchmarks/train_step.py [--preset paper] [--crop 384] [--kernels torch,triton,compile]
                                    [--source store|onthefly|synthetic] [--longest]

Batches come from the shipped precache through the prefetching loader, so the data-wait share
is the real one; a batch of one entry has that entry's size, cropped to ``--crop`` but not
padded up to it (the shipped entries have 25-558 tokens), so these steps vary in size and are
lighter than a full crop. ``--source onthefly`` feeds the
same loader from the shipped mmCIF files instead, parsing and searching MSAs and templates
with pyhmmer for every sample (the pipeline without the cache, what the precache is measured
against); ``--source synthetic`` uses a synthetic batch of exactly ``--crop`` tokens. Step time
is the median over ``--steps`` steps after one warm-up step (each step's time, and the time
Python's garbage collector took in it, are in the JSON); peak memory is the allocator's
peak above the weights (``--phases``: split into the forward's and the backward's), and the
JSON also has the most the caching allocator reserved, weights and graph pools included.
``compile`` is torch.compile of the eager model's repeated blocks (as
the profiler does it; compiling the whole loss takes longer and was no faster).
``--longest`` adds, per kernels setting, the longest crop whose step fits on a grid of 128
tokens from ``--crop`` (``megafold.profile.longest_crop`` on synthetic batches, within
``--longest-budget`` seconds).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import ROOT, config_overrides, environment, is_oom, print_table, stop_gracefully, write_json  # noqa: E402

from megafold.model import AlphaFold3, preset  # noqa: E402
from megafold.profile.profiler import _compile_blocks, longest_crop, variants  # noqa: E402
from megafold.train.trainer import pad_batch  # noqa: E402


def batches(args, device):
    if args.source == "synthetic":
        from megafold.model.synthetic import synthetic_batch

        while True:
            yield synthetic_batch(args.crop, atoms_per_token=8, msa_rows=256, device=device), 0.0
    from megafold.precache import open_store
    from megafold.precache.loader import Loader, OnTheFlySource

    if args.source == "onthefly":
        source = OnTheFlySource([ROOT / "cached_data" / "structures"])
    else:
        source = open_store(args.store)
    data = Loader(source, args.crop, 1, shuffle=True, workers=args.workers, device=device)
    while True:
        for batch in data:
            yield pad_batch(batch, args.pad_multiple), data.stats()["wait_s"]


class GcTimer:
    """Seconds Python's cyclic garbage collector ran, and its full (generation 2) collections,
    since the last ``take()``: a full collection walks every tracked object of the process."""

    def __init__(self):
        self.seconds, self.full, self._began = 0.0, 0, None
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self.full += info["generation"] == 2

    def take(self) -> tuple[float, int]:
        taken, self.seconds, self.full = (self.seconds, self.full), 0.0, 0
        return taken

    def close(self):
        gc.callbacks.remove(self._callback)


def run(kernels: str, args, device) -> dict:
    torch._dynamo.reset()
    cuda = device.type == "cuda"  # else a CPU smoke run ("tiny"): no memory counters
    torch.cuda.empty_cache()
    variant = variants(preset(args.preset, **args.overrides), (kernels,))[kernels]
    model = AlphaFold3(variant.config).to(device).train()
    if variant.compile:
        _compile_blocks(model, variant.compile)
    training_loss = model.training_loss
    source = batches(args, device)
    times, waits, gc_times, gc_full, peaks = [], [], [], [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    collector = GcTimer()
    for i in range(args.steps + 1):
        batch, waited_total = next(source)  # the loader's cumulative wait for data, seconds
        if i == 1:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if args.gc_freeze:  # the objects alive now (model, caches) leave the collections
                gc.collect()
                gc.freeze()
        collector.take()
        start = time.perf_counter()
        loss, _terms = training_loss(batch, n_cycles=1)
        if cuda and i > 0 and args.phases:  # the forward's peak, then the backward's (two syncs)
            forward_peak = torch.cuda.max_memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        if cuda and i > 0 and args.phases:
            peaks.append((round(forward_peak / 2**30, 3), round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)))
        if i > 0:  # the first step compiles and tunes
            times.append(time.perf_counter() - start)
            seconds, full = collector.take()
            gc_times.append(round(seconds, 4))
            gc_full.append(full)
        waits.append(waited_total)
    collector.close()
    if args.gc_freeze:
        gc.unfreeze()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    if peaks:
        peak = max(max(pair) for pair in peaks)
    # what the caching allocator held at most (all of it, the weights and CUDA graphs' pools
    # included): a graph's replay allocates nothing, so the allocated peak sees its pool's
    # use only at capture
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    step_s = statistics.median(times)
    wait_per_step = (waits[-1] - waits[1]) / max(1, len(waits) - 2)
    row = {"kernels": kernels, "preset": args.preset, "crop": args.crop, "source": args.source,
           "step_s": step_s, "step_times_s": times, "gc_s": gc_times, "gc_full_collections": gc_full,
           "gc_freeze": args.gc_freeze, "peak_gib": peak,
           "peak_forward_backward_gib": peaks, "reserved_peak_gib": reserved, "data_wait_s": wait_per_step,
           "data_wait_frac": wait_per_step / (wait_per_step + step_s)}
    source.close()
    del model, source
    return row


def longest(kernels: str, args, device) -> dict:
    """The longest crop whose training step fits, for one kernels setting."""
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    variant = variants(preset(args.preset), (kernels,))[kernels]
    found = longest_crop(variant, start=args.crop, step=128, max_crop=args.max_crop,
                         time_budget_s=args.longest_budget, device=device)
    return {"longest_N": int(found.attrs["longest_crop"]), "longest_stopped_by": str(found.attrs["stopped_by"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--kernels", default="torch,triton")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after the warm-up step, so full collections skip the objects alive then")
    parser.add_argument("--phases", action="store_true",
                        help="record each step's forward and backward memory peaks (syncs once more per step)")
    parser.add_argument("--store", default=str(ROOT / "cached_data" / "store.zarr"))
    parser.add_argument("--source", choices=("store", "onthefly", "synthetic"), default="store")
    parser.add_argument("--synthetic", action="store_true", help="same as --source synthetic")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--pad-multiple", type=int, default=0,
                        help="pad store / onthefly batches to a multiple of this many tokens, as the trainer's "
                        "pad_multiple does (0: each entry at its own size)")
    parser.add_argument("--longest", action="store_true", help="also find the longest crop that fits")
    parser.add_argument("--longest-budget", type=float, default=240.0, help="seconds per kernels setting")
    parser.add_argument("--max-crop", type=int, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for every run, e.g. checkpoint_reentrant=false (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the JSON's name (runs with --set)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.overrides = config_overrides(args.set)
    if args.synthetic:
        args.source = "synthetic"
    if not torch.cuda.is_available() and args.preset != "tiny":
        sys.exit("benchmarks/train_step.py needs a GPU (on the CPU: --preset tiny, a smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    rows = []
    with stop_gracefully() as stopped:  # a `timeout` still leaves the rows that finished
        for kernels in args.kernels.split(","):
            try:
                row = run(kernels, args, device)
            except Exception as error:
                row = {"kernels": kernels, "crop": args.crop,
                       "error": "OOM" if is_oom(error) else f"{type(error).__name__}: {error}"[:300]}
            if args.longest:
                try:
                    row.update(longest(kernels, args, device))
                except Exception as error:
                    row["longest_error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print("  ", row, flush=True)
    name = "train_step" if args.source == "store" and args.preset == "paper" else f"train_step-{args.preset}-{args.source}"
    name += f"-{args.tag}" if args.tag else ""
    path = write_json(name, env, rows, {"preset": args.preset, "crop": args.crop, "recycles": 1,
                                        "overrides": args.overrides, "interrupted": stopped["interrupted"],
                                        "source": args.source, "workers": args.workers, "pad_multiple": args.pad_multiple,
                                        "command": " ".join(["python", "benchmarks/train_step.py", *(argv or sys.argv[1:])])},
                      args.out)
    print()
    print_table(rows, ["kernels", "preset", "crop", "source", "step_s", "peak_gib", "data_wait_frac",
                       "longest_N", "error"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
