"""What every benchmark shares: environment record, timing, peak memory, table, JSON.

Timing is the median of CUDA-event-timed repetitions after warm-up
(``triton.testing.do_bench`` with ``return_mode="median"``); peak memory is the allocator's
peak during one extra run above what was allocated before it (the inputs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def dtype_for(device) -> torch.dtype:
    """bf16 on a GPU; fp16 for a CPU smoke run (Triton's interpreter mishandles bf16 arithmetic)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16


def environment() -> dict:
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # MEGAFOLD_COMMIT names the commit of a copied tree whose .git is missing or stale.
    commit = os.environ.get("MEGAFOLD_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "hip": getattr(torch.version, "hip", None),
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": _dt.date.today().isoformat(),
        "python": sys.version.split()[0],
    }


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    if not torch.cuda.is_available():
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graphed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` (one forward + backward) captured once in a CUDA graph; returns its replay.

    Every implementation gets the same treatment: three warm-up calls on a side stream (they
    tune and compile what needs it), then one capture. The replay has no host work, so its
    time is the GPU's: what the op costs inside a graphed training step, where launches and
    Python no longer show.

    Known problem: in kernels.py's EvoAttention runs, the capture of the process's first
    shape fails for every implementation (later shapes capture; benchmarks/NOTES.md,
    session 11), so kernels.py runs a small throwaway shape first under ``--graph``.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream: whatever it set up is there
        step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def graph_time(step: Callable[[], object]) -> dict:
    """``{"graph_ms": ...}``: ``step`` replayed from a CUDA graph (``graphed``), or
    ``{"graph_error": ...}`` where the capture fails (the plain row stays)."""
    try:
        return {"graph_ms": time_ms(graphed(step))}
    except Exception as error:
        return {"graph_error": f"{type(error).__name__}: {error}"[:200]}


def peak_mib(fn: Callable[[], object]) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stop_gracefully():
    """Stop the measurements inside the block on Ctrl-C or SIGTERM (what ``timeout`` sends),
    not the whole process: the caller then writes the rows that finished. Yields a dict whose
    "interrupted" says whether that happened (record it in the JSON's config)."""
    state = {"interrupted": False}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield state
    except KeyboardInterrupt:
        state["interrupted"] = True
        print("\ninterrupted: writing the rows measured so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(name: str, env: dict, rows: list[dict], config: dict, out_dir: Path | None = None) -> Path:
    """Write ``results/<gpu-name>/<date>-<name>.json`` atomically; return its path."""
    folder = (out_dir or RESULTS) / re.sub(r"[^A-Za-z0-9._-]+", "_", env["device"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{env['date']}-{name}.json"
    # The kernel shape keys that ran their op's default for want of a tuned choice on this GPU
    # (MEGAFOLD_AUTOTUNE=0 and nothing shipped or cached): their figures are untuned ones.
    from megafold.kernels._common import untuned_keys

    untuned = untuned_keys()
    if untuned:
        print(f"{len(untuned)} kernel shape keys ran untuned defaults (listed under 'untuned' in the JSON)")
    payload = {"benchmark": name, **env, "config": config, "rows": rows, "untuned": untuned}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)
    return path


def row_summary(row: dict) -> str:
    """One timed row as a progress line: time, peak and error, or what failed; graphed time."""
    text = (f"{row['ms']:8.3f} ms  {row['peak_mib'] or 0:9.1f} MiB  err {row['rel_err']:.2e}"
            if "ms" in row else row["error"])
    if "graph_ms" in row:
        text += f"  graph {row['graph_ms']:8.3f} ms"
    if "graph_error" in row:
        text += f"  graph: {row['graph_error']}"
    return text


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.2f}"
        return "-" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def config_overrides(items: list[str]) -> dict[str, object]:
    """``--set FIELD=VALUE`` items as config overrides, each VALUE parsed as JSON where it
    parses (true, 8, 0.5), else kept as a string."""
    overrides = {}
    for item in items:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except ValueError:
            overrides[field] = value
    return overrides


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def kernel_breakdown(fn: Callable[[], object], steps: int = 5) -> dict[str, float]:
    """Device time per kernel name (ms per call of ``fn``), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            totals[event.key[:60]] = device_us / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
