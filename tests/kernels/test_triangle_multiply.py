"""triangle_multiply: the Triton path against a float64 reference, forward and every gradient.

Tolerances, as relative Frobenius error ||x - ref|| / ||ref||:
  fp32: 1e-5. IEEE fp32 dots, fp32 LayerNorm statistics and accumulation; measured ~3e-7.
  fp16: 5e-3. a, b, x, the normalised activations and the gradients between passes are
        stored in fp16 (2^-11 relative each); measured ~7e-4.
  bf16: 2e-2. The same roundings with 8 mantissa bits; the N-long sums of the triangular
        product round once at the end (fp32 accumulation in cuBLAS). A wrong index or a
        lost mask gives O(1).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megafold.kernels.triangle_multiply import PARAM_NAMES, triangle_multiply, triangle_multiply_reference
from megafold.kernels.testing import TOL, assert_backward_repeats, rel_err

# The package exports the op under its module's name: reach the module itself.
module = importlib.import_module("megafold.kernels.triangle_multiply")


def make_params(c_z, c_h, dtype, device="cpu"):
    params = {
        "norm_in_weight": 1 + 0.2 * torch.randn(c_z, device=device),
        "norm_in_bias": 0.2 * torch.randn(c_z, device=device),
        "ab_proj_weight": torch.randn(2 * c_h, c_z, device=device) / c_z**0.5,
        "ab_gate_weight": torch.randn(2 * c_h, c_z, device=device) / c_z**0.5,
        "out_gate_weight": torch.randn(c_z, c_z, device=device) / c_z**0.5,
        "norm_out_weight": 1 + 0.2 * torch.randn(c_h, device=device),
        "norm_out_bias": 0.2 * torch.randn(c_h, device=device),
        "out_proj_weight": torch.randn(c_z, c_h, device=device) / c_h**0.5,
    }
    return {name: t.to(dtype).requires_grad_() for name, t in params.items()}


def padded_mask(B, N, padding, device="cpu"):
    """Pair mask of a batch whose last ``padding`` tokens are padding, plus random holes."""
    tokens = torch.ones(B, N, dtype=torch.bool, device=device)
    if padding:
        tokens[:, N - padding:] = False
    return tokens[:, :, None] & tokens[:, None, :] & (torch.rand(B, N, N, device=device) > 0.1)


def check(z, mask, params, outgoing, dtype, grad_out=None):
    out = triangle_multiply(z, mask, params, outgoing=outgoing, backend="triton")
    if grad_out is None:
        grad_out = torch.randn_like(out)
    leaves = [z] + [params[n] for n in PARAM_NAMES]
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = triangle_multiply_reference(ref_leaves[0], mask, dict(zip(PARAM_NAMES, ref_leaves[1:])), outgoing)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert out.dtype == dtype and out.shape == ref.shape
    errors = {"out": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, r) for n, g, r in zip(("z",) + PARAM_NAMES, grads, ref_grads)}
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, N, c_z, c_h, padding",
    [
        (2, 7, 24, 40, 0),  # batch of 2, c_h wider than c_z, nothing a power of two
        (1, 13, 16, 16, 3),  # padded tokens
        (1, 33, 40, 24, 5),
    ],
)
def test_matches_float64_reference(B, N, c_z, c_h, padding, dtype, outgoing, poisoned_empty):
    z = (torch.randn(B, N, N, c_z) + 1).to(dtype).requires_grad_()
    check(z, padded_mask(B, N, padding), make_params(c_z, c_h, dtype), outgoing, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_narrow_channel_slices(dtype, monkeypatch, poisoned_empty):
    # 16-channel slices in the input kernels (c_h = 40: 3 slices, the last one partial)
    # compute the same op.
    monkeypatch.setattr(module, "run_tuned", lambda op, key, device, candidates, default, launch, rows=None:
                        launch(default | ({"BLOCK_C": 16, "BLOCK_M": 32, "num_warps": 8} if "_in_" in op else {})))
    z = (torch.randn(2, 7, 7, 24) + 1).to(dtype).requires_grad_()
    check(z, padded_mask(2, 7, 2), make_params(24, 40, dtype), True, dtype)


def pinned(monkeypatch, pinned_op, config):
    """Run ``pinned_op`` (e.g. the output backward) with ``config``, the other ops as tuned;
    returns the configs launched for it."""
    used = []
    real = module.run_tuned

    def run_tuned(op, key, device, candidates, default, launch, rows=None):
        if op != pinned_op:
            return real(op, key, device, candidates, default, launch, rows)
        used.append(config)
        return launch(config)

    monkeypatch.setattr(module, "run_tuned", run_tuned)
    return used


def persistent_output_backward(monkeypatch, config):
    """Run the output backward's persistent kernel with ``config``; returns the configs launched."""
    return pinned(monkeypatch, "triangle_multiply_out_bwd", config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_output_backward(dtype, monkeypatch, poisoned_empty):
    # Weight gradients in registers: one program (one SM off a GPU, PERSISTENT=1) or two take
    # all row blocks of both batches (2 x 13 x 13 pairs in blocks of 16, the last partial).
    for per_sm in (1, 2):
        used = persistent_output_backward(monkeypatch, {"BLOCK_M": 16, "num_warps": 4, "PERSISTENT": per_sm})
        z = (torch.randn(2, 13, 13, 24) + 1).to(dtype).requires_grad_()
        check(z, padded_mask(2, 13, 3), make_params(24, 40, dtype), True, dtype)
        assert used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [{"BLOCK_M": 16, "num_warps": 4, "PERSISTENT": 1, "LOOP_STAGES": 2},
                                    {"BLOCK_M": 16, "num_warps": 4}], ids=["persistent", "block-a-program"])
def test_output_forward_row_blocks(config, dtype, monkeypatch, poisoned_empty):
    # Persistent: one program a batch (one SM off a GPU) takes every row block of its batch
    # (13 x 13 pairs in blocks of 16, the last partial), its loads pipelined two deep. The
    # default is persistent too, so the plain grid (one block a program) is pinned here.
    # c_h is wider than c_z.
    used = pinned(monkeypatch, "triangle_multiply_out_fwd", config)
    z = (torch.randn(2, 13, 13, 24) + 1).to(dtype).requires_grad_()
    check(z, padded_mask(2, 13, 3), make_params(24, 40, dtype), True, dtype)
    assert used


def test_persistent_output_backward_is_deterministic(monkeypatch):
    persistent_output_backward(monkeypatch, {"BLOCK_M": 16, "num_warps": 4, "PERSISTENT": 2})
    z = torch.randn(1, 12, 12, 24).transpose(1, 2).requires_grad_()
    params = make_params(24, 16, torch.float32)
    out = triangle_multiply(z, padded_mask(1, 12, 2), params, backend="triton")
    assert_backward_repeats(out, [z] + [params[n] for n in PARAM_NAMES])


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_fully_masked_row_and_column(outgoing):
    B, N = 1, 11
    mask = padded_mask(B, N, 0)
    mask[:, 4, :] = False
    mask[:, :, 7] = False
    z = torch.randn(B, N, N, 24).requires_grad_()
    check(z, mask, make_params(24, 24, torch.float32), outgoing, torch.float32)


def test_transposed_views():
    # z, mask and the output gradient as transposed views: read in place, same result.
    B, N, c_z = 2, 9, 24
    z = torch.randn(B, N, N, c_z).transpose(1, 2).requires_grad_()
    mask = padded_mask(B, N, 2).transpose(1, 2)
    grad_out = torch.randn(B, N, N, c_z).transpose(1, 2)
    check(z, mask, make_params(c_z, 16, torch.float32), True, torch.float32, grad_out)


def test_weight_gradients_are_deterministic():
    z = torch.randn(1, 12, 12, 24).requires_grad_()
    mask = padded_mask(1, 12, 2)
    params = make_params(24, 16, torch.float32)
    out = triangle_multiply(z, mask, params, backend="triton")
    assert_backward_repeats(out, [params[n] for n in PARAM_NAMES])


def test_weight_gradient_chunks(one_block_chunks):
    # Many row chunks in both backward passes, row blocks that straddle the two batches
    # (N * N = 144 pairs each), a transposed z: the chunks' products add up to the float64
    # gradients, bitwise the same on a second run.
    B, N = 2, 12
    z = torch.randn(B, N, N, 24).transpose(1, 2).requires_grad_()
    mask = padded_mask(B, N, 2)
    params = make_params(24, 16, torch.float32)
    check(z, mask, params, True, torch.float32)
    assert len(one_block_chunks) == 2 and all(len(chunks) > 4 for chunks in one_block_chunks)
    out = triangle_multiply(z, mask, params, backend="triton")
    assert_backward_repeats(out, [z] + [params[n] for n in PARAM_NAMES])


def test_normalised_input_is_kept_only_for_a_backward(monkeypatch):
    # The input forward stores LN(z) for the weight gradients (STORE_ZN) only when some input
    # needs a gradient; without one (inference, no_grad) nothing is stored, and the output is
    # the same either way.
    stored = []
    real = module.launch_kernel

    def spy(kernel, grid, *args, **meta):
        if kernel is module._triangle_input_forward_kernel:
            stored.append(meta["STORE_ZN"])
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(module, "launch_kernel", spy)
    torch.manual_seed(5)
    z = torch.randn(1, 7, 7, 16)
    mask = padded_mask(1, 7, 1)
    params = make_params(16, 8, torch.float32)
    with torch.no_grad():
        plain = triangle_multiply(z, mask, params, backend="triton")
    assert stored == [False]
    with_grad = triangle_multiply(z, mask, params, backend="triton")
    assert stored == [False, True]
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=0)
    frozen = {name: t.detach() for name, t in params.items()}
    triangle_multiply(z, mask, frozen, backend="triton")  # nothing requires a gradient
    assert stored == [False, True, False]


def test_interleaved_weights_round_trip():
    # The kernels read ab_proj_weight and ab_gate_weight as one matrix whose rows pair each
    # channel's projection and gate, side a then side b; its gradient splits back exactly.
    c_h, c_z = 6, 5
    w_p, w_g = torch.randn(2 * c_h, c_z), torch.randn(2 * c_h, c_z)
    both = module.interleaved_weights(w_p.t().contiguous().t(), w_g)  # any strides in
    assert both.shape == (4 * c_h, c_z) and both.is_contiguous()
    for side in range(2):
        for c in (0, c_h - 1):
            assert torch.equal(both[2 * (side * c_h + c)], w_p[side * c_h + c])
            assert torch.equal(both[2 * (side * c_h + c) + 1], w_g[side * c_h + c])
    back_p, back_g = module.split_interleaved(both)
    assert torch.equal(back_p, w_p) and torch.equal(back_g, w_g)


def test_bad_inputs_are_named():
    z = torch.randn(1, 5, 5, 8)
    params = make_params(8, 4, torch.float32)
    with pytest.raises(ValueError, match="mask"):
        triangle_multiply(z, torch.ones(1, 5, 5), params)
    with pytest.raises(ValueError, match="ab_gate_weight"):
        triangle_multiply(z, torch.ones(1, 5, 5, dtype=torch.bool), params | {"ab_gate_weight": torch.ones(4, 8)})


@pytest.mark.gpu
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("N", [256, 384, 768])
def test_bf16_real_size_on_gpu(N, outgoing):
    z = torch.randn(1, N, N, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
    mask = padded_mask(1, N, N // 16, device="cuda")
    check(z, mask, make_params(128, 128, torch.bfloat16, device="cuda"), outgoing, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", module._output_backward_candidates()[6:], ids=str)
def test_bf16_persistent_output_backward_on_gpu(config, monkeypatch):
    # Every persistent candidate at N = 384 (147k pairs: ~8-35 row blocks a program).
    used = persistent_output_backward(monkeypatch, config)
    z = torch.randn(1, 384, 384, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
    mask = padded_mask(1, 384, 24, device="cuda")
    check(z, mask, make_params(128, 128, torch.bfloat16, device="cuda"), True, torch.bfloat16)
    assert used


@pytest.mark.parametrize("n, chunks", [(256, 1), (384, 2), (768, 2), (1024, 3), (1792, 9)])
def test_input_backward_chunks_follow_the_pair_tensor(n, chunks):
    # The input backward's gradients of the projection and gate pre-activations (4 c_h = 512
    # bf16 a row) come in chunks of 2.5 times the pair tensor's bytes, clamped to 128-384 MB:
    # N = 384 keeps the two chunks that hold its peak under cuEquivariance's, N = 768 takes 2,
    # and the longest crops never hold more than 384 MB of them.
    rows, row_bytes, pair_bytes = n * n, 512 * 2, n * n * 128 * 2
    scale = module._input_chunk_scale(pair_bytes)
    got = module.row_chunks(rows, row_bytes, 128, scale)
    assert len(got) == chunks
    # (a chunk's rows are rounded up to whole 128-row blocks)
    assert max(end - start for start, end in got) * row_bytes <= (384 << 20) + 128 * row_bytes
    assert got[0][0] == 0 and got[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("n, chunks", [(256, 1), (384, 2), (768, 2), (1024, 3), (1792, 9)])
def test_input_backward_chunks_are_whole_waves(n, chunks):
    # In rows of whole waves (128-row programs on 132 SMs) every chunk but the last ends in a
    # full wave; the chunk count stays, and a chunk exceeds the budget by less than one wave.
    rows, row_bytes, pair_bytes = n * n, 512 * 2, n * n * 128 * 2
    scale = module._input_chunk_scale(pair_bytes)
    wave = 128 * 132
    got = module.row_chunks(rows, row_bytes, wave, scale)
    assert len(got) == chunks
    assert all(start % wave == 0 for start, _ in got)
    assert all((end - start) % wave == 0 for start, end in got[:-1])
    budget = scale * (256 << 20)
    assert max(end - start for start, end in got) * row_bytes < budget + wave * row_bytes
    assert got[0][0] == 0 and got[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert module.wave_rows(128, torch.device("cpu")) == 128  # one "SM" off a GPU
