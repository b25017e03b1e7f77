"""Data-parallel throughput: samples/s of whole training steps on 1 and K GPUs (DDP, torchrun).

    python benchmarks/multigpu.py [--gpus 2] [--presets small paper] [--crop 384] [--steps 8]

The script launches itself under torchrun once per (preset, GPU count). Each rank trains on a
synthetic batch of exactly ``--crop`` tokens (``Trainer.train_step``: DDP backward with
overlapped all-reduce, clipping, Adam, EMA, the all-reduced NaN guard); samples/s = ranks x
batch x steps / time after 2 warm-up steps; scaling = samples/s on K GPUs / on 1 GPU.
Rows: {"gpus", "preset", "samples_per_s", "scaling"} via _harness.write_json("multigpu").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def worker(args) -> None:
    import torch

    from megafold.model import preset
    from megafold.model.synthetic import synthetic_batch
    from megafold.train import TrainConfig, Trainer
    from megafold.train import distributed

    config = preset(args.preset, kernels=args.kernels, recycles=1)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, TrainConfig(store=str(ROOT / "cached_data" / "store.zarr"), out=out, crop_size=args.crop,
                                              steps=10**9, workers=0, progress=False))  # fmt: skip
        batch = synthetic_batch(args.crop, atoms_per_token=8, msa_rows=256, device=trainer.device)
        trainer.next_batch = lambda: batch
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize()
        distributed.barrier()
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        torch.cuda.synchronize()
        distributed.barrier()
        elapsed = time.perf_counter() - started
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"samples_per_s": trainer.world_size * args.steps / elapsed}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from benchmarks._harness import environment, print_table, write_json

    rows, env = [], environment()
    for name in args.presets:
        single = None
        for gpus in sorted({1, args.gpus}):
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                                __file__, "--worker", "--preset", name, "--crop", str(args.crop), "--steps", str(args.steps),
                                "--kernels", args.kernels, "--result", result.name], check=True)  # fmt: skip
                samples_per_s = json.loads(Path(result.name).read_text())["samples_per_s"]
            single = single or samples_per_s
            rows.append({"gpus": gpus, "preset": name, "samples_per_s": samples_per_s, "scaling": samples_per_s / single})
            print(rows[-1], flush=True)
            # written after every run, so a job stopped half way keeps what it measured
            path = write_json("multigpu", env, rows, {"crop": args.crop, "steps": args.steps,
                                                      "kernels": args.kernels, "recycles": 1}, args.out)
    print_table(rows, ["preset", "gpus", "samples_per_s", "scaling"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
