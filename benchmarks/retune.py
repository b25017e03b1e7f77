"""Forced re-tune of one op's benchmark shape keys on this GPU: every candidate compiled in
worker processes first, then each key timed (``MEGAFOLD_AUTOTUNE=force``).

    MEGAFOLD_CACHE_DIR=/tmp/retune python benchmarks/retune.py --op transition --ns 384 768
    MEGAFOLD_CACHE_DIR=/tmp/retune python benchmarks/retune.py --op evo_attention \\
        --shapes tri diffusion --ns 768 --only dkdv

The cases are the benchmarks' own: benchmarks/_pair_ops.py's for the pair ops (``--shapes``
picks some, e.g. layernorm_linear's ``128->512``) and EvoAttention's shapes of
benchmarks/kernels.py (``--shapes``, default ``tri``). ``--only`` tunes just the keys whose
``[op, key]`` JSON contains one of the given strings (an EvoAttention pass such as ``dkdv``,
or an op name such as ``transition_bwd``), through ``MEGAFOLD_AUTOTUNE_OPS`` (`tune_parts`);
every other key runs its stored choice or its default, untimed.
``--where TMA=true ROWS=2`` offers just the candidates with those settings (values in JSON),
e.g. only the new kind when the others were timed before: a key then keeps the best of those,
which the A/B (``variant_ab.py``) weighs against the shipped choice.

The choices land in ``$MEGAFOLD_CACHE_DIR/autotune.json`` and every candidate's time in
``autotune-trials.json`` beside it: ``variant_ab.py run --choices NAME=<that autotune.json>``
then times them against the shipped choices. This script writes
``results/<gpu>/<date>-retune-<op>.json``: one row per key tuned, with its choice and the best
candidate with and without tensor descriptors (``"TMA"``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

KERNEL_MODULES = ("evo_attention", "layernorm_linear", "transition", "triangle_multiply", "outer_product_mean")


def tune_parts(op: str, only: list[str]) -> tuple[str, ...]:
    """``MEGAFOLD_AUTOTUNE_OPS`` parts that select what ``--only`` names (empty: every key): each
    string as a part of an op's name (``transition_bwd``) and of the op's shape keys
    (``evo_attention:dkdv``, `_common.op_selected`)."""
    return (*only, *(f"{op}:{part}" for part in only))


def parse_where(items: list[str]) -> dict:
    """``["TMA=true", "ROWS=2"]`` -> ``{"TMA": True, "ROWS": 2}`` (each value read as JSON)."""
    where = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            where[name] = json.loads(value)
        except json.JSONDecodeError:
            sep = ""
        if not sep or not name:
            raise SystemExit(f"--where {item!r}: expected NAME=JSON, e.g. TMA=true or ROWS=2")
    return where


def offered(candidates: list[dict], where: dict) -> list[dict]:
    """The candidates whose configuration has every setting of ``where``."""
    return [c for c in candidates if all(c.get(name) == value for name, value in where.items())]


def offer_only(where: dict) -> None:
    """Make each kernel module's launcher tune over just the candidates ``offered`` by
    ``where``; a key left with none launches its default."""
    if not where:
        return
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"megafold.kernels.{name}")
        real = module.run_tuned

        def run(op, key, device, candidates, default, launch, rows=None, real=real):
            kept = offered(candidates, where)
            if not kept:
                return launch(default)
            return real(op, key, device, kept, default, launch, rows=rows)

        module.run_tuned = run


def summarize(trials: dict[str, list[dict]], op_prefix: str, only: list[str]) -> list[dict]:
    """One row per key of ``autotune-trials.json`` of an op named ``op_prefix*`` that ``only``
    selects: the choice and its time, the fastest candidate with and without descriptors, how
    many candidates there were and how many failed."""
    from megafold.kernels._common import op_selected

    parts = tune_parts(op_prefix, only)
    rows = []
    for name, tried in trials.items():
        op, key, _device = json.loads(name)
        if not op.startswith(op_prefix) or not op_selected(op, key, parts):
            continue
        timed = sorted((t for t in tried if "ms" in t), key=lambda t: t["ms"])
        chosen = next((t for t in tried if t.get("chosen")), None)
        row = {"op": op, "key": key, "chosen": chosen["config"] if chosen else None,
               "ms": chosen.get("ms") if chosen else None, "candidates": len(tried),
               "failed": sum("error" in t for t in tried)}
        for label, descriptors in (("pointer", False), ("descriptor", True)):
            best = next((t for t in timed if bool(t["config"].get("TMA")) == descriptors), None)
            row[f"{label}_ms"] = best["ms"] if best else None
            row[f"{label}_config"] = best["config"] if best else None
        rows.append(row)
    return rows


def cases(op: str, shapes: list[str], ns: list[int], device) -> list:
    import _pair_ops

    if op == "evo_attention":
        return [_pair_ops.evo_case(n, device, shape) for shape in shapes or ["tri"] for n in ns]
    found = [c for c in _pair_ops.cases(False, device, ns=ns) if c.op == op and (not shapes or c.shape in shapes)]
    if not found:
        sys.exit(f"no benchmark case of {op} with shapes {shapes}")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, choices=KERNEL_MODULES)
    parser.add_argument("--ns", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--shapes", nargs="*", default=[], help="the cases' shape names (default: every one)")
    parser.add_argument("--only", nargs="*", default=[], help="tune only keys whose [op, key] JSON contains one")
    parser.add_argument("--where", nargs="*", default=[], metavar="NAME=JSON",
                        help="offer only candidates with these settings, e.g. TMA=true ROWS=2")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: CPUs, at most 16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    where = parse_where(args.where)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/retune.py tunes for a GPU: there is none here")
    # Every selected key is tuned again, whatever is shipped or cached (read when a key is
    # first launched; the compile workers inherit both).
    os.environ["MEGAFOLD_AUTOTUNE"] = "force"
    os.environ["MEGAFOLD_AUTOTUNE_OPS"] = ",".join(tune_parts(args.op, args.only))

    from _harness import environment, print_table, write_json

    from megafold.kernels._common import autotune_cache_path, autotune_trials_path
    from megafold.kernels.precompile import compile_in_processes, record_launches

    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  cache {autotune_cache_path()}")
    offer_only(where)
    todo = cases(args.op, args.shapes, args.ns, torch.device("cuda"))

    def step(case):
        out = case.implementations["megafold"](case.make_inputs())
        out.float().sum().backward()

    records = []
    began = time.perf_counter()
    with record_launches(records, candidates=True):
        for case in todo:
            step(case)
    report = compile_in_processes(records, args.workers).wait()
    compile_s = round(time.perf_counter() - began, 1)
    print(f"{len(todo)} cases: compiled {report['compiled']} of {report['records']} launches in {compile_s} s")
    began = time.perf_counter()
    for case in todo:
        step(case)
    torch.cuda.synchronize()
    tune_s = round(time.perf_counter() - began, 1)
    rows = summarize(json.loads(autotune_trials_path().read_text()), args.op, args.only)
    command = " ".join(["python", "benchmarks/retune.py", *(argv if argv is not None else sys.argv[1:])])
    path = write_json(f"retune-{args.op}", env, rows,
                      {"op": args.op, "ns": args.ns, "shapes": args.shapes, "only": args.only, "where": where,
                       "compile_s": compile_s, "tune_s": tune_s, "compiled": report["compiled"],
                       "cache": str(autotune_cache_path()), "command": command}, args.out)
    print()
    print_table(rows, ["op", "key", "ms", "pointer_ms", "descriptor_ms", "failed"])
    print(f"\ntuned in {tune_s} s; choices in {autotune_cache_path()}\nwrote {path}")


if __name__ == "__main__":  # the compile workers are spawned: they import this file
    main()
