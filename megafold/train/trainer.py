"""The training loop: AF3's optimiser and schedule over batches from a precache store.

    trainer = Trainer(preset("small"), TrainConfig(store="outputs/store", out="outputs/run", steps=2000))
    trainer.fit()                        # or: trainer.resume(); trainer.fit()

What a step does (AF3 Sec. 5): Adam (beta 0.9 / 0.95, eps 1e-8); learning rate warmed up
linearly, then multiplied by 0.95 every ``decay_every`` steps; ``grad_accum`` micro-batches;
gradients clipped at norm 10; an EMA of the weights (decay 0.999, warmed up: ``ema_update``)
updated after every step. A step whose loss or gradient norm is NaN or inf changes nothing (weights, optimiser,
EMA): it is skipped and counted. bf16 autocast and per-block activation checkpointing are
switches of the model config (``bf16``, ``checkpoint``).

Under ``torchrun`` the same loop trains data-parallel (``distributed.py``): each rank loads
its shard of the data and draws its own random numbers (rank 0 the stream of a one-process
run, rank r > 0 one derived from (seed, r)); DDP averages the gradients; the NaN guard's
verdict is all-reduced so that every rank skips the same steps; rank 0 alone writes files.
The checkpoint counts the loader's position in global samples and keeps every rank's random
state, so a run resumes exactly on as many processes, and at the same sample on any number.

A run directory ``out`` holds ``checkpoint.pt`` (everything a resume needs, see
``checkpoint.py``), ``metrics.csv`` (one row per step), ``eval.csv`` (one row per
evaluation) and ``metrics.zarr``, the two as one xarray Dataset (dims ``step`` and
``eval_step``): ``load_metrics(out)`` opens it in a notebook.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from megafold.data.features import FEATURES
from megafold.errors import CacheError, ConfigError
from megafold.model import AlphaFold3, AlphaFold3Config
from megafold.precache.loader import Loader
from megafold.precache.store import open_store
from megafold.train import distributed
from megafold.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_rng, set_rng_state
from megafold.train.metrics import evaluate
from megafold.files import atomic_open

CHECKPOINT_NAME = "checkpoint.pt"
ATOMS_PER_TOKEN_PAD = 8  # atoms are padded to 8x the token multiple (~7.5 heavy atoms per residue)
EVAL_SEED = 1234  # evaluation samples with its own generator: the training stream is untouched


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model (``AlphaFold3Config``); AF3's values by default."""

    store: str  # precache store (``megafold precache``)
    out: str = "outputs/train"  # run directory
    keys: tuple[str, ...] | None = None  # train on these entries only (default: all)
    crop_size: int = 384
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimiser step
    steps: int = 10_000
    max_minutes: float | None = None  # stop earlier once this much time has passed
    lr: float = 1.8e-3
    warmup_steps: int = 1000
    decay_every: int = 50_000
    decay_factor: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 10.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500  # steps (and always at the end)
    eval_every: int = 0  # steps; 0: no evaluation during training (``evaluate()`` still works)
    eval_keys: tuple[str, ...] | None = None  # evaluated entries (default: the first 8 trained on)
    eval_sampler_steps: int | None = None  # default: the model config's sampler_steps
    workers: int = 2  # loader worker processes
    max_msa_rows: int | None = None
    # Pad every batch's token axis (and MSA rows) to a multiple of this, its atom axis to a
    # multiple of ATOMS_PER_TOKEN_PAD times it (0: no padding). The model ignores padding, so
    # this changes no result; it bounds the distinct shapes that kernels compile or tune for.
    pad_multiple: int = 0
    seed: int = 0
    device: str | None = None  # default: CUDA if available, else CPU
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        positive = ("crop_size", "batch_size", "grad_accum", "steps", "decay_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train config: {name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "workers", "pad_multiple"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train config: {name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0 or self.clip_norm <= 0 or not 0 < self.decay_factor <= 1 or not 0 <= self.ema_decay < 1:
            raise ConfigError("train config: need lr > 0, clip_norm > 0, 0 < decay_factor <= 1, 0 <= ema_decay < 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train config: max_minutes={self.max_minutes} must be > 0")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as a checkpoint stores them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


def learning_rate(step: int, config: TrainConfig) -> float:
    """AF3's schedule: linear warm-up over ``warmup_steps``, then x ``decay_factor`` every
    ``decay_every`` steps (``step`` counts from 0)."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    return config.lr * warmup * config.decay_factor ** (step // config.decay_every)


def ema_update(decay: float):
    """An ``AveragedModel`` update: ``ema += (1 - d) * (weights - ema)`` with the decay warmed
    up as ``d = min(decay, (1 + n) / (10 + n))`` after n updates, so that a short run's EMA is
    not mostly the initial weights (with 0.999 they would still be 37% of it after 1,000 steps)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers are counters or indices: take the model's
            torch._foreach_copy_(averaged, current)

    return update


def pad_batch(batch: Mapping[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """``batch`` with its token and MSA-row axes padded up to a multiple of ``multiple`` and its
    atom axis to a multiple of ``ATOMS_PER_TOKEN_PAD * multiple``, with each feature's padding
    value (``FEATURES``), as ``collate`` pads a shorter example; ``multiple`` 0 returns it as is."""
    if not multiple:
        return dict(batch)
    steps = {"token": multiple, "token2": multiple, "msa_row": multiple, "atom": ATOMS_PER_TOKEN_PAD * multiple}
    out = {}
    for name, value in batch.items():
        spec = FEATURES.get(name)
        widths = []
        if spec is not None:
            for axis, dim in enumerate(spec.dims, start=1):
                step = steps.get(dim)
                size = value.shape[axis]
                widths.append(-(-size // step) * step - size if step and size else 0)
        if not any(widths):
            out[name] = value
            continue
        pairs = [width for extra in reversed(widths) for width in (0, extra)]  # last axis first
        out[name] = torch.nn.functional.pad(value, pairs, value=spec.pad)
    return out


class _TrainingLoss(torch.nn.Module):
    """``model.training_loss`` as a ``forward``: DistributedDataParallel hooks the gradient
    all-reduce into the backward of what its forward returns."""

    def __init__(self, model: AlphaFold3):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_loss(batch)


class Trainer:
    """Trains ``AlphaFold3(model_config)`` as ``config`` says; see the module docstring."""

    def __init__(self, model_config: AlphaFold3Config, config: TrainConfig):
        self.config = config
        self.model_config = model_config
        self.device = distributed.init(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out = Path(config.out)
        seed_rng(config.seed)  # the same initial weights on every rank
        self.model = AlphaFold3(model_config).to(self.device)
        if self.rank > 0:
            seed_rng(distributed.rank_seed(config.seed, self.rank))
        self.loss_module = distributed.data_parallel(_TrainingLoss(self.model), self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(config.ema_decay), use_buffers=True)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
        )
        self.store = open_store(config.store)
        self.train_keys = sorted(config.keys) if config.keys else self.store.keys()
        self.data = self._loader(self.train_keys, shuffle=True)
        self.eval_keys = sorted(config.eval_keys) if config.eval_keys else self.train_keys[:8]
        self._loader(self.eval_keys, shuffle=False)  # unknown eval keys fail here, not at the first evaluation
        self.step = 0  # optimiser steps taken (skipped ones included)
        self.skipped_steps = 0  # steps skipped by the NaN/inf guard
        self.elapsed_s = 0.0  # training time over all sessions of this run
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self._batch_stream: Iterator[dict[str, torch.Tensor]] | None = None

    def _loader(self, keys: Sequence[str], *, shuffle: bool) -> Loader:
        config = self.config
        return Loader(
            self.store,
            config.crop_size,
            config.batch_size,
            shuffle=shuffle,
            workers=config.workers,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            max_msa_rows=config.max_msa_rows,
            keys=keys,
        )

    # ------------------------------------------------------------------ data

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch, from where the loader's state says."""
        empty_epochs = 0  # one is normal: a resume at the end of an epoch
        while empty_epochs < 2:
            empty_epochs += 1
            for batch in self.data:
                empty_epochs = 0
                yield batch
        raise CacheError(f"{self.config.store}: the loader yields no batches (fewer entries than the batch size?)")

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._batch_stream is None:
            self._batch_stream = self._batches()
        # DataLoader draws a seed from the global generator when an epoch starts; fork it so
        # the model's random stream does not depend on when epochs (or a resume) begin.
        with torch.random.fork_rng(devices=[]):
            return pad_batch(next(self._batch_stream), self.config.pad_multiple)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics row."""
        config = self.config
        started = time.perf_counter()
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        terms_sum: dict[str, float] = {}
        finite = True
        wait_s = 0.0
        tokens = 0
        for micro in range(config.grad_accum):
            requested = time.perf_counter()
            batch = self.next_batch()
            wait_s += time.perf_counter() - requested
            tokens += int(batch["token_mask"].sum())
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last else distributed.no_sync(self.loss_module):
                loss, terms = self.loss_module(batch)
                for name, value in terms.items():
                    terms_sum[name] = terms_sum.get(name, 0.0) + value / config.grad_accum
                finite = distributed.all_true(finite and math.isfinite(terms["loss"]), self.device)
                if finite:  # the last backward all-reduces the gradients (DDP buckets, overlapped)
                    (loss / config.grad_accum).backward()
        grad_norm = float("nan")
        if finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_norm))
            finite = distributed.all_true(math.isfinite(grad_norm), self.device)
        if finite:
            self.optimizer.step()
            self.ema.update_parameters(self.model)
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        reduced = distributed.reduce_values(terms_sum, {"tokens": float(tokens)}, self.device)
        step_s = time.perf_counter() - started
        self.elapsed_s += step_s
        row = {
            "step": self.step,
            "epoch": self.data.epoch,
            **{name: reduced[name] for name in terms_sum},
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": int(not finite),
            "tokens": int(reduced["tokens"]),  # of the global batch
            "step_s": step_s,
            "data_wait_s": wait_s,
            "elapsed_s": self.elapsed_s,
        }
        if self.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, float]]:
        """Train until ``config.steps`` (or ``max_minutes``); checkpoint and log on the way.
        Returns the metrics rows of this session."""
        from tqdm.auto import tqdm

        config = self.config
        main = distributed.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else math.inf
        session: list[dict[str, float]] = []
        bar = tqdm(total=config.steps, initial=self.step, desc="train", unit="step", disable=not (config.progress and main), dynamic_ncols=True)
        try:
            # Ranks' clocks differ: rank 0's deadline decides for all, or they would part ways.
            while self.step < config.steps and distributed.all_true(time.perf_counter() < deadline, self.device):
                row = self.train_step()
                self._log(row)
                session.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", s_per_step=f"{row['step_s']:.2f}", lr=f"{row['lr']:.2e}", skipped=self.skipped_steps)
                if config.eval_every and self.step % config.eval_every == 0 and main:  # the EMA is the same on every rank
                    result = self.evaluate()
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step"))
                if self.step % config.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        if not session or self.step % config.checkpoint_every:
            self.save()
        return session

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics (``megafold.train.metrics.evaluate``) of the EMA model on the eval entries,
        cropped as in training, the same crops every time; logged to ``eval.csv``."""
        loader = self._loader(self.eval_keys, shuffle=False)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(EVAL_SEED)
            batches = (pad_batch(batch, self.config.pad_multiple) for batch in loader)
            result = evaluate(self.ema.module, batches, steps=self.config.eval_sampler_steps)
        row = {"step": self.step, **result}
        self.eval_history.append(row)
        if distributed.is_main():
            _append_csv(self.out / "eval.csv", row)
        return row

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if distributed.is_main():
            _append_csv(self.out / "metrics.csv", row)

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Under torchrun every rank must call it (it gathers the
        ranks' random states); the loader's position is counted in global samples."""
        loader = {**self.data.state_dict(), "position": self.data.position * self.world_size}
        random_states = distributed.gather(rng_state())
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"step": self.step, "lr": learning_rate(self.step, self.config)},
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
            "rng": random_states[0],
            "rng_ranks": random_states,
            "world_size": self.world_size,
            "loader": loader,
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": self.config.to_dict(),
        }

    def save(self) -> Path:
        """Checkpoint (atomically) and write ``metrics.zarr``; rank 0 writes, all ranks call it."""
        state = self.state_dict()
        if distributed.is_main():
            save_checkpoint(self.checkpoint_path, state)
            write_metrics_zarr(self.out, self.history, self.eval_history, attrs=self._attrs())
        distributed.barrier()  # nobody runs ahead to read a checkpoint not yet written
        return self.checkpoint_path

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Continue from a checkpoint (default ``out/checkpoint.pt``): the same batches, random
        numbers and updates as if the run had never stopped (on another number of processes:
        the same next sample, and random streams reseeded from (seed, rank, step))."""
        path = Path(path) if path is not None else self.checkpoint_path
        state = load_checkpoint(path, map_location=self.device)
        saved = AlphaFold3Config().replace(**state["model_config"])
        if saved != self.model_config:
            changed = [f.name for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(self.model_config, f.name)]
            raise ConfigError(f"{path}: the checkpoint's model config differs in {changed}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.elapsed_s = float(state["elapsed_s"])
        self._load_loader_state(state["loader"])
        self._batch_stream = None
        random_states = state.get("rng_ranks", [state["rng"]])
        if len(random_states) == self.world_size:
            set_rng_state(random_states[self.rank])
        else:
            seed_rng(distributed.rank_seed(self.config.seed, self.rank, self.step))
        # Rows logged after the checkpoint was written belong to a future that did not happen.
        self.history = _truncate_csv(self.out / "metrics.csv", self.step)
        self.eval_history = _truncate_csv(self.out / "eval.csv", self.step)

    def _load_loader_state(self, state: Mapping[str, int]) -> None:
        """The loader at the checkpoint's global position (samples of the epoch handed out by
        all ranks together): rank r resumes at its share of it, so any world size continues
        from the same sample of the same epoch order."""
        position = int(state["position"])
        if position % self.world_size and distributed.is_main():
            warnings.warn(
                f"resuming at sample {position} of the epoch on {self.world_size} processes: "
                f"{position % self.world_size} sample(s) are seen twice in this epoch",
                stacklevel=3,
            )
        self.data.load_state_dict({**state, "position": position // self.world_size})

    def _attrs(self) -> dict[str, Any]:
        return {
            "model_config": repr(dataclasses.asdict(self.model_config)),
            "train_config": repr(self.config.to_dict()),
            "device": str(self.device),
            "world_size": self.world_size,
            "skipped_steps": self.skipped_steps,
        }


# ---------------------------------------------------------------------------- metrics files


def _append_csv(path: Path, row: Mapping[str, float]) -> None:
    """Append ``row``; the file is (re)written with a header when it is new or lacks a column."""
    columns = None
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as handle:
            columns = next(csv.reader(handle))
    if columns is None or not set(row) <= set(columns):
        columns = list(dict.fromkeys([*(columns or []), *row]))
        _rewrite_csv(path, _read_csv(path), columns)
    with open(path, "a", newline="") as handle:
        csv.DictWriter(handle, columns, restval="nan").writerow(dict(row))


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _rewrite_csv(path: Path, rows: Sequence[Mapping[str, float]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="nan")
        writer.writeheader()
        writer.writerows(rows)


def _truncate_csv(path: Path, last_step: int) -> list[dict[str, float]]:
    rows = [row for row in _read_csv(path) if row["step"] <= last_step]
    if path.is_file():
        _rewrite_csv(path, rows)
    return rows


def metrics_dataset(history: Sequence[Mapping[str, float]], eval_history: Sequence[Mapping[str, float]] = (), attrs: Mapping[str, Any] | None = None):
    """Training rows along dim ``step`` and evaluation rows along ``eval_step`` as one
    ``xarray.Dataset`` (evaluation variables are prefixed ``eval_``)."""
    import xarray as xr

    variables = {}
    for rows, dim, prefix in ((history, "step", ""), (eval_history, "eval_step", "eval_")):
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
        for column in columns:
            variables[prefix + column] = (dim, np.array([r.get(column, np.nan) for r in rows], np.float64))
    coords = {
        "step": np.array([int(r["step"]) for r in history], np.int64),
        "eval_step": np.array([int(r["step"]) for r in eval_history], np.int64),
    }
    return xr.Dataset(variables, coords=coords, attrs=dict(attrs or {}))


def write_metrics_zarr(out: Path, history, eval_history, attrs: Mapping[str, Any] | None = None) -> Path:
    """Write ``metrics_dataset(...)`` to ``out/metrics.zarr``, replacing the previous one whole."""
    final = out / "metrics.zarr"
    temporary = out / f".metrics.zarr.{uuid.uuid4().hex[:8]}.tmp"
    metrics_dataset(history, eval_history, attrs).to_zarr(temporary, mode="w", consolidated=False)
    old = out / f".metrics.zarr.{uuid.uuid4().hex[:8]}.old"
    if final.exists():
        os.rename(final, old)
    os.rename(temporary, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_metrics(out: str | os.PathLike):
    """The metrics of the run in ``out`` as an ``xarray.Dataset`` (loaded into memory)."""
    import xarray as xr

    path = Path(out) / "metrics.zarr"
    if not path.is_dir():
        raise CacheError(f"{path}: no metrics here (has the run saved a checkpoint yet?)")
    with xr.open_zarr(path, consolidated=False) as dataset:
        return dataset.load()
