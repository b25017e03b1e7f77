"""Registers, spills and shared memory of every megafold kernel, compiled for a GPU without one.

    python benchmarks/register_report.py [--arch 90 | --hip gfx942] [--only NAME] [--loops] [--out DIR]

Each kernel is compiled ahead of time (Triton's own compiler, no GPU, no driver) with the
configuration megafold launches at AF3's pair widths (c_z = c = 128, c_h = 128 for the
triangle, c_h = 32 for the outer product mean): the H100's shipped choice for the N = 768
bucket where there is one, else the op's default.

- NVIDIA (``--arch``, default 90): ``ptxas -v`` (shipped with Triton) reports registers per
  thread and spill bytes. A kernel at 255 registers with spill stores keeps more live state
  than the register file holds and pays local-memory traffic inside its main loop.
- AMD (``--hip gfx942``, an MI300X; ``gfx90a``, an MI250X): the code object's vector
  registers, spills and scratch, and the LDS it needs. AMD GPUs have 64 KiB of LDS per CU, so
  a kernel that compiles here but needs more than that cannot launch there.

Each kernel is specialized as a real launch specializes it: the arguments of every kernel are
captured from the ops themselves (their forward and backward run once on the CPU at N=64, with
each kernel launch recorded instead of run), and Triton's own launcher specializes them: an
integer argument equal to 1 becomes a constant, pointers and integers divisible by 16 are
marked so (and on AMD, buffers within 2 GB). This
matters: a unit stride known at compile time lets loads vectorize and lets Triton pipeline them
(``num_stages``) through shared memory. Without it (the reports before session 13) the
EvoAttention dBias kernel showed 255 registers a thread and no pipelining, where the launched
kernel holds 109 and pipelines three stages (row field ``specialized``: false where no capture
matched). Stages are the choice's, else what the op passes, else the backend's default (3 on
NVIDIA, 2 on AMD), as at launch; ``fits_shared`` compares the shared memory with what one
program may use on that compute capability (H100 227 KiB, A100 163, RTX 4090 / L40 99).

With ``--loops`` (NVIDIA), each loop of the kernel's SASS (``nvdisasm`` of the cubin: a
backward branch and its target) with the instructions a thread executes in one iteration, by
opcode: where a kernel is bound by instruction issue (EvoAttention, benchmarks/NOTES.md,
session 20), what an iteration costs and what a change removes from it.

A row with an error is a kernel that does not compile for that target with this Triton: the
check that the kernels build on the oldest supported Triton (3.2) and on AMD GPUs, which no
machine here has. Compare resources with what a GPU run measures; Triton's version matters
(the GPU machine in ``benchmarks/results`` runs Triton 3.6).
JSON: results/<target>-offline/<date>-register_report-triton<version>.json.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from _harness import environment, print_table, write_json  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megafold.kernels._common import TUNED_DIR, _read_disk_cache  # noqa: E402

FP32_NAMES = ("mean", "rstd", "part", "ln_", "norm_ptr", "inv_norm", "bias_ptr")


def _pointer_type(name: str) -> str:
    if "mask" in name:
        return "*i1"
    if any(part in name for part in FP32_NAMES):
        return "*fp32"
    return "*bf16"


def _scalar_type(name: str) -> str:
    return "fp32" if name == "eps" or name.startswith("scale") else "i32"


CAPTURE_N = 64  # the ops' size when their launches are captured (N^2 pair rows, S = N)


def _defaults(fn, constexpr_only: bool = False) -> dict:
    """{name: default} of the kernel's parameters that have one (its constexpr flags)."""
    return {p.name: p.default for p in fn.params
            if p.default is not inspect.Parameter.empty and (p.is_constexpr or not constexpr_only)}


def _capture_launches() -> dict:
    """{kernel: {argument name: value}} of the first launch of every megafold kernel, with
    launches recorded instead of run: each op's forward and backward once on the CPU at N =
    ``CAPTURE_N``. Only the integer values and the pointers' alignment are used (what Triton
    specializes on); N = 64 gives the same specialization as 384 or 768 (multiples of 16)."""
    import importlib

    import _pair_ops
    import torch
    from triton.runtime.jit import JITFunction

    import megafold.kernels._common as common
    from megafold.kernels import evo_attention

    seen: dict = {}

    def record(self, *args, grid, warmup, **kwargs):
        # Parameters a launch leaves out (e.g. a constexpr flag's off default) take their default.
        seen.setdefault(self, _defaults(self) | dict(zip(self.arg_names, args)) | kwargs)

    run, active = JITFunction.run, common.interpreter_active
    JITFunction.run = record  # record the launch; nothing is compiled or run
    common.interpreter_active = lambda: True  # Triton kernels on CPU tensors, no autotuning
    try:
        n = CAPTURE_N
        dtype = torch.float16
        q, k, v, gate = (torch.randn(1, n, n, 4, 32, dtype=dtype, requires_grad=True) for _ in range(4))
        bias = torch.randn(1, 4, n, n, dtype=dtype, requires_grad=True)
        out = evo_attention(q, k, v, bias, torch.ones(1, n, n, dtype=torch.bool), gate, backend="triton")
        out.backward(torch.ones_like(out))
        for case in _pair_ops.cases(False, "cpu", [n]):
            out = case.implementations["megafold"](case.make_inputs())
            out.backward(torch.ones_like(out))
        # The triangle's persistent output backward, which only a tuned choice launches.
        tri = importlib.import_module("megafold.kernels.triangle_multiply")
        real = tri.run_tuned

        def persistent(op, key, device, candidates, default, launch, rows=None):
            if op == "triangle_multiply_out_bwd":
                return launch({"BLOCK_M": 32, "num_warps": 8, "PERSISTENT": 1})
            return real(op, key, device, candidates, default, launch, rows)

        tri.run_tuned = persistent
        try:
            case = next(c for c in _pair_ops.cases(False, "cpu", [n]) if c.op == "triangle_multiply")
            out = case.implementations["megafold"](case.make_inputs())
            out.backward(torch.ones_like(out))
        finally:
            tri.run_tuned = real
    finally:
        JITFunction.run, common.interpreter_active = run, active
    return seen


def _runtime_types(fn, constexprs: dict, types: dict | None) -> dict:
    """Type of each runtime (non-constexpr) argument: ``types``, else the naming rules."""
    return {n: (types or {}).get(n) or (_pointer_type(n) if n.endswith("_ptr") else _scalar_type(n))
            for n in fn.arg_names if n not in constexprs}


def launcher_specialization(fn, values: dict, target: GPUTarget) -> tuple[set, dict]:
    """What Triton's own launcher for ``target`` derives from one launch's arguments
    (``values``: every argument by name): the runtime arguments it turns into the constant 1,
    and {argument: attribute string} for the others it marks ("D": divisible by 16; AMD may
    add "S": a buffer within 2 GB)."""
    from triton.compiler import make_backend

    names = fn.arg_names
    backend = make_backend(target)
    args = [values[n] for n in names]
    runtime = {p.name for p in fn.params if not p.is_constexpr}
    if hasattr(backend, "get_attrs_descriptor"):  # Triton 3.2
        props = backend.get_attrs_descriptor(fn.params, args).arg_properties
        ones = {names[i] for i in props.get("tt.equal_to", [])} & runtime
        return ones, {names[i]: "D" for i in props.get("tt.divisibility", []) if names[i] in runtime}
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _bound, spec, _options = binder(*args)
    ones = {n for n, (kind, _) in zip(names, spec) if kind == "constexpr"} & runtime
    return ones, {n: attr for n, (_, attr) in zip(names, spec) if isinstance(attr, str) and attr and n in runtime}


def _source(fn, constexprs: dict, types: dict | None, values: dict | None, target: GPUTarget) -> ASTSource:
    """The kernel with its argument types and constexpr values, in the form this Triton takes:
    3.3 and later list every argument in the signature (constexprs as "constexpr") and key
    the values and attributes by argument index; 3.2 lists only the runtime arguments, keys
    the values by name and takes the attributes as an ``AttrsDescriptor``. ``values``: one
    launch's arguments, specialized by Triton's own launcher (``launcher_specialization``);
    without them every argument is generic. Constexpr parameters missing from ``constexprs``
    take their defaults, as in a launch that leaves them out."""
    names = fn.arg_names
    constexprs = _defaults(fn, constexpr_only=True) | constexprs
    runtime = _runtime_types(fn, constexprs, types)
    ones, marks = launcher_specialization(fn, {**values, **constexprs}, target) if values else (set(), {})
    constants = dict(constexprs) | {n: 1 for n in ones}
    if "constexprs" in inspect.signature(ASTSource).parameters:
        from triton.compiler import make_backend

        parse_attr = make_backend(target).parse_attr
        signature = {n: "constexpr" if n in constants else runtime[n] for n in names}
        return ASTSource(fn=fn, signature=signature,
                         constexprs={(names.index(k),): v for k, v in constants.items()},
                         attrs={(names.index(n),): parse_attr(desc) for n, desc in marks.items()})
    from triton.backends.compiler import (
        AttrsDescriptor,  # Triton 3.2: arguments by position
    )

    attrs = AttrsDescriptor.from_dict({"cls": "AttrsDescriptor", "arg_properties": {
        "tt.divisibility": [names.index(n) for n, desc in marks.items() if "D" in desc],
        "tt.equal_to": [names.index(n) for n in ones]}})
    return ASTSource(fn=fn, signature=runtime, constants=constants, attrs=attrs)


def _hip_report(kernel) -> dict:
    """Resources of an AMD code object, from the metadata in its assembly."""
    asm = kernel.asm["amdgcn"]

    def field(name):
        found = re.search(rf"\.{name}:\s+(\d+)", asm)
        return int(found.group(1)) if found else None

    return {
        "registers": field("vgpr_count"),  # vector registers per lane
        "vgpr_spills": field("vgpr_spill_count"),  # registers spilled (counts, not bytes)
        "sgpr_spills": field("sgpr_spill_count"),
        "scratch_b": field("private_segment_fixed_size"),  # bytes of scratch per lane
        "shared_kib": round(kernel.metadata.shared / 1024, 1),
        "fits_lds": kernel.metadata.shared <= 64 * 1024,
    }


# Shared memory one program may use (KiB) on NVIDIA GPUs, by compute capability: A100 163,
# consumer Ampere and Ada (RTX 30xx / 40xx, L4, L40) 99, H100 / H200 227.
NVIDIA_SHARED_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}


_SASS_LABEL = re.compile(r"\.(L_x_\d+):")
_SASS_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def sass_loops(sass: str, top: int = 12) -> list[dict]:
    """The loops of ``nvdisasm -c`` output: each backward branch to a label before it. Per
    loop: its first and last address, the instructions in between (one iteration of its body,
    inner loops included) and the most frequent opcodes (without modifiers: FADD, not FADD.FTZ)."""
    labels, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_INSTRUCTION.match(line)
        if match:
            address = int(match.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, match.group(2).split(".")[0], match.group(3)))
    loops = []
    for address, opcode, rest in instructions:
        target = re.search(r"\(\.(L_x_\d+)\)", rest) if opcode == "BRA" else None
        if target and labels.get(target.group(1), address) < address:
            start = labels[target.group(1)]
            body = Counter(op for at, op, _ in instructions if start <= at <= address)
            loops.append({"start": hex(start), "end": hex(address), "instructions": sum(body.values()),
                          "opcodes": dict(body.most_common(top))})
    return loops


def wgmma_serialized(ptxas_report: str) -> str | None:
    """Why ptxas serialized the kernel's wgmma instructions (its C7515 note), else None."""
    match = re.search(r"\(C7515\) Potential Performance Loss: wgmma\.mma_async instructions are serialized "
                      r"due to (.*?) in the function", ptxas_report)
    return match.group(1) if match else None


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int | None, arch: int | str,
                   types: dict | None = None, values: dict | None = None, loops: bool = False) -> dict:
    """Compile ``fn`` (a @triton.jit kernel) for sm_<arch> (an int) or an AMD GPU (a "gfx..."
    name) and read its resource report. ``types``: argument types that differ from the naming
    rules (``*bf16`` pointers, fp32 statistics and partials, ``*i1`` masks, fp32 ``eps`` and
    ``scale``, i32 otherwise). ``values``: a launch's arguments (``_capture_launches``), for
    the launcher's specialization; without them every argument is generic. ``num_stages`` None:
    the backend's default (3 on NVIDIA, 2 on AMD), as a launch that does not name it gets."""
    target = GPUTarget("hip", arch, 64) if isinstance(arch, str) else GPUTarget("cuda", arch, 32)
    source = _source(fn, constexprs, types, values, target)
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages is not None else {})
    if isinstance(arch, str):
        return _hip_report(triton.compile(source, target=target, options=options))
    kernel = triton.compile(source, target=target, options=options)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = ""
        for exe in ("ptxas", "ptxas-blackwell"):  # the first one whose PTX version fits
            # the "a" (architecture-specific) targets start at sm_90; older ones have none
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            run = subprocess.run([str(bin_dir / exe), "-v", f"--gpu-name={gpu}", str(ptx),
                                  "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
            report = run.stderr
            if "Used" in report:
                break
        sass = ""
        if loops:
            sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(Path(tmp) / "kernel.cubin")],
                                  capture_output=True, text=True).stdout
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared_kib": round(kernel.metadata.shared / 1024, 1),
        "fits_shared": kernel.metadata.shared <= NVIDIA_SHARED_KIB.get(arch, 99) * 1024,
        "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
        # ptxas C7515: it made every wgmma wait for the one before (no overlap of the tensor
        # cores with the other instructions). Session 22 found it behind a dK/dV variant that
        # had fewer instructions and ran 12% slower (benchmarks/NOTES.md).
        "wgmma_serialized": wgmma_serialized(report),
        **({"loops": sass_loops(sass)} if loops else {}),
    }


@functools.lru_cache(maxsize=None)  # read once for all the cases
def _h100_choices() -> dict:
    return _read_disk_cache(TUNED_DIR / "NVIDIA_H100_80GB_HBM3.json")


def _shipped(op: str, key_prefix: list) -> dict | None:
    """The H100's shipped choice for ``op`` whose key starts with ``key_prefix`` (the N = 768
    bucket, 2^20 rows, where the key has one)."""
    found = None
    for key, value in _h100_choices().items():
        if key.startswith("_"):  # the file's own fields (its GPU's capability)
            continue
        name, shape, _device = json.loads(key)
        if name == op and shape[: len(key_prefix)] == key_prefix:
            if shape[-1] == 1 << 20:
                return value
            found = found or value
    return found


def _narrow_case(ln, width: int, cfg: dict, note: str) -> tuple:
    """layernorm_linear's narrow backward (dW in registers) for K=128 and ``width`` outputs."""
    return (f"layernorm_linear bwd narrow 128->{width}{note}", ln._layernorm_linear_backward_narrow_kernel,
            dict(K=128, X_MERGED=True, DY_MERGED=True, DOT_PRECISION=None, NEED_DX=True, NEED_BIAS=True, ONE_BATCH=True,
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=ln.block_size(width, 1 << 30), BLOCK_K=128), cfg)


def cases(defaults: bool = False) -> list[tuple]:
    """(name, kernel, constexprs, launch config[, argument types]) for each kernel at AF3's pair
    widths, and EvoAttention's kernels at the triangle shape (H=4, D=32, N=768). ``defaults``:
    every kernel at its op's default configuration (what a GPU with no shipped choices runs with
    tuning off, e.g. an AMD GPU), not the H100's shipped choices."""
    shipped = (lambda op, key_prefix: None) if defaults else _shipped
    import importlib

    # the modules themselves (megafold.kernels re-exports functions of the same names)
    ln, opm, tr, tri = (importlib.import_module(f"megafold.kernels.{name}") for name in
                        ("layernorm_linear", "outer_product_mean", "transition", "triangle_multiply"))

    bf16 = "torch.bfloat16"
    out = []
    for width in (16, 128, 512, 640):
        cfg = shipped("layernorm_linear_fwd", [128, width, bf16, bf16, True]) or {
            "BLOCK_M": 64, "BLOCK_N": ln.block_size(width, 128), "BLOCK_K": 128, "num_warps": 4}
        col_blocks = cfg.get("COL_BLOCKS") or ln._column_blocks(1 << 20, width, cfg["BLOCK_N"])
        out.append((f"layernorm_linear fwd 128->{width}", ln._layernorm_linear_forward_kernel,
                    dict(K=128, HAS_BIAS=True, X_MERGED=True, DOT_PRECISION=None, BLOCK_M=cfg["BLOCK_M"],
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128, COL_BLOCKS=col_blocks), cfg))
        cfg = shipped("layernorm_linear_bwd", [128, width, bf16, bf16, bf16, True, True, True]) or (
            ln.NARROW_DEFAULT if ln.block_size(width, 1 << 30) <= ln.NARROW_MAX_OUT else
            {"BLOCK_M": 64, "BLOCK_N": ln.block_size(width, 64), "num_warps": 4})
        out.append(_narrow_case(ln, width, cfg, "") if cfg.get("NARROW") else
                   (f"layernorm_linear bwd 128->{width}", ln._layernorm_linear_backward_kernel,
                    dict(K=128, X_MERGED=True, DY_MERGED=True, DOT_PRECISION=None, NEED_DX=True, WRITE_XN=True,
                         XN_WIDTH=136, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128), cfg))
    for width in (16, 32, 128):  # the narrow backward (dW in registers) at its default tiles
        out.append(_narrow_case(ln, width, ln.NARROW_DEFAULT, ", default tiles"))
    tr_defaults = tr.default_configs(128, 128)
    for direction, kernel in (("fwd", tr._transition_forward_kernel), ("bwd", tr._transition_backward_kernel)):
        cfg = shipped(f"transition_{direction}", [128, 512, 128, bf16, bf16]) or tr_defaults[direction]
        extra = {"DY_MERGED": True} if direction == "bwd" else {}
        out.append((f"transition {direction}", kernel,
                    dict(C=128, X_MERGED=True, DOT_PRECISION=None, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=128,
                         BLOCK_CO=128, BLOCK_H=cfg["BLOCK_H"], **extra), cfg))
    for name, kernel, extra in (
        ("in_fwd", tri._triangle_input_forward_kernel, {"M_MERGED": True, "STORE_ZN": True}),
        ("in_bwd", tri._triangle_input_backward_kernel, {"M_MERGED": True}),
        ("out_fwd", tri._triangle_output_forward_kernel, {"CH": 128}),
        ("out_bwd", tri._triangle_output_backward_kernel, {"CH": 128, "D_MERGED": True}),
    ):
        cfg = shipped(f"triangle_multiply_{name}", [128, 128, bf16, bf16]) or (
            {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4} if "in_" in name else {"BLOCK_M": 64, "num_warps": 4})
        if name == "out_fwd":  # its row loop's pipeline depth (persistent choices)
            extra = {**extra, "NUM_STAGES": cfg.get("LOOP_STAGES", 1)}
        elif cfg.get("PERSISTENT"):  # the shipped choice is the persistent output backward
            name, kernel = "out_bwd persistent", tri._triangle_output_backward_persistent_kernel
        blocks = {"BLOCK_C": cfg["BLOCK_C"]} if "in_" in name else {"BLOCK_CH": 128}
        out.append((f"triangle {name}", kernel,
                    dict(CZ=128, Z_MERGED=True, DOT_PRECISION=None, BLOCK_M=cfg["BLOCK_M"], BLOCK_CZ=128,
                         **blocks, **extra), cfg))
    evo = importlib.import_module("megafold.kernels.evo_attention")
    evo_types = {"bias_ptr": "*bf16", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dbias_ptr": "*fp32",
                 "first_ptr": "*i32"}
    for name, kernel, extra in (
        ("fwd", evo._evo_attention_forward_kernel, {"HAS_BIAS": True, "HAS_GATE": True, "ROWS": 2, "PREFIX": True}),
        ("dkdv", evo._evo_attention_dkdv_kernel, {"HAS_BIAS": True}),
        ("dq", evo._evo_attention_dq_kernel, {"HAS_BIAS": True, "WRITE_DBIAS": False, "ROWS": 2, "PREFIX": True}),
        ("dbias", evo._evo_attention_dbias_kernel, {"PREFIX": True}),
    ):
        cfg = shipped("evo_attention", [name, 1024, 1024, 32, 4, bf16, True]) or evo._default_blocks(name, 768, 32)
        out.append((f"evo_attention {name} (triangle, N=768)", kernel,
                    dict(D=32, HAS_MASK=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=32,
                         IEEE=False, WIDE=False, **extra), cfg, evo_types))
    # The rows' first masked keys, as _forward launches it before the forward kernel.
    out.append(("evo_attention first masked key", evo._first_masked_key_kernel,
                dict(BLOCK_S=evo._FIRST_ROWS, BLOCK_N=evo._FIRST_KEYS, WIDE=False),
                {"num_warps": 4, "num_stages": 3}, {"mask_ptr": "*u8", "first_ptr": "*i32"}))
    # The backward's prologue (gate gradient, ungated dO, delta), as _backward launches it.
    out.append(("evo_attention prep (triangle, N=768)", evo._evo_attention_backward_prep_kernel,
                dict(H=4, D=32, HAS_GATE=True, BLOCK_N=32, BLOCK_H=4, BLOCK_D=32, WIDE=False),
                {"num_warps": 4, "num_stages": 3}, {"delta_ptr": "*fp32"}))
    for S in (128, 64):
        defaults = opm.default_configs(32, 128, S)
        for name, kernel in (("forward", opm._outer_product_mean_forward_kernel),
                             ("left_grad", opm._outer_product_mean_left_grad_kernel),
                             ("weight_grad", opm._outer_product_mean_weight_grad_kernel)):
            cfg = shipped(f"outer_product_mean_{name}", [32, 128, S, bf16]) or defaults[name]
            constexprs = {k: cfg[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_C", "BLOCK_S")}
            constexprs |= dict(DOT_PRECISION=None, BLOCK_D=32, BLOCK_CZ=128)
            if name != "left_grad":
                constexprs["ONE_S_BLOCK"] = S <= cfg["BLOCK_S"]
            out.append((f"outer_product_mean {name} S={S}", kernel, constexprs, cfg))
    return out


def check_specialization(launches: dict, target: GPUTarget, defaults: bool = False, only: str | None = None) -> int:
    """The specialization each case compiles with (``--check``, nothing compiled): the
    launcher's constants and marked arguments for its captured launch. Prints one line a
    kernel; returns the number of kernels the ops did not launch (those compile generically)."""
    missing = 0
    for name, kernel, constexprs, _cfg, *_types in cases(defaults):
        if only and only not in name:
            continue
        values = launches.get(kernel)
        if values is None:
            print(f"  {name:52s} not launched by the ops at N={CAPTURE_N}")
            missing += 1
            continue
        ones, marks = launcher_specialization(kernel, {**values, **constexprs}, target)
        print(f"  {name:52s} as launched: {len(ones)} constants, {len(marks)} marked")
    return missing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--hip", default=None, help="an AMD GPU instead, e.g. gfx942 (MI300X), gfx90a (MI250X)")
    parser.add_argument("--defaults", action="store_true",
                        help="each op's default configuration instead of the H100's shipped choices")
    parser.add_argument("--only", default=None, help="substring of the kernel names to compile")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--loops", action="store_true",
                        help="NVIDIA: each loop's instructions per iteration, by opcode (nvdisasm)")
    parser.add_argument("--check", action="store_true",
                        help="compile nothing: list the specialization each kernel compiles with (Triton's "
                             "launcher over the captured arguments); exit 1 where a kernel was not captured")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, before the kernels are defined
    target = args.hip or args.arch
    target_name = args.hip or f"sm_{args.arch}"
    env = environment() | {"device": f"{target_name}-offline"}
    print(f"triton {triton.__version__}, {target_name}")
    rows = []
    launches = _capture_launches()
    device_target = GPUTarget("hip", args.hip, 64) if args.hip else GPUTarget("cuda", args.arch, 32)
    if args.check:
        sys.exit(check_specialization(launches, device_target, args.defaults, args.only))
    from triton.compiler import make_backend

    default_stages = make_backend(device_target).parse_options({}).num_stages
    for name, kernel, constexprs, cfg, *types in cases(args.defaults):
        if args.only and args.only not in name:
            continue
        values = launches.get(kernel)
        # As launched: the choice's warps and stages, else what the op passes (seen in the
        # captured launch), else the backend's default (an op that names no stages).
        warps = cfg.get("num_warps", (values or {}).get("num_warps", 4))
        stages = cfg.get("num_stages", (values or {}).get("num_stages"))
        if args.hip and stages is not None:  # as megafold launches on AMD GPUs (64 KiB of LDS)
            stages = min(stages, 2)
        row = {"kernel": name, "config": {k: v for k, v in cfg.items()}, "num_warps": warps,
               "num_stages": stages if stages is not None else default_stages,
               "specialized": values is not None}
        try:
            row |= compile_report(kernel, constexprs, warps, stages, target, types[0] if types else None, values,
                                  loops=args.loops and not args.hip)
        except Exception as error:  # one kernel that does not compile is a row, not a crash
            row["error"] = f"{type(error).__name__}: {error}"[:200]
        rows.append(row)
        spills = (f"spilled {row.get('vgpr_spills')} vgprs / {row.get('sgpr_spills')} sgprs, scratch "
                  f"{row.get('scratch_b')} B" if args.hip else
                  f"spills {row.get('spill_stores')} / {row.get('spill_loads')} B")
        print(f"  {name:36s} " + (f"{row['registers']} regs, {spills}, {row['shared_kib']} KiB shared"
                                   if "error" not in row else row["error"]), flush=True)
        for loop in row.get("loops", []):
            print(f"      loop {loop['start']}-{loop['end']}: {loop['instructions']} instructions; "
                  + ", ".join(f"{op} {n}" for op, n in loop["opcodes"].items()), flush=True)
    name = f"register_report-triton{triton.__version__}" + ("-defaults" if args.defaults else "")
    config = {"target": target_name, "triton": triton.__version__, "defaults": args.defaults,
              "specialization": f"as launched: arguments captured from the ops at N={CAPTURE_N}"}
    path = write_json(name, env, rows, config, args.out)
    print()
    spill_columns = ["vgpr_spills", "sgpr_spills", "scratch_b"] if args.hip else ["spill_stores", "spill_loads"]
    columns = ["kernel", "num_warps", "num_stages", "registers", *spill_columns, "shared_kib", "specialized"]
    print_table(rows, columns + (["fits_lds"] if args.hip else ["fits_shared", "wgmma_serialized"]) + ["error"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
