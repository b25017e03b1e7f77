"""Host time of one EvoAttention forward + backward at the pair-bias shape, next to SDPA's.

    python benchmarks/host_overhead.py [--ns 384,1024] [--dims 24,64] [--tri-ns 256]
        [--reps 400] [--profile] [--launches]

``--tri-ns`` adds the triangle shape (S = N, H = 4, D = 32) at those N; there the GPU may be
the bound (``gpu_us`` tells). At S = 1 the GPU work is 0.05-0.3 ms and a plain call's time is
the host's. kernels.py times each call alone after flushing L2 (``triton.testing.do_bench``),
and on the H100 hosts those figures move by 2x between runs of the same shape. Here each
implementation runs ``--reps`` calls back to back with no synchronisation inside: the host's
time per call is the loop's wall time over the reps, while the GPU has less work per call than
the host and never holds the loop back. (``gpu_us`` is the span of CUDA events around the loop,
per call: equal to ``host_us`` when the host is the bound, larger when the GPU is.) The rows
are interleaved (A B C A B C ...) over ``--rounds`` rounds and the median of the rounds is
reported, so a slow patch of the host hits every row alike.

Rows: megafold (the op), ``megafold_triton_path`` (the op with every launch through Triton's
``kernel[grid](...)``, as before ``_common.launch_kernel`` launched compiled kernels directly),
``megafold_before_session36`` (launches that take tensor descriptors through Triton's path,
the others direct, and every descriptor built by Triton's constructor: as before session 36,
when ``launch_kernel`` keyed a descriptor as itself, an unhashable dataclass),
sdpa (kernels.py's SDPA row: bias + key mask, SDPA, gate), and three floors: ``autograd`` (a
torch.autograd.Function whose forward and backward only allocate the outputs: what any custom
op pays), ``triton_launch`` (one launch of an empty two-argument Triton kernel through
Triton's path) and ``direct_launch`` (the same launch through ``launch_kernel``).
``--profile`` adds cProfile's top functions of the megafold row to the JSON; ``--launches``
adds a row per launch of one megafold forward and backward, replayed alone: through
``launch_kernel``, its argument key alone, and the compiled launcher alone.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_json  # noqa: E402
from kernels import evo_implementations, evo_inputs  # noqa: E402

from megafold.kernels import _common  # noqa: E402


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    if n < 0:  # never true: the launch is what is measured
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


class _AllocOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, gate):
        ctx.save_for_backward(q, k, v, bias, mask, gate)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask, gate = ctx.saved_tensors
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias), None,
                torch.empty_like(gate))


def host_us(fn, reps: int) -> tuple[float, float]:
    """(host us per call, GPU us per call) over ``reps`` back-to-back calls."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) * 1e3 / reps


def launch_costs(step, reps: int) -> list[dict]:
    """Host us of each launch of one ``step`` (a forward and backward), replayed ``reps`` times
    with its recorded arguments: through ``launch_kernel`` (key and launcher), the argument
    key alone, and the compiled launcher alone (which builds the TMA maps of descriptors)."""
    recorded = []
    real = _common.launch_kernel

    def record(kernel, grid, *a, **meta):
        recorded.append((kernel, tuple(grid), a, meta))
        return real(kernel, grid, *a, **meta)

    modules = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("megafold.kernels.") and hasattr(m, "launch_kernel")]
    for m in modules:
        m.launch_kernel = record
    try:
        step()
    finally:
        for m in modules:
            m.launch_kernel = real
    descriptor = _common._descriptor_class()
    rocm = torch.version.hip is not None
    out = []
    for kernel, grid, a, meta in recorded:
        key = (kernel, torch.cuda.current_device(), _common._argument_key(a, rocm), *meta.items())
        entry = _common._launchers.get(key)
        replay = lambda: real(kernel, grid, *a, **meta)  # noqa: E731
        launch_us = host_us(replay, reps)[0]
        key_us = host_us(lambda: _common._argument_key(a, rocm), reps)[0]
        launcher_us = float("nan")
        if entry is not None:
            _, run, function, packed, tail = entry
            n = len(grid)
            stream = torch.cuda.current_stream().cuda_stream
            launcher_us = host_us(lambda: run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                                              function, packed, None, None, None, *a, *tail), reps)[0]
        out.append({"kernel": getattr(kernel, "__name__", str(kernel)), "launch_us": launch_us, "key_us": key_us,
                    "launcher_us": launcher_us, "direct": entry is not None,
                    "descriptors": sum(type(x) is descriptor for x in a) if descriptor else 0, "args": len(a)})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="384,1024")
    parser.add_argument("--dims", default="24,64", help="head dims (H = 16, S = 1)")
    parser.add_argument("--tri-ns", default="", help="triangle-shape N (S = N, H = 4, D = 32)")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--launches", action="store_true", help="host us of each launch of a forward and backward")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    env = environment()
    rows = []
    x = torch.empty(16, device=device)
    launch = lambda: _empty_kernel[(1,)](x, 16, BLOCK=16)  # noqa: E731
    direct = lambda: _common.launch_kernel(_empty_kernel, (1,), x, 16, BLOCK=16)  # noqa: E731

    def through_triton(step):
        def run():
            saved = list(_common._fast)
            _common._fast[:] = [None]  # launch_kernel takes Triton's path
            try:
                step()
            finally:
                _common._fast[:] = saved
        return run

    descriptor = _common._descriptor_class()

    class _NoFields(dict):  # tensor_descriptor keeps no tile's fields: the constructor every time
        def __setitem__(self, key, value):
            pass

    def descriptors_through_triton(step):
        real_key, real_fields = _common._argument_key, _common._descriptor_fields

        def before_session36(launch_args, rocm):
            if any(type(a) is descriptor for a in launch_args):
                raise TypeError("a descriptor, unhashable as launch_kernel keyed it")
            return real_key(launch_args, rocm)

        def run():
            _common._argument_key, _common._descriptor_fields = before_session36, _NoFields()
            try:
                step()
            finally:
                _common._argument_key, _common._descriptor_fields = real_key, real_fields
        return run

    shapes = [("pairbias", 1, N, 16, D) for D in (int(d) for d in args.dims.split(","))
              for N in (int(n) for n in args.ns.split(","))]
    shapes += [("tri", N, N, 4, 32) for N in (int(n) for n in args.tri_ns.split(",") if n)]
    for family, S, N, H, D in shapes:
        label = f"{family}{D}" if family == "pairbias" else family
        inputs = evo_inputs(S, N, H, D, device)
        grad_out = torch.randn_like(inputs["q"])
        leaves = tuple(inputs[k] for k in ("q", "k", "v", "bias", "gate"))
        impls = evo_implementations(S, N, H, D)
        steps = {}
        for name in ("megafold", "sdpa"):
            prepare, run = impls[name]
            x_in = prepare(inputs) if prepare else inputs
            steps[name] = (lambda r=run, xi=x_in: torch.autograd.grad(r(xi), leaves, grad_out))
            if name == "megafold":
                steps["megafold_triton_path"] = through_triton(steps[name])
                if descriptor is not None:
                    steps["megafold_before_session36"] = descriptors_through_triton(steps[name])
        steps["autograd"] = lambda: torch.autograd.grad(
            _AllocOnly.apply(*(inputs[k] for k in ("q", "k", "v", "bias", "mask", "gate"))), leaves, grad_out)
        steps["triton_launch"] = launch
        steps["direct_launch"] = direct
        for step in steps.values():  # compile, tune (off by default), warm the allocator
            for _ in range(20):
                step()
        samples = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                samples[name].append(host_us(step, args.reps))
        shape_rows = {}
        for name, values in samples.items():
            row = shape_rows[name] = {
                "shape": label, "N": N, "S": S, "H": H, "D": D, "impl": name,
                "host_us": statistics.median(v[0] for v in values),
                "host_us_rounds": [round(v[0], 1) for v in values],
                "gpu_us": statistics.median(v[1] for v in values)}
            rows.append(row)
            print(f"  {label:10s} N={N:5d} {name:32s} host {row['host_us']:8.1f} us/call   "
                  f"gpu {row['gpu_us']:8.1f} us/call", flush=True)
        if args.launches:
            for row in launch_costs(steps["megafold"], args.reps):
                row.update(shape=label, N=N, S=S, H=H, D=D, impl="launch:" + row.pop("kernel"))
                rows.append(row)
                print(f"  {label:10s} N={N:5d} {row['impl']:48s} launch {row['launch_us']:6.1f} us  "
                      f"key {row['key_us']:5.1f}  launcher {row['launcher_us']:6.1f}  "
                      f"descriptors {row['descriptors']}", flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.reps):
                steps["megafold"]()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            shape_rows["megafold"]["cprofile"] = text.getvalue()
            print(text.getvalue()[:4000])
    config = {"ns": args.ns, "dims": args.dims, "tri_ns": args.tri_ns, "reps": args.reps, "rounds": args.rounds}
    name = "host_overhead" + (f"-{args.tag}" if args.tag else "")
    print("wrote", write_json(name, env, rows, config, args.out))


if __name__ == "__main__":
    main()
