"""transition (SwiGLU): the Triton kernels against a float64 reference, forward and every gradient.

Tolerances, as relative Frobenius error ||x - ref|| / ||ref||:
  fp32: 1e-5. IEEE fp32 dots, fp32 statistics, SwiGLU and accumulation; measured ~3e-7.
  fp16: 5e-3. The normalised input, the hidden chunk and the gradients of the hidden are
        rounded to fp16 before each product (2^-11 each); measured ~5e-4.
  bf16: 2e-2. The same roundings with 8 mantissa bits; a wrong index gives O(1).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megafold.kernels.transition import transition, transition_reference
from megafold.kernels.testing import (
    TOL,
    assert_backward_repeats,
    record_descriptor_use,
    rel_err,
    shipped_descriptor_choices_offered,
)

# The package exports the op under its module's name: reach the module itself.
module = importlib.import_module("megafold.kernels.transition")

NAMES = ("x", "ln_weight", "ln_bias", "w_in", "w_out")


def make_inputs(shape, n, dtype, device="cpu", c_out=None):
    C = shape[-1]
    hidden = n * C
    inputs = {
        "x": torch.randn(*shape, device=device) * 2 + 1,
        "ln_weight": 1 + 0.2 * torch.randn(C, device=device),
        "ln_bias": 0.2 * torch.randn(C, device=device),
        "w_in": torch.randn(2 * hidden, C, device=device) / C**0.5,
        "w_out": torch.randn(c_out or C, hidden, device=device) / hidden**0.5,
    }
    return {name: t.to(dtype).requires_grad_() for name, t in inputs.items()}


def check(inputs, dtype, grad_out=None):
    out = transition(**inputs, backend="triton")
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[n] for n in NAMES], grad_out)
    ref_inputs = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref = transition_reference(**ref_inputs)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[n] for n in NAMES], grad_out.double())
    assert out.dtype == dtype and out.shape == ref.shape
    errors = {"out": rel_err(out, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip(NAMES, grads, ref_grads)}
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, n, c_out",
    [
        ((2, 7, 7, 24), 4, None),  # pair-shaped, AF3's n = 4, channels not multiples of 16
        ((13, 40), 2, None),
        ((3, 5, 33), 3, 20),  # odd channels, hidden 99 (not a multiple of the chunk), c_out != c
    ],
)
def test_matches_float64_reference(shape, n, c_out, dtype, poisoned_empty):
    check(make_inputs(shape, n, dtype, c_out=c_out), dtype)


@pytest.mark.parametrize("block_m, block_h", [(32, 16), (64, 16)])
def test_narrow_tiles(block_m, block_h, monkeypatch, poisoned_empty):
    # Narrow hidden blocks (16 units, as the default takes for rows wider than 256) at 32 or 64 rows.
    monkeypatch.setattr(module, "run_tuned", lambda op, key, device, candidates, default, launch, rows=None:
                        launch(default | {"BLOCK_M": block_m, "BLOCK_H": block_h, "num_warps": 8}))
    check(make_inputs((3, 5, 33), 3, torch.float16, c_out=20), torch.float16)


def test_transposed_input_and_gradient():
    inputs = make_inputs((2, 9, 9, 24), 4, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32, grad_out=torch.randn(2, 9, 9, 24).transpose(1, 2))


def test_hidden_activation_is_never_saved():
    inputs = make_inputs((2, 10, 10, 16), 4, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        transition(**inputs, backend="triton")
    assert saved and max(saved) <= inputs["x"].numel()


def test_weight_gradients_are_deterministic():
    inputs = make_inputs((3, 11, 11, 16), 4, torch.float32)
    assert_backward_repeats(transition(**inputs, backend="triton"), [inputs[n] for n in NAMES[1:]])


def test_weight_gradient_chunks(one_block_chunks):
    # Many row chunks (the hidden's gradients exist one chunk at a time), blocks that
    # straddle the batches of a transposed view, c_out != c: the chunks' products add up to
    # the float64 gradients, bitwise the same on a second run.
    inputs = make_inputs((3, 11, 11, 24), 4, torch.float32, c_out=20)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32)
    assert one_block_chunks and all(len(chunks) > 4 for chunks in one_block_chunks)
    assert_backward_repeats(transition(**inputs, backend="triton"), list(inputs.values()))


@pytest.fixture(params=[(32, 3), (16, 5)])
def descriptor_tiles(request, monkeypatch):
    """Both directions launch a tensor-descriptor (TMA) candidate: 64 rows, 32 hidden units
    and 3 stages (the hidden loop's weight tiles fetched two ahead), or 16 units and 5 stages.
    Yields whether each launch got its descriptors (True) or took the pointer path (False)."""
    block_h, stages = request.param
    used = record_descriptor_use(monkeypatch, module, "_descriptors")

    def pick(op, key, device, candidates, default, launch, rows=None):
        tiles = [c for c in candidates if c.get("TMA")]
        assert bool(tiles) == module.descriptors_available()
        if not tiles:
            return launch(default)
        return launch(next(c for c in tiles if c["BLOCK_M"] == 64 and c["BLOCK_H"] == block_h
                           and c["num_stages"] == stages))

    monkeypatch.setattr(module, "run_tuned", pick)
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, n, c_out", [((2, 7, 7, 24), 4, None), ((13, 40), 4, 24), ((3, 11, 11, 16), 4, None)])
def test_descriptor_tiles_match_float64_reference(shape, n, c_out, dtype, descriptor_tiles, poisoned_empty):
    # Rows and channels past the tiles' edges (zero-filled loads, clipped stores), c_out != c.
    check(make_inputs(shape, n, dtype, c_out=c_out), dtype)
    assert descriptor_tiles == [module.descriptors_available()] * 2


def test_descriptor_tiles_in_many_row_chunks(descriptor_tiles, one_block_chunks):
    # One row block a chunk: each block's rows in the chunk buffers (from 0) and in x, dy, dx
    # (from the chunk's start) by descriptor; bitwise the same on a second run.
    inputs = make_inputs((3, 11, 11, 24), 4, torch.float32, c_out=40)
    check(inputs, torch.float32)
    assert one_block_chunks and all(len(chunks) > 4 for chunks in one_block_chunks)
    assert descriptor_tiles == [module.descriptors_available()] * 2
    assert_backward_repeats(transition(**inputs, backend="triton"), list(inputs.values()))


def test_descriptor_tiles_fall_back_where_a_layout_has_none(descriptor_tiles):
    # A hidden of 120 units (not a multiple of 16- or 32-unit tiles: a tile of a would run into
    # b's rows), fp32 rows of 33 channels (132 bytes, not 16-byte aligned) and a transposed
    # view's rows (not one run): the same tiles through pointers.
    check(make_inputs((3, 5, 40), 3, torch.float16, c_out=24), torch.float16)
    check(make_inputs((13, 33), 4, torch.float32), torch.float32)
    inputs = make_inputs((2, 9, 9, 24), 4, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32)
    assert descriptor_tiles == [False] * 6


@pytest.mark.gpu
@pytest.mark.parametrize("N", [257, 384])
def test_bf16_descriptor_tiles_on_gpu(N, descriptor_tiles):
    # TMA copies on Hopper.
    check(make_inputs((1, N, N, 128), 4, torch.bfloat16, device="cuda"), torch.bfloat16)
    assert descriptor_tiles == [module.descriptors_available()] * 2


@pytest.mark.gpu
def test_descriptor_tiles_under_autocast_on_gpu(descriptor_tiles):
    # The model's call: an fp32 pair input (fp32 x tiles by descriptor) and bf16 weights, under
    # autocast; forward and every gradient against float64.
    inputs = make_inputs((1, 257, 257, 128), 4, torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = transition(**inputs, backend="triton")
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[n] for n in NAMES], grad_out)
    ref_inputs = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref = transition_reference(**ref_inputs)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[n] for n in NAMES], grad_out.double())
    errors = {"out": rel_err(out, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip(NAMES, grads, ref_grads)}
    assert max(errors.values()) < TOL[torch.bfloat16], errors
    assert descriptor_tiles == [module.descriptors_available()] * 2


def test_every_shipped_descriptor_choice_is_a_candidate_of_its_key():
    """A shipped descriptor (TMA) choice is one this code offers for its key."""
    dtypes = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}

    def call(op, key):
        C, H, C_OUT = key[:3]
        x = torch.zeros(4, C, dtype=dtypes[key[4]])
        w_in = torch.zeros(2 * H, C, dtype=dtypes[key[3]])
        w_out = torch.zeros(C_OUT, H, dtype=dtypes[key[3]])
        if op == "transition_fwd":
            module.transition_forward(x, torch.ones(C), torch.zeros(C), w_in, w_out, 1e-5)
        else:
            dy = torch.zeros(4, C_OUT, dtype=dtypes[key[5]])
            module.transition_backward(x, dy, torch.ones(C), torch.zeros(C), w_in, w_out, torch.zeros(4),
                                       torch.ones(4), x.dtype)

    assert shipped_descriptor_choices_offered(module, "transition_", call) > 0  # the H200's, session 32


@pytest.mark.gpu
@pytest.mark.parametrize("N", [256, 384, 768])
def test_bf16_pair_transition_on_gpu(N):
    check(make_inputs((1, N, N, 128), 4, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
def test_bf16_single_transition_on_gpu():
    # The single track (c_s = 384): a row wider than one 128-wide block.
    check(make_inputs((1, 768, 384), 4, torch.bfloat16, device="cuda"), torch.bfloat16)


def test_bad_shapes_are_named():
    inputs = make_inputs((4, 16), 4, torch.float32)
    with pytest.raises(ValueError, match="w_in"):
        transition(**(inputs | {"w_in": torch.randn(64, 16)}))


def test_the_backward_never_holds_the_whole_hidden(monkeypatch):
    # With the default chunk budget (which all 242 rows fit), the backward still splits the
    # rows: the hidden and its gradient never exist for every row at once.
    module = importlib.import_module("megafold.kernels.transition")

    used, real = [], module.row_chunks
    monkeypatch.setattr(module, "row_chunks", lambda *args, **kw: used.append(real(*args, **kw)) or used[-1])
    inputs = make_inputs((2, 11, 11, 16), 4, torch.float32)
    check(inputs, torch.float32)
    rows = 2 * 11 * 11
    assert used and all(len(chunks) >= module.MIN_CHUNKS for chunks in used)
    assert all(max(end - start for start, end in chunks) < rows for chunks in used)
    assert all(chunks[0][0] == 0 and chunks[-1][1] == rows for chunks in used)


def test_row_chunks_keep_a_minimum_count_where_the_rows_allow():
    from megafold.kernels.layernorm_linear import row_chunks

    assert row_chunks(1000, 1, 16) == [(0, 1000)]
    assert row_chunks(1000, 1, 16, min_count=2) == [(0, 512), (512, 1000)]
    assert row_chunks(1000, 1, 16, min_count=3) == [(0, 336), (336, 672), (672, 1000)]
    assert row_chunks(10, 1, 16, min_count=2) == [(0, 10)]  # fewer rows than one block
