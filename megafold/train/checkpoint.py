"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is one ``torch.save`` file of tensors and plain values (dicts, lists, ints,
floats, strings, None): model, EMA, optimizer, schedule, RNG states, loader position and
the configs. It is written to a temporary file beside the target, flushed to disk and
renamed over it (``os.replace``), so a kill during a write leaves the previous checkpoint
whole. It is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from megafold.errors import CacheError
from megafold.files import atomic_open

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (tensors and plain values only) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; CacheError names a missing, corrupt or
    foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CacheError(f"{path}: not a readable megafold checkpoint ({first_line})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CacheError(f"{path}: not a megafold checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def seed_rng(seed: int) -> None:
    """Seed every global random generator (python, numpy, torch CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every global random generator (python, numpy, torch CPU and CUDA), as
    tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned (also from a checkpoint loaded with
    ``map_location="cuda"``: the generators take CPU tensors, hence the ``.cpu()`` calls)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
