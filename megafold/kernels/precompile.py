"""Compile the Triton kernels a piece of code will launch, in parallel processes, before it runs.

Triton compiles a kernel the first time it is launched with a new specialization, one after
the other in the launching thread: a fresh machine spends about 90 s of its first "paper"
training step (H100) compiling ~60 kernel variants. ``record_launches`` runs code with every
Triton launch replaced by a record (kernel, argument dtypes and integers, constexprs, launch
options: what Triton specializes on) and nothing launched; ``compile_in_processes`` then has
worker processes compile those records through ``JITFunction.warmup`` and load them (which
builds each signature's C launcher), writing Triton's on-disk cache. The real run finds each
kernel and launcher there (a load, not a compile).

What the recorded run computes is garbage (no kernel ran): only its launches count, so run a
throwaway step. With ``candidates=True`` it also records every candidate configuration of the
shape keys the real run would tune, so that a tuning run on a fresh machine compiles in
parallel first and then only times. A record whose tensor argument is not 16-byte aligned in
the real run (a view at an odd offset) specializes differently and compiles lazily as before;
nothing goes wrong, it is just not precompiled. Under the Triton interpreter nothing is
recorded.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

Record = tuple  # (module, name, args, kwargs, grid): picklable, see _encode


def _encode(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("__tensor__", str(value.dtype).removeprefix("torch."))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a {type(value).__name__} argument")


def _decode(value: object) -> object:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__tensor__":
        return getattr(torch, value[1])  # JITFunction.warmup wraps a torch dtype as a mock tensor
    return value


@contextlib.contextmanager
def record_launches(records: list[Record], candidates: bool = False) -> Iterator[None]:
    """Inside this block no Triton kernel is launched or compiled: each launch appends a
    record to ``records`` instead (the first launch of each distinct record only).

    ``candidates``: a shape key that would be tuned here (tuning on and no stored choice, or
    every key under ``MEGAFOLD_AUTOTUNE=force``) records a launch of each of its candidate
    configurations, then runs on its default; nothing is timed or stored. Compiling those
    records first makes the real tuning run a matter of timing only: tuning a key otherwise
    compiles its 10-50 candidates one after the other in the launching thread."""
    from triton.runtime.jit import JITFunction

    from megafold.kernels import _common

    original = JITFunction.run
    seen: set[Record] = set()

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or callable(grid):  # a warm-up compiles as asked; a grid function cannot be recorded
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        try:
            record = (
                self.fn.__module__, self.fn.__qualname__, tuple(_encode(a) for a in args),
                tuple(sorted((k, _encode(v)) for k, v in kwargs.items())), tuple(int(g) for g in grid),
            )  # fmt: skip
        except TypeError:
            return None  # an argument this module cannot describe: that kernel compiles lazily
        if record not in seen:
            seen.add(record)
            records.append(record)
        return None

    JITFunction.run = run
    recording = _common._record_candidates
    _common._record_candidates = candidates
    try:
        yield
    finally:
        JITFunction.run = original
        _common._record_candidates = recording


def _compile(records: Sequence[Record]) -> tuple[int, list[str]]:
    """(in a worker) Compile each record into Triton's on-disk cache; (compiled, problems)."""
    with contextlib.suppress(OSError, AttributeError):  # yield the CPU to the process being profiled
        os.nice(10)
    done, problems = 0, []
    for module, name, args, kwargs, grid in records:
        try:
            kernel = getattr(importlib.import_module(module), name)
            compiled = kernel.warmup(*(_decode(a) for a in args), grid=grid, **{k: _decode(v) for k, v in kwargs})
            # Loading the kernel builds its C launcher (compiled per signature, cached on disk
            # too): otherwise the main process builds every launcher at its first launch.
            init = getattr(compiled, "_init_handles", None)
            if init is not None:
                init()
            done += 1
        except Exception as error:  # noqa: BLE001  a record that fails compiles lazily later
            problems.append(f"{name}: {type(error).__name__}: {error}"[:200])
    return done, problems


@dataclass
class Precompile:
    """Worker processes compiling records; ``wait()`` for them (and shut the pool down)."""

    records: int
    futures: list[Future] = field(default_factory=list)
    pool: ProcessPoolExecutor | None = None
    began: float = field(default_factory=time.perf_counter)

    def wait(self) -> dict:
        compiled, problems = 0, []
        for future in self.futures:
            try:
                done, trouble = future.result()
            except Exception as error:  # noqa: BLE001  a dead worker: its kernels compile lazily
                done, trouble = 0, [f"worker: {type(error).__name__}: {error}"[:200]]
            compiled += done
            problems += trouble
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        return {"records": self.records, "compiled": compiled, "problems": problems,
                "seconds": time.perf_counter() - self.began}  # fmt: skip

    def cancel(self) -> None:
        """Drop what has not started and let the pool go without waiting (a failed caller)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def compile_in_processes(records: Sequence[Record], workers: int | None = None) -> Precompile:
    """Start compiling ``records`` in ``workers`` spawned processes (default: the CPUs, at most
    16, at most one per record); returns at once."""
    if not records:
        return Precompile(0)
    workers = max(1, min(workers or min(os.cpu_count() or 1, 16), len(records)))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    # Round-robin: each worker gets a mix of kernels (their compile times differ a lot).
    shares = [list(records[i::workers]) for i in range(workers)]
    return Precompile(len(records), [pool.submit(_compile, share) for share in shares], pool)
