"""Where a training step's host (Python) time goes: one "paper" step under cProfile.

    python benchmarks/host_profile.py [--preset paper] [--crop 384] [--kernels triton,torch]

A step whose GPU sits idle most of the time (``step_trace.py``'s idle share) is bound by
the host: Python, the dispatcher, autograd and kernel launches. For each kernels setting this
runs two warm-up steps, times two plain steps (wall, synchronised), then one step under
cProfile, and reports the functions with the most own time and, among megafold's own
functions, the most cumulative time. cProfile slows Python down, so compare the functions
with each other, not the profiled step with the plain one.
Writes ``benchmarks/results/<gpu>/<date>-host_profile-<preset>.json`` and a text report.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import environment, print_table, write_json  # noqa: E402

from megafold.model import AlphaFold3, preset  # noqa: E402
from megafold.model.synthetic import synthetic_batch  # noqa: E402


def _where(key: tuple) -> str:
    filename, line, name = key
    for marker in ("megafold/", "torch/", "triton/"):
        if marker in filename:
            filename = marker + filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"


def profile(kernels: str, args, device: torch.device) -> tuple[dict, list[dict]]:
    torch.cuda.empty_cache()
    model = AlphaFold3(preset(args.preset, kernels=kernels)).to(device).train()
    batch = synthetic_batch(args.crop, atoms_per_token=8, msa_rows=args.msa_rows, device=device)

    def step():
        loss, _ = model.training_loss(batch, n_cycles=1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for _ in range(2):
        step()
    walls = []
    for _ in range(2):
        began = time.perf_counter()
        step()
        walls.append(time.perf_counter() - began)
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    step()
    profiler.disable()
    profiled = time.perf_counter() - began
    stats = pstats.Stats(profiler)
    rows = []
    for key, (calls, _primitive, own, cumulative, _callers) in stats.stats.items():
        rows.append({"kernels": kernels, "function": _where(key), "calls": calls,
                     "own_ms": own * 1e3, "cumulative_ms": cumulative * 1e3})  # fmt: skip
    rows.sort(key=lambda r: -r["own_ms"])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    summary = {
        "kernels": kernels, "preset": args.preset, "crop": args.crop,
        "plain_step_s": min(walls), "profiled_step_s": profiled,
        "python_calls": sum(r["calls"] for r in rows),
    }  # fmt: skip
    del model, batch
    return summary, rows, text.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--msa-rows", type=int, default=256)
    parser.add_argument("--kernels", default="triton,torch")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py needs a GPU (a CPU step is bound by its arithmetic, not its host)")
    device = torch.device("cuda")
    summaries, tables, reports = [], [], []
    for kernels in args.kernels.split(","):
        summary, rows, report = profile(kernels, args, device)
        summaries.append(summary)
        own = rows[: args.top]
        ours = sorted((r for r in rows if r["function"].startswith("megafold/")), key=lambda r: -r["cumulative_ms"])
        tables.append((kernels, own, ours[: args.top]))
        reports.append(f"===== {kernels}\n{report}")
    print_table(summaries, list(summaries[0]))
    columns = ["function", "calls", "own_ms", "cumulative_ms"]
    for kernels, own, ours in tables:
        print(f"\n{kernels}: most own time")
        print_table(own, columns)
        print(f"\n{kernels}: megafold functions by cumulative time")
        print_table(ours, columns)
    rows = summaries + [r for _, own, ours in tables for r in own + ours]
    config = {"preset": args.preset, "crop": args.crop, "msa_rows": args.msa_rows, "top": args.top}
    path = write_json(f"host_profile-{args.preset}", environment(), rows, config, args.out)
    path.with_suffix(".txt").write_text("\n".join(reports))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
