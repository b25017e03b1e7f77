"""layernorm_linear: the Triton kernels against a float64 reference, forward and every gradient.

Tolerances, as relative Frobenius error ||x - ref|| / ||ref||:
  fp32: 1e-5. IEEE fp32 dots, fp32 statistics and accumulation; measured errors are ~1e-7.
  fp16: 5e-3. Inputs, the normalised activation and the output are rounded to fp16
        (2^-11 relative each); measured errors are ~3e-4.
  bf16: 2e-2. 8 mantissa bits (2^-9 per rounding) on the same roundings; measured ~4e-3.
        Any indexing or masking bug gives O(1) errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megafold.kernels.layernorm_linear import layernorm_linear, layernorm_linear_reference
from megafold.kernels.testing import (
    TOL,
    assert_backward_repeats,
    record_descriptor_use,
    rel_err,
    shipped_descriptor_choices_offered,
)

# The package exports the op under the module's name: reach the module itself.
module = importlib.import_module("megafold.kernels.layernorm_linear")


def make_inputs(shape, out_features, dtype, device="cpu", bias=True):
    K = shape[-1]
    # A mean far from 0 checks the fp32 two-pass statistics.
    x = (torch.randn(*shape, dtype=torch.float32, device=device) * 2 + 3).to(dtype)
    inputs = {
        "x": x,
        "ln_weight": 1 + 0.2 * torch.randn(K, device=device),
        "ln_bias": 0.2 * torch.randn(K, device=device),
        "weight": torch.randn(out_features, K, device=device) / K**0.5,
        "bias": torch.randn(out_features, device=device) if bias else None,
    }
    return {n: (t.to(dtype).requires_grad_() if t is not None else None) for n, t in inputs.items()}


def check(inputs, dtype, grad_out=None):
    leaves = [n for n, t in inputs.items() if t is not None]
    out = layernorm_linear(**inputs, backend="triton")
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[n] for n in leaves], grad_out)
    ref_inputs = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    ref = layernorm_linear_reference(**ref_inputs)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[n] for n in leaves], grad_out.double())
    assert out.dtype == dtype and out.shape == ref.shape
    errors = {"out": rel_err(out, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip(leaves, grads, ref_grads)}
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, out_features, bias",
    [
        ((2, 7, 7, 24), 40, True),  # pair-shaped, channels not multiples of 16
        ((13, 33), 16, False),  # odd K, no bias
        ((3, 5, 130), 200, True),  # K and O over one block: looped K, several output blocks
    ],
)
def test_matches_float64_reference(shape, out_features, bias, dtype, poisoned_empty):
    check(make_inputs(shape, out_features, dtype, bias=bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, out_features", [((2, 9, 9, 24), 150), ((3, 5, 130), 200)])
def test_every_column_block_in_one_program(shape, out_features, dtype, monkeypatch, poisoned_empty):
    # The pair-sized forward: each program computes all output-column blocks of its rows from
    # one load of x (with K over one block, the looped-K path does the same per column block).
    monkeypatch.setattr(module, "ALL_COLUMNS_MIN_ROWS", 1)
    assert module._column_blocks(10, out_features, 128) == 2
    check(make_inputs(shape, out_features, dtype), dtype)


@pytest.fixture
def narrow(monkeypatch):
    """Every output up to 128 columns takes the narrow backward (dW in registers)."""
    monkeypatch.setattr(module, "NARROW_MAX_OUT", 128)
    launches = []
    kernel = module._layernorm_linear_backward_narrow_kernel
    monkeypatch.setattr(module, "_layernorm_linear_backward_narrow_kernel", _Recorder(kernel, launches))
    return launches


class _Recorder:
    """A kernel whose launches are counted (grid sizes recorded)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, out_features, bias", [((2, 7, 7, 24), 40, True), ((13, 33), 16, False),
                                                        ((3, 11, 11, 128), 128, True)])
def test_narrow_backward_matches_float64_reference(shape, out_features, bias, dtype, narrow, poisoned_empty):
    # Each program takes several row blocks (one SM off a GPU: 4 programs), the last one partial.
    check(make_inputs(shape, out_features, dtype, bias=bias), dtype)
    assert narrow and all(grid[0] <= 4 for grid in narrow)


def test_narrow_backward_of_strided_views(narrow):
    inputs = make_inputs((2, 9, 9, 48), 24, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32, torch.randn(2, 9, 9, 24).transpose(1, 2))
    assert narrow


@pytest.mark.parametrize("frozen", [("x",), ("x", "ln_weight", "ln_bias"), ("bias",)])
def test_narrow_backward_of_a_subset(frozen, narrow):
    check_subset(frozen)
    assert narrow


def test_narrow_backward_is_deterministic(narrow):
    inputs = make_inputs((3, 11, 11, 24), 16, torch.float32)
    assert_backward_repeats(layernorm_linear(**inputs, backend="triton"), list(inputs.values()))
    assert narrow


def test_narrow_output_takes_the_narrow_backward_by_default(narrow, monkeypatch):
    monkeypatch.setattr(module, "NARROW_MAX_OUT", 32)
    out = layernorm_linear(**make_inputs((2, 9, 9, 24), 16, torch.float32), backend="triton")
    out.sum().backward()
    assert len(narrow) == 1
    out = layernorm_linear(**make_inputs((2, 9, 9, 24), 40, torch.float32), backend="triton")
    out.sum().backward()
    assert len(narrow) == 1  # 40 columns: the chunked kernel and the cuBLAS product


@pytest.fixture(params=["tiles", "rows"])
def descriptor_tiles(request, monkeypatch):
    """Both directions launch a tensor-descriptor candidate. "tiles": the forward's one tile
    a program, the narrow backward (32 rows, 3 stages: several row blocks a program,
    pipelined); "rows": the forward's programs over row blocks (32 rows, two programs, where
    the output is one column block), the chunked backward. Yields whether each launch got
    its descriptors (True) or took the pointer path (False)."""
    used = record_descriptor_use(monkeypatch, module, "_row_descriptors")
    monkeypatch.setattr(module, "NARROW_MAX_OUT", 128)

    def pick(op, key, device, candidates, default, launch, rows=None):
        tiles = [c for c in candidates if c.get("TMA")]
        assert bool(tiles) == module.descriptors_available()
        if not tiles:
            return launch(default)
        if op == "layernorm_linear_fwd":
            persistent = [c for c in tiles if c.get("PROGRAMS_PER_SM")]
            return launch(persistent[0] if request.param == "rows" and persistent else tiles[0])
        narrow = [c for c in tiles if c.get("NARROW") and c["BLOCK_M"] == 32 and c["num_stages"] == 3]
        chunked = [c for c in tiles if not c.get("NARROW")]
        return launch(narrow[0] if request.param == "tiles" and narrow else chunked[0])

    monkeypatch.setattr(module, "run_tuned", pick)
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, out_features, bias", [((2, 7, 7, 24), 40, True), ((3, 11, 11, 128), 128, False),
                                                        ((5, 13, 120), 16, True)])
def test_descriptor_tiles_match_float64_reference(shape, out_features, bias, dtype, descriptor_tiles,
                                                  poisoned_empty):
    # Rows, columns and outputs past the tiles' edges (zero-filled loads, clipped stores).
    check(make_inputs(shape, out_features, dtype, bias=bias), dtype)
    assert descriptor_tiles == [module.descriptors_available()] * 2


@pytest.mark.parametrize("frozen", [("x",), ("x", "ln_weight", "ln_bias")])
def test_descriptor_tiles_of_a_subset(frozen, descriptor_tiles):
    check_subset(frozen)
    # Without dx the chunked backward has no tile to load: only the LN(x) rows it writes.
    assert descriptor_tiles and all(descriptor_tiles) == module.descriptors_available()


def test_descriptor_tiles_fall_back_where_a_layout_has_none(descriptor_tiles):
    # fp32 rows of 33 channels (132 bytes) are not 16-byte aligned, a transposed view's rows
    # are not one run: the same tiles through pointers.
    check(make_inputs((13, 33), 16, torch.float32), torch.float32)
    inputs = make_inputs((2, 9, 9, 48), 24, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32)
    assert descriptor_tiles == [False] * 4


def test_every_shipped_descriptor_choice_is_a_candidate_of_its_key():
    """A shipped descriptor (TMA) choice is one this code offers for its key."""
    dtypes = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}

    def call(op, key):
        K, O = key[0], key[1]
        x = torch.zeros(4, K, dtype=dtypes[key[3]])
        weight = torch.zeros(O, K, dtype=dtypes[key[2]])
        if op == "layernorm_linear_fwd":
            bias = torch.zeros(O, dtype=weight.dtype) if key[4] else None
            module.layernorm_linear_forward(x, torch.ones(K), torch.zeros(K), weight, bias, 1e-5)
        else:
            dy = torch.zeros(4, O, dtype=dtypes[key[4]])
            module.layernorm_linear_backward(x, dy, torch.ones(K), torch.zeros(K), weight, torch.zeros(4),
                                             torch.ones(4), x.dtype, *key[5:8])

    assert shipped_descriptor_choices_offered(module, "layernorm_linear", call) > 0  # the H200's, session 31


def test_bias_gradient_rides_on_the_weight_product():
    # The bias gradient is column K of dy^T [LN(x), 1]: exact for a dy with one nonzero
    # column, and absent (plain sum) when the weight is frozen.
    inputs = make_inputs((2, 7, 7, 24), 40, torch.float32)
    out = layernorm_linear(**inputs, backend="triton")
    grad_out = torch.zeros_like(out)
    grad_out[..., 3] = 2.0
    d_bias = torch.autograd.grad(out, inputs["bias"], grad_out)[0]
    expected = torch.zeros(40)
    expected[3] = 2.0 * 2 * 7 * 7
    assert torch.equal(d_bias, expected)
    inputs["weight"] = inputs["weight"].detach()
    out = layernorm_linear(**inputs, backend="triton")
    assert torch.equal(torch.autograd.grad(out, inputs["bias"], grad_out)[0], expected)


def test_strided_inputs_and_gradient():
    # A transposed pair view, a channel-strided view and a transposed output gradient.
    inputs = make_inputs((2, 9, 9, 48), 24, torch.float32)
    base = inputs["x"].detach()
    inputs["x"] = base.transpose(1, 2).requires_grad_()
    grad_out = torch.randn(2, 9, 9, 24).transpose(1, 2)
    check(inputs, torch.float32, grad_out)
    inputs["x"] = base[..., ::2].requires_grad_()
    inputs["weight"] = inputs["weight"].detach()[:, ::2].contiguous().requires_grad_()
    inputs["ln_weight"] = inputs["ln_weight"].detach()[::2].contiguous().requires_grad_()
    inputs["ln_bias"] = inputs["ln_bias"].detach()[::2].contiguous().requires_grad_()
    check(inputs, torch.float32)


def test_weight_gradients_are_deterministic():
    inputs = make_inputs((3, 11, 11, 24), 40, torch.float32)
    out = layernorm_linear(**inputs, backend="triton")
    assert_backward_repeats(out, [inputs[n] for n in ("ln_weight", "ln_bias", "weight", "bias")])


def test_weight_gradient_chunks(one_block_chunks):
    # Many row chunks, blocks that straddle the batches of a transposed view: the chunks'
    # products add up to the float64 gradients, bitwise the same on a second run.
    inputs = make_inputs((3, 11, 11, 24), 40, torch.float32)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).requires_grad_()
    check(inputs, torch.float32)
    assert one_block_chunks and all(len(chunks) > 4 for chunks in one_block_chunks)
    assert_backward_repeats(layernorm_linear(**inputs, backend="triton"), list(inputs.values()))


@pytest.mark.parametrize("frozen", [("x",), ("weight", "bias"), ("x", "ln_weight", "ln_bias", "weight")])
def test_gradients_of_a_subset(frozen):
    check_subset(frozen)


def check_subset(frozen):
    """Only the gradients autograd asks for are computed; each one still matches."""
    inputs = make_inputs((2, 9, 9, 24), 40, torch.float32)
    for name in frozen:
        inputs[name] = inputs[name].detach()
    leaves = [n for n, t in inputs.items() if t.requires_grad]
    out = layernorm_linear(**inputs, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[n] for n in leaves], grad_out)
    ref_inputs = {n: t.detach().double().requires_grad_(n in leaves) for n, t in inputs.items()}
    ref_grads = torch.autograd.grad(layernorm_linear_reference(**ref_inputs), [ref_inputs[n] for n in leaves],
                                    grad_out.double())
    for name, grad, ref in zip(leaves, grads, ref_grads):
        assert rel_err(grad, ref) < TOL[torch.float32], name


def test_backends_agree_under_default_choice():
    # "auto" under the interpreter is Triton; the torch path is the reference.
    inputs = make_inputs((4, 20), 8, torch.float32)
    auto = layernorm_linear(**inputs)
    torch_path = layernorm_linear(**inputs, backend="torch")
    assert rel_err(auto, torch_path) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("N", [256, 384])
@pytest.mark.parametrize("out_features", [16, 128, 512, 640])
def test_bf16_pair_shapes_on_gpu(N, out_features):
    check(make_inputs((1, N, N, 128), out_features, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [257, 384])
@pytest.mark.parametrize("out_features", [16, 128])
def test_bf16_narrow_backward_on_gpu(N, out_features, narrow, monkeypatch):
    # The narrow kernel at its default tiles, whatever the shipped choice for the shape is.
    tuned = module.run_tuned
    monkeypatch.setattr(module, "run_tuned", lambda op, key, device, candidates, default, launch, rows=None:
                        launch(module.NARROW_DEFAULT) if op == "layernorm_linear_bwd"
                        else tuned(op, key, device, candidates, default, launch, rows))
    check(make_inputs((1, N, N, 128), out_features, torch.bfloat16, device="cuda"), torch.bfloat16)
    assert narrow


@pytest.mark.gpu
@pytest.mark.parametrize("N", [257, 384])
@pytest.mark.parametrize("out_features", [16, 128, 512])
def test_bf16_descriptor_tiles_on_gpu(N, out_features, descriptor_tiles):
    # TMA copies on Hopper.
    check(make_inputs((1, N, N, 128), out_features, torch.bfloat16, device="cuda"), torch.bfloat16)
    assert descriptor_tiles == [module.descriptors_available()] * 2


@pytest.mark.gpu
def test_bf16_weight_gradient_chunks_on_gpu(monkeypatch):
    # bf16 products of 32768-row chunks (8 MiB of LN(x) each, 5 chunks) summed in fp32.
    monkeypatch.setattr(module, "WEIGHT_GRAD_CHUNK_BYTES", 8 << 20)
    check(make_inputs((1, 384, 384, 128), 128, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
def test_autocast_on_gpu():
    inputs = make_inputs((1, 64, 64, 128), 128, torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layernorm_linear(**inputs, backend="triton")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert inputs["weight"].grad.dtype == torch.float32
    ref_inputs = {n: t.detach().double() for n, t in inputs.items()}
    assert rel_err(out, layernorm_linear_reference(**ref_inputs)) < TOL[torch.bfloat16]


def test_bad_shapes_are_named():
    inputs = make_inputs((4, 20), 8, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        layernorm_linear(**(inputs | {"weight": torch.randn(8, 19)}))
    with pytest.raises(ValueError, match="ln_bias"):
        layernorm_linear(**(inputs | {"ln_bias": torch.randn(21)}))


def test_weight_gradient_chunks_add_up_in_fp32(monkeypatch):
    # add_weight_grad: with widening products (a GPU, torch >= 2.8) one fp32 cuBLAS call a
    # chunk; elsewhere (here: the CPU has no torch.mm(..., out_dtype)) the product in the
    # operands' dtype, widened, then added. Both give the fp32 sum of the chunks' products.
    lnl = importlib.import_module("megafold.kernels.layernorm_linear")
    monkeypatch.setattr(lnl, "_NO_WIDENING_MM", set())
    torch.manual_seed(0)
    grad, act = torch.randn(96, 5, dtype=torch.bfloat16), torch.randn(96, 7, dtype=torch.bfloat16)
    acc = swapped = None
    for start in range(0, 96, 32):
        acc = lnl.add_weight_grad(acc, grad[start:start + 32], act[start:start + 32])
        swapped = lnl.add_weight_grad(swapped, grad[start:start + 32], act[start:start + 32], swapped=True)
    torch.testing.assert_close(swapped, acc, rtol=0, atol=0)  # the fallback ignores the order
    assert acc.dtype == torch.float32 and acc.shape == (5, 7)
    assert "cpu" in lnl._NO_WIDENING_MM  # tried once, then the fallback
    expected = sum(torch.mm(grad[s:s + 32].t(), act[s:s + 32]).float() for s in range(0, 96, 32))
    torch.testing.assert_close(acc, expected, rtol=0, atol=0)
    exact = grad.double().t() @ act.double()
    assert (acc.double() - exact).abs().max() <= 2e-2 * exact.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weight_gradient_chunks_widen_on_the_gpu(monkeypatch):
    # torch >= 2.8 on CUDA: the widening product is taken (no fallback recorded) and its fp32
    # sum is at least as close to float64 as the rounded chunks' sum.
    lnl = importlib.import_module("megafold.kernels.layernorm_linear")
    monkeypatch.setattr(lnl, "_NO_WIDENING_MM", set())
    torch.manual_seed(0)
    grad = torch.randn(3 * 4096, 64, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(3 * 4096, 128, device="cuda", dtype=torch.bfloat16)
    acc = swapped = None
    for start in range(0, grad.shape[0], 4096):
        acc = lnl.add_weight_grad(acc, grad[start:start + 4096], act[start:start + 4096])
        swapped = lnl.add_weight_grad(swapped, grad[start:start + 4096], act[start:start + 4096], swapped=True)
    assert swapped.shape == acc.shape and swapped.dtype == torch.float32
    torch.testing.assert_close(swapped, acc, rtol=1e-5, atol=1e-3)
    widened = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8) and torch.version.cuda
    assert ("cuda" not in lnl._NO_WIDENING_MM) == bool(widened)
    exact = grad.double().t() @ act.double()
    rounded = sum(torch.mm(grad[s:s + 4096].t(), act[s:s + 4096]).float() for s in range(0, grad.shape[0], 4096))
    assert acc.dtype == torch.float32
    assert (acc.double() - exact).abs().max() <= (rounded.double() - exact).abs().max() + 1e-6
