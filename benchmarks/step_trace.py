"""Where a training step's GPU time goes: one "paper" step under torch.profiler, per kernels
setting, against the step's wall time.

    python benchmarks/step_trace.py [--preset paper] [--crop 384] [--kernels torch,triton]

For each setting: one warm-up step, then one profiled step (synthetic batch of exactly
``--crop`` tokens, as ``train_step.py --source synthetic``). Reported: the step's wall time;
the GPU's busy time (the union of every kernel and copy interval) and so its idle share,
which is host time the GPU waits through (Python, launches, synchronisations); the number of
kernel launches; the GPU time inside the forward and the backward; and the kernels that take
the most GPU time. The profiler's own host cost inflates the wall time a little, so compare the
wall time with ``train_step.py``'s and read the idle share as an upper bound.
Writes ``benchmarks/results/<gpu>/<date>-step_trace-<preset>.json`` and a text table of the top
kernels per setting next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import environment, print_table, write_json  # noqa: E402

from megafold.model import AlphaFold3, preset  # noqa: E402
from megafold.model.synthetic import synthetic_batch  # noqa: E402


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def trace(kernels: str, args, device: torch.device) -> tuple[dict, list[dict]]:
    torch.cuda.empty_cache()
    model = AlphaFold3(preset(args.preset, kernels=kernels)).to(device).train()
    batch = synthetic_batch(args.crop, atoms_per_token=8, msa_rows=256, device=device)

    def step():
        with record_function("forward"):
            loss, _ = model.training_loss(batch, n_cycles=1)
        with record_function("backward"):
            loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.events()
    phase_names = ("forward", "backward")
    # GPU-side copies of the two record_function ranges are annotations, not GPU work.
    gpu = [
        e for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
        and e.name not in phase_names and not getattr(e, "is_user_annotation", False)
    ]  # fmt: skip
    intervals = [(e.time_range.start, e.time_range.end) for e in gpu]
    phases = {}
    for e in events:
        if e.name in phase_names and e.device_type == torch.autograd.DeviceType.CPU:
            window = (e.time_range.start, e.time_range.end)
            inside = [iv for iv in intervals if window[0] <= iv[0] < window[1]]
            phases[e.name] = (window[1] - window[0], busy_us(inside), len(inside))
    per_kernel: dict[str, list[float]] = {}
    for e in gpu:
        entry = per_kernel.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.end - e.time_range.start
        entry[1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    busy = busy_us(intervals)
    row = {
        "kernels": kernels, "preset": args.preset, "crop": args.crop,
        "wall_s": round(wall, 3), "gpu_busy_s": round(busy / 1e6, 3), "gpu_idle_frac": round(1 - busy / 1e6 / wall, 3),
        "launches": len(gpu),
        **{f"{name}_wall_s": round(v[0] / 1e6, 3) for name, v in phases.items()},
        **{f"{name}_gpu_s": round(v[1] / 1e6, 3) for name, v in phases.items()},
        **{f"{name}_launches": v[2] for name, v in phases.items()},
    }  # fmt: skip
    kernels_rows = [
        {"kernels": kernels, "kernel": name[:90], "gpu_ms": round(total / 1e3, 2), "calls": calls}
        for name, (total, calls) in top
    ]
    del model
    return row, kernels_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--kernels", default="torch,triton")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a GPU")
    device = torch.device("cuda")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    rows, top = [], []
    for kernels in args.kernels.split(","):
        row, kernel_rows = trace(kernels, args, device)
        rows.append(row)
        top.extend(kernel_rows)
        print("  ", row, flush=True)
    print_table(rows, list(rows[0]))
    print()
    print_table(top, ["kernels", "kernel", "gpu_ms", "calls"])
    path = write_json(f"step_trace-{args.preset}", env, rows, {"crop": args.crop, "top_kernels": top}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
