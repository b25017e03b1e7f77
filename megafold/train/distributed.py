"""Data-parallel training over torch.distributed, as ``torchrun`` launches it.

    torchrun --standalone --nproc_per_node=2 -m megafold train --store STORE --out RUN

Every process (rank) holds the whole model; ``Trainer`` wraps it in
``DistributedDataParallel``, whose gradient buckets are all-reduced while the backward is
still running. Each rank loads its own shard of every epoch (the loader's rank /
world_size), so a step's global batch is ``world_size x batch_size`` samples. Rank 0 alone
writes checkpoints, metrics and the progress bar; the weights, optimiser and EMA are the
same on every rank because every rank applies the same averaged gradient.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on CUDA, gloo on the CPU. Without those
variables every function here is the single-process identity, so one code path serves both.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from typing import Any, ContextManager, Mapping

import numpy as np
import torch
import torch.distributed as dist

# NVLink SHARP (multicast) collectives hang or fail on some drivers and VMs; DDP's bucketed
# all-reduce does not need them. Set before NCCL initialises; a user's value wins.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 may evaluate or checkpoint while the others wait


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def local_device(device: str | torch.device) -> torch.device:
    """``device`` with this rank's GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if launched() else torch.cuda.current_device())
    return device


def init(device: str | torch.device) -> torch.device:
    """Join torchrun's process group (once; later calls only return the device): NCCL when
    ``device`` is CUDA, gloo otherwise. Returns this rank's device. A no-op outside torchrun."""
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the loader's prefetch use the current device
    if launched() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave the process group (torch warns at exit about one still open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``(seed, *keys)``: one independent stream per rank (and step)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group is running, else itself.

    find_unused_parameters stays off: every parameter of AlphaFold3 gets a gradient in every
    training step (the confidence head learns from detached trunk outputs, the recycling
    layers run in the last, differentiated cycle); DDP raises at the next step if that ever
    stops being true. Buffers (the Fourier embedding's fixed draws) never change, so they are
    not re-broadcast every forward. Gradients live in the all-reduce buckets (no copy).
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


def no_sync(module: torch.nn.Module) -> ContextManager:
    """DDP's ``no_sync`` (accumulate locally, all-reduce on a later backward), or nothing."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def all_true(flag: bool, device: torch.device) -> bool:
    """``flag`` of every rank and-ed together, so that all ranks take the same branch."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def reduce_values(mean: Mapping[str, float], total: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """``mean`` averaged and ``total`` summed over ranks, in one all-reduce (for the metrics row)."""
    if not active():
        return {**mean, **total}
    names = [*mean, *total]
    values = torch.tensor([*mean.values(), *total.values()], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values[: len(mean)] /= world_size()
    return dict(zip(names, values.tolist()))


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (plain values and CPU tensors), in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if active():
        dist.barrier()
