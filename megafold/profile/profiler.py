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
* memory: at every switch the allocator's current allocation and its peak since the previous
  switch are read together (one ``memory_stats_as_nested_dict`` call, then
  ``reset_peak_memory_stats``), so the peak of every segment, module and stage is exact on a
  GPU. The CPU has no allocator statistics: there a ``TorchDispatchMode`` counts the bytes of
  the tensor storages created while profiling that are still alive (freed ones leave through
  weakref finalizers), an equally exact figure for tensors (not for the allocator's own
  caching or fragmentation).

The profiler's own cost is measured, not assumed: after the warmup ``profile_step`` runs one
plain step (stage boundaries only, no hooks) and reports ``plain_step_ms`` and ``overhead_ms``
next to the profiled step, with ``switches`` per step and ``graph_hook_ms`` (hooking the autograd
graph before backward, outside the step's stages). Each switch costs host time (an event, one
allocator read: tens of microseconds; a "paper" step has ~6.5k switches); on a GPU it hides
behind queued kernels except where the step is launch-bound (the diffusion rollout's small
modules), which is where overhead_ms comes from. ``modules=False`` times the stages only.
Under ``torch.compile`` the compiled blocks (``COMPILED_BLOCKS``) are opaque: modules inside
them get no time of their own (NaN).

Results are ``xarray.Dataset`` objects (``save`` / ``load`` through zarr); see
``profile_step`` for the variables.
"""

from __future__ import annotations

import bisect
import contextlib
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
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from megafold.errors import ConfigError
from megafold.model import AlphaFold3, AlphaFold3Config, preset, synthetic_batch
from megafold.model.primitives import graphed_chunks_under_trace, nonreentrant_checkpoints

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
# With profile_step(..., graphed_diffusion=True): the owner of the training diffusion chunks
# that replay CUDA graphs, timed as one opaque region.
OPAQUE_CHUNK_OWNER = "DiffusionModule"
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
    (megafold's kernels) and "compile" (torch.compile of the eager model). The compiled
    variant's sampler runs without megafold's CUDA graph: a compiled block first called inside
    the capture compiles there, which invalidates the capture and leaves the RNG's graph state
    broken ("Offset increment outside graph capture", H100, torch 2.11)."""
    config = resolve_config(config)
    known = {
        "torch": Variant(config.replace(kernels="torch")),
        "triton": Variant(config.replace(kernels="triton")),
        "compile": Variant(config.replace(kernels="torch", rollout_cuda_graph=False, diffusion_cuda_graph=False), compile=True),
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
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # per-device calls need the index
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
    """Marks on the device timeline: CUDA events on the stream the step runs on (recorded
    without synchronizing), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream: Any = None

    def start(self) -> None:
        """Take the stream a step runs on (once per step, not per mark)."""
        if self.cuda:
            self.stream = torch.cuda.current_stream(self.device)

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
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
    """Current and peak memory in MiB; ``sample`` returns both and restarts the peak.

    GPU: the caching allocator's allocated bytes, current and peak read from one nested
    statistics dict (``torch.cuda.memory_stats_as_nested_dict``: a single C call, where
    ``memory_allocated`` / ``max_memory_allocated`` each flatten every statistic in Python,
    ~100 us apiece), the peak restarted with ``reset_peak_memory_stats``. CPU: the bytes of
    tensor storages created inside the ``with`` block that are still alive (``_LiveTensors``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.index = device.index if self.cuda else None
        self.method = (
            "allocated bytes of the CUDA caching allocator (exact peak per segment)"
            if self.cuda
            else "live tensor storages created while profiling (a dispatch mode; exact peak per segment)"
        )
        self._live = None if self.cuda else _LiveTensors()

    def __enter__(self) -> _Memory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.index)
        else:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def sample(self) -> tuple[float, float]:
        """(allocated now, peak since the previous sample) in MiB; restarts the peak."""
        if self.cuda:
            allocated = torch.cuda.memory_stats_as_nested_dict(self.index)["allocated_bytes"]["all"]
            torch.cuda.reset_peak_memory_stats(self.index)
            return allocated["current"] / MIB, allocated["peak"] / MIB
        return self._live.bytes / MIB, self._live.take_peak() / MIB

    def allocated(self) -> float:
        if self.cuda:
            return torch.cuda.memory_stats_as_nested_dict(self.index)["allocated_bytes"]["all"]["current"] / MIB
        return self._live.bytes / MIB


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
        self.clock.start()
        self.memory.sample()
        self.marks.append(self.clock.mark())

    def close(self, owner: Owner) -> None:
        """End the running segment, owned by ``owner``: one event and one memory read."""
        self.marks.append(self.clock.mark())
        self.owners.append(owner)
        allocated, peak = self.memory.sample()
        self.allocated.append(allocated)
        self.peaks.append(peak)


_PROBE_LEAF = torch.zeros((), requires_grad=True)
# The thread's autograd sequence counter, read without creating a node (newer torch).
_PEEK_SEQUENCE_NR: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread will get."""
    if _PEEK_SEQUENCE_NR is not None:
        return _PEEK_SEQUENCE_NR()
    with torch.enable_grad():  # a probe node takes the number before it
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

    def __init__(self, model: nn.Module, traced: bool, graphed_diffusion: bool = False):
        self.timeline: _Timeline | None = None  # set by begin()
        self.stack: list[Owner] = []
        self.base: Owner = _STAGE_OWNERS["data"]
        self.in_backward = False
        self.seq_starts: list[int] = []
        self.seq_owners: list[tuple[str, str]] = []
        self.traced_modules: set[str] = set()
        self.entries: dict[tuple[str, str], int] = {}
        self.traced = traced
        self.graphed_diffusion = traced and graphed_diffusion
        self._lock = threading.RLock()
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        self._class_wrapped: list[tuple[type, str, Callable]] = []
        self.opaque_depth = 0  # > 0 inside an opaque region: module hooks do not switch owners
        if traced:
            self._attach(model)
            if graphed_diffusion:
                self._attach_graphed_chunks()

    # ---- forward: module hooks
    def _attach(self, model: nn.Module) -> None:
        for module in _visible_modules(model):
            name = type(module).__name__
            if name in AF3_MODULES:
                self.traced_modules.add(name)
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._pre_hook, name)))
                self._handles.append(
                    module.register_forward_hook(functools.partial(self._post_hook, name), always_call=True)
                )
            for method in REGION_METHODS.get(name, ()):
                setattr(module, method, self._region(name, getattr(module, method)))
                self._wrapped.append((module, method))

    def _attach_graphed_chunks(self) -> None:
        """Time the training diffusion chunks that replay CUDA graphs (``GraphedChunkDenoiser``)
        as one opaque region of ``OPAQUE_CHUNK_OWNER``: a replay runs no module hooks, and its
        backward runs a nested autograd graph that the loss graph's hooks do not reach, so
        modules inside get none of the chunks' time (their eager first and last chunks
        included, for one consistent account)."""
        from megafold.model.diffusion import GraphedChunkDenoiser

        for method, phase in (("forward_chunk", None), ("backward_chunk", "backward")):
            original = getattr(GraphedChunkDenoiser, method)
            setattr(GraphedChunkDenoiser, method, self._region(OPAQUE_CHUNK_OWNER, original, phase, opaque=True))
            self._class_wrapped.append((GraphedChunkDenoiser, method, original))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, method in self._wrapped:
            delattr(module, method)
        for cls, method, original in self._class_wrapped:
            setattr(cls, method, original)
        self._handles, self._wrapped, self._class_wrapped = [], [], []

    def _region(self, name: str, method: Callable, phase: str | None = None, opaque: bool = False) -> Callable:
        """``method`` timed as ``name`` (in ``phase``, default by stage); an ``opaque`` region
        owns all of its time: module hooks and regions inside it do not switch owners."""

        @functools.wraps(method)
        def timed(*args, **kwargs):
            with self._lock:
                self.enter(name, phase=phase, opaque=opaque)
                self.opaque_depth += opaque
            try:
                return method(*args, **kwargs)
            finally:
                with self._lock:
                    self.opaque_depth -= opaque
                    self.exit(name, opaque=opaque)

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

    def enter(self, name: str, phase: str | None = None, opaque: bool = False) -> None:
        with self._lock:
            if self.base[2] in ("data", "optimizer"):
                return  # e.g. a loader that runs a module: not part of the model's step
            if self.opaque_depth and not opaque:
                return  # inside an opaque region: it owns all of its time
            self._switch()
            phase = phase or ("recompute" if self.in_backward else "forward")
            outer = self.stack[0] if self.stack else self.base
            part = outer[1] if outer[1] != OTHER else name
            self.stack.append((name, part if part in PARTS else OTHER, phase))
            self._count(name, phase)
            self._record_sequence()

    def exit(self, name: str, opaque: bool = False) -> None:
        with self._lock:
            if self.opaque_depth and not opaque:
                return  # a module inside an opaque region (which may bear the region's name)
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
        if not self.traced:
            return handles  # a plain step: its backward runs without a hook
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


def _visible_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` outside compiled blocks (a hook on one would recompile it)."""
    opaque = [m for m in model.modules() if type(m).__name__ in COMPILED_BLOCKS and _is_compiled(m)]
    hidden = {id(inner) for block in opaque for inner in block.modules()}
    return [module for module in model.modules() if id(module) not in hidden]


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
    before the model is built (``with _Session(...) as session:``). Adam's moments are
    allocated up front, so every step (the first included) holds the same persistent memory:
    ``base_mib`` is that (weights, moments) plus one gradient per parameter."""

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
        self.base_mib = 0.0

    def __enter__(self) -> _Session:
        self.memory.__enter__()
        try:
            torch.manual_seed(self.seed)
            with torch.device(self.device):  # initialise on the device: seconds faster for "paper"
                self.model = AlphaFold3(self.variant.config).train()
            if self.variant.compile:
                _compile_blocks(self.model, self.variant.compile)
            self.parameters = sum(p.numel() for p in self.model.parameters())
            gradient_bytes = 0
            if self.backward:
                self.optimizer = torch.optim.Adam(self.model.parameters(), **ADAM)
                _allocate_optimizer_state(self.optimizer)
                gradient_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            self.base_mib = self.memory.allocated() + gradient_bytes / MIB
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.model = self.optimizer = None
        self.memory.__exit__(*exc)
        _free_memory(self.device)

    def step(self, batches: Iterator[Batch], tracer: _Tracer | None = None) -> _StepRecord:
        """One step; without a tracer only the stage boundaries are marked (a plain step)."""
        timeline = _Timeline(self.clock, self.memory)
        tracer = tracer or _Tracer(self.model, traced=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tracer.begin(timeline)
        batch = next(batches)
        tracer.stage("forward")
        # A traced step hooks the loss's autograd graph: a reentrant checkpoint's inner backward
        # is not part of it, so the traced step checkpoints non-reentrantly.
        def exact():
            modes = contextlib.ExitStack()
            if tracer.traced:
                modes.enter_context(nonreentrant_checkpoints())
                if tracer.graphed_diffusion:  # the chunk denoiser: one opaque region
                    modes.enter_context(graphed_chunks_under_trace())
            return modes

        with exact(), torch.set_grad_enabled(self.backward):
            loss, _ = self.model.training_loss(batch, n_cycles=self.n_cycles)
        if self.backward:
            tracer.stage("profiler")
            handles = tracer.hook_graph(loss)
            tracer.stage("backward")
            try:
                with exact():
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


def _allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's moments now (zeros, step count 0: as a fresh optimizer) rather than in
    the first step, whose peak would otherwise lack them. A step with zero gradients leaves
    the weights as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        state = optimizer.state[p]
        for name, value in state.items():
            if name == "step":
                state[name] = value.zero_() if isinstance(value, torch.Tensor) else 0


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        # cuBLAS keeps a workspace per stream it ran on, allocated through the caching
        # allocator and so counted as allocated memory; a step that stops midway (out of
        # memory) may leave one on a side stream. They are rebuilt on the next call.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            torch.cuda.synchronize(device)
            clear_workspaces()
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


def _graph_hook_ms(record: _StepRecord) -> float:
    return float(sum(ms for ms, owner in zip(record.durations_ms, record.owners) if owner[2] == "profiler"))


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
    from megafold.kernels._common import untuned_keys

    attrs = {"device": describe_device(device), "date": datetime.date.today().isoformat(), **_versions()}
    # Kernel shape keys that ran their op's default for want of a tuned choice on this GPU
    # (so far in this process): their times are untuned ones. MEGAFOLD_AUTOTUNE=1 tunes them.
    untuned = untuned_keys()
    attrs["untuned_kernel_keys"] = len(untuned)
    attrs["untuned_kernel_keys_json"] = json.dumps(untuned)
    if device.type == "cuda":
        attrs["device_memory_mib"] = torch.cuda.get_device_properties(device).total_memory / MIB
    return attrs


def _profile_dataset(
    records: Sequence[_StepRecord],
    plain: _StepRecord | None,
    session: _Session,
    traced_modules: set[str],
    attrs: dict[str, Any],
) -> xr.Dataset:
    import xarray as xr

    tables = [_step_tables(record) for record in records]
    step_ms = np.stack([t["stage_ms"].sum() for t in tables])
    plain_ms = float(_step_tables(plain)["stage_ms"].sum()) if plain is not None else np.nan

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
            "step_ms": (("step",), step_ms, {"units": "ms"}),
            "plain_step_ms": ((), plain_ms, {"doc": "one step without module hooks, same run", "units": "ms"}),
            "overhead_ms": (
                (), step_ms.mean() - plain_ms,
                {"doc": "step_ms (mean) minus plain_step_ms: the profiler's cost", "units": "ms"},
            ),
            "switches": ((), float(len(last.owners)), {"doc": "timeline segments per profiled step"}),
            "graph_hook_ms": (
                (), np.mean([_graph_hook_ms(record) for record in records]),
                {"doc": "hooking the autograd graph before backward (not in step_ms)", "units": "ms"},
            ),
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


def precompile_kernels(
    config: AlphaFold3Config | str | Variant,
    *,
    crop: int,
    device: str | torch.device | None = None,
    backward: bool = True,
    n_cycles: int = 1,
    msa_rows: int = 64,
    atoms_per_token: int = 8,
    workers: int | None = None,
    candidates: bool = False,
):
    """Start compiling, in worker processes, the Triton kernels one training step of ``config``
    at ``crop`` launches (``megafold.kernels.precompile``); returns the handle to ``wait()`` on
    (None where there is nothing to do: no CUDA, no Triton kernels, a compiled variant).

    It runs one throwaway step with every Triton launch recorded instead of run (a few
    seconds: the step's host work without its kernels), then returns while the workers
    compile; profile something else meanwhile.

    ``candidates``: also every candidate configuration of each shape key that a step in this
    process would tune (``MEGAFOLD_AUTOTUNE`` on and no stored choice for this GPU; every key
    under ``MEGAFOLD_AUTOTUNE=force``), so that the tuning step after ``wait()`` only times
    (``tune_kernels``). Without it the recorded step takes the stored choices or
    the defaults, as the real step does with tuning off."""
    from megafold.kernels.precompile import compile_in_processes, record_launches

    variant = config if isinstance(config, Variant) else Variant(resolve_config(config))
    device = resolve_device(device)
    if device.type != "cuda" or variant.compile or not variant_label(variant, device).startswith("triton"):
        return None
    records: list = []
    # Tuning times real launches: the recorded step takes the stored choices (or the defaults),
    # unless it records the candidates of what a tuning step would tune.
    with mock.patch.dict(os.environ, {} if candidates else {"MEGAFOLD_AUTOTUNE": "0"}):
        model, batch = _graphless_step_inputs(variant, device, crop, msa_rows, atoms_per_token)
        try:
            with record_launches(records, candidates=candidates), torch.set_grad_enabled(backward):
                loss, _ = model.training_loss(batch, n_cycles=n_cycles)
                if backward:
                    loss.backward()
        finally:
            model = batch = loss = None
            _free_memory(device)
    return compile_in_processes(records, workers)


def _graphless_step_inputs(variant: Variant, device: torch.device, crop: int, msa_rows: int,
                           atoms_per_token: int) -> tuple[AlphaFold3, Any]:
    """``variant``'s model with its CUDA graphs off (every kernel launched eagerly, none first
    met inside a capture) and a synthetic batch at ``crop``, seeded: the step that
    ``precompile_kernels`` records and ``tune_kernels`` tunes."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AlphaFold3(variant.config.replace(rollout_cuda_graph=False, diffusion_cuda_graph=False)).train()
    return model, synthetic_batch(crop, atoms_per_token=atoms_per_token, msa_rows=msa_rows, device=device, seed=0)


def tune_kernels(
    config: AlphaFold3Config | str | Variant = "paper",
    *,
    crop: int = 384,
    device: str | torch.device | None = None,
    msa_rows: int = 256,
    atoms_per_token: int = 8,
    workers: int | None = None,
    precompile: bool = True,
    force: bool = False,
    ops: Sequence[str] = (),
) -> dict:
    """Tune every Triton kernel shape key that one training step of ``config`` at ``crop``
    launches on this GPU, compiling first: what a fresh GPU's first steps would otherwise do
    one candidate compile at a time (more than ten minutes of a "paper" step).

    1. ``precompile_kernels(..., candidates=True)``: a recorded step launches every candidate of
       each key that would be tuned, and worker processes compile them (``precompile=False``
       skips this: the tuning step compiles in-line, as before);
    2. one step of synthetic data with tuning on, the CUDA graphs off (no key is first met
       inside a capture): each key is timed and its choice written to the tuning cache
       (``MEGAFOLD_CACHE_DIR``, default ``~/.cache/megafold``), every candidate's time beside it;
    3. the step again with tuning off, timed: the keys that still found no choice.

    ``MEGAFOLD_AUTOTUNE`` decides what is tuned: on (the default) the keys without a stored
    choice, ``force`` every key again; ``force=True`` does the latter whatever it says.
    ``ops``: parts of op names (``MEGAFOLD_AUTOTUNE_OPS``, e.g. ``["triangle_multiply_out_fwd"]``);
    only the ops whose name contains one are tuned (or tuned again), the rest run their stored
    choices (a comma-separated string works too). A part ``OP:KEY`` keeps only the shape keys
    of those ops whose JSON contains ``KEY`` (``evo_attention:dkdv``: EvoAttention's dK dV
    pass), so a long forced re-tune can be split into several runs.

    Returns ``{"phases": {"precompile_s", "tuning_step_s", "tuned_step_s"}, "precompile": the
    compile report or None, "tuned": one dict per key tuned here (op, key, chosen, ms,
    candidates, ran, slowest_ms), "untuned": the keys the last step ran without a choice}``.
    ``megafold tune`` runs it from the command line."""
    from megafold.kernels import _common

    variant = config if isinstance(config, Variant) else variants(resolve_config(config), ("triton",))["triton"]
    device = resolve_device(device)
    if device.type != "cuda":
        raise ConfigError("tune_kernels: kernel tuning times launches on a GPU; this machine has none")
    env = {"MEGAFOLD_AUTOTUNE": "force"} if force else {}
    selection = ops if isinstance(ops, str) else ",".join(ops)
    if selection.strip():  # parsed where it is read, by _common.autotune_ops
        env["MEGAFOLD_AUTOTUNE_OPS"] = selection
    with mock.patch.dict(os.environ, env):
        if not _common.autotune_enabled():
            raise ConfigError("tune_kernels: MEGAFOLD_AUTOTUNE=0 turns tuning off (unset it, set 1 or force, "
                              "or pass force=True)")
        if _common.autotune_forced():  # what this process already chose for these ops is timed again
            _common.forget_choices(_common.autotune_ops())
        return _tune_step(variant, device, crop, msa_rows, atoms_per_token, workers, precompile)


def _tune_step(variant: Variant, device: torch.device, crop: int, msa_rows: int, atoms_per_token: int,
               workers: int | None, precompile: bool) -> dict:
    """``tune_kernels`` after its checks, under its environment."""
    from megafold.kernels import _common

    name = _common.device_name(device)

    def records() -> dict[tuple, dict]:
        return {(r["op"], str(r["key"])): r for r in _common.tuning_records() if r["device"] == name}

    # A key tuned here is new in the trials file, or has new trials there (a forced re-tune).
    before = {key: record["trials"] for key, record in records().items()}
    phases: dict[str, float] = {}
    report = None
    if precompile:
        began = time.perf_counter()
        handle = precompile_kernels(variant, crop=crop, device=device, msa_rows=msa_rows,
                                    atoms_per_token=atoms_per_token, workers=workers, candidates=True)
        report = handle.wait() if handle is not None else {"records": 0, "compiled": 0, "problems": []}
        phases["precompile_s"] = round(time.perf_counter() - began, 1)

    def timed_step() -> float:
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        loss, _ = model.training_loss(batch, n_cycles=1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        return time.perf_counter() - began

    model, batch = _graphless_step_inputs(variant, device, crop, msa_rows, atoms_per_token)
    try:
        phases["tuning_step_s"] = round(timed_step(), 1)
        tuned = []
        for key, record in records().items():
            if before.get(key) == record["trials"]:
                continue
            times = [trial["ms"] for trial in record["trials"] if "ms" in trial]
            tuned.append({"op": record["op"], "key": record["key"], "chosen": record["chosen"], "ms": record["ms"],
                          "candidates": len(record["trials"]), "ran": len(times),
                          "slowest_ms": max(times) if times else None})
        _common._untuned.clear()
        with mock.patch.dict(os.environ, {"MEGAFOLD_AUTOTUNE": "0"}):
            phases["tuned_step_s"] = round(timed_step(), 2)
            untuned = _common.untuned_keys()
    finally:
        model = batch = None
        _free_memory(device)
    return {"phases": phases, "precompile": report, "tuned": tuned, "untuned": untuned}


def profile_step(
    config: AlphaFold3Config | str | Variant = "tiny",
    *,
    crop: int | None = None,
    batches: Iterable[Batch] | None = None,
    steps: int = 1,
    warmup: int = 1,
    backward: bool = True,
    modules: bool = True,
    measure_overhead: bool = True,
    graphed_diffusion: bool = False,
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
    each, ``msa_rows`` MSA rows) that stays on the device. ``measure_overhead`` runs one plain
    step (stage boundaries only) between the warmup and the profiled steps, so the profiler's
    own cost is measured in the same run (with ``warmup=0`` the plain step is the first and
    carries its one-off costs).

    The traced step checkpoints non-reentrantly and, by default, runs the training diffusion
    chunks eagerly (their CUDA graphs' gradient sums bypass the autograd graph its backward
    hooks follow). On a launch-bound step that costs more than the hooks: "paper" at crop 384
    on an H200 took 4.5 s traced without hooks against 1.85-2.2 s as training runs it, of
    which the eager chunks ~1.35 s and the checkpoint mode ~0.5 s; the hooks added ~10%
    (``benchmarks/profiler_overhead.py``, benchmarks/NOTES.md, session 27).
    ``graphed_diffusion=True`` keeps the chunks' CUDA graphs in the traced step and times the
    chunk denoiser, forward and backward, as one opaque region of ``DiffusionModule``: modules
    inside it then get no time from the training chunks (the sampler's mini-rollout still
    traces them where it runs eagerly).

    Returns an ``xarray.Dataset``:
      time_ms, calls, peak_mib ``[module, phase]``: exclusive time (ms per step), entries and
      peak memory (MiB) per AF3 module and phase (forward / backward / recompute); NaN for a
      module that was not traced (inside a compiled block);
      part_time_ms ``[part, phase]``; stage_ms ``[step, stage]`` (data / forward / backward /
      optimizer), step_ms ``[step]``, stage_peak_mib ``[stage]``, loss ``[step]``;
      timeline_ms / timeline_mib / timeline_peak_mib / timeline_module / timeline_phase
      ``[sample]``: the memory timeline of the last step, one sample per switch;
      plain_step_ms, overhead_ms (mean step_ms minus plain_step_ms; NaN without
      ``measure_overhead``), switches (timeline segments per step) and graph_hook_ms (hooking
      the autograd graph between forward and backward, left out of step_ms): the profiler's cost.
    Attributes name the device, versions, config and the measuring methods, and count the
    kernel shape keys that ran their op's default for want of a tuned choice on this GPU
    (``untuned_kernel_keys``; the keys in ``untuned_kernel_keys_json``).
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
        plain = session.step(source) if modules and measure_overhead else None
        tracer = _Tracer(session.model, traced=modules, graphed_diffusion=graphed_diffusion)
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
            "msa_rows": msa_rows,
            "atoms_per_token": atoms_per_token,
            "modules_traced": modules,
            "graphed_diffusion": bool(modules and graphed_diffusion),
            "timing": "CUDA events on the current stream" if session.clock.cuda else "time.perf_counter",
            "memory": session.memory.method,
            "attribution": "exclusive time of the innermost AF3 module (see megafold.profile.profiler)",
            **_config_attrs(variant),
            **_base_attrs(device),
        }  # fmt: skip
        return _profile_dataset(records, plain, session, tracer.traced_modules, attrs)


def longest_crop(
    config: AlphaFold3Config | str | Variant = "tiny",
    *,
    start: int | None = None,
    step: int | None = None,
    max_crop: int | None = None,
    memory_budget_mib: float | None = None,
    time_budget_s: float | None = None,
    known: xr.Dataset | None = None,
    backward: bool = True,
    device: str | torch.device | None = None,
    n_cycles: int = 1,
    msa_rows: int = 64,
    atoms_per_token: int = 8,
    seed: int = 0,
    label: str = "",
) -> xr.Dataset:
    """The longest crop (tokens, on the grid ``start + k * step``) whose training step fits.

    Where memory has a limit (96% of a GPU's memory, or ``memory_budget_mib``) the search
    predicts instead of walking. It fits the measured peaks as ``base + b N + c N^2 + d N^3``
    (eager triangle attention holds an ``[N, N, N]`` tensor), with non-negative coefficients and
    ``base`` the persistent memory (weights, Adam's moments, one gradient per parameter); one
    point gives ``base + b N + c N^2`` with the two terms equal there (``base + d N^3`` for the
    torch kernels), a cautious first jump; two give ``c, d`` where the peak grew faster than
    N^2 between them, else ``b, c``. Each step then runs at the largest grid crop predicted to
    fit inside the bracket (the longest crop that fit, the shortest that did not),
    so a step both verifies the prediction and sharpens the fit; once the prediction says the
    next grid crop does not fit, one step there closes the bracket. A profile of the same
    config (``known=profile_step(...)``) or an earlier search seeds the points, so the first
    step of a search seeded with a crop-384 profile already tries the predicted longest crop.
    Without a limit (the CPU without a budget) it steps up by ``step``.

    A step that raises ``torch.OutOfMemoryError`` counts as "does not fit" (it stops where
    memory runs out; the profiler frees it and goes on); with ``memory_budget_mib`` a step
    whose peak exceeds the budget counts as "over budget". On the CPU (no allocator limit) the
    memory is the bytes of live tensors and the search stops at ``max_crop`` (default 64, steps
    of 16) or at the budget.

    ``time_budget_s`` bounds the search: a step predicted (from the measured step times) to
    end after the budget is not started, and a step that runs past it is stopped at the next
    AF3 module it enters (outcome "out of time"). The answer then says what it rests on.

    Returns a Dataset over ``crop``: fits (bool), peak_mib, step_ms, outcome ("fits", "out of
    memory", "over budget", "out of time"), source ("search", or "known" for seeded points).
    Attributes: longest_crop, the longest crop a step was measured to fit (0 if not even
    ``start``); stopped_by, why the search ended: "out of memory" / "memory budget" (a step at
    the next grid crop was measured not to fit), "max_crop", "memory (predicted)" (the fit
    predicts the next grid crop does not fit; not run within the time budget), or "time
    budget" (a longer crop predicted to fit was not verified); predicted_crop, the longest
    grid crop the memory fit predicts (0 without a limit); memory_limit_mib; fit_mib, the
    coefficients ``[base, b, c, d]`` of the fitted peak in MiB (N in tokens).
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
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        limit_mib = 0.96 * fraction * torch.cuda.get_device_properties(device).total_memory / MIB
    else:
        limit_mib = None
    grid = _Grid(start, step, start + (max_crop - start) // step * step)
    seeded = _known_trials(known, variant, backward, n_cycles, msa_rows, atoms_per_token)
    began = time.perf_counter()
    deadline = None if time_budget_s is None else began + time_budget_s
    with _Session(variant, device, backward=backward, n_cycles=n_cycles, seed=seed) as session:

        def measure(crop: int) -> _Trial:
            return _measure(session, crop, deadline, memory_budget_mib, msa_rows, atoms_per_token, seed)

        # The reference triangle attention (torch kernels, compiled or not) holds [H, N, N, N]
        # logits: its first extrapolation assumes cubic growth.
        cubic = variant_label(variant, device).startswith("torch")
        result = _search(measure, grid, limit_mib, session.base_mib, seeded, deadline, cubic=cubic)
    tried = result.tried
    crops = sorted(tried)
    fitting = [c for c in crops if tried[c].outcome == "fits"]
    return xr.Dataset(
        {
            "fits": (("crop",), np.array([tried[c].outcome == "fits" for c in crops], dtype=bool)),
            "peak_mib": (("crop",), np.array([tried[c].peak_mib for c in crops], dtype=np.float64), {"units": "MiB"}),
            "step_ms": (("crop",), np.array([tried[c].step_ms for c in crops], dtype=np.float64), {"units": "ms"}),
            "outcome": (("crop",), np.array([tried[c].outcome for c in crops], dtype=str)),
            "source": (("crop",), np.array(["known" if c in seeded else "search" for c in crops], dtype=str)),
        },
        coords={"crop": np.array(crops, dtype=np.int64)},
        attrs={
            "label": label or variant_label(variant, device),
            "longest_crop": max(fitting) if fitting else 0,
            "stopped_by": result.stopped_by,
            "predicted_crop": result.predicted or 0,
            "memory_budget_mib": memory_budget_mib if memory_budget_mib is not None else "none",
            "memory_limit_mib": limit_mib if limit_mib is not None else "none",
            "fit_mib": [float(c) for c in result.fit] if result.fit is not None else [],
            "search": f"grid start {start}, step {step}, max {max_crop}; "
            + ("steps at the crop a fit of the measured peaks predicts" if limit_mib is not None else "stepping up"),
            "attempts": len(tried) - len(seeded),
            "seconds": time.perf_counter() - began,
            "time_budget_s": time_budget_s if time_budget_s is not None else "none",
            "backward": backward,
            "n_cycles": n_cycles,
            "msa_rows": msa_rows,
            "atoms_per_token": atoms_per_token,
            "memory": session.memory.method,
            **_config_attrs(variant),
            **_base_attrs(device),
        },
    )


@dataclass(frozen=True)
class _Trial:
    """One step of a longest-crop search."""

    outcome: str  # "fits" | "out of memory" | "over budget" | "out of time"
    peak_mib: float = np.nan
    step_ms: float = np.nan


@dataclass(frozen=True)
class _Grid:
    """Crops ``start + k * step`` up to ``last``."""

    start: int
    step: int
    last: int

    def floor(self, crop: float) -> int:
        return self.start + int(np.floor((crop - self.start) / self.step)) * self.step

    def ceil(self, crop: float) -> int:
        return self.start + int(np.ceil((crop - self.start) / self.step)) * self.step


@dataclass
class _SearchResult:
    tried: dict[int, _Trial]
    stopped_by: str
    predicted: int | None  # the longest grid crop the fit predicts fits (None: no limit)
    fit: np.ndarray | None  # peak MiB = sum(fit[k] * N**k), k = 0..3


_FAILED = {"out of memory": "out of memory", "over budget": "memory budget"}


def _search(
    measure: Callable[[int], _Trial],
    grid: _Grid,
    limit_mib: float | None,
    base_mib: float,
    known: Mapping[int, _Trial],
    deadline: float | None,
    clock: Callable[[], float] = time.perf_counter,
    cubic: bool = False,
) -> _SearchResult:
    """The longest-crop search of ``longest_crop`` over a measuring function (see there)."""
    tried = dict(known)
    while True:
        fit = _fit_peaks(tried, base_mib, cubic) if limit_mib is not None else None
        predicted = _predicted_crop(fit, limit_mib, grid) if fit is not None else None
        candidate, decided = _next_crop(tried, grid, predicted)
        if candidate is None:
            return _SearchResult(tried, decided, predicted, fit)
        # A step above the prediction only confirms that the crop below is the longest.
        confirming = predicted is not None and candidate > predicted
        out_of_time = "memory (predicted)" if confirming else "time budget"
        if deadline is not None:
            estimate_s = _estimate_ms(tried, candidate) / 1e3
            if clock() + estimate_s > deadline:
                return _SearchResult(tried, out_of_time, predicted, fit)
        tried[candidate] = measure(candidate)
        if tried[candidate].outcome == "out of time":
            return _SearchResult(tried, out_of_time, predicted, fit)


def _next_crop(tried: Mapping[int, _Trial], grid: _Grid, predicted: int | None) -> tuple[int | None, str]:
    """The next crop to step at, or (None, why the search is decided)."""
    fitting = sorted(c for c, t in tried.items() if t.outcome == "fits")
    failed = sorted(c for c, t in tried.items() if t.outcome in _FAILED)
    if not fitting:
        first_failed = min(failed, default=None)
        if first_failed is not None and first_failed <= grid.start:
            return None, _FAILED[tried[first_failed].outcome]
        return grid.start, ""
    longest = fitting[-1]
    above = [c for c in failed if c > longest]
    lowest = grid.ceil(longest + 1)  # the shortest grid crop above the longest that fit
    highest = grid.last if not above else min(grid.last, grid.floor(above[0] - 1))
    if lowest > highest:
        return None, _FAILED[tried[above[0]].outcome] if above and above[0] <= grid.last + grid.step else "max_crop"
    if predicted is None:
        return lowest, ""
    if above and predicted >= above[0]:  # a failure refuted the prediction: bisect the bracket
        return min(max(grid.floor((longest + above[0]) / 2), lowest), highest), ""
    return min(max(predicted, lowest), highest), ""


def _fit_peaks(tried: Mapping[int, _Trial], base_mib: float, cubic: bool = False) -> np.ndarray | None:
    """Coefficients ``[base, b, c, d]`` (MiB) of ``peak = base + b N + c N^2 + d N^3``, all
    non-negative, fitted by least squares to the measured peaks: from one point ``b`` and ``c``
    sharing the peak above the base equally (``d`` alone with ``cubic``: a config known to hold
    ``[N, N, N]`` tensors, whose slower extrapolation would overshoot into an out-of-memory
    step); from two, ``c, d`` where the peak above the base grows faster than N^2 between
    them, else ``b, c``; ``b, c, d`` from three on (exact where there are as many points as
    unknowns). None without a measured peak."""
    points = sorted((c, t.peak_mib) for c, t in tried.items() if np.isfinite(t.peak_mib))
    if not points:
        return None
    n = np.array([p[0] for p in points], dtype=np.float64)
    above_base = np.array([p[1] for p in points], dtype=np.float64) - base_mib
    if len(points) == 1 and not cubic:
        # Half of the peak above the base in a linear term, half in a quadratic one. The H100
        # "paper" search's four-point fit put 78% of the triton step's activations at crop 384
        # in the linear term (atoms, 48 diffusion samples) and its peak grew as N^1.5 up to
        # 1408; a pure N^2 extrapolation undershot to 1152 and cost two more steps of ~15 s.
        half = max(above_base[0], 0.0) / 2
        return np.array([base_mib, half / n[0], half / n[0] ** 2, 0.0])
    if len(points) == 1:
        powers: tuple[int, ...] = (3,)
    elif len(points) == 2:
        faster = above_base[0] > 0 and above_base[1] > above_base[0] * (n[1] / n[0]) ** 2
        powers = (2, 3) if faster else (1, 2)
    else:
        powers = (1, 2, 3)
    coefficients = _nonnegative_least_squares(n[:, None] ** np.array(powers), above_base)
    fit = np.zeros(4)
    fit[0] = base_mib
    fit[list(powers)] = coefficients
    return fit


def _nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||design x - target|| over x >= 0, by trying every set of free columns (at most
    three columns here: seven small problems)."""
    columns = design.shape[1]
    scale = np.abs(design).max(axis=0)  # N^3 and N differ by 10^6: solve in scaled columns
    scaled = design / scale
    best, best_residual = np.zeros(columns), float(np.sum(target**2))
    for mask in range(1, 2**columns):
        free = [k for k in range(columns) if mask >> k & 1]
        solution = np.linalg.lstsq(scaled[:, free], target, rcond=None)[0]
        if np.any(solution < 0):
            continue
        residual = float(np.sum((scaled[:, free] @ solution - target) ** 2))
        if residual < best_residual * (1 - 1e-12):
            best = np.zeros(columns)
            best[free] = solution
            best_residual = residual
    return best / scale


def _predicted_crop(fit: np.ndarray, limit_mib: float, grid: _Grid) -> int:
    """The longest grid crop whose fitted peak is within ``limit_mib`` (the peak grows with N:
    bisection over the grid); ``grid.start - grid.step`` if not even the first fits."""

    def peak(crop: int) -> float:
        return float(np.polyval(fit[::-1], crop))

    low, high = -1, (grid.last - grid.start) // grid.step  # low fits (virtually), high + 1 does not
    if peak(grid.last) <= limit_mib:
        return grid.last
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(grid.start + middle * grid.step) <= limit_mib else (low, middle)
    return grid.start + low * grid.step


def _estimate_ms(tried: Mapping[int, _Trial], crop: int) -> float:
    """The time of a step at ``crop`` from the measured ones: a power law through the two
    longest (exponent between 1 and 3), N^1.5 from one point (much of a crop-384 "paper" step is
    launch-bound and grows slower than the trunk's N^3), 0 with none."""
    times = sorted((c, t.step_ms) for c, t in tried.items() if t.outcome == "fits" and np.isfinite(t.step_ms))
    if not times:
        return 0.0
    if len(times) == 1:
        exponent = 1.5
    else:
        (n1, t1), (n2, t2) = times[-2:]
        exponent = float(np.clip(np.log(t2 / t1) / np.log(n2 / n1), 1.0, 3.0)) if t1 > 0 and t2 > 0 else 2.0
    longest, ms = times[-1]
    return ms * (crop / longest) ** exponent


class _OutOfTime(Exception):
    """A search step ran past the search's deadline."""


class _Deadline:
    """Forward pre-hooks on the AF3 modules that stop a step (``_OutOfTime``) once the clock
    passes ``deadline``: checked at every module entry, the recomputation of checkpointed
    blocks inside backward included."""

    def __init__(self, model: nn.Module, deadline: float | None):
        self.deadline = deadline
        self.passed = False
        self._handles = [] if deadline is None else [
            module.register_forward_pre_hook(self._check)
            for module in _visible_modules(model) if type(module).__name__ in AF3_MODULES
        ]  # fmt: skip

    def _check(self, module: nn.Module, args: Any) -> None:
        if time.perf_counter() > self.deadline:
            self.passed = True
            raise _OutOfTime(f"past the search's time budget entering {type(module).__name__}")

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _measure(
    session: _Session, crop: int, deadline: float | None, budget_mib: float | None, msa_rows: int,
    atoms_per_token: int, seed: int,
) -> _Trial:  # fmt: skip
    """One step at ``crop``; a step that runs out of GPU memory or time is cleaned up."""
    record, outcome = None, "out of memory"
    with _Deadline(session.model, deadline) as watch:
        try:
            source = _synthetic_batches(crop, session.device, msa_rows, atoms_per_token, seed)
            record = session.step(source)
        except _OOM_ERROR:
            pass  # the traceback (and the tensors its frames hold) is released on leaving this block
        except (_OutOfTime, RuntimeError):
            if not watch.passed:  # a RuntimeError of the step itself
                raise
            outcome = "out of time"  # (autograd may re-raise the hook's error as a RuntimeError)
    source = None
    if session.optimizer is not None:
        session.optimizer.zero_grad(set_to_none=True)
    _free_memory(session.device)
    if record is None:
        return _Trial(outcome)
    peak = max(record.peaks)
    over = budget_mib is not None and peak > budget_mib
    return _Trial("over budget" if over else "fits", peak, float(record.durations_ms.sum()))


def _known_trials(
    known: xr.Dataset | None, variant: Variant, backward: bool, n_cycles: int, msa_rows: int, atoms_per_token: int
) -> dict[int, _Trial]:
    """Points of a profile (``profile_step`` on synthetic batches) or an earlier search of the
    same config and settings, as search trials."""
    if known is None:
        return {}
    if "crop" not in known.dims and not str(known.attrs.get("data", "")).startswith("synthetic"):
        raise ConfigError("longest_crop: known profiles must be of synthetic batches (as the search steps)")
    expected = {
        "config_json": _config_attrs(variant)["config_json"], "backward": backward, "n_cycles": n_cycles,
        "msa_rows": msa_rows, "atoms_per_token": atoms_per_token,
    }  # fmt: skip
    differ = [name for name, value in expected.items() if known.attrs.get(name) != value]
    if differ:
        raise ConfigError(f"longest_crop: the known results were made with other settings ({', '.join(differ)})")
    if "crop" in known.dims:  # an earlier search
        return {
            int(crop): _Trial(str(outcome), float(peak), float(ms))
            for crop, outcome, peak, ms in zip(known.crop.values, known.outcome.values, known.peak_mib.values,
                                               known.step_ms.values)
            if outcome in ("fits", *_FAILED)
        }  # fmt: skip
    plain_ms = float(known["plain_step_ms"]) if "plain_step_ms" in known else np.nan
    step_ms = plain_ms if np.isfinite(plain_ms) else float(known["step_ms"].mean())
    return {int(known.attrs["crop"]): _Trial("fits", float(known["stage_peak_mib"].max()), step_ms)}


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

    ``longest=True`` also runs ``longest_crop`` for each (options in ``longest_options``; seeded
    with the profile when it ran on synthetic batches) and adds longest_crop / longest_stopped_by
    / longest_predicted / longest_budget_mib / longest_limit_mib ``[config]``, longest_fit_mib
    ``[config, power]`` and crop_fits / crop_peak_mib / crop_step_ms / crop_outcome / crop_source
    ``[config, search_crop]``. ``on_result(label, partial)`` is called after each
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
            searches[label] = longest_crop(
                config, label=label, known=results[label] if profile_options.get("batches") is None else None,
                **{**search_options, **(longest_options or {})},
            )
        if on_result is not None:
            on_result(label, combine(results, searches))
    return combine(results, searches)


_SEARCH_VARIABLES = ("fits", "peak_mib", "step_ms", "outcome", "source")
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
                "source": ("crop", np.zeros(0, dtype=str)),
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
                .assign(**_search_summary(search))
                .assign_coords(power=np.arange(4))
            )
        per_search = {*_PER_CONFIG_ATTRS, *_PER_SEARCH_ATTRS}
        attrs = combined.attrs or {k: v for k, v in next(iter(searches.values())).attrs.items() if k not in per_search}
        combined = xr.merge([combined, xr.concat(sweep, dim="config")], combine_attrs="override").assign_attrs(attrs)
    return combined


_PER_SEARCH_ATTRS = (
    "longest_crop", "stopped_by", "predicted_crop", "memory_budget_mib", "memory_limit_mib", "fit_mib", "search",
    "attempts", "seconds", "time_budget_s",
)  # fmt: skip


def _search_summary(search: xr.Dataset) -> dict[str, tuple]:
    """A search's answer as variables along ``config`` (see ``compare``)."""
    fit = np.asarray(search.attrs.get("fit_mib") or [np.nan] * 4, dtype=np.float64)
    return {
        "longest_crop": ("config", [search.attrs.get("longest_crop", 0)]),
        "longest_stopped_by": ("config", [search.attrs["stopped_by"]]),
        "longest_predicted": ("config", [search.attrs.get("predicted_crop", 0)]),
        "longest_budget_mib": ("config", [_number(search.attrs.get("memory_budget_mib"))]),
        "longest_limit_mib": ("config", [_number(search.attrs.get("memory_limit_mib"))]),
        "longest_fit_mib": (("config", "power"), fit[None, :], {"doc": "peak MiB = sum over k of fit[k] N^k"}),
    }


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else np.nan


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

