"""Profile one AlphaFold3 training step: time and memory per AF3 module, per stage, and the
longest crop that fits.

    from megafold.profile import profile_step, compare, variants, longest_crop
    ds = profile_step("tiny", crop=32)                       # one xarray Dataset
    both = compare(variants(preset("paper"), ("torch", "triton")), crop=384, longest=True)
    save(both, "profile.zarr"); load("profile.zarr")

How time is measured and attributed
-----------------------------------
A step has four stages: data (fetching the batch), forward (``training_loss``), backward and
optimizer (Adam). The profiler keeps one timeline of *switch points*: CUDA events on the
current stream on a GPU (``torch.cuda.Event``, read after one synchronize at the end of the
step), ``time.perf_counter`` on the CPU. A switch happens at every stage boundary and whenever
the *owner* of the timeline changes; the time between two switches belongs to the owner that
was current. Owners are (module, part, phase):

* forward: a forward pre-hook of a module named in ``AF3_MODULES`` pushes it and its forward
  hook pops it (``always_call``, so an exception also pops), and a few methods that do AF3
  work outside ``forward`` are wrapped the same way (``REGION_METHODS``: the diffusion
  module's per-trunk ``prepare`` and the pair-bias projection). Time is *exclusive*: the
  innermost module owns it, so ``TriangleAttention`` inside ``PairformerStack`` is counted
  once, under ``TriangleAttention``; ``PairformerStack`` keeps its own glue (residual adds,
  dropout, checkpointing). Time outside every AF3 module (losses, recycling, embeddings
  glue) is ``"(other)"``. The *part* is the outermost AF3 module (``PARTS``), so the same
  ``Transition`` class is counted per module and per part.
* backward: autograd nodes carry the sequence number of the forward op that created them.
  The forward records which owner was current for each range of sequence numbers; before
  ``backward()`` every node of the graph gets a pre-hook that switches the timeline to the
  owner of its forward op. With activation checkpointing, forward hooks fire again inside
  backward: that time is the phase ``"recompute"`` of the recomputed module.
* memory: at every switch the allocator's current allocation is sampled
  (``torch.cuda.memory_allocated``) and the peak since the previous switch is read and reset
  (``max_memory_allocated`` / ``reset_peak_memory_stats``), so the peak of every segment,
  module and stage is exact on a GPU. The CPU has no allocator statistics: there a
  ``TorchDispatchMode`` counts the bytes of the tensor storages created while profiling that
  are still alive (freed ones leave through weakref finalizers), an equally exact figure for
  tensors (not for the allocator's own caching or fragmentation).

The hooks cost a few microseconds of host time per switch (thousands per "paper" step); on
a GPU that overhead hides behind queued kernels except where the step is launch-bound.
``modules=False`` times the stages only. Under ``torch.compile`` the compiled blocks
(``COMPILED_BLOCKS``) are opaque: modules inside them get no time of their own (NaN).

Results are ``xarray.Dataset`` objects (``save`` / ``load`` through zarr); see
``profile_step`` for the variables.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from megafold.errors import ConfigError
from megafold.model import AlphaFold3, AlphaFold3Config, preset, synthetic_batch

if TYPE_CHECKING:
    import xarray as xr

Batch = Mapping[str, torch.Tensor]

OTHER = "(other)"
# AF3 modules (paper names) that own time, in the order of a training step.
AF3_MODULES: tuple[str, ...] = (
    "InputFeatureEmbedder",
    "AtomAttentionEncoder",
    "AtomAttentionDecoder",
    "RelativePositionEncoding",
    "TemplateEmbedder",
    "MSAModule",
    "OuterProductMean",
    "MSAPairWeightedAveraging",
    "PairformerStack",
    "TriangleMultiplication",
    "TriangleAttention",
    "AttentionPairBias",
    "Transition",
    "DiffusionModule",
    "ConditionedTransitionBlock",
    "DistogramHead",
    "ConfidenceHead",
)
MODULES: tuple[str, ...] = (*AF3_MODULES, OTHER)
# Top-level parts of the step: the outermost AF3 module a segment runs in.
PARTS: tuple[str, ...] = (
    "InputFeatureEmbedder",
    "TemplateEmbedder",
    "MSAModule",
    "PairformerStack",
    "DiffusionModule",
    "DistogramHead",
    "ConfidenceHead",
    OTHER,
)
# Methods that run AF3 work outside forward(); timed as their class.
REGION_METHODS: dict[str, tuple[str, ...]] = {
    "DiffusionModule": ("prepare",),
    "AtomAttentionEncoder": ("prepare",),
    "AttentionPairBias": ("pair_bias",),
}
PHASES: tuple[str, ...] = ("forward", "backward", "recompute")
STAGES: tuple[str, ...] = ("data", "forward", "backward", "optimizer")
# torch.compile targets: the repeated blocks, outermost first (an MSABlock holds a PairformerBlock).
COMPILED_BLOCKS: tuple[str, ...] = ("MSABlock", "PairformerBlock", "DiffusionTransformer")
# AF3 Adam (Sec. 5.4): beta1 0.9, beta2 0.95, eps 1e-8.
ADAM = {"lr": 1.8e-3, "betas": (0.9, 0.95), "eps": 1e-8}
CPU_SEARCH = {"start": 16, "step": 16, "max_crop": 64}
GPU_SEARCH = {"start": 128, "step": 128, "max_crop": 8192}
MIB = 2**20

# torch.OutOfMemoryError (torch >= 2.5) is torch.cuda.OutOfMemoryError under a newer name.
_OOM_ERROR: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Variant:
    """One thing to profile: a model config and whether to torch.compile its repeated blocks
    (``compile``: False, True for the default inductor backend, or a backend name)."""

    config: AlphaFold3Config
    compile: bool | str = False


def variants(config: AlphaFold3Config | str, names: Sequence[str] = ("torch", "triton")) -> dict[str, Variant]:
    """The standard comparison of one config: "torch" (eager reference kernels), "triton"
    (megafold's kernels) and "compile" (torch.compile of the eager model)."""
    config = resolve_config(config)
    known = {
        "torch": Variant(config.replace(kernels="torch")),
        "triton": Variant(config.replace(kernels="triton")),
        "compile": Variant(config.replace(kernels="torch"), compile=True),
    }
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown profile variant(s) {unknown}; expected some of {tuple(known)}")
    return {name: known[name] for name in names}


def variant_label(variant: Variant, device: str | torch.device | None = None) -> str:
    """The kernels a variant runs on ``device`` ("auto" resolved), "+compile" if compiled."""
    from megafold.kernels._common import resolve_backend, use_kernels

    with use_kernels(variant.config.kernels):
        kernels = resolve_backend("auto", torch.empty(0, device=resolve_device(device)))
    return f"{kernels}+compile" if variant.compile else kernels


def resolve_config(config: AlphaFold3Config | str) -> AlphaFold3Config:
    return preset(config) if isinstance(config, str) else config


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def describe_device(device: str | torch.device | None = None) -> str:
    """The device in words, for labelling results: GPU name with its CUDA or ROCm version
    (``torch.version.hip``), or the CPU."""
    device = resolve_device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        runtime = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{name} ({runtime})"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU"


def default_crop(device: str | torch.device | None = None) -> int:
    """384 tokens (AF3's training crop) on a GPU, 32 on the CPU."""
    return 384 if resolve_device(device).type == "cuda" else 32


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version, "commit": _git_commit()}


# --------------------------------------------------------------------------- clock and memory


class _Clock:
    """Marks on the device timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def durations_ms(self, marks: Sequence[Any]) -> np.ndarray:
        """Time between consecutive marks (synchronizes with the GPU once)."""
        if self.cuda:
            marks[-1].synchronize()
            return np.array([a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])], dtype=np.float64)
        return np.diff(np.asarray(marks, dtype=np.float64)) * 1e3


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active (the CPU has no
    allocator statistics): every op's outputs are noted once per storage, and a weakref
    finalizer subtracts a storage when it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.bytes = 0
        self.peak = 0
        self._lock = threading.Lock()

    def _note(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        with self._lock:
            if key in self.live:
                return
            size = storage.nbytes()
            self.live[key] = size
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.bytes -= self.live.pop(key, 0)

    def take_peak(self) -> int:
        """The peak in bytes since the previous call (which restarts it at the current count)."""
        with self._lock:
            peak, self.peak = self.peak, self.bytes
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._note(leaf)
        return out


class _Memory:
    """Current and peak memory in MiB; ``take_peak`` returns the peak since its last call.

    GPU: the caching allocator's allocated bytes (``memory_allocated``, peaks read and reset
    with ``max_memory_allocated`` / ``reset_peak_memory_stats``). CPU: the bytes of tensor
    storages created inside the ``with`` block that are still alive (``_LiveTensors``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = (
            "torch.cuda.memory_allocated (exact peak per segment)"
            if self.cuda
            else "live tensor storages created while profiling (a dispatch mode; exact peak per segment)"
        )
        self._live = None if self.cuda else _LiveTensors()

    def __enter__(self) -> _Memory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def allocated(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / MIB
        return self._live.bytes / MIB

    def take_peak(self) -> float:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / MIB
        return self._live.take_peak() / MIB


# --------------------------------------------------------------------------- timeline


Owner = tuple[str, str, str]  # (module, part, phase)
# The owner of each stage outside AF3 modules. "profiler" is the profiler's own work between
# forward and backward (hooking the graph): it is left out of every total.
_STAGE_OWNERS: dict[str, Owner] = {
    "data": ("(data)", OTHER, "data"),
    "forward": (OTHER, OTHER, "forward"),
    "profiler": ("(profiler)", OTHER, "profiler"),
    "backward": (OTHER, OTHER, "backward"),
    "optimizer": ("(optimizer)", OTHER, "optimizer"),
}


class _Timeline:
    """Switch points of one step; segment i runs from mark i to mark i + 1 and belongs to
    ``owners[i]``."""

    def __init__(self, clock: _Clock, memory: _Memory):
        self.clock, self.memory = clock, memory
        self.marks: list[Any] = []
        self.owners: list[Owner] = []
        self.allocated: list[float] = []
        self.peaks: list[float] = []

    def start(self) -> None:
        self.memory.take_peak()
        self.marks.append(self.clock.mark())

    def close(self, owner: Owner) -> None:
        """End the running segment, owned by ``owner``."""
        self.marks.append(self.clock.mark())
        self.owners.append(owner)
        self.allocated.append(self.memory.allocated())
        self.peaks.append(self.memory.take_peak())


_PROBE_LEAF = torch.zeros((), requires_grad=True)


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread will get (a probe
    node takes the one before it)."""
    with torch.enable_grad():
        return (_PROBE_LEAF * 1.0).grad_fn._sequence_nr() + 1


def _graph_nodes(roots: Iterable[Any]) -> list[Any]:
    seen, stack, nodes = set(), [r for r in roots if r is not None], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return nodes


class _Tracer:
    """Owns the timeline's current owner: module hooks in forward (and recompute), node
    pre-hooks in backward. See the module docstring."""

    def __init__(self, model: nn.Module, traced: bool):
        self.timeline: _Timeline | None = None  # set by begin()
        self.stack: list[Owner] = []
        self.base: Owner = _STAGE_OWNERS["data"]
        self.in_backward = False
        self.seq_starts: list[int] = []
        self.seq_owners: list[tuple[str, str]] = []
        self.traced_modules: set[str] = set()
        self.entries: dict[tuple[str, str], int] = {}
        self._lock = threading.RLock()
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        if traced:
            self._attach(model)

    # ---- forward: module hooks
    def _attach(self, model: nn.Module) -> None:
        opaque = [m for m in model.modules() if type(m).__name__ in COMPILED_BLOCKS and _is_compiled(m)]
        hidden = {id(inner) for block in opaque for inner in block.modules()}
        for module in model.modules():
            name = type(module).__name__
            if id(module) in hidden:
                continue
            if name in AF3_MODULES:
                self.traced_modules.add(name)
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._pre_hook, name)))
                self._handles.append(
                    module.register_forward_hook(functools.partial(self._post_hook, name), always_call=True)
                )
            for method in REGION_METHODS.get(name, ()):
                setattr(module, method, self._region(name, getattr(module, method)))
                self._wrapped.append((module, method))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, method in self._wrapped:
            delattr(module, method)
        self._handles, self._wrapped = [], []

    def _region(self, name: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return method(*args, **kwargs)
            finally:
                self.exit(name)

        return timed

    def _pre_hook(self, name: str, module: nn.Module, args: Any) -> None:
        self.enter(name)

    def _post_hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.exit(name)

    def current(self) -> Owner:
        return self.stack[-1] if self.stack else self.base

    def _switch(self) -> None:
        self.timeline.close(self.current())

    def _record_sequence(self) -> None:
        if not self.in_backward:
            module, part, _ = self.current()
            self.seq_starts.append(_next_sequence_nr())
            self.seq_owners.append((module, part))

    def _count(self, module: str, phase: str) -> None:
        self.entries[module, phase] = self.entries.get((module, phase), 0) + 1

    def enter(self, name: str) -> None:
        with self._lock:
            if self.base[2] in ("data", "optimizer"):
                return  # e.g. a loader that runs a module: not part of the model's step
            self._switch()
            phase = "recompute" if self.in_backward else "forward"
            outer = self.stack[0] if self.stack else self.base
            part = outer[1] if outer[1] != OTHER else name
            self.stack.append((name, part if part in PARTS else OTHER, phase))
            self._count(name, phase)
            self._record_sequence()

    def exit(self, name: str) -> None:
        with self._lock:
            names = [owner[0] for owner in self.stack]
            if name not in names:
                return
            self._switch()
            del self.stack[len(names) - 1 - names[::-1].index(name) :]
            self._record_sequence()

    # ---- stages
    def begin(self, timeline: _Timeline) -> None:
        """Start a step on ``timeline`` in the data stage."""
        with self._lock:
            self.timeline = timeline
            self.entries = {}
            self.stack.clear()
            self.base, self.in_backward = _STAGE_OWNERS["data"], False
            timeline.start()

    def stage(self, stage: str) -> None:
        """Switch to ``stage`` (a key of ``_STAGE_OWNERS``)."""
        with self._lock:
            self._switch()
            self.stack.clear()
            self.base = _STAGE_OWNERS[stage]
            self.in_backward = stage == "backward"
            if stage == "forward":
                self.seq_starts, self.seq_owners = [], []
                self._record_sequence()

    def finish(self) -> None:
        with self._lock:
            self._switch()

    # ---- backward: node pre-hooks
    def hook_graph(self, loss: torch.Tensor) -> list[Any]:
        """Give every node of ``loss``'s graph a pre-hook that switches to its forward owner."""
        handles = []
        if not self.seq_starts or loss.grad_fn is None or not hasattr(loss.grad_fn, "_sequence_nr"):
            return handles
        for node in _graph_nodes([loss.grad_fn]):
            if node.name().endswith("AccumulateGrad"):
                continue  # no sequence number of its own; runs inside its consumer's time
            index = bisect.bisect_right(self.seq_starts, node._sequence_nr()) - 1
            module, part = self.seq_owners[index] if index >= 0 else (OTHER, OTHER)
            handles.append(node.register_prehook(functools.partial(self._node_hook, (module, part, "backward"))))
        return handles

    def _node_hook(self, owner: Owner, grad_outputs: Any) -> None:
        with self._lock:
            if owner != self.base or self.stack:
                self._switch()
                self.stack.clear()
                if owner != self.base:
                    self._count(owner[0], "backward")
                self.base = owner


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _compile_blocks(model: nn.Module, backend: bool | str) -> None:
    """torch.compile the repeated blocks in place (outermost match only)."""
    options = {} if backend is True else {"backend": backend}
    done: set[int] = set()
    for module in model.modules():
        if id(module) in done or type(module).__name__ not in COMPILED_BLOCKS:
            continue
        module.compile(**options)
        done.update(id(inner) for inner in module.modules())


# --------------------------------------------------------------------------- one step


@dataclass
class _StepRecord:
    durations_ms: np.ndarray  # per segment
    owners: list[Owner]
    allocated: list[float]
    peaks: list[float]
    entries: dict[tuple[str, str], int]
    loss: float


class _Session:
    """A model and its optimizer on one device, ready to run steps; memory is counted from
    before the model is built (``with _Session(...) as session:``)."""

    def __init__(
        self, variant: Variant, device: torch.device, *, backward: bool, n_cycles: int, seed: int,
    ):  # fmt: skip
        self.variant, self.device = variant, device
        self.backward, self.n_cycles, self.seed = backward, n_cycles, seed
        self.clock = _Clock(device)
        self.memory = _Memory(device)
        self.model: AlphaFold3 | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.parameters = 0

    def __enter__(self) -> _Session:
        self.memory.__enter__()
        try:
            torch.manual_seed(self.seed)
            with torch.device(self.device):  # initialise on the device: seconds faster for "paper"
                self.model = AlphaFold3(self.variant.config).train()
            if self.variant.compile:
                _compile_blocks(self.model, self.variant.compile)
            self.optimizer = torch.optim.Adam(self.model.parameters(), **ADAM) if self.backward else None
            self.parameters = sum(p.numel() for p in self.model.parameters())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.model = self.optimizer = None
        self.memory.__exit__(*exc)
        _free_memory(self.device)

    def step(self, batches: Iterator[Batch], tracer: _Tracer | None = None) -> _StepRecord:
        timeline = _Timeline(self.clock, self.memory)
        tracer = tracer or _Tracer(self.model, traced=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tracer.begin(timeline)
        batch = next(batches)
        tracer.stage("forward")
        with torch.set_grad_enabled(self.backward):
            loss, _ = self.model.training_loss(batch, n_cycles=self.n_cycles)
        if self.backward:
            tracer.stage("profiler")
            handles = tracer.hook_graph(loss)
            tracer.stage("backward")
            try:
                loss.backward()
            finally:
                for handle in handles:
                    handle.remove()
            tracer.stage("optimizer")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        tracer.finish()
        loss_value = float(loss.detach())
        del loss, batch
        return _StepRecord(
            self.clock.durations_ms(timeline.marks), timeline.owners, timeline.allocated, timeline.peaks,
            dict(tracer.entries), loss_value,
        )


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synthetic_batches(
    crop: int, device: torch.device, msa_rows: int, atoms_per_token: int, seed: int
) -> Iterator[Batch]:
    batch = synthetic_batch(crop, atoms_per_token=atoms_per_token, msa_rows=msa_rows, device=device, seed=seed)
    while True:
        yield batch


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Endless batches from a re-iterable source (a precache loader: one epoch per iter())."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ConfigError("profile: the batch source yielded no batches")


# --------------------------------------------------------------------------- datasets


def _step_tables(record: _StepRecord) -> dict[str, np.ndarray]:
    module_index = {name: i for i, name in enumerate(MODULES)}
    part_index = {name: i for i, name in enumerate(PARTS)}
    phase_index = {name: i for i, name in enumerate(PHASES)}
    stage_of = {"data": 0, "forward": 1, "backward": 2, "recompute": 2, "optimizer": 3}
    time_ms = np.zeros((len(MODULES), len(PHASES)))
    calls = np.zeros((len(MODULES), len(PHASES)))
    peak = np.zeros((len(MODULES), len(PHASES)))
    part_ms = np.zeros((len(PARTS), len(PHASES)))
    stage_ms = np.zeros(len(STAGES))
    stage_peak = np.zeros(len(STAGES))
    for duration, owner, segment_peak in zip(record.durations_ms, record.owners, record.peaks):
        module, part, phase = owner
        if phase == "profiler":
            continue
        stage = stage_of[phase]
        stage_ms[stage] += duration
        stage_peak[stage] = max(stage_peak[stage], segment_peak)
        if phase in phase_index:
            m, p = module_index[module], phase_index[phase]
            time_ms[m, p] += duration
            peak[m, p] = max(peak[m, p], segment_peak)
            part_ms[part_index[part], p] += duration
    for (module, phase), count in record.entries.items():
        if module in module_index:
            calls[module_index[module], phase_index[phase]] = count
    return {
        "time_ms": time_ms, "calls": calls, "peak_mib": peak, "part_time_ms": part_ms,
        "stage_ms": stage_ms, "stage_peak_mib": stage_peak,
    }  # fmt: skip


def _config_attrs(variant: Variant) -> dict[str, Any]:
    config = variant.config
    return {
        "kernels": config.kernels,
        "compile": str(variant.compile) if variant.compile else "off",
        "checkpoint": config.checkpoint,
        "dtype": "bf16" if config.bf16 else "fp32",
        "config_json": json.dumps(dataclasses.asdict(config), sort_keys=True),
    }


def _base_attrs(device: torch.device) -> dict[str, Any]:
    attrs = {"device": describe_device(device), "date": datetime.date.today().isoformat(), **_versions()}
    if device.type == "cuda":
        attrs["device_memory_mib"] = torch.cuda.get_device_properties(device).total_memory / MIB
    return attrs


def _profile_dataset(
    records: Sequence[_StepRecord], session: _Session, traced_modules: set[str], attrs: dict[str, Any]
) -> xr.Dataset:
    import xarray as xr

    tables = [_step_tables(record) for record in records]

    def mean(name: str) -> np.ndarray:
        return np.mean([t[name] for t in tables], axis=0)

    untraced = np.array([name != OTHER and name not in traced_modules for name in MODULES])
    time_ms, calls, peak = mean("time_ms"), mean("calls"), np.max([t["peak_mib"] for t in tables], axis=0)
    for table in (time_ms, calls, peak):
        table[untraced] = np.nan
    last = records[-1]
    kept = [i for i, owner in enumerate(last.owners) if owner[2] != "profiler"]
    ends = np.cumsum(last.durations_ms[kept])
    allocated = np.asarray(last.allocated)[kept]
    segment_peaks = np.asarray(last.peaks)[kept]
    owners = [last.owners[i] for i in kept]
    dims = {"module": ("module", "phase"), "part": ("part", "phase")}
    return xr.Dataset(
        {
            "time_ms": (dims["module"], time_ms, {"doc": "exclusive time per step (mean over steps)", "units": "ms"}),
            "calls": (dims["module"], calls, {"doc": "entries per step (backward: stretches of its autograd nodes)"}),
            "peak_mib": (dims["module"], peak, {"doc": "peak while the module owned the timeline", "units": "MiB"}),
            "part_time_ms": (dims["part"], mean("part_time_ms"), {"doc": "time per top-level part", "units": "ms"}),
            "stage_ms": (("step", "stage"), np.stack([t["stage_ms"] for t in tables]), {"units": "ms"}),
            "step_ms": (("step",), np.stack([t["stage_ms"].sum() for t in tables]), {"units": "ms"}),
            "stage_peak_mib": (("stage",), np.max([t["stage_peak_mib"] for t in tables], axis=0), {"units": "MiB"}),
            "loss": (("step",), np.array([r.loss for r in records])),
            "timeline_ms": (("sample",), ends, {"doc": "end of each segment since the last step began", "units": "ms"}),
            "timeline_mib": (("sample",), allocated, {"doc": "allocated at the segment's end", "units": "MiB"}),
            "timeline_peak_mib": (("sample",), segment_peaks, {"doc": "peak within the segment", "units": "MiB"}),
            "timeline_module": (("sample",), np.array([o[0] for o in owners], dtype=str)),
            "timeline_phase": (("sample",), np.array([o[2] for o in owners], dtype=str)),
        },
        coords={
            "module": np.array(MODULES, dtype=str),
            "part": np.array(PARTS, dtype=str),
            "phase": np.array(PHASES, dtype=str),
            "stage": np.array(STAGES, dtype=str),
            "step": np.arange(len(records)),
            "sample": np.arange(len(ends)),
        },
        attrs={**attrs, "parameters": session.parameters},
    )


# --------------------------------------------------------------------------- public API


def profile_step(
    config: AlphaFold3Config | str | Variant = "tiny",
    *,
    crop: int | None = None,
    batches: Iterable[Batch] | None = None,
    steps: int = 1,
    warmup: int = 1,
    backward: bool = True,
    modules: bool = True,
    device: str | torch.device | None = None,
    n_cycles: int = 1,
    msa_rows: int = 64,
    atoms_per_token: int = 8,
    seed: int = 0,
    label: str = "",
) -> xr.Dataset:
    """Profile ``steps`` training steps of ``config`` (a preset name, a config or a Variant)
    after ``warmup`` unmeasured ones (Triton compiles and autotunes, Adam allocates its state).

    A step: fetch a batch, ``model.training_loss(batch, n_cycles)`` (trunk with ``n_cycles``
    recycles, ``diffusion_samples`` noised copies, mini-rollout, confidence, losses), backward,
    Adam. ``backward=False`` profiles the forward alone, without autograd. Batches come from
    ``batches`` (e.g. ``megafold.precache.loader(...)``; the data stage then measures the
    wait for it), else one synthetic protein of ``crop`` tokens (``atoms_per_token`` atoms
    each, ``msa_rows`` MSA rows) that stays on the device.

    Returns an ``xarray.Dataset``:
      time_ms, calls, peak_mib ``[module, phase]``: exclusive time (ms per step), entries and
      peak memory (MiB) per AF3 module and phase (forward / backward / recompute); NaN for a
      module that was not traced (inside a compiled block);
      part_time_ms ``[part, phase]``; stage_ms ``[step, stage]`` (data / forward / backward /
      optimizer), step_ms ``[step]``, stage_peak_mib ``[stage]``, loss ``[step]``;
      timeline_ms / timeline_mib / timeline_peak_mib / timeline_module / timeline_phase
      ``[sample]``: the memory timeline of the last step, one sample per switch.
    Attributes name the device, versions, config and the measuring methods.
    """
    variant = config if isinstance(config, Variant) else Variant(resolve_config(config))
    device = resolve_device(device)
    crop = crop or default_crop(device)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"profile: need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    source = (
        _cycle(batches) if batches is not None
        else _synthetic_batches(crop, device, msa_rows, atoms_per_token, seed)
    )  # fmt: skip
    with _Session(variant, device, backward=backward, n_cycles=n_cycles, seed=seed) as session:
        for _ in range(warmup):
            session.step(source)
        tracer = _Tracer(session.model, traced=modules)
        try:
            records = [session.step(source, tracer) for _ in range(steps)]
        finally:
            tracer.detach()
        attrs = {
            "label": label or variant_label(variant, device),
            "crop": crop,
            "data": "batches from the given source" if batches is not None
            else f"synthetic: {crop} tokens x {atoms_per_token} atoms, {msa_rows} MSA rows",
            "steps": steps,
            "warmup": warmup,
            "backward": backward,
            "n_cycles": n_cycles,
            "modules_traced": modules,
            "timing": "CUDA events on the current stream" if session.clock.cuda else "time.perf_counter",
            "memory": session.memory.method,
            "attribution": "exclusive time of the innermost AF3 module (see megafold.profile.profiler)",
            **_config_attrs(variant),
            **_base_attrs(device),
        }  # fmt: skip
        return _profile_dataset(records, session, tracer.traced_modules, attrs)


def longest_crop(
    config: AlphaFold3Config | str | Variant = "tiny",
    *,
    start: int | None = None,
    step: int | None = None,
    max_crop: int | None = None,
    memory_budget_mib: float | None = None,
    time_budget_s: float | None = None,
    backward: bool = True,
    device: str | torch.device | None = None,
    n_cycles: int = 1,
    msa_rows: int = 64,
    atoms_per_token: int = 8,
    seed: int = 0,
    label: str = "",
) -> xr.Dataset:
    """The longest crop (tokens, on the grid ``start + k * step``) whose training step fits.

    Where memory has a limit (a GPU's memory, or ``memory_budget_mib``) the search predicts
    instead of walking: after two crops that fit it fits the measured peaks (``a + c N^2``,
    then a quadratic in N from three points on) and jumps to the last grid crop predicted to
    fit, then closes the bracket (the longest crop that fits, the next grid crop that does
    not) by bisection. A search that would take ~15 steps of 128 tokens on an H100 takes ~5,
    so it fits a dashboard's time budget. Without a limit (the CPU without a budget) it steps
    up by ``step``.

    On a GPU a step that raises ``torch.OutOfMemoryError`` counts as "does not fit"; the
    profiler frees the failed step (gradients, cached blocks) and goes on. ``memory_budget_mib``
    makes a step whose peak exceeds the budget count as "does not fit" instead (to ask what fits
    a smaller card). On the CPU nothing runs out of memory first: the search stops at
    ``max_crop`` (default 64, steps of 16) or at the budget, measured as the process's
    resident memory above its size when the search began. ``time_budget_s`` stops before a
    crop that would start after that many seconds.

    Returns a Dataset over ``crop``: fits (bool), peak_mib, step_ms, outcome ("fits", "out of
    memory", "over budget"); attrs longest_crop (0 if even ``start`` fails) and stopped_by
    ("out of memory" | "memory budget" | "max_crop" | "time budget").
    """
    import xarray as xr

    variant = config if isinstance(config, Variant) else Variant(resolve_config(config))
    device = resolve_device(device)
    defaults = GPU_SEARCH if device.type == "cuda" else CPU_SEARCH
    step = step or defaults["step"]
    start = start or defaults["start"]
    max_crop = max_crop or defaults["max_crop"]
    if step < 1 or start < 1 or max_crop < start:
        raise ConfigError(f"longest_crop: need step >= 1 and 1 <= start <= max_crop, got {start}, {step}, {max_crop}")
    if memory_budget_mib is not None:
        limit_mib = float(memory_budget_mib)
    elif device.type == "cuda":  # what the allocator can hand out, less a little for fragmentation
        limit_mib = 0.96 * torch.cuda.get_device_properties(device).total_memory / MIB
    else:
        limit_mib = None
    last = start + (max_crop - start) // step * step  # the largest grid crop
    tried: dict[int, tuple[str, float, float]] = {}  # crop -> (outcome, peak MiB, step ms)
    stopped_by = "max_crop"
    began = time.perf_counter()
    with _Session(variant, device, backward=backward, n_cycles=n_cycles, seed=seed) as session:
        while True:
            crop = _next_crop(tried, start, step, last, limit_mib)
            if crop is None:  # the bracket is closed, or max_crop fits
                failed = [c for c, t in tried.items() if t[0] != "fits"]
                if failed:
                    outcome = tried[min(failed)][0]
                    stopped_by = "out of memory" if outcome == "out of memory" else "memory budget"
                break
            if time_budget_s is not None and tried and time.perf_counter() - began > time_budget_s:
                stopped_by = "time budget"
                break
            record = _attempt(session, crop, msa_rows, atoms_per_token, seed)
            if record is None:
                outcome, peak, elapsed = "out of memory", np.nan, np.nan
            else:
                peak = max(record.peaks)
                elapsed = float(record.durations_ms.sum())
                over = memory_budget_mib is not None and peak > memory_budget_mib
                outcome = "over budget" if over else "fits"
            tried[crop] = (outcome, peak, elapsed)
    crops = sorted(tried)
    outcomes, peaks, times = ([tried[c][i] for c in crops] for i in range(3))
    fits = [outcome == "fits" for outcome in outcomes]
    fitting = [c for c, ok in zip(crops, fits) if ok]
    return xr.Dataset(
        {
            "fits": (("crop",), np.array(fits, dtype=bool)),
            "peak_mib": (("crop",), np.array(peaks, dtype=np.float64), {"units": "MiB"}),
            "step_ms": (("crop",), np.array(times, dtype=np.float64), {"units": "ms"}),
            "outcome": (("crop",), np.array(outcomes, dtype=str)),
        },
        coords={"crop": np.array(crops, dtype=np.int64)},
        attrs={
            "label": label or variant_label(variant, device),
            "longest_crop": max(fitting) if fitting else 0,
            "stopped_by": stopped_by,
            "memory_budget_mib": memory_budget_mib if memory_budget_mib is not None else "none",
            "search": f"start {start}, step {step}, max {max_crop}, "
            + ("predicted from measured peaks, then bisection" if limit_mib is not None else "stepping up"),
            "attempts": len(crops),
            "backward": backward,
            "memory": session.memory.method,
            **_config_attrs(variant),
            **_base_attrs(device),
        },
    )


def _next_crop(
    tried: Mapping[int, tuple[str, float, float]], start: int, step: int, last: int, limit_mib: float | None
) -> int | None:
    """The next crop of a longest-crop search, or None when it is decided (see ``longest_crop``)."""
    fit = sorted(c for c, t in tried.items() if t[0] == "fits")
    failed = sorted(c for c, t in tried.items() if t[0] != "fits")
    if not tried:
        return start
    if failed and failed[0] == start:
        return None  # not even the first crop fits
    lo = fit[-1] if fit else start - step
    hi = failed[0] if failed else None
    if hi is not None:  # bisect the bracket on the grid
        gap = (hi - lo) // step
        return None if gap <= 1 else lo + gap // 2 * step
    if lo >= last:
        return None
    if limit_mib is None or len(fit) < 2:
        return lo + step
    predicted = _predict_crop([(c, tried[c][1]) for c in fit], limit_mib)
    if predicted is None:
        return lo + step
    grid = start + int((predicted - start) // step) * step
    return int(min(max(grid, lo + step), last))


def _predict_crop(points: Sequence[tuple[int, float]], limit_mib: float) -> float | None:
    """The crop whose peak memory reaches ``limit_mib``, from measured (crop, peak MiB) pairs:
    peak = a + c N^2 through two points (the pair representation dominates), a least-squares
    quadratic in N from three on. None if the fit does not grow with N."""
    n = np.array([p[0] for p in points], dtype=np.float64)
    peak = np.array([p[1] for p in points], dtype=np.float64)
    if not np.isfinite(peak).all():
        return None
    if len(points) == 2:
        c = (peak[1] - peak[0]) / (n[1] ** 2 - n[0] ** 2)
        if c <= 0:
            return None
        a = peak[0] - c * n[0] ** 2
        return float(np.sqrt(max(limit_mib - a, 0.0) / c))
    c2, c1, c0 = np.polyfit(n, peak, 2)
    if c2 <= 0:  # no curvature measured: a straight line through the last points
        c1, c0 = np.polyfit(n[-2:], peak[-2:], 1)
        return float((limit_mib - c0) / c1) if c1 > 0 else None
    disc = c1 * c1 - 4 * c2 * (c0 - limit_mib)
    return float((-c1 + np.sqrt(disc)) / (2 * c2)) if disc >= 0 else None


def _attempt(session: _Session, crop: int, msa_rows: int, atoms_per_token: int, seed: int) -> _StepRecord | None:
    """One step at ``crop`` tokens; None if it ran out of GPU memory (after cleaning up)."""
    record = None
    try:
        source = _synthetic_batches(crop, session.device, msa_rows, atoms_per_token, seed)
        record = session.step(source)
    except _OOM_ERROR:
        pass  # the traceback (and the tensors its frames hold) is released on leaving this block
    source = None
    if session.optimizer is not None:
        session.optimizer.zero_grad(set_to_none=True)
    _free_memory(session.device)
    return record


def compare(
    configs: Mapping[str, AlphaFold3Config | Variant | str],
    *,
    crop: int | None = None,
    longest: bool = False,
    longest_options: Mapping[str, Any] | None = None,
    on_result: Callable[[str, xr.Dataset], None] | None = None,
    **profile_options: Any,
) -> xr.Dataset:
    """``profile_step`` for each labelled config (e.g. ``variants(preset("paper"))``), at the
    same crop and batches, side by side along a new ``config`` dimension.

    ``longest=True`` also runs ``longest_crop`` for each (options in ``longest_options``) and
    adds longest_crop / longest_stopped_by / longest_budget_mib ``[config]`` and crop_fits / crop_peak_mib /
    crop_step_ms / crop_outcome ``[config, search_crop]``. ``on_result(label, partial)`` is called after each
    config with the results so far (a dashboard draws them as they arrive). Per-config
    settings (kernels, compile, checkpoint, dtype, crop) become coordinates along ``config``.
    """
    if not configs:
        raise ConfigError("compare: no configs given")
    results: dict[str, xr.Dataset] = {}
    searches: dict[str, xr.Dataset] = {}
    for label, config in configs.items():
        results[label] = profile_step(config, crop=crop, label=label, **profile_options)
        if longest:
            search_options = {
                k: profile_options[k] for k in ("device", "n_cycles", "msa_rows", "atoms_per_token", "seed", "backward")
                if k in profile_options
            }  # fmt: skip
            searches[label] = longest_crop(config, label=label, **{**search_options, **(longest_options or {})})
        if on_result is not None:
            on_result(label, combine(results, searches))
    return combine(results, searches)


_SEARCH_VARIABLES = ("fits", "peak_mib", "step_ms", "outcome")
# A comparison keeps each profile's crop as the coordinate "crop" along config; the crops a
# search tried get their own dimension.
SEARCH_DIM = "search_crop"
_PER_CONFIG_ATTRS = ("label", "kernels", "compile", "checkpoint", "dtype", "crop", "config_json", "parameters")


def combine(results: Mapping[str, xr.Dataset], searches: Mapping[str, xr.Dataset] | None = None) -> xr.Dataset:
    """Profiles and longest-crop searches keyed by label -> one Dataset along ``config``
    (either may be empty; a label without a search gets longest_stopped_by "not searched")."""
    import xarray as xr

    searches = searches or {}
    labels = list(results) or list(searches)
    combined = xr.Dataset()
    if results:
        parts = []
        for label in labels:
            ds = results[label]
            per_config = {name: ds.attrs[name] for name in _PER_CONFIG_ATTRS if name in ds.attrs}
            ds = ds.assign_attrs({k: v for k, v in ds.attrs.items() if k not in per_config})
            parts.append(ds.expand_dims(config=[label]).assign_coords({
                name: ("config", [value]) for name, value in per_config.items() if name != "label"
            }))  # fmt: skip
        longest_samples = max(ds.sizes["sample"] for ds in parts)
        parts = [_pad(ds, "sample", np.arange(longest_samples)) for ds in parts]
        combined = xr.concat(parts, dim="config", combine_attrs="drop_conflicts", join="outer")
    if searches:
        crops = np.array(sorted({int(c) for s in searches.values() for c in s.crop.values}), dtype=np.int64)
        not_searched = xr.Dataset(
            {
                "fits": ("crop", np.zeros(0, bool)), "peak_mib": ("crop", np.zeros(0)),
                "step_ms": ("crop", np.zeros(0)), "outcome": ("crop", np.zeros(0, dtype=str)),
            },
            coords={"crop": np.zeros(0, np.int64)},
            attrs={"stopped_by": "not searched"},
        )  # fmt: skip
        sweep = []
        for label in labels:
            search = searches.get(label, not_searched)
            sweep.append(
                _pad(search[list(_SEARCH_VARIABLES)], "crop", crops)
                .rename({"crop": SEARCH_DIM, **{name: f"crop_{name}" for name in _SEARCH_VARIABLES}})
                .expand_dims(config=[label])
                .assign(
                    longest_crop=("config", [search.attrs.get("longest_crop", 0)]),
                    longest_stopped_by=("config", [search.attrs["stopped_by"]]),
                    longest_budget_mib=("config", [_budget(search)]),
                )
            )
        per_search = {*_PER_CONFIG_ATTRS, "longest_crop", "stopped_by", "memory_budget_mib", "search"}
        attrs = combined.attrs or {k: v for k, v in next(iter(searches.values())).attrs.items() if k not in per_search}
        combined = xr.merge([combined, xr.concat(sweep, dim="config")], combine_attrs="override").assign_attrs(attrs)
    return combined


def _budget(search: xr.Dataset) -> float:
    budget = search.attrs.get("memory_budget_mib")
    return float(budget) if isinstance(budget, (int, float)) else np.nan


def _pad(ds: xr.Dataset, dim: str, index: np.ndarray) -> xr.Dataset:
    """Reindex ``dim`` to ``index``, filling with NaN, "" or False by dtype."""
    fill = {}
    for name, var in ds.data_vars.items():
        if dim in var.dims:
            kind = var.dtype.kind
            fill[name] = "" if kind in "US" else False if kind == "b" else np.nan
    if dim not in ds.coords:
        ds = ds.assign_coords({dim: np.arange(ds.sizes.get(dim, 0))})
    return ds.reindex({dim: index}, fill_value=fill)


def summary(ds: xr.Dataset) -> Any:
    """Time per AF3 module (ms per step) as a pandas DataFrame, largest first, modules that
    took no time left out: one column per config (forward + backward + recompute) for a
    comparison, one per phase plus "total" for a single profile."""
    if "config" in ds.dims:
        frame = ds["time_ms"].sum("phase", min_count=1).transpose("module", "config").to_pandas()
    else:
        frame = ds["time_ms"].transpose("module", "phase").to_pandas()
        frame["total"] = frame.sum(axis=1, min_count=1)
    frame = frame[(frame.fillna(0) > 0).any(axis=1)]
    return frame.sort_values(frame.columns[-1] if "config" not in ds.dims else frame.columns[0], ascending=False)


# --------------------------------------------------------------------------- zarr


def save(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to a zarr store at ``path`` atomically (a temporary store renamed into
    place; an existing store at ``path`` is replaced). Strings are stored as variable-length
    UTF-8 (a zarr v3 data type with a specification)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = ds.copy()
    for name, var in list(encoded.variables.items()):
        if var.dtype.kind in "US":
            encoded[name] = var.astype(object)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        encoded.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike) -> xr.Dataset:
    """A profile saved with ``save``, loaded into memory (strings back as numpy str)."""
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise ConfigError(f"{path}: no saved profile here (expected a zarr store written by megafold.profile.save)")
    ds = xr.open_zarr(path, consolidated=False).load()
    strings = {name: var for name, var in ds.variables.items() if var.dtype.kind in "OT"}
    as_str = {name: (var.dims, np.array(var.values.tolist(), dtype=str), var.attrs) for name, var in strings.items()}
    coords = {name: value for name, value in as_str.items() if name in ds.coords}
    return ds.assign_coords(coords).assign({name: value for name, value in as_str.items() if name not in coords})

