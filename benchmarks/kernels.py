"""Kernel benchmark: forward + backward, bf16, every implementation side by side in one run.

    python benchmarks/kernels.py [--quick] [--ops evo_attention,transition,...]

EvoAttention shapes (CONVENTIONS.md): triangle (B=1, S=N, H=4, D=32), pair-bias (S=1, H=16,
D=24 and 64), diffusion (S=48 samples sharing one bias, H=16, D=48), N in 256..1024; and two
shapes of the "paper" training step (`--shapes diffusion4,msa256`). The key
mask is a crop's padding (the last 5% of keys masked for every row). Rows: eager (the
reference), compile (torch.compile of the reference; dynamo reset between shapes so no shape
hits the recompile limit), sdpa, flex (FlexAttention, compiled, bias in score_mod, padding in
a block mask built outside the timed region), megafold, and cueq / trifast when importable.
Every implementation's output and gradients are checked against an fp32 reference in the
same run (rel_err = the largest relative error over output and gradients).
Pair ops (transition, layernorm_linear, triangle_multiply, outer_product_mean) come from
benchmarks/_pair_ops.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (  # noqa: E402
    dtype_for, environment, graph_time, is_oom, kernel_breakdown, peak_mib, print_table, rel_err, row_summary,
    stop_gracefully, time_ms, write_json,
)

from megafold.kernels import evo_attention  # noqa: E402
from megafold.kernels.evo_attention import evo_attention_reference  # noqa: E402
from megafold.kernels.testing import evo_attention_reference_chunked  # noqa: E402

EVO_SHAPES = {
    "tri": lambda n: dict(S=n, H=4, D=32),
    "pairbias24": lambda n: dict(S=1, H=16, D=24),
    "pairbias64": lambda n: dict(S=1, H=16, D=64),
    "diffusion": lambda n: dict(S=48, H=16, D=48),
    # The shapes the "paper" training step itself launches: its diffusion transformer's
    # 4-sample chunks, and the MSA module's pair-weighted averaging over 256 MSA rows (there q
    # and k are zero, which costs the kernels the same).
    "diffusion4": lambda n: dict(S=4, H=16, D=48),
    "msa256": lambda n: dict(S=256, H=8, D=32),
    # The triangle shape in the layouts the model has handed the op: q, k, v and gate as views
    # of one LayerNorm-linear output of ``width`` channels (4 x H x D, then H bias channels,
    # then zero padding), and the ending node's transposed views of it (``ending``).
    "tri_view516": lambda n: dict(S=n, H=4, D=32, width=516),
    "tri_view516_end": lambda n: dict(S=n, H=4, D=32, width=516, ending=True),
    "tri_view528": lambda n: dict(S=n, H=4, D=32, width=528),
}


def evo_inputs(S, N, H, D, device, dtype=torch.bfloat16, width=None, ending=False, generator=None):
    """Fresh inputs; q, k, v and gate are separate contiguous leaves, or (``width``) views of
    one ``[1, S, N, width]`` leaf, transposed (S and N swapped) with ``ending``. ``generator``:
    one of the benchmark's own (a failed CUDA-graph capture leaves the default one unusable)."""
    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_()

    mask = torch.ones(1, S, N, dtype=torch.bool, device=device)
    mask[..., N - max(1, N // 20):] = False  # crop padding
    if width is None:
        q, k, v, gate = (leaf(1, S, N, H, D) for _ in range(4))
    else:
        proj = leaf(1, N, S, width) if ending else leaf(1, S, N, width)
        q, k, v, gate = proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3)
        if ending:
            q, k, v, gate = (t.transpose(1, 2) for t in (q, k, v, gate))
    return {"q": q, "k": k, "v": v, "bias": leaf(1, H, N, N), "mask": mask, "gate": gate}


def evo_implementations(S, N, H, D):
    """name -> fn(inputs) -> output [1, S, N, H, D]. Layout changes a peer needs are made
    once, outside the timed region (its best setup), by the `prepare` of each entry."""
    impls = {
        "eager": (None, lambda x: evo_attention(**x, backend="torch")),
        "megafold": (None, lambda x: evo_attention(**x, backend="triton")),
    }
    compiled = torch.compile(evo_attention_reference, dynamic=False)
    impls["compile"] = (None, lambda x: compiled(**x))

    def sdpa_prepare(x):
        key_bias = torch.zeros(1, N, device=x["q"].device, dtype=x["bias"].dtype)
        key_bias.masked_fill_(~x["mask"][:, 0], float("-inf"))
        return {**x, "key_bias": key_bias}

    def sdpa(x):
        q, k, v = (t[0].permute(0, 2, 1, 3) for t in (x["q"], x["k"], x["v"]))  # [S, H, N, D]
        attn_bias = (x["bias"] + x["key_bias"][:, None, None, :]).expand(S, H, N, N)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return (out.permute(0, 2, 1, 3) * torch.sigmoid(x["gate"][0]))[None]

    impls["sdpa"] = (sdpa_prepare, sdpa)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def flex_prepare(x):
            keys = x["mask"][0, 0]
            block_mask = create_block_mask(lambda b, h, qi, kj: keys[kj], None, None, N, N,
                                           device=x["q"].device)
            return {**x, "block_mask": block_mask}

        def flex_run(x):
            bias = x["bias"][0]
            q, k, v = (t[0].permute(0, 2, 1, 3) for t in (x["q"], x["k"], x["v"]))

            def score_mod(score, b, h, qi, kj):
                return score + bias[h, qi, kj]

            out = flex(q, k, v, score_mod=score_mod, block_mask=x["block_mask"])
            return (out.permute(0, 2, 1, 3) * torch.sigmoid(x["gate"][0]))[None]

        impls["flex"] = (flex_prepare, flex_run)
    except ImportError:
        pass

    try:
        import cuequivariance_torch as cuet

        def cueq_prepare(x):
            # cuEquivariance wants [B, S, H, N, D] contiguous, bias [B, 1, H, N, N], mask [B, S, 1, 1, N].
            q, k, v = (t.detach().transpose(2, 3).contiguous().requires_grad_()
                       for t in (x["q"], x["k"], x["v"]))
            bias = x["bias"].detach().clone().requires_grad_()
            gate = x["gate"].detach().transpose(2, 3).contiguous().requires_grad_()
            return {"q": q, "k": k, "v": v, "bias": bias, "gate": gate,
                    "mask": x["mask"][:, :, None, None, :], "_grads_of": (q, k, v, bias, gate)}

        def cueq(x):
            out = cuet.triangle_attention(x["q"], x["k"], x["v"], x["bias"][:, None], x["mask"])
            return out * torch.sigmoid(x["gate"])

        impls["cueq"] = (cueq_prepare, cueq)
    except ImportError:
        pass

    if S == N:
        try:
            import trifast

            def trifast_prepare(x):
                # trifast wants [B, H, S, N, D] contiguous and mask True = masked, [B, S, N].
                q, k, v = (t.detach().permute(0, 3, 1, 2, 4).contiguous().requires_grad_()
                           for t in (x["q"], x["k"], x["v"]))
                bias = x["bias"].detach().clone().requires_grad_()
                gate = x["gate"].detach().permute(0, 3, 1, 2, 4).contiguous().requires_grad_()
                return {"q": q, "k": k, "v": v, "bias": bias, "gate": gate,
                        "mask": ~x["mask"], "_grads_of": (q, k, v, bias, gate)}

            def trifast_run(x):
                out = trifast.triangle_attention(x["q"], x["k"], x["v"], x["bias"], x["mask"])
                return out * torch.sigmoid(x["gate"])

            impls["trifast"] = (trifast_prepare, trifast_run)
        except ImportError:
            pass
    return impls


def _to_reference_layout(name, tensor, impl):
    """Gradients of peers that took another layout, back in [B, S, N, H, D] / [B, H, N, N]."""
    if name == "bias" or impl not in ("cueq", "trifast"):
        return tensor
    return tensor.transpose(2, 3) if impl == "cueq" else tensor.permute(0, 2, 3, 1, 4)


def bench_evo(ns, shapes, device, rows, breakdown=False, impls=None, graph=False):
    runs = [(shape, n, True) for shape in shapes for n in ns]
    if graph:
        # A small shape first, its rows not kept: in session 11 every implementation's capture
        # failed at the first shape of the process, and only there (cause not found).
        runs.insert(0, (shapes[0], 64, False))
    for shape, n, keep in runs:
        dims = EVO_SHAPES[shape](n)
        S, H, D = dims["S"], dims["H"], dims["D"]
        torch._dynamo.reset()
        generator = torch.Generator(device=device)
        generator.manual_seed(n)
        inputs = evo_inputs(S, n, H, D, device, dtype=dtype_for(device), width=dims.get("width"),
                            ending=dims.get("ending", False), generator=generator)
        grad_out = torch.randn(inputs["q"].shape, device=device, dtype=inputs["q"].dtype, generator=generator)
        leaves = ["q", "k", "v", "bias", "gate"]
        ref, ref_grads = evo_attention_reference_chunked(inputs, grad_out, dtype=torch.float32)
        for impl, (prepare, run) in evo_implementations(S, n, H, D).items():
            if impls and impl not in impls:
                continue
            row = {"op": "evo_attention", "shape": shape, "N": n, "S": S, "H": H, "D": D,
                   "impl": impl}
            try:
                x = prepare(inputs) if prepare else inputs
                grads_of = x.get("_grads_of") or tuple(inputs[k] for k in leaves)
                x = {k: v for k, v in x.items() if k != "_grads_of"}
                out = run(x)
                g_out = {"cueq": lambda g: g.transpose(2, 3).contiguous(),
                         "trifast": lambda g: g.permute(0, 3, 1, 2, 4).contiguous(),
                         }.get(impl, lambda g: g)(grad_out)
                grads = torch.autograd.grad(out, grads_of, g_out)
                out_ref_layout = _to_reference_layout("q", out, impl)
                errs = [rel_err(out_ref_layout, ref)]
                errs += [rel_err(_to_reference_layout(name, g, impl), ref_grads[name])
                         for name, g in zip(leaves, grads)]
                row["rel_err"] = max(errs)
                row["rel_err_out"] = errs[0]
                del out, grads

                def step():
                    o = run(x)
                    torch.autograd.grad(o, grads_of, g_out)

                row["ms"] = time_ms(step)
                row["peak_mib"] = peak_mib(step)
                if graph:
                    row.update(graph_time(step))
                if breakdown and device.type == "cuda":
                    row["kernels_ms"] = kernel_breakdown(step)
                    print("   ", {k: round(v, 3) for k, v in row["kernels_ms"].items()})
            except Exception as error:  # a peer that cannot run a shape is a row, not a crash
                row["error"] = ("OOM" if is_oom(error) else f"{type(error).__name__}: {error}")[:200]
            if not keep:
                continue
            rows.append(row)
            print(f"  {shape:10s} N={n:5d} {impl:9s} {row_summary(row)}", flush=True)
        del inputs, ref, ref_grads
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in 384, 768 only")
    parser.add_argument("--ops", default="evo_attention,pair",
                        help="comma list: evo_attention, pair (the four pair ops) or pair ops by name")
    parser.add_argument("--shapes", default="tri,pairbias24,pairbias64,diffusion",
                        help=f"comma list of: {', '.join(EVO_SHAPES)}")
    parser.add_argument("--ns", default=None, help="comma list of N (overrides --quick)")
    parser.add_argument("--breakdown", action="store_true", help="device time per megafold kernel")
    parser.add_argument("--impls", default=None, help="comma list of implementations to run")
    parser.add_argument("--graph", action="store_true",
                        help="also time every implementation replayed from a CUDA graph")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no GPU: a smoke run only (set TRITON_INTERPRET=1 for the megafold rows)")
    ns = [int(n) for n in args.ns.split(",")] if args.ns else ([384, 768] if args.quick else
                                                                [256, 384, 512, 768, 1024])
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit'][:10]}")
    ops = args.ops.split(",")
    rows: list[dict] = []
    with stop_gracefully() as stopped:  # a `timeout` still leaves the rows that finished
        if "evo_attention" in ops:
            bench_evo(ns, args.shapes.split(","), device, rows, args.breakdown,
                      args.impls.split(",") if args.impls else None, graph=args.graph and device.type == "cuda")
        if set(ops) - {"evo_attention"}:
            try:
                import _pair_ops
            except ImportError as error:
                print(f"pair ops skipped: {error}")
            else:
                pair_ops = _pair_ops.OPS if "pair" in ops else [op for op in ops if op in _pair_ops.OPS]
                _pair_ops.run(ns, device, rows, pair_ops, args.impls.split(",") if args.impls else None,
                              graph=args.graph and device.type == "cuda")
    from megafold.kernels._common import autotune_cache_path

    tuned = json.loads(autotune_cache_path().read_text()) if autotune_cache_path().exists() else {}
    path = write_json("kernels", env, rows, {"ns": ns, "ops": ops, "dtype": "bfloat16", "mode": "forward+backward",
                                             "graph": args.graph, "tuned": tuned,
                                             "interrupted": stopped["interrupted"]}, args.out)
    print()
    print_table(rows, ["op", "shape", "N", "impl", "ms", "graph_ms", "peak_mib", "rel_err", "error"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
