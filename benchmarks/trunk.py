"""Trunk benchmark: the 48-block Pairformer of the "paper" config, forward + backward.

    python benchmarks/trunk.py [--ns 384,768] [--stacks eager,triton,cueq,compile] [--longest]

bf16 autocast and per-block activation checkpointing (pair activations stored in bf16), as in
the "paper" preset, in training mode (dropout on). Stacks: eager (kernels torch), triton (megafold kernels), compile
(torch.compile of each eager block), cueq (cuEquivariance's triangle attention and triangle
multiplication in the same modules, when cuequivariance_torch is importable), triton-offload
(triton with the checkpointed bf16 pair copies in pinned host memory: ``pair_offload``; its
peak counts GPU memory only); any of them but triton-offload with ``-graph`` (the step
captured once and replayed as one CUDA graph: ``megafold.train.graphs.GraphedStep``; its peak is
the capture's, the memory its graph pool holds). Step time is the
median of timed steps after one warm-up step; peak memory is the allocator's peak during a step
above what the inputs and weights hold. ``--longest`` steps N up by 128 from the last size until
a step runs out of memory and records the longest that fit (one untimed step per size, from
``--longest-from``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import environment, is_oom, kernel_breakdown, print_table, stop_gracefully, write_json  # noqa: E402

from megafold.model import preset  # noqa: E402
from megafold.model.pairformer import PairformerStack, TriangleAttention, TriangleMultiplication  # noqa: E402


@contextlib.contextmanager
def cueq_modules():
    """TriangleAttention and TriangleMultiplication on cuEquivariance's kernels, same weights."""
    import cuequivariance_torch as cuet

    from megafold.kernels import layernorm_linear

    def tri_mul(self, pair, pair_mask):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else pair.dtype
        w = {n: (p.to(dtype) if p.dim() == 2 else p) for n, p in self.named_parameters(recurse=False)}
        return cuet.triangle_multiplicative_update(
            pair.to(dtype), direction="outgoing" if self.outgoing else "incoming", mask=pair_mask.to(dtype),
            norm_in_weight=w["norm_in_weight"], norm_in_bias=w["norm_in_bias"],
            p_in_weight=w["ab_proj_weight"], g_in_weight=w["ab_gate_weight"],
            norm_out_weight=w["norm_out_weight"], norm_out_bias=w["norm_out_bias"],
            p_out_weight=w["out_proj_weight"], g_out_weight=w["out_gate_weight"],
        )

    def tri_attn(self, pair, pair_mask):
        H, D = self.heads, self.head_dim
        proj = layernorm_linear(pair, self.norm_weight, self.norm_bias, self.in_proj_weight, backend="torch")
        q, k, v, gate = proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3)
        bias = proj[..., 4 * H * D:]
        if self.ending:
            q, k, v, gate = (t.transpose(1, 2) for t in (q, k, v, gate))
            bias, mask = bias.permute(0, 3, 2, 1), pair_mask.transpose(1, 2)
        else:
            bias, mask = bias.permute(0, 3, 1, 2), pair_mask
        # cuEquivariance's layout: [B, S, H, N, D], bias [B, 1, H, N, N], mask [B, S, 1, 1, N].
        out = cuet.triangle_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3),
                                      bias[:, None], mask[:, :, None, None, :])
        out = out.transpose(2, 3) * torch.sigmoid(gate)
        out = torch.nn.functional.linear(out.flatten(-2), self.out_proj_weight.to(out.dtype))
        return out.transpose(1, 2) if self.ending else out

    saved = TriangleMultiplication.forward, TriangleAttention.forward
    TriangleMultiplication.forward, TriangleAttention.forward = tri_mul, tri_attn
    try:
        yield
    finally:
        TriangleMultiplication.forward, TriangleAttention.forward = saved


def build_stack(kernels: str, device, offload: bool = False) -> tuple[PairformerStack, object]:
    config = preset("paper", kernels=kernels, pair_offload=offload)
    stack = PairformerStack(config, config.pairformer_blocks, config.c_z, config.c_s).to(device)
    return stack, config


def step_fn(stack, config, N, device, compiled=False, graph=False):
    """One forward + backward of ``stack`` on fixed random inputs; with ``graph`` a
    ``GraphedStep`` of it (captured after one warm-up run), else an eager step that clears the
    gradients after itself."""
    from megafold.kernels import use_kernels
    from megafold.train.graphs import GraphedStep

    pair = torch.randn(1, N, N, config.c_z, device=device, requires_grad=True)
    single = torch.randn(1, N, config.c_s, device=device, requires_grad=True)
    token_mask = torch.ones(1, N, dtype=torch.bool, device=device)
    token_mask[:, N - max(1, N // 20):] = False  # crop padding
    pair_mask = token_mask[:, :, None] & token_mask[:, None, :]
    if compiled:
        for i, block in enumerate(stack.blocks):
            stack.blocks[i] = torch.compile(block, dynamic=False)

    def body():
        with use_kernels(config.kernels), torch.autocast("cuda", torch.bfloat16):
            pair_out, single_out = stack(pair, single, pair_mask, token_mask)
        loss = pair_out.float().square().mean() + single_out.float().square().mean()
        loss.backward()
        return loss

    if graph:
        return GraphedStep(body, [*stack.parameters(), pair, single])

    def step():
        body()
        stack.zero_grad(set_to_none=True)
        pair.grad = single.grad = None

    return step


KERNELS = {"eager": "torch", "compile": "torch", "triton": "triton", "triton-offload": "triton", "cueq": "torch"}
# "<stack>-graph": the same stack's step captured once and replayed as one CUDA graph
# (megafold.train.graphs.GraphedStep); its peak is the capture's.
KERNELS.update({f"{name}-graph": kernels for name, kernels in KERNELS.items() if name != "triton-offload"})


def measure(name, N, device, reps=2, breakdown=False):
    """Median step seconds and peak GiB over ``reps`` timed steps after a warm-up step
    (``reps=0``: the warm-up step alone, to see whether N fits), and with ``breakdown`` the
    device ms per kernel name of one more step (else None)."""
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    base_name, graph = name.removesuffix("-graph"), name.endswith("-graph")
    context = cueq_modules() if base_name == "cueq" else contextlib.nullcontext()
    with context:
        stack, config = build_stack(KERNELS[name], device, offload=name == "triton-offload")
        step = step_fn(stack, config, N, device, compiled=base_name == "compile", graph=graph)
        step()  # warm-up: compilation, tuning (a graph's first replay)
        torch.cuda.synchronize()
        if not reps:
            del stack, step
            torch.cuda.empty_cache()
            return None, None, None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (step.peak_bytes if graph else torch.cuda.max_memory_allocated() - base) / 2**30
        kernels = kernel_breakdown(step, steps=1) if breakdown else None
    del stack, step
    torch.cuda.empty_cache()
    return statistics.median(times), peak, kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="384,768")
    parser.add_argument("--stacks", default="eager,triton,cueq,compile")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--longest", action="store_true", help="also step N up by 128 until OOM")
    parser.add_argument("--longest-stacks", default="triton")
    parser.add_argument("--longest-from", type=int, default=None, help="first N of the search (default: the largest --ns)")
    parser.add_argument("--longest-step", type=int, default=128)
    parser.add_argument("--max-n", type=int, default=3072)
    parser.add_argument("--breakdown", action="store_true",
                        help="also the device time per kernel of one step (the top --top names)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/trunk.py needs a GPU")
    device = torch.device("cuda")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    rows: list[dict] = []
    stacks = args.stacks.split(",")
    ns = [int(n) for n in args.ns.split(",")]
    with stop_gracefully() as stopped:  # a `timeout` still leaves the rows that finished
        _measure_all(args, stacks, ns, device, rows)
    path = write_json("trunk", env, rows, {"preset": "paper", "blocks": 48, "bf16": True, "checkpoint": True,
                                           "ns": ns, "interrupted": stopped["interrupted"]}, args.out)
    print()
    print_table(rows, ["stack", "N", "step_s", "peak_gib", "device_s", "longest_N", "error"])
    print(f"\nwrote {path}")


def _measure_all(args, stacks: list[str], ns: list[int], device, rows: list[dict]) -> None:
    """Every stack at every N (appending to ``rows`` as each finishes), then the longest crops."""
    for name in stacks:
        if name.startswith("cueq"):
            try:
                import cuequivariance_torch  # noqa: F401
            except ImportError:
                print("cueq stack skipped: cuequivariance_torch not importable")
                continue
        for N in ns:
            row = {"stack": name, "N": N}
            try:
                row["step_s"], row["peak_gib"], kernels = measure(name, N, device, args.reps, args.breakdown)
                if kernels:
                    row["device_s"] = sum(kernels.values()) / 1e3
                    row["kernels_ms"] = {k: round(v, 2) for k, v in list(kernels.items())[: args.top]}
                    for kernel, ms in row["kernels_ms"].items():
                        print(f"      {ms:9.2f} ms  {kernel}")
            except Exception as error:
                row["error"] = "OOM" if is_oom(error) else f"{type(error).__name__}: {error}"[:200]
                torch.cuda.empty_cache()
            rows.append(row)
            print("  ", {k: v for k, v in row.items() if k != "kernels_ms"}, flush=True)
    if args.longest:
        for name in args.longest_stacks.split(","):
            longest, N = None, args.longest_from or max(ns)
            while N <= args.max_n:
                try:
                    measure(name, N, device, reps=0)
                    longest = N
                    print(f"   {name}: N={N} fits", flush=True)
                except Exception as error:
                    if not is_oom(error):
                        raise
                    print(f"   {name}: N={N} out of memory", flush=True)
                    torch.cuda.empty_cache()
                    break
                N += args.longest_step
            rows.append({"stack": name, "longest_N": longest, "max_tried": N})


if __name__ == "__main__":
    main()
