"""outer_product_mean: the Triton path against a float64 reference, forward and every gradient.

Tolerances, as relative Frobenius error ||x - ref|| / ||ref||:
  fp32: 1e-5. IEEE fp32 dots with fp32 accumulation over s and over (c, d); measured ~3e-7.
  fp16: 5e-3. a, b, each outer-product slice and the scaled output gradient are rounded to
        fp16 (2^-11 each) before a product; measured ~6e-4.
  bf16: 2e-2. The same roundings with 8 mantissa bits; a wrong index or a lost mask gives O(1).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megafold.kernels.outer_product_mean import PARAM_NAMES, outer_product_mean, outer_product_mean_reference
from megafold.kernels.testing import TOL, assert_backward_repeats, rel_err

# The module itself (megafold.kernels re-exports a function of the same name).
opm_module = importlib.import_module("megafold.kernels.outer_product_mean")


def make_params(c_m, c_h, c_z, dtype, device="cpu"):
    params = {
        "norm_weight": 1 + 0.2 * torch.randn(c_m, device=device),
        "norm_bias": 0.2 * torch.randn(c_m, device=device),
        "proj_weight": torch.randn(2 * c_h, c_m, device=device) / c_m**0.5,
        "out_weight": torch.randn(c_z, c_h * c_h, device=device) / c_h,
        "out_bias": torch.randn(c_z, device=device),
    }
    return {name: t.to(dtype).requires_grad_() for name, t in params.items()}


def make_msa(B, S, N, c_m, dtype, device="cpu"):
    m = (torch.randn(B, S, N, c_m, device=device) + 1).to(dtype).requires_grad_()
    mask = torch.rand(B, S, N, device=device) > 0.2
    return m, mask


def check(m, mask, params, dtype, grad_out=None):
    out = outer_product_mean(m, mask, params, backend="triton")
    if grad_out is None:
        grad_out = torch.randn_like(out)
    leaves = [m] + [params[n] for n in PARAM_NAMES]
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = outer_product_mean_reference(ref_leaves[0], mask, dict(zip(PARAM_NAMES, ref_leaves[1:])))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert out.dtype == dtype and out.shape == ref.shape
    errors = {"out": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, r) for n, g, r in zip(("m",) + PARAM_NAMES, grads, ref_grads)}
    assert max(errors.values()) < TOL[dtype], errors


def assert_deterministic(m, mask, params):
    """Two backward passes give every gradient bit for bit (dW is summed from per-program
    partials in a fixed order; the MSA gradient has no reduction across programs)."""
    out = outer_product_mean(m, mask, params, backend="triton")
    assert_backward_repeats(out, [m] + [params[n] for n in PARAM_NAMES])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, S, N, c_m, c_h, c_z",
    [
        (2, 5, 7, 24, 8, 40),  # batch of 2, few MSA rows, c_h under the 16-wide dot minimum
        (1, 70, 13, 16, 12, 24),  # odd c_h, S over one 64-row block in the backward
        (1, 9, 10, 40, 32, 16),  # AF3's c_h = 32
    ],
)
def test_matches_float64_reference(B, S, N, c_m, c_h, c_z, dtype, poisoned_empty):
    m, mask = make_msa(B, S, N, c_m, dtype)
    check(m, mask, make_params(c_m, c_h, c_z, dtype), dtype)


def test_deep_msa_over_several_row_blocks():
    # S > 128: the forward and backward both walk several s blocks.
    m, mask = make_msa(1, 133, 6, 8, torch.float32)
    check(m, mask, make_params(8, 8, 16, torch.float32), torch.float32)


def test_left_gradient_with_one_s_block(monkeypatch):
    # The tuner's candidate that covers a 70-row MSA with one s block (dP made once, not twice).
    real = opm_module.default_configs

    def one_s_block(CH, CZ, S):
        configs = real(CH, CZ, S)
        configs["left_grad"] = configs["left_grad"] | {"BLOCK_S": opm_module.block_size(S, 128), "num_stages": 1}
        return configs

    monkeypatch.setattr(opm_module, "default_configs", one_s_block)
    assert one_s_block(12, 24, 70)["left_grad"]["BLOCK_S"] == 128
    m, mask = make_msa(1, 70, 13, 16, torch.float32)
    check(m, mask, make_params(16, 12, 24, torch.float32), torch.float32)


@pytest.mark.parametrize("number", range(-5, 0))
def test_narrow_channel_chunk_candidates(monkeypatch, number):
    # The tuner's 4-warp candidates with half or a quarter of the channel chunk (and wider or
    # narrower j blocks), as the weight-gradient kernel's default, at AF3's c_h = 32.
    real = opm_module.default_configs
    candidate = opm_module._candidates(real(32, 24, 6)["weight_grad"], 32, 24)[number]

    def with_candidate(CH, CZ, S):
        return real(CH, CZ, S) | {"weight_grad": candidate}

    monkeypatch.setattr(opm_module, "default_configs", with_candidate)
    m, mask = make_msa(1, 6, 11, 16, torch.float32)
    check(m, mask, make_params(16, 32, 24, torch.float32), torch.float32)


def test_fully_masked_residue_and_sequence():
    # Residue 3 has no valid row (count 0: the output is the bias, gradients finite); row 2 is empty.
    m, mask = make_msa(1, 6, 9, 16, torch.float32)
    mask[:, :, 3] = False
    mask[:, 2, :] = False
    check(m, mask, make_params(16, 8, 16, torch.float32), torch.float32)


def test_transposed_views():
    m = torch.randn(2, 9, 5, 16).transpose(1, 2).requires_grad_()  # [B, S, N, c_m] view
    mask = (torch.rand(2, 9, 5) > 0.2).transpose(1, 2)
    grad_out = torch.randn(2, 9, 9, 24).transpose(1, 2)
    check(m, mask, make_params(16, 8, 24, torch.float32), torch.float32, grad_out)


def test_memory_is_quadratic_in_channels_only_once(monkeypatch):
    # Nothing of the size of the [N, N, c_h, c_h] outer products is allocated or saved.
    B, S, N, c_h = 1, 6, 20, 16
    sizes = []
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (t := real_empty(*a, **k), sizes.append(t.numel()))[0])
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: (t := real_like(*a, **k), sizes.append(t.numel()))[0])
    m, mask = make_msa(B, S, N, 16, torch.float32)
    params = make_params(16, c_h, 16, torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = outer_product_mean(m, mask, params, backend="triton")
    out.sum().backward()
    assert max(sizes) < B * N * N * c_h * c_h // 8


def test_several_tiles_of_every_kind(monkeypatch):
    # The smallest tiles (the fallback where nothing else fits): every kernel walks several i
    # and j blocks (N = 9 over 4-wide blocks), channel chunks (c_h = 10 over 4, the last one
    # part padding) and s blocks (S = 20 over 16: the forward and dW kernels accumulate the
    # outer products over s); with 2 dW partials the 3 j blocks split unevenly (0 and 2, 1).
    small = opm_module.SMALLEST_CONFIG
    monkeypatch.setattr(opm_module, "MAX_WEIGHT_GRAD_PARTIALS", 2)
    monkeypatch.setattr(opm_module, "default_configs",
                        lambda CH, CZ, S: {kernel: dict(small) for kernel in ("forward", "left_grad", "weight_grad")})
    m, mask = make_msa(1, 20, 9, 8, torch.float32)
    check(m, mask, make_params(8, 10, 20, torch.float32), torch.float32)


def test_a_config_that_does_not_fit_falls_back_once():
    default = opm_module.default_configs(32, 128, 64)["left_grad"]
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg != opm_module.SMALLEST_CONFIG:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    run = opm_module._fitting(("test", 1), launch)
    run(default)
    assert tried == [default, default | {"num_stages": 1}, opm_module.SMALLEST_CONFIG]
    run(default)  # the config that fit is remembered
    assert tried[3:] == [opm_module.SMALLEST_CONFIG]

    def broken(cfg):
        raise RuntimeError("an error of another kind")

    with pytest.raises(RuntimeError, match="another kind"):
        opm_module._fitting(("test", 2), broken)(default)


def test_every_gradient_is_deterministic():
    m, mask = make_msa(1, 11, 12, 16, torch.float32)
    assert_deterministic(m, mask, make_params(16, 8, 24, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("N, S", [(256, 128), (384, 128), (320, 200)])  # S = 200: s blocks in every kernel
def test_bf16_real_size_on_gpu(N, S):
    m, mask = make_msa(1, S, N, 64, torch.bfloat16, device="cuda")
    check(m, mask, make_params(64, 32, 128, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
def test_bf16_gradients_are_deterministic_on_gpu():
    m, mask = make_msa(1, 64, 384, 64, torch.bfloat16, device="cuda")
    assert_deterministic(m, mask, make_params(64, 32, 128, torch.bfloat16, device="cuda"))


def test_bad_inputs_are_named():
    m, mask = make_msa(1, 4, 5, 8, torch.float32)
    params = make_params(8, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="mask"):
        outer_product_mean(m, mask.float(), params)
    with pytest.raises(ValueError, match="out_weight"):
        outer_product_mean(m, mask, params | {"out_weight": torch.randn(16, 15)})
