"""Shared machinery of the fused ops: backend choice, interpreter detection, autotune cache.

Nothing here imports the rest of megafold.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

BACKENDS = ("auto", "triton", "torch")

_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar(
    "megafold_kernels_backend", default="auto"
)


def interpreter_active() -> bool:
    """True when Triton runs its Python interpreter (``TRITON_INTERPRET=1``), e.g. on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_kernels(backend: str) -> Iterator[None]:
    """Set the default backend ("auto" | "triton" | "torch") of every op for a block of code."""
    token = _default_backend.set(_check_backend(backend))
    try:
        yield
    finally:
        _default_backend.reset(token)


def default_backend() -> str:
    return _default_backend.get()


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn an op's ``backend`` argument into "triton" or "torch" for these inputs.

    "auto" defers to ``use_kernels``; if that is "auto" too, Triton runs on a GPU (CUDA or
    ROCm) and under the interpreter, and torch everywhere else.
    """
    choice = _check_backend(backend)
    if choice == "auto":
        choice = default_backend()
    on_gpu = all(t.is_cuda for t in tensors if t is not None)
    if choice == "auto":
        choice = "triton" if triton_available() and (on_gpu or interpreter_active()) else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton cannot be imported")
        if not on_gpu and not interpreter_active():
            raise RuntimeError(
                "backend='triton' needs GPU tensors, or TRITON_INTERPRET=1 set before "
                "megafold.kernels is imported to run the kernels on the CPU"
            )
    return choice


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Plain Python: ``triton.cdiv`` became a constexpr
    function in Triton 3.4+, and called from the host it costs ~5 us (a forward and backward of
    EvoAttention asked it eight times)."""
    return -(-a // b)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.lru_cache(maxsize=None)  # asked on every launch of some kernels
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM (or AMD CU) count; 1 off a GPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# --------------------------------------------------------------------------- tensor descriptors
#
# A kernel that takes a Triton tensor descriptor instead of a pointer for a row-major 2-D
# operand loads and stores whole tiles by their corner (``desc.load([row, col])``), with the
# edges zero-filled on loads and clipped on stores. On Hopper and later NVIDIA GPUs these are
# TMA copies: asynchronous, no address or mask arithmetic in the kernel, and pipelined by
# Triton through shared memory rather than registers; elsewhere Triton lowers them to plain
# loads and stores. Host-side descriptors came with Triton 3.4: on older Triton (and where a
# tensor's layout does not allow one) the kernels take their pointer path, so a descriptor is
# only ever a tuning candidate, never a requirement.


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def descriptors_available() -> bool:
    """Whether this Triton takes host-side tensor descriptors (3.4+)."""
    return _descriptor_class() is not None


def tensor_descriptor(t: torch.Tensor, block_shape: Sequence[int]):
    """A descriptor of the 2-D tensor ``t`` with tiles of ``block_shape`` (powers of two), or None
    where this Triton has none or ``t`` cannot have one: its last dim strided, its base or its
    row stride not 16-byte aligned (what TMA asks)."""
    cls = _descriptor_class()
    if cls is None or t.dim() != 2:
        return None
    (rows, cols), stride = t.shape, t.stride()
    if stride[1] != 1 or rows == 0 or cols == 0:
        return None
    if t.data_ptr() % 16 or (stride[0] * t.element_size()) % 16 or (rows > 1 and stride[0] < cols):
        return None
    tile = (t.dtype, tuple(block_shape))
    fields = _descriptor_fields.get(tile)
    if fields is None:
        desc = cls(t, [rows, cols], list(stride), list(block_shape))  # Triton's checks, once a tile
        if _TENSOR_FIELDS <= set(getattr(desc, "__dict__", ())) <= _TENSOR_FIELDS | _TILE_FIELDS:
            _descriptor_fields[tile] = {**vars(desc), "base": None, "shape": None, "strides": None}
        return desc
    # The checks above are the per-tensor ones of the descriptor's own constructor (base and
    # row stride 16-byte aligned, unit last stride, no empty dim); the tile's (block shape,
    # dtype) passed when this tile's first descriptor was made. ~5 us a descriptor less on
    # the H200 hosts, a dozen a forward and backward (benchmarks/NOTES.md, session 36).
    desc = cls.__new__(cls)
    vars(desc).update(fields)
    desc.base, desc.shape, desc.strides = t, [rows, cols], list(stride)
    desc.block_shape = list(block_shape)  # its own list, as the constructor's
    return desc


# Per (dtype, block shape): a descriptor's fields but the tensor's own (base, shape, strides),
# kept only where the descriptor has no fields but these (Triton 3.4-3.9; 3.4 has no TF32 flag).
_descriptor_fields: dict[tuple, dict] = {}
_TENSOR_FIELDS = {"base", "shape", "strides"}
_TILE_FIELDS = {"block_shape", "padding", "round_f32_to_tf32"}


# --------------------------------------------------------------------------- launches
#
# ``kernel[grid](*args, **meta)`` makes Triton work out, on every call, how each argument
# specializes the kernel (each tensor's dtype and 16-byte alignment, each int's value being 1
# or a multiple of 16), turn that and the options into its cache key and check the kernel's
# globals before it calls the compiled launcher: a large part of a small call's host time.
# ``launch_kernel`` does it once for each (kernel, device, argument key, meta) and afterwards
# calls the compiled kernel's launcher directly: on the H100 hosts 15-31% less host time for a
# plain EvoAttention call at the pair-bias shape, 140-315 us for its five launches
# (benchmarks/NOTES.md, session 15). The argument key is at least as fine as
# Triton's own: ints by value, tensors by dtype and alignment (and, on ROCm, whether their
# storage is within 2 GiB: the buffer-op specialization), host tensor descriptors by their
# base's dtype, block shape, rank and padding, floats by type. Triton's own path is
# taken under the interpreter, on Triton 3.2 (its launchers take the non-constexpr arguments
# only), while a launch hook or a kernel's pre-run hook is set (a profiler such as proton),
# while ``JITFunction.run`` is patched (e.g. by ``precompile.record_launches``), and with
# ``MEGAFOLD_FAST_LAUNCH=0``. Not checked again on the direct path: that the module globals a
# kernel reads have not changed since it compiled (Triton raises then; ours are constants) and
# Triton's debug and instrumentation knobs (set them before the first launch).

_launchers: dict[tuple, tuple] = {}
_LAUNCHERS_MAX = 4096  # distinct (kernel, shape) entries kept before the table starts again
_fast: list = []  # [None] (Triton's path only) or [(current_device, current_stream, hooks_set, jit_run, rocm)]
_NOT_YET = "not yet"  # _fast_setup while JITFunction.run is patched: decide at a later launch


def _fast_setup() -> tuple | None:
    if interpreter_active() or os.environ.get("MEGAFOLD_FAST_LAUNCH", "1") == "0":
        return None
    try:
        import triton
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if version < (3, 3):
            return None
        run = JITFunction.run
        if getattr(run, "__module__", None) != JITFunction.__module__:
            return _NOT_YET  # patched for now (record_launches): the comparison needs the real one
        active = driver.active
        current_device, current_stream = active.get_current_device, active.get_current_stream
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:  # Triton 3.4+
            runtime = knobs.runtime

            def hooks_set() -> bool:
                return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)
        else:
            from triton.compiler.compiler import CompiledKernel

            def hooks_set() -> bool:
                return _hook_active(CompiledKernel.launch_enter_hook) or _hook_active(CompiledKernel.launch_exit_hook)
    except Exception:  # noqa: BLE001  an unexpected Triton layout: its own launch path
        return None
    return current_device, current_stream, hooks_set, run, torch.version.hip is not None


def _hook_active(hook) -> bool:
    """Whether a launch hook is set: None (Triton 3.3-3.5) or a ``HookChain`` with no calls in
    it (Triton 3.6+, where the hooks are never None) is not."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _argument_key(args: Sequence, rocm: bool) -> tuple:
    # By exact type first (most arguments are ints): this runs on every launch.
    descriptor = _descriptor_class()
    key = []
    append = key.append
    for a in args:
        kind = type(a)
        if kind is int:
            append(a)  # by value
        elif kind is torch.Tensor or isinstance(a, torch.Tensor):
            if rocm:
                append((a.dtype, a.data_ptr() % 16 == 0, a.untyped_storage().size() < 2**31))
            else:
                append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is descriptor:
            # Triton types a host descriptor by its base's dtype and its block shape (shape and
            # strides are runtime arguments); the rank, padding and TF32 rounding are kept too.
            # The dataclass is unhashable: keyed as itself, every descriptor launch took
            # Triton's path (until session 36).
            append((descriptor, a.base.dtype, tuple(a.block_shape), len(a.shape),
                    getattr(a, "padding", "zero"), getattr(a, "round_f32_to_tf32", False)))
        elif kind is float:
            append(float)
        else:
            append((kind, a))  # a bool, None, a string (True == 1: the type tells them apart)
    return tuple(key)


def launch_kernel(kernel, grid: Sequence[int], *args, **meta) -> object:
    """``kernel[grid](*args, **meta)``; from the second call with the same argument key on,
    without Triton's per-call specialization (see above). ``grid``: a tuple of 1 to 3 ints."""
    if not _fast:
        setup = _fast_setup()
        if setup is _NOT_YET:
            return kernel[grid](*args, **meta)
        _fast.append(setup)
    fast = _fast[0]
    if fast is None:
        return kernel[grid](*args, **meta)
    current_device, current_stream, hooks_set, jit_run, rocm = fast
    if getattr(type(kernel), "run", None) is not jit_run or hooks_set() or getattr(kernel, "pre_run_hooks", None):
        return kernel[grid](*args, **meta)  # a wrapper, a patched JITFunction.run, a hook
    device = current_device()
    try:
        key = (kernel, device, _argument_key(args, rocm), *meta.items())
        entry = _launchers.get(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[grid](*args, **meta)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        run = getattr(compiled, "run", None)
        if run is not None:
            # The launcher takes every parameter in order, constexprs included (it skips them).
            tail = []
            for param in kernel.params[len(args):]:
                tail.append(meta[param.name] if param.name in meta else param.default)
            if len(_launchers) >= _LAUNCHERS_MAX:
                _launchers.clear()
            _launchers[key] = (compiled, run, compiled.function, compiled.packed_metadata, tuple(tail))
        return compiled
    compiled, run, function, packed_metadata, tail = entry
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, current_stream(device),
        function, packed_metadata, None, None, None, *args, *tail)
    return compiled


# --------------------------------------------------------------------------- autotuning
#
# Triton's own @autotune re-tunes in every process and cannot run under the interpreter.
# Here a tuned choice is stored on disk, keyed by op, shape bucket, dtype and device, so a
# training job pays for tuning once per machine; with tuning off (MEGAFOLD_AUTOTUNE=0, the
# interpreter, or no candidates) the op's default configuration is used.

_cache_lock = threading.Lock()
_memory_cache: dict[str | tuple, dict] = {}
_untuned: list[dict] = []  # keys that ran their op's default for want of a stored choice
# True inside ``precompile.record_launches(..., candidates=True)``: a key that this process
# would tune launches each of its candidates once (recorded there, not run) and then its
# default; nothing is timed and no choice is stored.
_record_candidates = False


def untuned_keys() -> list[dict]:
    """The shape keys this process launched with the op's default configuration because
    tuning was off and no choice was stored for this GPU (shipped or in the local cache):
    ``{"op", "key", "device"}`` each, in launch order. A run with ``MEGAFOLD_AUTOTUNE=1``
    tunes exactly these (once per machine); an empty list means every launch ran a tuned
    choice."""
    return [dict(entry) for entry in _untuned]


def autotune_enabled() -> bool:
    return not interpreter_active() and os.environ.get("MEGAFOLD_AUTOTUNE", "1") != "0"


def autotune_forced() -> bool:
    """``MEGAFOLD_AUTOTUNE=force``: tune every key again in this process, ignoring the shipped
    and cached choices (the new choices are still written to the cache)."""
    return autotune_enabled() and os.environ.get("MEGAFOLD_AUTOTUNE") == "force"


def autotune_ops() -> tuple[str, ...]:
    """``MEGAFOLD_AUTOTUNE_OPS``: comma-separated parts of op names (e.g.
    ``triangle_multiply_out_fwd,layernorm_linear``). Where set, only the ops whose name
    contains one are tuned (tuned again under ``MEGAFOLD_AUTOTUNE=force``); every other op runs
    its stored choice or its default, as with tuning off. A part ``OP:KEY`` selects only the
    shape keys of those ops whose JSON contains ``KEY``: ``evo_attention:dkdv`` is
    EvoAttention's dK dV pass. Unset: every op."""
    return tuple(part.strip() for part in os.environ.get("MEGAFOLD_AUTOTUNE_OPS", "").split(",") if part.strip())


def op_selected(op: str, key, parts: tuple[str, ...]) -> bool:
    """Whether ``parts`` (`autotune_ops`) select the shape key ``key`` of ``op``."""
    if not parts:
        return True
    text = None
    for part in parts:
        op_part, _, key_part = part.partition(":")
        if op_part not in op:
            continue
        if not key_part:
            return True
        text = json.dumps(list(key)) if text is None else text
        if key_part in text:
            return True
    return False


def forget_choices(parts: tuple[str, ...] = ()) -> None:
    """Drop this process's remembered choices of the ops and keys ``parts`` selects (every one
    where empty), so that a forced tuning started now times them again."""
    with _cache_lock:
        for key in list(_memory_cache):
            if op_selected(*_op_key_of(key), parts):
                del _memory_cache[key]


def _op_key_of(key: tuple | str) -> tuple[str, list]:
    """The op and shape key of a remembered choice: a tuple key's first two items, or a JSON
    key's (a key that is not JSON, such as ``_capability``, names no op)."""
    if isinstance(key, tuple):
        return key[0], list(key[1])
    try:
        op, shape = json.loads(key)[:2]
        return op, list(shape)
    except (ValueError, IndexError, KeyError, TypeError):
        return "", []


TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def packaged_tuning_path(device: torch.device) -> Path:
    """Choices tuned on a known GPU and shipped with the package (read when the local cache misses)."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in device_name(device))
    return TUNED_DIR / f"{name}.json"


def device_capability(device: torch.device) -> list[int] | None:
    if device.type != "cuda":
        return None
    return list(torch.cuda.get_device_capability(device))


def packaged_choices(device: torch.device) -> dict[str, dict]:
    """The shipped choices for this GPU, keyed as ``pick_config`` keys them.

    A GPU's own file comes first. A key it lacks (or every key, where it has no file) is
    borrowed from a shipped GPU of the same architecture (same compute capability: an H100
    and an H200 have the same SMs, registers and shared memory), re-keyed to this device's
    name; where several such files hold the key, the first by file name serves. The files'
    ``_capability`` entries say which they are.
    """
    own_path = packaged_tuning_path(device)
    own = {k: v for k, v in _read_disk_cache(own_path).items() if not k.startswith("_")}
    capability = device_capability(device)
    if capability is None:
        return own
    name = device_name(device)
    choices: dict[str, dict] = {}
    for path in sorted(TUNED_DIR.glob("*.json")):
        if path.name == own_path.name:
            continue
        data = _read_disk_cache(path)
        if data.get("_capability") != capability:
            continue
        for key, value in data.items():
            if key.startswith("_"):
                continue
            op, shape, _other = json.loads(key)
            choices.setdefault(json.dumps([op, shape, name]), value)
    choices.update(own)
    return choices


def autotune_cache_path() -> Path:
    root = os.environ.get("MEGAFOLD_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "megafold"
    return base / "autotune.json"


def autotune_trials_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Every candidate's time for each tuned key, beside the cache (or in ``cache_dir``)."""
    folder = Path(cache_dir) if cache_dir is not None else autotune_cache_path().parent
    return folder / "autotune-trials.json"


def _read_disk_cache(path: Path) -> dict[str, dict]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_disk_cache(path: Path, data: dict[str, dict]) -> None:
    # Write to a temporary file and rename, so a crash never leaves a torn cache.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home directory only costs re-tuning


def pick_config(
    op: str,
    key: Sequence,
    device: torch.device,
    candidates: Sequence[dict],
    default: dict,
    bench: Callable[[dict], float],
    rows: int | None = None,
) -> dict:
    """Return the fastest of ``candidates`` for this op and shape key, tuning once per machine.

    ``bench(config)`` runs the kernel with a config and returns its time in ms (raising
    if the config cannot run, e.g. out of shared memory). ``rows``: the op's row count; the
    key then gains its ``rows_bucket``, so one choice serves a range of similar shapes. With
    tuning off, a choice stored under the key without the bucket (choices shipped before the
    bucket existed) serves where the bucketed key has none.
    """
    if device.type != "cuda" or len(candidates) <= 1:
        return default
    legacy_key = None
    if rows is not None:
        legacy_key, key = key, tuned_key(key, rows)
    # A training step asks ~20k times: the answer for (op, key, device, tuning on) is kept under a
    # tuple key, so a repeat costs one dict lookup (no JSON key, no device-name query).
    tuning = autotune_enabled()
    fast_key = (op, tuple(key), device.index, tuning)
    hit = _memory_cache.get(fast_key)
    if hit is not None:
        return hit
    parts = autotune_ops()
    # An op that MEGAFOLD_AUTOTUNE_OPS leaves out runs as with tuning off. Its answer is kept
    # under the selection, not under the tuning-on key, so a repeat is still one lookup and the
    # op is tuned once the selection is lifted.
    left_out = tuning and not op_selected(op, key, parts)
    if left_out:
        fast_key = (op, tuple(key), device.index, parts)
        hit = _memory_cache.get(fast_key)
        if hit is not None:
            return hit
    tuning = tuning and not left_out
    name = device_name(device)
    cache_key = json.dumps([op, list(key), name])
    with _cache_lock:
        forced = autotune_forced()
        if not _memory_cache and (parts or not forced):
            stored = {**packaged_choices(device), **_read_disk_cache(autotune_cache_path())}
            if forced:  # the selected ops are tuned again: only the others keep their choices
                stored = {k: v for k, v in stored.items() if not op_selected(*_op_key_of(k), parts)}
            _memory_cache.update(stored)
            _memory_cache["_loaded"] = {}  # loaded, even where nothing was stored
        hit = _memory_cache.get(cache_key)
        if hit is None and legacy_key is not None and not tuning:
            hit = _memory_cache.get(json.dumps([op, list(legacy_key), name]))
    if hit is not None or not tuning:  # tuning off: a stored choice where there is one, else the default
        entry = {"op": op, "key": list(key), "device": name}
        if hit is None and entry not in _untuned:
            _untuned.append(entry)
        _memory_cache[fast_key] = hit if hit is not None else default
        return _memory_cache[fast_key]
    if _record_candidates:  # the launches are recorded for compiling, not run: no times
        for config in candidates:
            with contextlib.suppress(Exception):
                bench(config)
        return default
    trials, raw = [], []
    for config in candidates:
        try:
            ms = bench(config)
        except Exception as error:  # a config that does not fit this GPU is just not a candidate
            trials.append({"config": config, "error": f"{type(error).__name__}: {error}"[:120]})
            raw.append(None)
            continue
        trials.append({"config": config, "ms": round(ms, 4)})
        raw.append(ms)
    chosen = _refine(trials, raw, bench)
    best = chosen["config"] if chosen is not None else default
    with _cache_lock:
        _memory_cache[cache_key] = _memory_cache[fast_key] = best
        merged = _read_disk_cache(autotune_cache_path())
        merged[cache_key] = best
        _write_disk_cache(autotune_cache_path(), merged)
        # Every candidate's time, beside the cache: what the choice was made from.
        record = _read_disk_cache(autotune_trials_path())
        record[cache_key] = trials
        _write_disk_cache(autotune_trials_path(), record)
    return best


# The first pass times each candidate once (bench_ms: a median of 10 calls). Between
# processes those times move by ~5% (session 23: two forced re-tunes of the outer product
# mean picked different forward tiles at N = 384, and the second pick was 3% slower in the
# op). The fastest few are then timed again, interleaved, and ranked by their median.
REFINE_TOP = 3
REFINE_ROUNDS = 3


def _refine(trials: list[dict], raw: list[float | None], bench: Callable[[dict], float]) -> dict | None:
    """The chosen trial: of the ``REFINE_TOP`` fastest first-pass trials (``raw``: each trial's
    unrounded time, None where it failed), the one whose median over its first time and
    ``REFINE_ROUNDS`` more (taken round-robin, so a slow patch of the GPU hits every contender
    alike) is lowest. Refined trials keep ``first_ms`` and get that median as ``ms``; the
    chosen one is marked ``chosen``. None where no candidate ran."""
    ran = sorted((ms, index) for index, ms in enumerate(raw) if ms is not None)[:REFINE_TOP]
    if not ran:
        return None
    samples = {index: [ms] for ms, index in ran}
    if len(ran) > 1:
        for _ in range(REFINE_ROUNDS):
            for _, index in ran:
                try:
                    samples[index].append(bench(trials[index]["config"]))
                except Exception:  # it ran once: keep the times it has
                    continue
        for index, times in samples.items():
            trials[index]["first_ms"] = trials[index]["ms"]
            trials[index]["ms"] = round(statistics.median(times), 4)
    chosen = trials[min(samples, key=lambda index: (statistics.median(samples[index]), index))]
    chosen["chosen"] = True
    return chosen


def run_tuned(
    op: str,
    key: Sequence,
    device: torch.device,
    candidates: Sequence[dict],
    default: dict,
    launch: Callable[[dict], object],
    rows: int | None = None,
) -> object:
    """Launch with the tuned (or stored) configuration for this key (``rows``: see
    ``pick_config``).

    A configuration that does not fit this GPU's shared memory is not a crash:
    - a stored choice that does not fit (the key missed something that changes the kernel's
      footprint) falls back to the default;
    - a default that does not fit (a GPU with less shared memory than the H100 the defaults
      were sized on: an RTX 4090, L4 or L40 has 99 KiB a program, an H100 227) is launched with
      one pipeline stage fewer at a time, down to one.
    What fit is remembered per (op, key), so the failed attempts are paid once per process.
    """
    config = pick_config(op, key, device, candidates, default, lambda cfg: _bench_launch(launch, cfg), rows)
    if _fitted:
        asked, fitted = _fitted.get((op, tuple(key)), (None, None))
        if asked == config:
            return launch(fitted)
    for attempt in _attempts(config, default):
        try:
            result = launch(attempt)
        except Exception as error:
            if "out of resource" not in str(error).lower():
                raise
            failed = error
            continue
        if attempt is not config:
            _fitted[(op, tuple(key))] = (config, attempt)
        return result
    raise failed


def _attempts(config: dict, default: dict) -> Iterator[dict]:
    """What ``run_tuned`` launches, in order, until one fits: the choice, the default, then the
    default with one pipeline stage fewer at a time, down to one. Lazily: the common case
    stops at the first."""
    yield config
    if default != config:
        yield default
    for stages in range(default.get("num_stages", 2) - 1, 0, -1):
        yield {**default, "num_stages": stages}


# (op, key) -> (the configuration asked for, the one that fit this GPU): see run_tuned.
_fitted: dict[tuple, tuple[dict, dict]] = {}


def tuning_records(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """What the tuner chose and why: one record per tuned key, from ``autotune-trials.json`` in
    ``cache_dir`` (default: the tuning cache's folder, ``MEGAFOLD_CACHE_DIR`` or
    ``~/.cache/megafold``). Each record: ``op``, ``key`` (the shape key), ``device``,
    ``trials`` (every candidate's ``config`` with its median ``ms`` or the ``error`` that ruled
    it out; the chosen one first, then fastest first, failures last), ``chosen`` (the config
    the tuner picked: the fastest after re-timing the first few, ``_refine``) and ``ms`` (its
    time); records are sorted by op
    and key. An empty list where nothing was tuned; ValueError for a file that is not a record.
    """
    path = autotune_trials_path(cache_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        records = []
        for cache_key, trials in data.items():
            op, key, device = json.loads(cache_key)
            # The chosen trial first (a record from before the refining step marks none: its
            # fastest), then the fastest first, failures last.
            trials = sorted(trials, key=lambda t: (not t.get("chosen"), t.get("ms", float("inf"))))
            best = trials[0] if trials and "ms" in trials[0] else None
            records.append({"op": op, "key": key, "device": device, "trials": trials,
                            "chosen": best["config"] if best else None, "ms": best["ms"] if best else None})
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{path}: not a tuning record ({type(error).__name__}: {error})") from None
    return sorted(records, key=lambda r: (r["op"], json.dumps(r["key"])))


def rows_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the row-count field of a tuning key (a pair
    tensor's N^2 rows at N = 384 and 512 share 2^18; N = 768 is 2^20; a single track's N
    rows are far below)."""
    return next_power_of_2(rows)


def tuned_key(key: Sequence, rows: int | None) -> tuple:
    """The shape key a choice is stored under: ``key``, plus the ``rows_bucket`` of ``rows``
    where the op passes its row count (``pick_config``)."""
    return tuple(key) if rows is None else (*key, rows_bucket(rows))


def tune_with_graphs() -> bool:
    """The tuner times each candidate replayed from a CUDA graph (``bench_graph_ms``): device
    time, which ranks small kernels that plain calls (``bench_ms``, the host's launch time
    included) could not. On by default since session 24 (H200: the outer product mean's
    graph-timed pick was confirmed 2% faster in a round-robin A/B, and its MSA LayerNorm+Linear
    backward timed 0.043 ms instead of 0.083 ms). ``MEGAFOLD_TUNE_GRAPHS=0`` times plain calls."""
    return os.environ.get("MEGAFOLD_TUNE_GRAPHS", "1") != "0"


def _bench_launch(launch: Callable[[dict], object], cfg: dict) -> float:
    """The tuner's time for one candidate: from a CUDA graph where ``tune_with_graphs()``
    and the launch can be captured, else ``bench_ms``'s plain calls. A config that does not
    fit the GPU raises either way (it is then not a candidate). While candidates are
    recorded (``_record_candidates``), one launch and no time."""
    if _record_candidates:
        launch(cfg)
        return 0.0
    if tune_with_graphs():
        try:
            return bench_graph_ms(lambda: launch(cfg))
        except Exception as error:
            if "out of resource" in str(error).lower():
                raise
    return bench_ms(lambda: launch(cfg))


def bench_graph_ms(fn: Callable[[], object], reps: int = 20, rounds: int = 3) -> float:
    """Device time of one ``fn`` call in ms, replayed from a CUDA graph: what a graphed step
    pays for it. Plain calls (``bench_ms``) include the host's launch time, which at a small
    kernel is most of the figure and the same for every candidate: the outer product mean's
    MSA LayerNorm+Linear backward took 0.044 ms on the H200 while its candidates timed
    0.083-0.14 ms in plain calls (session 23). ``fn`` runs once plainly first (it compiles,
    and any key it launches is tuned outside the capture), then once on a side stream, as
    capture requires. Raises where ``fn`` cannot be captured (a host sync inside)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # A capture that fails ends inside CUDAGraph.capture_end, before torch resets the default
    # generator's capture flag and restores the caller's stream: the process's next CUDA random
    # draw then raises "Offset increment outside graph capture" (seen on the H200, session 24).
    # So keep a clone of the generator's state and the stream, and put both back on failure.
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    saved_state, stream = generator.clone_state(), torch.cuda.current_stream()
    try:
        # thread_local: tuning runs inside a training step while the loader's copy thread
        # (megafold.precache.loader) may allocate and copy; a global-mode capture would make
        # that thread's allocations fail (as in the diffusion sampler's graphs).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
    except BaseException:
        generator.graphsafe_set_state(saved_state)
        torch.cuda.set_stream(stream)
        raise
    graph.replay()
    torch.cuda.synchronize()

    def replays():
        for _ in range(reps):
            graph.replay()

    times = [_event_ms(replays) / reps for _ in range(rounds)]
    del graph, replays  # the graph's memory pool goes back to the allocator
    return statistics.median(times)


def _event_ms(fn: Callable[[], object]) -> float:
    """``fn``'s time in ms between two CUDA events on the current stream."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median time of ``fn`` in ms on the current CUDA stream (used by the tuner)."""
    fn()
    torch.cuda.synchronize()
    times = [_event_ms(fn) for _ in range(reps)]
    times.sort()
    return times[len(times) // 2]
