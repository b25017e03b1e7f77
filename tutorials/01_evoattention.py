# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · EvoAttention: from the PyTorch reference to a Triton kernel
#
# AlphaFold3 spends most of its time and memory in one operation: attention over the last
# token axis with a *pair bias shared by every row*. Triangle attention runs it with S = N rows
# of N tokens, the Pairformer's single attention with S = 1, the diffusion transformer with S
# noised samples sharing one bias, and MSA pair-weighted averaging with S MSA rows. For
# q, k, v, gate of shape `[B, S, N, H, D]`, bias `[B, H, N, N]` and a key mask `[B, S, N]`:
#
# $$\mathrm{out}_{s,i,h} = \sigma(g_{s,i,h}) \sum_j \mathrm{softmax}_j\big(q_{s,i,h}\cdot k_{s,j,h}/\sqrt{D} + b_{h,i,j}\big)\, v_{s,j,h}$$
#
# This tutorial goes from the plain PyTorch version to megafold's Triton kernel: why the
# reference runs out of memory, the online softmax that avoids it, a 40-line Triton forward
# kernel, and then the real kernel (masking, any strides, a deterministic backward) checked
# against float64 and timed on the GPU.

# %%
# Setup: works locally and in a fresh Colab runtime (there it clones and installs megafold).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("megafold") is None:
    repository = os.environ.get("MEGAFOLD_REPO", "https://github.com/megafold/megafold.git")
    subprocess.check_call(["git", "clone", "--depth", "1", repository, "megafold"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", "megafold[data,notebooks]"])
    sys.path.insert(0, os.path.abspath("megafold"))

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in the interpreter
    torch.set_num_threads(1)  # the CPU configs are tiny: more threads only add overhead

import megafold.viz as viz
from megafold.profile import describe_device

viz.init_notebook()  # plotly and 3Dmol.js render offline
DEVICE = describe_device()
print(f"running on {DEVICE}")

# %%
import math
import time

import pandas as pd
import torch
from IPython.display import display

from megafold.kernels import evo_attention
from megafold.kernels.evo_attention import evo_attention_reference

torch.manual_seed(0)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def random_inputs(B, S, N, H, D, dtype=torch.float32, device="cpu", requires_grad=False):
    """Fresh random q, k, v, gate [B, S, N, H, D], bias [B, H, N, N] and a mask with a few keys off."""
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    mask = torch.rand(B, S, N, device=device) > 0.1
    return {"q": make(B, S, N, H, D), "k": make(B, S, N, H, D), "v": make(B, S, N, H, D),
            "gate": make(B, S, N, H, D), "bias": make(B, H, N, N), "mask": mask}


# %% [markdown]
# ## 1. The reference, and what it costs
#
# The eager version is four lines: scores, bias, softmax, weighted sum. It materialises the
# scores `[B, S, H, N, N]`: for triangle attention (S = N) that is N³·H numbers, kept for the
# backward pass.

# %%
inputs = random_inputs(1, 8, 24, 2, 16, dtype=torch.float64)
q, k, v, gate, bias, mask = (inputs[n] for n in ("q", "k", "v", "gate", "bias", "mask"))
scores = torch.einsum("bsihd,bsjhd->bshij", q, k) / math.sqrt(q.shape[-1]) + bias[:, None]
scores = scores.masked_fill(~mask[:, :, None, None, :], float("-inf"))
by_hand = torch.einsum("bshij,bsjhd->bsihd", scores.softmax(-1), v) * gate.sigmoid()
print("by hand vs megafold's reference:", relative_error(by_hand, evo_attention_reference(**inputs)))

rows = []
for n in (256, 384, 512, 768, 1024):
    heads = 4  # AF3 triangle attention: 4 heads of 32
    rows.append({"N (tokens)": n, "scores of one triangle attention (GiB, bf16)": n**3 * heads * 2 / 2**30})
# display() rather than the cell's last value: a DataFrame kept in the notebook's globals (as
# `_` and `Out`) breaks Triton 3.2's interpreter, which compares every global of a kernel
# defined here with triton.language.
display(pd.DataFrame(rows).set_index("N (tokens)").round(2))

# %% [markdown]
# Two triangle attentions per Pairformer block, 48 blocks: at crop 768 the eager scores alone
# would need hundreds of GiB without checkpointing. The way out is never to hold a row of
# scores whole.
#
# ## 2. Online softmax
#
# Walk over the keys in blocks and keep, per query, the running maximum `m`, the running sum
# of exponentials `l` and the running weighted sum `acc`. When a new block raises the maximum,
# rescale what was accumulated by `exp(m_old - m_new)`. The invariant after each block:
# `acc / l` is the softmax-weighted average of the values seen so far.

# %%
def online_softmax_attention(q, k, v, bias, block=8):
    """One row, one head: q, k, v [N, D], bias [N, N]; keys visited `block` at a time."""
    n = q.shape[0]
    m = torch.full((n,), -math.inf, dtype=q.dtype)
    l = torch.zeros(n, dtype=q.dtype)
    acc = torch.zeros_like(q)
    for start in range(0, n, block):
        s = q @ k[start:start + block].T / math.sqrt(q.shape[-1]) + bias[:, start:start + block]
        m_new = torch.maximum(m, s.max(-1).values)
        p = torch.exp(s - m_new[:, None])
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[:, None] + p @ v[start:start + block]
        m = m_new
    return acc / l[:, None]


row, head = 3, 1
plain = torch.softmax(q[0, row, :, head] @ k[0, row, :, head].T / 4 + bias[0, head], -1) @ v[0, row, :, head]
print("online softmax vs plain softmax:", relative_error(
    online_softmax_attention(q[0, row, :, head], k[0, row, :, head], v[0, row, :, head], bias[0, head]), plain))

# %% [markdown]
# ## 3. A Triton forward kernel in 40 lines
#
# One program per (query block, row, head). It loads its queries once, then streams the keys
# and values of its row block by block, adds the bias tile, and keeps `m`, `l`, `acc` in
# registers: memory traffic is O(N) per query and nothing of size N x N is ever stored. (On
# the CPU this runs in Triton's interpreter.)

# %%
import triton
import triton.language as tl


@triton.jit
def attention_forward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, N, scale,
                             H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q, k, v, out: contiguous [S, N, H, D]; bias: contiguous [H, N, N]
    block_m, row, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    base = row * N * H * D + head * D
    q = tl.load(q_ptr + base + offs_m[:, None] * H * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys = offs_n[:, None] < N
        k = tl.load(k_ptr + base + offs_n[:, None] * H * D + offs_d[None, :], mask=keys, other=0.0)
        v = tl.load(v_ptr + base + offs_n[:, None] * H * D + offs_d[None, :], mask=keys, other=0.0)
        b = tl.load(bias_ptr + head * N * N + offs_m[:, None] * N + offs_n[None, :],
                    mask=(offs_m[:, None] < N) & (offs_n[None, :] < N), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale + b
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        # Invariant: acc / l_i is the softmax-weighted mean of the values seen so far, m_i their max logit.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(out_ptr + base + offs_m[:, None] * H * D + offs_d[None, :], acc / l_i[:, None], mask=offs_m[:, None] < N)


def triton_attention(q, k, v, bias, block=16):
    """q, k, v [S, N, H, D] and bias [H, N, N], contiguous float32: no mask, no gate."""
    S, N, H, D = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(N, block), S, H)
    attention_forward_kernel[grid](q, k, v, bias, out, N, D**-0.5, H=H, D=D, BLOCK_M=block, BLOCK_N=block)
    return out


device = "cuda" if ON_GPU else "cpu"
small = {n: t.to(device=device, dtype=torch.float32).contiguous() for n, t in random_inputs(1, 4, 40, 2, 16).items()}
ours = triton_attention(small["q"][0], small["k"][0], small["v"][0], small["bias"][0])
reference = evo_attention_reference(*(small[n].double() for n in ("q", "k", "v")), bias=small["bias"].double())
print("40-line Triton kernel vs float64 reference:", relative_error(ours, reference[0]))

# %% [markdown]
# ## 4. megafold's kernel: masks, strides and a deterministic backward
#
# `megafold.kernels.evo_attention` adds what training needs: the key mask (a row whose keys
# are all masked gives 0 and a zero gradient, never NaN), the output gate, inputs of any
# strides (the ending-node triangle attention passes transposed views, without a copy), and a
# backward pass in three kernels that each own what they write (dK/dV, dQ, dBias: no atomics,
# so the bias gradient is bit-for-bit reproducible). In a padded crop most key blocks are
# whole: one small pass finds each row's first masked key before the forward, and the
# forward, dQ and dBias passes take the blocks before it without the mask (no mask load, no
# select: ~8% of a triangle attention's fwd+bwd on an H100). Below: output and every gradient
# against the float64 reference.

# %%
def check(B, S, N, H, D, dtype):
    inputs = random_inputs(B, S, N, H, D, dtype=dtype, device=device, requires_grad=True)
    inputs["mask"][:, 0] = False  # one row with every key masked
    grad_out = torch.randn(B, S, N, H, D, dtype=dtype, device=device)
    out = evo_attention(**inputs, backend="triton")
    grads = torch.autograd.grad(out, [inputs[n] for n in ("q", "k", "v", "gate", "bias")], grad_out)
    exact = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t) for n, t in inputs.items()}
    ref = evo_attention_reference(**exact)
    ref_grads = torch.autograd.grad(ref, [exact[n] for n in ("q", "k", "v", "gate", "bias")], grad_out.double())
    row = {"shape": f"B{B} S{S} N{N} H{H} D{D}", "dtype": str(dtype).replace("torch.", ""), "out": relative_error(out, ref)}
    row.update({f"d{n}": relative_error(g, r) for n, g, r in zip(("q", "k", "v", "gate", "bias"), grads, ref_grads)})
    row["masked row is 0"] = bool((out[:, 0] == 0).all() and torch.isfinite(out).all())
    return row


shapes = [(1, 6, 20, 2, 16), (1, 1, 33, 4, 8)] + ([(1, 256, 256, 4, 32), (1, 1, 384, 16, 24)] if ON_GPU else [])
dtypes = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
print(DEVICE)
display(pd.DataFrame([check(*shape, dtype) for shape in shapes for dtype in dtypes]).set_index(["shape", "dtype"]))

# %% [markdown]
# float32 errors sit far below 1e-3; bf16 ones near 1e-3..1e-2, what bf16 inputs allow.
#
# ## 5. Speed and memory
#
# Forward + backward of triangle attention (S = N, 4 heads of 32, bf16) on the GPU: time
# (median of CUDA-event timings) and peak memory, eager reference against the kernel. On the
# CPU the kernel runs in Triton's interpreter, which says nothing about speed: the table then
# compares a few tiny shapes only to show the mechanics.

# %%
import plotly.graph_objects as go


def measure(fn, reps):
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps + 1):  # the first call compiles / warms up
        start = time.perf_counter()
        if ON_GPU:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        fn()
        if ON_GPU:
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            times.append(1e3 * (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if ON_GPU else float("nan")
    return sorted(times[1:])[len(times[1:]) // 2], peak


sizes = (128, 256, 384, 512) if ON_GPU else (8, 12)
dtype = torch.bfloat16 if ON_GPU else torch.float32
heads, head_dim = (4, 32) if ON_GPU else (2, 8)
rows = []
for n in sizes:
    inputs = random_inputs(1, n, n, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.randn_like(inputs["q"])
    for backend in ("torch", "triton"):
        def step():
            out = evo_attention(**inputs, backend=backend)
            out.backward(grad_out)
        ms, peak = measure(step, reps=5 if ON_GPU else 1)
        rows.append({"N": n, "backend": backend, "fwd+bwd ms": ms, "peak MiB": peak})
timings = pd.DataFrame(rows)
fig = go.Figure([go.Bar(x=timings[timings.backend == b]["N"].astype(str), y=timings[timings.backend == b]["fwd+bwd ms"], name=b)
                 for b in ("torch", "triton")])
fig.update_layout(title=f"Triangle attention, forward + backward ({DEVICE})", xaxis_title="N (tokens)", yaxis_title="ms",
                  barmode="group", height=380)
fig.show()
timings.pivot(index="N", columns="backend", values=["fwd+bwd ms", "peak MiB"]).round(2)

# %% [markdown]
# The full benchmark (every shape AF3 uses, torch.compile and FlexAttention rows, results as
# JSON) is `python benchmarks/kernels.py`; the kernel's source, top to bottom, is
# `megafold/kernels/evo_attention.py`.
#
# Two ways to read its times. A plain call includes the host's work: Python, autograd and
# one launch per kernel, which at small N can take longer than the kernels themselves (on
# the H100 host behind `benchmarks/results`, 1-3 ms per pair op at N = 384). With `--graph`
# each implementation is also captured once in a CUDA graph and replayed, which leaves only
# GPU time: what the op costs inside a graphed training step (megafold's trunk and diffusion
# chunks run that way). `python benchmarks/pair_breakdown.py` splits one call into its kernels
# and reports the host's own time next to them.
