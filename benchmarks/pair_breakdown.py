"""Where each pair op's time goes: device time per kernel (torch.profiler), fwd + bwd, bf16.

    python benchmarks/pair_breakdown.py [--ns 384,768] [--impls megafold,compile] [--out DIR]

For every case of benchmarks/_pair_ops.py (the shapes benchmarks/kernels.py times) and each
implementation named, one forward + backward is run under the PyTorch profiler (after a
warm-up call) and the kernels are listed by device time per call, with their sum and the
wall time of the same call. The gap between the two is time the GPU waits for the host.
``host_ms`` is the host's own time per call: ten calls issued back to back without a sync
(the GPU queue absorbs them), timed on the host clock. ``--cprofile K`` prints the K
functions with the most own time in ten megafold calls (cProfile slows Python; compare the
functions with each other).
JSON: results/<gpu>/<date>-pair_breakdown.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import environment, kernel_breakdown, time_ms, write_json  # noqa: E402


def host_ms(step, calls: int = 10) -> float:
    """The host's time per call, ``calls`` calls issued without a sync in between."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return host


def own_time(step, top: int, calls: int = 10) -> str:
    """The ``top`` functions by own time over ``calls`` calls, as cProfile's table."""
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="384,768")
    parser.add_argument("--impls", default="megafold,compile")
    parser.add_argument("--ops", default="layernorm_linear,transition,triangle_multiply,outer_product_mean")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per case")
    parser.add_argument("--cprofile", type=int, default=0, help="functions listed per megafold case")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pair_breakdown: needs a GPU (device time per kernel)")
    import _pair_ops

    device = torch.device("cuda")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit'][:10]}")
    rows = []
    ops = args.ops.split(",")
    for case in _pair_ops.cases(False, device, [int(n) for n in args.ns.split(",")]):
        if case.op not in ops:
            continue
        for name in args.impls.split(","):
            fn = case.implementations.get(name)
            if fn is None:
                continue
            torch._dynamo.reset()
            inputs = case.make_inputs()

            def step():
                out = fn(inputs)
                out.backward(torch.ones_like(out))
                for value in inputs.values():
                    value.grad = None

            try:
                wall = time_ms(step)
                host = host_ms(step)
                kernels = kernel_breakdown(step, steps=3)
            except Exception as error:  # a failing peer is a row, not a crash
                rows.append({"op": case.op, "shape": case.shape, "N": case.N, "impl": name, "error": str(error)[:200]})
                print(f"{case.op} {case.shape} N={case.N} {name}: {error}")
                continue
            total = sum(kernels.values())
            rows.append({"op": case.op, "shape": case.shape, "N": case.N, "impl": name, "wall_ms": wall,
                         "host_ms": host, "device_ms": total, "kernels": kernels})
            print(f"\n{case.op} {case.shape} N={case.N} {name}: wall {wall:.3f} ms, host {host:.3f} ms, "
                  f"kernels {total:.3f} ms, {len(kernels)} kernel names")
            for kernel, ms in list(kernels.items())[: args.top]:
                print(f"   {ms:8.3f}  {kernel}")
            if args.cprofile and name == "megafold":
                rows[-1]["cprofile"] = own_time(step, args.cprofile)
                print(rows[-1]["cprofile"])
            del inputs
            torch.cuda.empty_cache()
    path = write_json("pair_breakdown", env, rows, {"ns": args.ns, "impls": args.impls}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
