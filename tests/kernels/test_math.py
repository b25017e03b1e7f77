"""megafold.kernels._math: device functions shared by the kernels, against float64."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from megafold.kernels._math import sigmoid

# Relative error of the sigmoid where it is above 1e-19:
# - the fp32 rounding of t = -x log2(e) (half an ulp of t, |t| 2^-24) becomes a relative error
#   of ln(2) |t| 2^-24 = |x| 2^-24 in exp2(t), and up to that in the sigmoid: tl.sigmoid's
#   exp lowers to the same exp2 and shares it;
# - the rest: the approximate exp2 and rsqrt on a GPU (~2^-22 each) and the roundings of
#   1 + e and its square, within 3e-7 (~2.5 fp32 ulp).
# Below 1e-19 (x < -44) the result may be 0: an absolute error under 1e-19.
RTOL, RTOL_PER_X, ATOL = 3e-7, 2.0**-24, 1e-19


@triton.jit
def _sigmoid_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, sigmoid(x), mask=ok)


def _inputs(device) -> torch.Tensor:
    edges = [-float("inf"), -1e4, -100.0, -88.8, -50.0, -44.5, -43.0, -20.0, -1e-8, 0.0, 1e-8, 20.0,
             43.0, 44.5, 87.5, 88.8, 100.0, 1e4, float("inf")]
    x = torch.cat([torch.randn(3000, dtype=torch.float64) * 12, torch.tensor(edges, dtype=torch.float64)])
    return x.float().to(device)


def _check(device):
    x = _inputs(device)
    y = torch.full_like(x, float("nan"))
    _sigmoid_kernel[(triton.cdiv(x.numel(), 512),)](x, y, x.numel(), BLOCK=512)
    ref = torch.sigmoid(x.double())
    err = (y.double() - ref).abs()
    assert not torch.isnan(y).any()
    bad = err > ATOL + (RTOL + RTOL_PER_X * x.double().abs()) * ref
    assert not bad.any(), f"x={x[bad][:5].tolist()} got {y[bad][:5].tolist()} want {ref[bad][:5].tolist()}"
    assert y[x == float("inf")].item() == 1.0 and y[x == -float("inf")].item() == 0.0


def test_sigmoid_matches_float64_over_the_whole_range():
    _check("cpu")


@pytest.mark.gpu
def test_sigmoid_matches_float64_over_the_whole_range_on_the_gpu():
    """The GPU's approximate exp2 and rsqrt (the interpreter computes them exactly)."""
    _check("cuda")
