"""Whole-model benchmark: one AlphaFold3 "paper" training step (trunk with 1 recycle, the
48-sample diffusion batch, every loss including the confidence mini-rollout).

    python benchmarks/train_step.py [--crop 384] [--kernels torch,triton,compile] [--store cached_data/store.zarr]

Batches come from the shipped precache through the prefetching loader (crop 384; entries
shorter than the crop are padded), so the data-wait share is the real one; ``--synthetic``
uses a synthetic batch of exactly ``--crop`` tokens instead. Step time is the median over
``--steps`` steps after one warm-up step; peak memory is the allocator's peak above the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import ROOT, environment, is_oom, print_table, write_json  # noqa: E402

from megafold.model import AlphaFold3, preset  # noqa: E402


def batches(args, device):
    if args.synthetic:
        from megafold.model.synthetic import synthetic_batch

        while True:
            yield synthetic_batch(args.crop, atoms_per_token=8, msa_rows=256, device=device), 0.0
    from megafold.precache import loader, open_store

    data = loader(open_store(args.store), crop_size=args.crop, batch_size=1, shuffle=True,
                  workers=2, device=device)
    while True:
        for batch in data:
            yield batch, data.stats()["wait_s"]


def run(kernels: str, args, device) -> dict:
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    config = preset("paper", kernels="torch" if kernels == "compile" else kernels)
    model = AlphaFold3(config).to(device).train()
    training_loss = torch.compile(model.training_loss) if kernels == "compile" else model.training_loss
    source = batches(args, device)
    times, waits = [], []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for i in range(args.steps + 1):
        batch, waited_total = next(source)  # the loader's cumulative wait for data, seconds
        if i == 1:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss, _terms = training_loss(batch, n_cycles=1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i > 0:  # the first step compiles and tunes
            times.append(time.perf_counter() - start)
        waits.append(waited_total)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    step_s = statistics.median(times)
    wait_per_step = (waits[-1] - waits[1]) / max(1, len(waits) - 2)
    return {"kernels": kernels, "crop": args.crop, "step_s": step_s, "peak_gib": peak,
            "data_wait_frac": wait_per_step / (wait_per_step + step_s)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--kernels", default="torch,triton")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--store", default=str(ROOT / "cached_data" / "store.zarr"))
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train_step.py needs a GPU")
    device = torch.device("cuda")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    rows = []
    for kernels in args.kernels.split(","):
        try:
            row = run(kernels, args, device)
        except Exception as error:
            row = {"kernels": kernels, "crop": args.crop,
                   "error": "OOM" if is_oom(error) else f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        print("  ", row, flush=True)
    path = write_json("train_step", env, rows, {"preset": "paper", "crop": args.crop,
                                                "recycles": 1, "synthetic": args.synthetic}, args.out)
    print()
    print_table(rows, ["kernels", "crop", "step_s", "peak_gib", "data_wait_frac", "error"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
