"""Fused ops for AlphaFold3 training, each with a plain PyTorch reference and a Triton path.

Every op takes ``backend="auto" | "triton" | "torch"``; ``use_kernels`` sets the default for a
block of code. The model calls these functions, never a kernel directly.
"""

from megafold.kernels._common import default_backend, use_kernels
from megafold.kernels.evo_attention import evo_attention
from megafold.kernels.layernorm_linear import layernorm_linear
from megafold.kernels.outer_product_mean import outer_product_mean
from megafold.kernels.transition import transition
from megafold.kernels.triangle_multiply import triangle_multiply

__all__ = [
    "default_backend",
    "evo_attention",
    "layernorm_linear",
    "outer_product_mean",
    "transition",
    "triangle_multiply",
    "use_kernels",
]
