"""Training batches from a precache store: crop per sample, collate, prefetch to the GPU.

``loader(store, crop_size, batch_size)`` returns a :class:`Loader`: iterate it for one
epoch of feature batches (``features.collate`` layout, padding masks included). It

* loads and crops each sample in DataLoader worker processes, with a random generator
  derived from (seed, epoch, sample), so a sample's crop does not depend on the worker
  count, and a resumed run sees the very batches it would have seen;
* pins host memory and, with a CUDA device, copies the next batches to the GPU on a
  side stream from a background thread while the current one is used;
* measures how long the training loop waited for each batch (``stats()``);
* resumes mid-epoch from ``state_dict()`` (epoch, position, seed) and shards samples
  over ``world_size`` ranks.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from megafold.data.crop import CROP_WEIGHTS, crop_example, random_rotate_conformers
from megafold.data.features import batch_to, collate
from megafold.errors import CacheError
from megafold.precache.store import Store, open_store


class ShardedSampler(Sampler):
    """This rank's samples of one epoch, from ``start`` on, as ``(index, epoch)`` pairs.

    The order is a permutation drawn from (seed, epoch) (or 0..n-1 without shuffle),
    padded by wrapping around to a multiple of ``world_size`` (or cut, with
    ``drop_last``), then dealt round-robin: rank r takes positions r, r + W, ...
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        indices = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.drop_last:
            indices = indices[: len(indices) - len(indices) % self.world_size]
        elif len(indices) % self.world_size:
            indices = np.resize(indices, len(indices) + self.world_size - len(indices) % self.world_size)
        return indices[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(int(i), epoch) for i in self.order(epoch)[self.start :]])

    def __len__(self) -> int:
        return max(len(self.order(self.epoch)) - self.start, 0)


class CroppedExamples(Dataset):
    """Store entries, each cropped and its conformers rotated with a per-sample generator."""

    def __init__(
        self,
        source,
        keys: Sequence[str],
        crop_size: int,
        *,
        seed: int,
        crop_weights: Mapping[str, float] = CROP_WEIGHTS,
        max_msa_rows: int | None = None,
    ):
        self.source, self.keys = source, list(keys)
        self.crop_size, self.seed = crop_size, seed
        self.crop_weights, self.max_msa_rows = dict(crop_weights), max_msa_rows

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        index, epoch = item
        rng = np.random.default_rng([self.seed, epoch, index])
        example = self.source.load(self.keys[index])
        example = crop_example(
            example, self.crop_size, rng, weights=self.crop_weights, max_msa_rows=self.max_msa_rows
        )
        return random_rotate_conformers(example, rng)


class Loader:
    """Iterable of feature batches, one epoch per ``iter()``; see the module docstring.

    ``source`` is a :class:`Store` or anything with ``keys()`` and ``load(key)`` returning
    an example (e.g. :class:`OnTheFlySource`); ``keys`` picks a subset of its entries
    (default: all), e.g. a training split.
    """

    def __init__(
        self,
        source,
        crop_size: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        workers: int = 2,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        device: str | torch.device | None = None,
        max_msa_rows: int | None = None,
        crop_weights: Mapping[str, float] = CROP_WEIGHTS,
        prefetch_factor: int = 2,
        keys: Sequence[str] | None = None,
    ):
        name = getattr(source, "path", source)
        available = source.keys()
        if keys is None:
            keys = available
        else:
            missing = sorted(set(keys) - set(available))
            if missing:
                raise CacheError(f"{name}: no entries {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            keys = sorted(set(keys))  # the same batches whatever order the keys came in
        if not keys:
            raise CacheError(f"{name}: no entries to load")
        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            world_size = torch.distributed.get_world_size() if distributed else 1
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.dataset = CroppedExamples(
            source, keys, crop_size, seed=seed, crop_weights=crop_weights, max_msa_rows=max_msa_rows
        )
        self.sampler = ShardedSampler(
            len(keys), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=drop_last)
        self.data_loader = DataLoader(
            self.dataset,
            batch_sampler=self.batches,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
        )
        self._prefetcher: _CudaPrefetcher | None = None
        self.reset_stats()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        """Samples of the current epoch this rank has handed out."""
        return self.sampler.start

    def __len__(self) -> int:
        """Batches in one full epoch of this rank."""
        samples = len(self.sampler.order(self.sampler.epoch))
        return samples // self.batch_size if self.batches.drop_last else -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._stop_prefetch()  # an epoch abandoned half way still had its copy thread
        batches = iter(self.data_loader)
        if self.device.type == "cuda":
            self._prefetcher = _CudaPrefetcher(batches, self.device)
            batches = self._prefetcher
        try:
            while True:
                requested = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                self._wait_s += time.perf_counter() - requested
                self._batches += 1
                size = batch["token_mask"].shape[0]
                self._samples += size
                self.sampler.start += size
                yield batch if self._prefetcher is not None else batch_to(batch, self.device)
        finally:
            self._stop_prefetch()
        self.sampler.epoch += 1
        self.sampler.start = 0

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: checkpoint it with the model to resume mid-epoch."""
        return {"epoch": self.sampler.epoch, "position": self.sampler.start, "seed": self.sampler.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.sampler.start = int(state["position"])
        self.sampler.seed = self.dataset.seed = int(state["seed"])

    def stats(self) -> dict[str, float]:
        """Time the consumer waited for batches since the last ``reset_stats()``."""
        return {
            "wait_s": self._wait_s,
            "batches": self._batches,
            "samples": self._samples,
            "mean_wait_ms": 1000.0 * self._wait_s / max(self._batches, 1),
        }

    @property
    def wait_s(self) -> float:
        return self._wait_s

    def reset_stats(self) -> None:
        self._wait_s, self._batches, self._samples = 0.0, 0, 0


class _CudaPrefetcher:
    """A background thread that takes host batches and copies them to the GPU on a side
    stream, up to ``depth`` batches ahead, so the copy overlaps the caller's compute."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], device: torch.device, depth: int = 2):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batches,), daemon=True)
        self.thread.start()

    def _run(self, batches) -> None:
        try:
            torch.cuda.set_device(self.device)  # the current device is per thread
            for host in batches:
                with torch.cuda.stream(self.stream):
                    batch = batch_to(host, self.device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
                if not self._put((batch, copied)):
                    return
            self._put(None)
        except BaseException as exc:  # re-raised in the consumer's thread
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self.queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, copied = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)
        for tensor in batch.values():
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        return batch

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()


def loader(
    store: Store | str | Path,
    crop_size: int,
    batch_size: int,
    shuffle: bool = True,
    workers: int = 2,
    *,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    device: str | torch.device | None = None,
    max_msa_rows: int | None = None,
    crop_weights: Mapping[str, float] = CROP_WEIGHTS,
    keys: Sequence[str] | None = None,
) -> Loader:
    """A :class:`Loader` of cropped, collated feature batches from a precache store.

    keys: train on these entries only (default: every entry); an unknown key raises
    ``CacheError``.

    rank / world_size default to torch.distributed's when it is initialized (else 0 / 1);
    device defaults to CUDA when available (batches arrive there, prefetched).
    """
    source = store if isinstance(store, Store) else open_store(store)
    return Loader(
        source,
        crop_size,
        batch_size,
        shuffle=shuffle,
        workers=workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        device=device,
        max_msa_rows=max_msa_rows,
        crop_weights=crop_weights,
        keys=keys,
    )


class OnTheFlySource:
    """Featurize structure files at load time (parse, MSA search, templates), no cache.

    The baseline the precache is measured against: the same Loader over this source
    does in every sample what ``megafold precache`` does once.
    """

    def __init__(self, sources: Sequence[str | Path], *, seq_db: str | Path | None = None, templates: bool = True):
        from megafold.data.msa import SequenceDatabase
        from megafold.data.pipeline import input_sequences
        from megafold.data.structures import load_structure
        from megafold.data.templates import TemplateDatabase, template_chains
        from megafold.precache.build import entry_key, find_sources

        self.paths = {entry_key(p): p for p in find_sources(sources)}
        structures = [load_structure(p) for p in self.paths.values()]
        self.sequence_db = SequenceDatabase(seq_db, extra=input_sequences(structures))
        self.template_db = (
            TemplateDatabase([c for s in structures for c in template_chains(s)]) if templates else None
        )

    def keys(self) -> list[str]:
        return sorted(self.paths)

    def load(self, key: str) -> dict[str, np.ndarray]:
        from megafold.data.pipeline import featurize
        from megafold.data.structures import load_structure

        example, _ = featurize(
            load_structure(self.paths[key]), key=key, sequence_db=self.sequence_db, template_db=self.template_db
        )
        return example


def time_load_and_crop(
    store: Store | str | Path, crop_size: int = 384, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """Milliseconds to load one entry and crop it (what a loader worker does per sample).

    Every entry is loaded ``repeats`` times; returns the median and 90th percentile wall
    time over all loads, the median CPU time, and the entry count.
    """
    source = store if isinstance(store, Store) else open_store(store)
    dataset = CroppedExamples(source, source.keys(), crop_size, seed=seed)
    wall, cpu = [], []
    for _ in range(repeats):
        for index in range(len(dataset)):
            started, started_cpu = time.perf_counter(), time.process_time()
            dataset[(index, len(wall))]
            wall.append(1000.0 * (time.perf_counter() - started))
            cpu.append(1000.0 * (time.process_time() - started_cpu))
    return {
        "median_ms": float(np.median(wall)),
        "p90_ms": float(np.percentile(wall, 90)),
        "median_cpu_ms": float(np.median(cpu)),  # robust to other processes sharing the cores
        "entries": len(dataset),
        "crop_size": crop_size,
    }
