"""Elementwise device functions shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    """``1 / (1 + exp(-x))`` in fp32, in five instructions on an H100 where ``tl.sigmoid``
    takes eleven (ptxas for sm_90, benchmarks/NOTES.md session 28):
    - ``exp2`` lowers to ``ex2.approx.ftz``; ``tl.exp`` lowers to ``ex2.approx`` with a
      denormal fix-up (a compare and two multiplies). Flushing to zero only happens where
      ``x > 87``, and there the sigmoid rounds to 1 either way.
    - The reciprocal is ``rsqrt((1 + e)^2)`` (one MUFU.RSQ). ``tl.sigmoid``'s ``1 / d`` is a
      full-range division: a compare, a select, a multiply, MUFU.RCP and a multiply.
      ``(1 + e)^2`` overflows to inf only past ``x < -44``, giving 0 where the sigmoid is
      below 1e-19.
    Relative error ~1e-7 (the approximate rsqrt's), against the division's 2 ulp; portable
    (``tl.math.rsqrt`` and ``tl.exp2`` are core Triton, on AMD too)."""
    d = 1.0 + tl.exp2(x * -1.4426950408889634)
    return tl.math.rsqrt(d * d)
