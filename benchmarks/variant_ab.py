"""A/B of kernel-module variants of one op, in one process: graphed fwd+bwd, round-robin.

Kernel changes that move an op by a few percent cannot be judged across machines (these H100s
differ by ~3% from one session to the next) or across processes (a process's first shape, the
allocator's state). This runs every variant of an op's kernel module on the same inputs, on
the same GPU, in one process, and times the CUDA-graph replays round-robin, so each variant's
figure has its neighbours' as control.

A variant is a copy of ``megafold/kernels/<module>.py`` from another commit or with an edit:

    python benchmarks/variant_ab.py export REV [--module triangle_multiply] [--to scratch/variants]
        writes scratch/variants/triangle_multiply@REV.py (``git show REV:...``), to carry to
        a GPU machine whose checkout has no history;

    python benchmarks/variant_ab.py run --op triangle_multiply --ns 384 768 \
        --variant old=scratch/variants/triangle_multiply@6f88277.py --rounds 3 --breakdown 768 \
        [--fp32-autocast] [--pin old:triangle_multiply_in_bwd='{"BLOCK_M": 128, ...}'] --name NAME

The ops: the four pair ops of benchmarks/_pair_ops.py and ``evo_attention`` (``--shape``: one
of benchmarks/kernels.py's EvoAttention shapes, default ``tri``). ``head`` (the package's own module) is
always the first variant. Each variant is loaded as a
module of its own (``megafold.kernels._variant_<name>``) and called through its public
function; its tuned choices are the shipped ones for the same op names, unless pinned
(``--pin VARIANT:OP=JSON`` launches that config for every key of OP; ``--choices
VARIANT=autotune.json`` launches that file's choice for each shape key it has, as a forced
re-tune stored them: its picks against the shipped ones, every N in one run). Each row has per
variant: the graphed times of every round (ms), the peak memory of a plain call above its
inputs (MiB), and the largest error of the output and of every gradient against float64
(``max|x - ref| / max|ref|``). ``--breakdown N`` adds device ms by kernel name at that N
(plain calls, PyTorch profiler). ``--fp32-autocast`` adds rows with the pair input in fp32
under autocast, as the model calls the op. ``--peers cueq compile`` times the benchmark case's
other implementations in the same rounds, with the same error check.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pair_ops  # noqa: E402
from _harness import ROOT, environment, graphed, kernel_breakdown, peak_mib, rel_err, time_ms, write_json  # noqa: E402

from megafold.kernels._common import tuned_key  # noqa: E402

# Each op's kernel module bears the op's name: megafold/kernels/<op>.py.
OPS = (*_pair_ops.OPS, "evo_attention")


def export(rev: str, module: str, to: Path) -> Path:
    """``megafold/kernels/<module>.py`` at ``rev`` as ``to/<module>@<rev>.py``."""
    text = subprocess.run(["git", "show", f"{rev}:megafold/kernels/{module}.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    to.mkdir(parents=True, exist_ok=True)
    path = to / f"{module}@{rev}.py"
    path.write_text(f"# variant_ab export of megafold/kernels/{module}.py at {rev}\n" + text)
    return path


def load_variant(name: str, path: Path):
    """The module at ``path``, loaded as ``megafold.kernels._variant_<name>``."""
    module_name = f"megafold.kernels._variant_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def override_choices(module, lookup) -> None:
    """Make ``module``'s ``run_tuned`` launch ``lookup(op, key, rows)`` where that gives a
    config; other launches run as before (``--pin``, ``--choices``)."""
    original = module.run_tuned

    def run_tuned(op, key, device, candidates, default, launch, rows=None):
        config = lookup(op, key, rows)
        if config is not None:
            return launch(config)
        return original(op, key, device, candidates, default, launch, rows)

    module.run_tuned = run_tuned


def pin_configs(module, pins: dict[str, dict]) -> None:
    """Make ``module``'s ``run_tuned`` launch ``pins[op]`` for every key of a pinned op."""
    if pins:
        override_choices(module, lambda op, key, rows: pins.get(op))


def load_choices(path: Path) -> dict[tuple[str, str], dict]:
    """The choices of an ``autotune.json`` (a forced re-tune's ``MEGAFOLD_CACHE_DIR``, or a
    file of ``megafold/kernels/tuned/``) by (op, JSON of the full shape key); the GPU named in
    each key is not compared."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--choices {path}: not a readable autotune JSON file ({error})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--choices {path}: expected a JSON object of tuned choices")
    choices = {}
    for name, config in data.items():
        if name.startswith("_"):
            continue
        try:
            op, key, _device = json.loads(name)
        except (ValueError, TypeError):
            raise SystemExit(f"--choices {path}: {name[:80]!r} is not an [op, key, device] entry") from None
        choices[(op, json.dumps(key))] = config
    return choices


def choose_configs(module, choices: dict[tuple[str, str], dict]) -> dict[str, list]:
    """Make ``module``'s ``run_tuned`` launch, for each (op, shape key) found in ``choices``,
    the configuration stored there; other keys run as before. Unlike ``--pin`` (one config for
    every key of an op) this follows the tuner's keys, row bucket included, so a re-tune's
    picks can be A/B'd against the shipped ones at every N of one run. Returns a record that
    fills as launches happen: ``{"used": [...], "missing": [...]}``, (op, key) each once."""
    record: dict[str, list] = {"used": [], "missing": []}

    def lookup(op, key, rows):
        full = list(tuned_key(key, rows))
        config = choices.get((op, json.dumps(full)))
        seen = record["used"] if config is not None else record["missing"]
        if [op, full] not in seen:
            seen.append([op, full])
        return config

    override_choices(module, lookup)
    return record


@contextlib.contextmanager
def public_function(op: str, fn):
    """The benchmark case calls ``_pair_ops.<op>``: point it at ``fn`` for a while."""
    saved = getattr(_pair_ops, op)
    setattr(_pair_ops, op, fn)
    try:
        yield
    finally:
        setattr(_pair_ops, op, saved)


def fresh(inputs: dict, fp32_first: bool) -> dict:
    """New leaves with the same values (a graph's leaves must be its own); the first input
    (the pair or MSA activations) in fp32 where asked."""
    out = {}
    for i, (k, v) in enumerate(inputs.items()):
        if v.requires_grad:
            v = v.detach().clone()
            if i == 0 and fp32_first:
                v = v.float()
            v.requires_grad_()
        out[k] = v
    return out


def op_breakdown(fn, steps: int = 3) -> dict[str, float]:
    """Device ms per call of ``fn`` under each aten op that launched work (inclusive of the
    ops it calls): which host op a kernel of ``kernel_breakdown`` belongs to."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key.startswith("aten::"):
            totals[event.key] = round(device_us / 1e3 / steps, 4)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def find_case(device, op: str, shape: str | None, N: int):
    """The benchmark case of ``op`` at ``N`` (its first shape, or ``shape``; EvoAttention's
    default: ``tri``)."""
    if op == "evo_attention":
        return _pair_ops.evo_case(N, device, shape or "tri")
    return next(c for c in _pair_ops.cases(False, device, [N]) if c.op == op and (shape is None or c.shape == shape))


def grad_step(fn, inputs: dict, leaves: list[str], grad_out: torch.Tensor):
    """One forward + backward of ``fn`` on ``inputs`` (the gradients of ``leaves``)."""
    def step():
        torch.autograd.grad(fn(inputs), [inputs[k] for k in leaves], grad_out)

    return step


def parse_pins(items: list[str]) -> dict[str, dict[str, dict]]:
    pins: dict[str, dict[str, dict]] = {}
    for item in items:
        head, _, config = item.partition("=")
        variant, _, op = head.partition(":")
        if not op or not config:
            raise SystemExit(f"--pin {item!r}: expected VARIANT:OP=JSON")
        pins.setdefault(variant, {})[op] = json.loads(config)
    return pins


def run(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("variant_ab.py times CUDA graphs: it needs a GPU")
    device = torch.device("cuda")
    variants = {"head": importlib.import_module(f"megafold.kernels.{args.op}")}
    files = {"head": f"megafold/kernels/{args.op}.py"}
    for item in args.variant:
        name, _, path = item.partition("=")
        if not path or name in variants:
            raise SystemExit(f"--variant {item!r}: expected a new NAME=PATH")
        variants[name] = load_variant(name, Path(path))
        files[name] = f"{path} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]})"
    pins = parse_pins(args.pin)
    for name, op_pins in pins.items():
        pin_configs(variants[name], op_pins)
    chosen = {}
    for item in args.choices:
        name, _, path = item.partition("=")
        if not path or name not in variants or name == "head":
            raise SystemExit(f"--choices {item!r}: expected VARIANT=PATH for a --variant (not head)")
        chosen[name] = {"file": path, **choose_configs(variants[name], load_choices(Path(path)))}

    # A throwaway capture: a process's first capture has failed where later ones did not.
    warm = find_case(device, args.op, None, 64)
    warm_inputs = warm.make_inputs()
    leaves = [k for k, v in warm_inputs.items() if v.requires_grad]
    with contextlib.suppress(Exception):
        graphed(lambda: torch.autograd.grad(warm.implementations["megafold"](warm_inputs),
                                            [warm_inputs[k] for k in leaves], allow_unused=True))()
    torch.cuda.synchronize()

    def entries(case):
        """(name, fn, context) of each variant (the case's megafold implementation with the
        variant's public function swapped in), then of each peer (its own implementation)."""
        for name, mod in variants.items():
            yield name, case.implementations["megafold"], functools.partial(public_function, args.op,
                                                                              getattr(mod, args.op))
        for peer in args.peers:
            if peer not in case.implementations:
                raise SystemExit(f"--peers {peer}: not an implementation of {args.op} here "
                                 f"(have {sorted(case.implementations)})")
            yield peer, case.implementations[peer], contextlib.nullcontext

    rows, breakdowns = [], {}
    settings = [False, True] if args.fp32_autocast else [False]
    for N in args.ns:
        torch._dynamo.reset()  # torch.compile's peer row: a fresh compile per shape, no recompile limit
        case = find_case(device, args.op, args.shape, N)
        for fp32 in settings:
            torch.manual_seed(0)
            base = case.make_inputs()
            leaves = [k for k, v in base.items() if v.requires_grad]
            ref_inputs = {k: (v.detach().double().requires_grad_() if k in leaves else v) for k, v in base.items()}
            ref = case.reference(ref_inputs)
            grad_out = torch.randn(ref.shape, device=device, dtype=torch.bfloat16)
            ref_grads = torch.autograd.grad(ref, [ref_inputs[k] for k in leaves], grad_out.double())
            ref = ref.detach()
            del ref_inputs
            row = {"op": args.op, "shape": case.shape, "N": N, "input_dtype": "float32" if fp32 else "bfloat16",
                   "autocast": True, "errors": {}, "peak_mib_above_inputs": {}, "graph_ms": {}}
            # Every plain call (errors, peak) before the first capture of the row; the profiled
            # breakdowns after every replay.
            for name, fn, swap in entries(case):
                inputs = fresh(base, fp32)
                with swap():
                    out = fn(inputs)
                    grads = torch.autograd.grad(out, [inputs[k] for k in leaves], grad_out)
                    row["errors"][name] = {"out": rel_err(out, ref),
                                           **{k: rel_err(g, r) for k, g, r in zip(leaves, grads, ref_grads)}}
                    del out, grads
                    row["peak_mib_above_inputs"][name] = peak_mib(grad_step(fn, inputs, leaves, grad_out))
                del inputs
            torch.cuda.synchronize()
            replays, alive = {}, []
            for name, fn, swap in entries(case):
                inputs = fresh(base, fp32)  # a graph's leaves are its own
                with swap():
                    replays[name] = graphed(grad_step(fn, inputs, leaves, grad_out))
                alive.append(inputs)  # a replay reads the captured leaves: they must outlive it
            for _ in range(args.rounds):
                for name, replay in replays.items():
                    row["graph_ms"].setdefault(name, []).append(round(time_ms(replay), 4))
            del replays, alive, ref, ref_grads
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"{args.op} N={N} {'fp32 in' if fp32 else 'bf16 in'}:")
            for name in row["graph_ms"]:
                worst = max(row["errors"][name].values())
                print(f"  {name:12s} graphed ms {' '.join(f'{t:7.3f}' for t in row['graph_ms'][name])}"
                      f"  peak {row['peak_mib_above_inputs'][name]:8.1f} MiB  max err {worst:.2e}", flush=True)
    for N in args.breakdown:
        case = find_case(device, args.op, args.shape, N)
        torch.manual_seed(0)
        base = case.make_inputs()
        leaves = [k for k, v in base.items() if v.requires_grad]
        with torch.no_grad():  # the output's shape only: nothing saved for a backward
            shape = case.implementations["megafold"](base).shape
        grad_out = torch.randn(shape, device=device, dtype=torch.bfloat16)
        for name, mod in variants.items():
            step = grad_step(case.implementations["megafold"], fresh(base, False), leaves, grad_out)
            with public_function(args.op, getattr(mod, args.op)):
                breakdowns[f"{name}@{N}"] = kernel_breakdown(step)
                breakdowns[f"{name}@{N} aten ops"] = op_breakdown(step)
    for key, table in breakdowns.items():
        print(f"device ms by kernel, {key}:")
        for kernel, ms in list(table.items())[:14]:
            print(f"  {ms:7.4f}  {kernel}")
    path = write_json(args.name, environment(), rows,
                      {"op": args.op, "variants": files, "peers": args.peers, "pins": pins, "choices": chosen,
                       "rounds": args.rounds,
                       "breakdowns": breakdowns, "note": args.note},
                      Path(args.out) if args.out else None)
    for name, record in chosen.items():
        print(f"--choices {name}: {len(record['used'])} keys from {record['file']}, "
              f"{len(record['missing'])} not in it (ran the shipped choice)")
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a kernel module at a git revision, as a variant file")
    ex.add_argument("rev")
    ex.add_argument("--module", default="triangle_multiply", choices=sorted(OPS))
    ex.add_argument("--to", default="scratch/variants")
    r = sub.add_parser("run", help="time the variants (GPU)")
    r.add_argument("--op", required=True, choices=sorted(OPS))
    r.add_argument("--shape", default=None, help="the case's shape name (layernorm_linear: e.g. 128->16)")
    r.add_argument("--ns", type=int, nargs="+", default=[384, 768])
    r.add_argument("--variant", action="append", default=[], help="NAME=PATH of a kernel module copy")
    r.add_argument("--pin", action="append", default=[], help="VARIANT:OP=JSON config for every key of OP")
    r.add_argument("--choices", action="append", default=[],
                   help="VARIANT=PATH of an autotune.json: that variant launches the file's choice "
                        "for each shape key the file has (e.g. a forced re-tune's picks)")
    r.add_argument("--peers", nargs="*", default=[],
                   help="other implementations of the benchmark case to time in the same rounds "
                        "(e.g. cueq compile; their own code, errors checked the same way)")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--breakdown", type=int, nargs="*", default=[])
    r.add_argument("--fp32-autocast", action="store_true")
    r.add_argument("--name", required=True)
    r.add_argument("--note", default="")
    r.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(export(args.rev, args.module, Path(args.to)))
    else:
        run(args)


if __name__ == "__main__":
    main()
