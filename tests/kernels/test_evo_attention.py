"""EvoAttention: the Triton kernels against a float64 reference, forward and every gradient.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py) at small sizes in
fp32 and fp16; on a GPU (marker `gpu`) at real sizes in bf16.

Tolerances, as relative Frobenius error ||x - ref|| / ||ref||:
  fp32: 1e-5. The kernels use IEEE fp32 dots and fp32 accumulation; measured errors are ~1e-7.
  fp16: 5e-3. Operands are rounded to fp16 (2^-11 relative) and so are P and dS before the
        second matmul of each pair; the errors add up to a few 1e-4, far under 5e-3.
  bf16: 2e-2. bf16 keeps 8 mantissa bits (2^-9 relative per rounding); P and dS are rounded to
        bf16 before the PV, dK and dQ products and the output is stored in bf16, so errors of
        3e-3..1e-2 are expected; 2e-2 still catches any indexing or masking bug (those give O(1)).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton.language as triton_language

from megafold.kernels import evo_attention, use_kernels
from megafold.kernels.evo_attention import evo_attention_reference
from megafold.kernels.testing import (TOL, evo_attention_reference_chunked, record_descriptor_use, rel_err,
                                      shipped_descriptor_choices_offered)

# The module itself (megafold.kernels.evo_attention the attribute is the op, not the module).
evo_module = importlib.import_module("megafold.kernels.evo_attention")


def make_inputs(lead, S, N, H, D, dtype, device="cpu", bias=True, mask=True, gate=True,
                masked_rows=()):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()

    q, k, v = (leaf(*lead, S, N, H, D) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    if bias:
        inputs["bias"] = leaf(*lead, H, N, N)
    if mask:
        keys = torch.rand(*lead, S, N, device=device) > 0.25
        for row in masked_rows:  # rows with every key masked
            keys[(..., row, slice(None))] = False
        inputs["mask"] = keys
    if gate:
        inputs["gate"] = leaf(*lead, S, N, H, D)
    return inputs


def check_against_reference(inputs, dtype, scale=None, backend="triton", grad_out=None):
    """Run the op and the float64 reference; compare the output and every gradient (of the
    floating-point inputs, in the order of ``inputs``)."""
    out = evo_attention(**inputs, scale=scale, backend=backend)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    leaves = [name for name, t in inputs.items() if t.is_floating_point()]
    grads = torch.autograd.grad(out, [inputs[n] for n in leaves], grad_out)

    ref_inputs = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t)
                  for n, t in inputs.items()}
    ref = evo_attention_reference(**ref_inputs, scale=scale)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[n] for n in leaves], grad_out.double())

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert rel_err(out, ref) < tol, f"output: {rel_err(out, ref):.2e}"
    for name, g, rg in zip(leaves, grads, ref_grads):
        assert g.shape == inputs[name].shape
        err = rel_err(g, rg)
        assert err < tol, f"grad {name}: {err:.2e} >= {tol}"
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lead,S,N,H,D",
    [
        ((1,), 3, 16, 2, 32),   # block-aligned
        ((2,), 5, 13, 3, 24),   # odd N, D not a power of two
        ((1,), 1, 33, 4, 8),    # single row (pair-bias shape), N past one block
        ((2, 2), 2, 7, 1, 48),  # two leading dims, D = 48
        ((), 2, 9, 2, 16),      # no leading dim: q [S, N, H, D]
    ],
)
def test_matches_reference(lead, S, N, H, D, dtype, poisoned_empty):
    inputs = make_inputs(lead, S, N, H, D, dtype, masked_rows=(0,))
    check_against_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "S,N,H,D",
    [
        (3, 19, 2, 40),  # padded to 64
        (2, 21, 1, 80),  # padded to 128
        (1, 13, 2, 96),  # padded to 128; one row: the dQ pass writes the bias gradient
    ],
)
def test_padded_head_dims_match_reference(S, N, H, D, dtype, poisoned_empty):
    """Head dims the kernels pad to the next power of two, with odd N, a padded tail of keys,
    a fully masked row (where S > 1), a gate and a bias."""
    inputs = make_inputs((1,), S, N, H, D, dtype, masked_rows=(1,) if S > 1 else ())
    inputs["mask"][..., N - 3:] = False  # padded tail of keys
    check_against_reference(inputs, dtype)


@pytest.mark.parametrize("parts", [dict(bias=False, mask=False, gate=False),
                                   dict(bias=True, mask=False, gate=False),
                                   dict(bias=False, mask=True, gate=True)])
def test_optional_inputs(parts, poisoned_empty):
    inputs = make_inputs((1,), 3, 11, 2, 16, torch.float32, **parts)
    check_against_reference(inputs, torch.float32)


def test_custom_scale_and_d128():
    inputs = make_inputs((1,), 2, 9, 1, 128, torch.float32)
    check_against_reference(inputs, torch.float32, scale=0.37)


def test_fully_masked_rows_give_zero_output_and_gradient():
    inputs = make_inputs((1,), 4, 10, 2, 16, torch.float32, masked_rows=(1, 3))
    out, grads = check_against_reference(inputs, torch.float32)
    assert torch.all(out[:, [1, 3]] == 0)
    dq = grads[0]
    assert torch.all(dq[:, [1, 3]] == 0)


@pytest.mark.parametrize("D", [16, 48])
def test_transposed_views_need_no_copy(D, monkeypatch):
    """Ending-node triangle attention passes the pair transposed: a view, not a copy (D = 48:
    the padded head dim read through the strides)."""
    B, N, H = 1, 12, 2
    pair_q = torch.randn(B, N, N, H, D, requires_grad=True)
    pair_k = torch.randn(B, N, N, H, D, requires_grad=True)
    pair_v = torch.randn(B, N, N, H, D, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in (pair_q, pair_k, pair_v))
    assert not q.is_contiguous()
    bias = torch.randn(B, H, N, N).transpose(-1, -2).requires_grad_()  # transposed bias too
    mask = (torch.rand(B, N, N) > 0.2).transpose(1, 2)

    copies = []
    real_contiguous = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        if self.data_ptr() in {pair_q.data_ptr(), pair_k.data_ptr(), pair_v.data_ptr()}:
            copies.append(self.shape)
        return real_contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    check_against_reference({"q": q, "k": k, "v": v, "bias": bias, "mask": mask}, torch.float32)
    assert copies == []


def test_broadcast_bias_gets_summed_gradient():
    lead, S, N, H, D = (3,), 2, 9, 2, 16
    inputs = make_inputs(lead, S, N, H, D, torch.float32)
    inputs["bias"] = torch.randn(1, H, N, N, requires_grad=True)  # one bias for the 3 batches
    check_against_reference(inputs, torch.float32)


def test_bias_and_mask_without_leading_dims_broadcast():
    """bias ``[H, N, N]`` and mask ``[S, N]`` for q ``[2, S, N, H, D]``: both broadcast over the
    batch (the op expands them only when their leading dims differ from q's)."""
    lead, S, N, H, D = (2,), 3, 10, 2, 16
    inputs = make_inputs(lead, S, N, H, D, torch.float32)
    inputs["bias"] = torch.randn(H, N, N, requires_grad=True)
    inputs["mask"] = torch.rand(S, N) > 0.3
    check_against_reference(inputs, torch.float32)


def test_bias_gradient_is_deterministic():
    inputs = make_inputs((1,), 5, 17, 1, 16, torch.float32)
    runs = []
    for _ in range(2):
        out = evo_attention(**inputs, backend="triton")
        runs.append(torch.autograd.grad(out, inputs["bias"], torch.ones_like(out))[0])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("D", [24, 48])
def test_many_rows_paths(D, monkeypatch):
    """What a GPU runs for many rows, forced at a CPU size: forward and dQ programs serving two
    rows (an odd S, whose last program takes its last row twice; a fully masked row among them)
    and the dBias pass split into row chunks (one shorter than the others) whose partial sums
    are bitwise the same on every run; with D = 48 padded to 64 too."""
    monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 2)
    monkeypatch.setattr(evo_module, "_dbias_row_chunks", lambda tiles, S, multiprocessors: 3)
    inputs = make_inputs((1,), 7, 13, 2, D, torch.float32, masked_rows=(3,))
    grad_out = torch.randn_like(inputs["q"])
    out, grads = check_against_reference(inputs, torch.float32, grad_out=grad_out)
    assert torch.all(out[:, 3] == 0)
    again = torch.autograd.grad(evo_attention(**inputs, backend="triton"), inputs["bias"], grad_out)[0]
    leaves = [n for n, t in inputs.items() if t.is_floating_point()]
    assert torch.equal(again, grads[leaves.index("bias")])


@pytest.mark.parametrize("dtype, two_rows, D", [(torch.float32, False, 24), (torch.float16, True, 24),
                                               (torch.float32, True, 48)])
def test_whole_key_blocks_path(dtype, two_rows, D, monkeypatch, poisoned_empty):
    """The kernels' unmasked pass over whole key blocks, as a GPU runs it from 8 rows: a
    crop's padding (whole blocks, then a masked one, then one past N), one row with a random
    mask, a fully masked row; one and two rows a program, and the dBias pass in row chunks;
    D = 48 padded to 64 too.
    Each row's first masked key is found once before the forward and kept for the backward (N
    where none is masked, -1 for a row that attends no key); that scan and the dBias pass's
    reduction over a chunk's rows loop here over small tiles.
    """
    monkeypatch.setattr(evo_module, "PREFIX_MIN_ROWS", 1)
    monkeypatch.setattr(evo_module, "_FIRST_ROWS", 4)
    monkeypatch.setattr(evo_module, "_FIRST_KEYS", 16)
    monkeypatch.setattr(evo_module, "_CHUNK_ROWS", triton_language.constexpr(4))
    if two_rows:
        monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 2)
        monkeypatch.setattr(evo_module, "_dbias_row_chunks", lambda tiles, S, multiprocessors: 3)
    stored = []
    forward = evo_module._forward
    monkeypatch.setattr(evo_module, "_forward", lambda *a: (lambda r: stored.append(r[3]) or r)(forward(*a)))
    inputs = make_inputs((1,), 6, 37, 1, D, dtype)
    keys = torch.ones(1, 6, 37, dtype=torch.bool)
    keys[..., 33:] = False  # padding
    keys[0, 2] = torch.rand(37) > 0.3  # a random mask
    keys[0, 2, 5] = False
    keys[0, 4] = False  # attends no key
    keys[0, 5] = True  # attends every key
    if two_rows:  # as the ending node's attention hands it: a transposed view
        keys = keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    inputs["mask"] = keys
    out, grads = check_against_reference(inputs, dtype)
    assert torch.all(out[:, 4] == 0)
    first_random = int((~keys[0, 2]).nonzero()[0])
    assert stored and stored[0].dtype == torch.int32
    assert stored[0].tolist() == [[33, 33, first_random, 33, -1, 37]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lead,S,N,H,D,two_rows",
    [
        ((1,), 3, 24, 2, 16, False),  # whole tiles of D; keys past N in the next row's
        ((2,), 5, 40, 2, 24, True),   # D = 24 in 32-wide tiles (the next head's columns), two rows
        ((1,), 1, 16, 4, 8, False),   # single row (the pair-bias shape)
        ((1,), 2, 80, 2, 16, False),  # two query blocks (bias rows from the second block's)
    ],
)
def test_key_descriptors_match_reference(lead, S, N, H, D, two_rows, dtype, key_descriptors, monkeypatch,
                                            poisoned_empty):
    if two_rows:
        monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 2)
    inputs = make_inputs(lead, S, N, H, D, dtype, masked_rows=(S - 1,))
    out, _ = check_against_reference(inputs, dtype)
    assert torch.all(out[:, S - 1] == 0)
    # (One row: the dQ pass writes the bias gradient, no dBias pass.)
    assert key_descriptors == [evo_module.descriptors_available()] * (3 if S == 1 else 4)


@pytest.mark.parametrize("ending", [False, True])
def test_key_descriptors_of_a_projection(ending, key_descriptors, monkeypatch):
    """The pair attention's layout: q, k, v and gate views of one projection whose rows hold
    every head (the kernel's rows of keys have the projection's stride), a contiguous bias,
    padded keys, whole key blocks before them taken unmasked, two rows a program."""
    monkeypatch.setattr(evo_module, "PREFIX_MIN_ROWS", 1)
    monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 2)
    B, N, H, D = 1, 40, 2, 16
    width = 4 * H * D + H + (-(4 * H * D + H) % 16)
    proj = torch.randn(B, N, N, width)
    if ending:  # projected from the transposed pair: a contiguous projection all the same
        proj = proj.transpose(1, 2).contiguous()
    q, k, v, gate = (t.detach().requires_grad_() for t in proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3))
    keys = torch.ones(B, N, N, dtype=torch.bool)
    keys[..., N - 5:] = False
    inputs = {"q": q, "k": k, "v": v, "bias": torch.randn(B, H, N, N).requires_grad_(), "mask": keys, "gate": gate}
    assert k.stride()[2] == width and not k.is_contiguous()
    check_against_reference(inputs, torch.float32)
    assert key_descriptors == [evo_module.descriptors_available()] * 4


def test_key_descriptors_of_a_bias_shared_by_every_batch(key_descriptors):
    # A bias [H, N, N] for leading dims (2, 2): the kernel reads batch 0's rows for every batch.
    inputs = make_inputs((2, 2), 3, 24, 2, 16, torch.float32)
    inputs["bias"] = torch.randn(2, 24, 24).requires_grad_()
    check_against_reference(inputs, torch.float32)
    assert key_descriptors == [evo_module.descriptors_available()] * 4


def test_key_descriptors_fall_back_where_a_layout_has_none(key_descriptors):
    # Keys whose rows do not merge (a transposed view), a bias of 13 fp32 columns (52-byte
    # rows, not 16-byte aligned), heads of 12 fp16 channels (a head's first column 24 bytes
    # in): the same tiles through pointers.
    inputs = make_inputs((1,), 4, 24, 2, 16, torch.float32)
    inputs["k"] = inputs["k"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    check_against_reference(inputs, torch.float32)
    check_against_reference(make_inputs((1,), 3, 13, 2, 16, torch.float32), torch.float32)
    check_against_reference(make_inputs((1,), 3, 16, 4, 12, torch.float16), torch.float16)
    # The first's queries and bias still have descriptors: dK dV takes them. The second's
    # q, k, v and dO do: dBias (whose bias tile is loaded by pointer) takes them.
    avail = evo_module.descriptors_available()
    assert key_descriptors == [False, False, avail, False] + [False, avail, False, False] + [False] * 4


@pytest.mark.gpu
@pytest.mark.parametrize("S,N,H,D", [(257, 257, 4, 32), (384, 384, 4, 32), (48, 384, 16, 48), (1, 512, 16, 64)])
def test_gpu_key_descriptors(S, N, H, D, key_descriptors):
    # TMA copies on Hopper; N = 257 (514-byte bias rows) takes the pointer path.
    check_gpu_bf16(S, N, H, D)
    # Two forward and backward passes (the second checks the bias gradient's determinism). At
    # N = 257 only the dBias pass, which loads its bias tile by pointer, takes descriptors.
    avail = evo_module.descriptors_available()
    aligned = avail and N % 8 == 0
    assert key_descriptors == ([aligned] + ([avail] if S > 1 else []) + [aligned] * 2) * 2


def test_descriptor_candidates_for_every_pass_and_dq_never_at_two_stages(monkeypatch):
    offered = {}
    monkeypatch.setattr(evo_module, "descriptors_available", lambda: True)
    monkeypatch.setattr(evo_module, "run_tuned",
                        lambda op, key, device, candidates, default, launch: offered.update({key[0]: candidates}))
    for kind in ("fwd", "dkdv", "dq", "dbias"):
        evo_module._run(kind, None, torch.device("cpu"), 48, 384, 48, 16, torch.bfloat16, True)
    tma = {kind: [c for c in candidates if c.get("TMA")] for kind, candidates in offered.items()}
    assert {c["num_stages"] for c in tma["fwd"]} == {c["num_stages"] for c in tma["dkdv"]} == {2, 3, 4}
    assert {c["num_stages"] for c in tma["dbias"]} == {2, 3, 4}
    assert tma["dq"] and min(c["num_stages"] for c in tma["dq"]) == 3  # ptxas crashed at 2 (session 33)


def test_two_row_candidates_only_for_the_forward_with_descriptors_and_rows_to_pair(monkeypatch):
    offered = {}
    monkeypatch.setattr(evo_module, "run_tuned",
                        lambda op, key, device, candidates, default, launch: offered.update({key[0]: candidates}))
    for available, S in ((True, 384), (False, 384), (True, 4)):
        monkeypatch.setattr(evo_module, "descriptors_available", lambda: available)
        for kind in ("fwd", "dkdv", "dq", "dbias"):
            evo_module._run(kind, None, torch.device("cpu"), S, 384, 32, 4, torch.bfloat16, True)
            two = [c for c in offered[kind] if c.get("ROWS") == 2]
            assert bool(two) == (available and S >= 8 and kind == "fwd"), (kind, S, available)
            assert all(c.get("TMA") for c in two)


def test_a_configurations_rows_override_the_heuristic(monkeypatch):
    monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 1)
    inp = evo_module._Inputs(*(torch.empty(1, 9, 40, 2, 16) for _ in range(3)), None, None, None)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    assert inp.query_grid(cfg, 16) == ((3, 9, 2), 1)
    assert inp.query_grid(cfg | {"ROWS": 2}, 16) == ((3, 5, 2), 2)


@pytest.mark.parametrize("descriptors", [False, True])
def test_forward_two_rows_by_configuration(descriptors, monkeypatch, poisoned_empty):
    """A forward configuration's ``"ROWS": 2`` (odd S, a fully masked row) against float64,
    with the heuristic saying one row; by descriptor too (the shipped kind)."""
    monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 1)
    launched = []
    used = record_descriptor_use(monkeypatch, evo_module, "_key_descriptors")

    def pick(op, key, device, candidates, default, launch):
        cfg = default
        if key[0] == "fwd":
            cfg = default | {"ROWS": 2} | ({"TMA": True} if descriptors else {})
        launched.append((key[0], cfg.get("ROWS", 1)))
        return launch(cfg)

    monkeypatch.setattr(evo_module, "run_tuned", pick)
    inputs = make_inputs((1,), 5, 24, 2, 16, torch.float32, masked_rows=(2,))
    out, _ = check_against_reference(inputs, torch.float32)
    assert torch.all(out[:, 2] == 0)
    assert ("fwd", 2) in launched and ("dq", 1) in launched
    assert used[:1] == [descriptors and evo_module.descriptors_available()]


def test_every_shipped_descriptor_choice_is_a_candidate_of_its_key():
    """A shipped descriptor (TMA) choice is one the launcher offers for its key."""
    dtypes = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}

    def call(op, key):
        kind, S, N, D, H, dtype, has_bias = key
        evo_module._run(kind, None, torch.device("cpu"), S, N, D, H, dtypes[dtype], has_bias)

    assert shipped_descriptor_choices_offered(evo_module, "evo_attention", call) > 0  # the H200's, session 33


@pytest.mark.parametrize("D", [16, 40])
def test_int64_offsets_path(D, monkeypatch):
    """The kernels' int64 addressing (what views of more than 2**31 elements get on a GPU),
    forced at a CPU size, on the transposed views of the ending-node attention and with the
    two-row and dBias-chunk paths; D = 40 padded to 64 too."""
    monkeypatch.setattr(evo_module._Inputs, "wide", property(lambda self: True))
    monkeypatch.setattr(evo_module, "PREFIX_MIN_ROWS", 1)  # the prefix's offsets too
    monkeypatch.setattr(evo_module, "_rows_per_program", lambda S, programs, multiprocessors, tile: 2)
    monkeypatch.setattr(evo_module, "_dbias_row_chunks", lambda tiles, S, multiprocessors: 2)
    inputs = make_inputs((1,), 5, 5, 2, D, torch.float32, masked_rows=(1,))
    inputs = {name: (t.detach().transpose(1, 2).requires_grad_() if t.dim() == 5 else t)
              for name, t in inputs.items()}  # S and N swap roles: rows strided by N x H x D
    check_against_reference(inputs, torch.float32)


def test_wide_only_past_int32():
    small = evo_module._Inputs(*(torch.empty(1, 4, 4, 2, 8) for _ in range(3)), None, None, None)
    assert not small.wide
    big_storage = torch.empty(2**31 // 2**20, 2**20, dtype=torch.uint8)  # 2 GiB of one-byte elements
    view = big_storage[:1, :256].view(1, 4, 4, 2, 8)
    assert evo_module._Inputs(view, view, view, None, None, None).wide


def test_two_rows_per_program_only_where_the_grid_stays_full():
    small_tile = 64 * 32 * 32
    # Triangle N=384 (64-query blocks, H=4) and diffusion S=48 on 132 SMs: two rows.
    assert evo_module._rows_per_program(384, 6 * 384 * 4, 132, small_tile) == 2
    assert evo_module._rows_per_program(48, 6 * 48 * 16, 132, small_tile) == 2
    # Diffusion in chunks of 8 samples at N=384: 768 programs would drop under 4 per SM.
    assert evo_module._rows_per_program(8, 6 * 8 * 16, 132, small_tile) == 1
    # One row (pair bias), few rows, or tiles too large for two rows' registers: one.
    assert evo_module._rows_per_program(1, 10**6, 132, small_tile) == 1
    assert evo_module._rows_per_program(5, 10**6, 132, small_tile) == 1
    assert evo_module._rows_per_program(384, 10**6, 132, 64 * 128 * 32) == 1
    assert evo_module._rows_per_program(48, 10**6, 132, 64 * 32 * 64) == 1


def test_dbias_row_chunks_fill_the_gpu_only_when_needed():
    # Triangle N=384 on 132 SMs with 64x32 tiles: 288 programs -> 2 chunks of 192 rows.
    assert evo_module._dbias_row_chunks(288, 384, 132) == 2
    # Enough programs already (triangle N=768, diffusion): one chunk, no partial sums.
    assert evo_module._dbias_row_chunks(1152, 768, 132) == 1
    assert evo_module._dbias_row_chunks(4608, 48, 132) == 1
    # Few rows: chunks keep at least 32 rows.
    assert evo_module._dbias_row_chunks(8, 40, 132) == 1
    assert evo_module._dbias_row_chunks(8, 100, 132) == 3


def test_default_blocks_are_tuning_candidates(monkeypatch):
    """The untuned default of every kernel is among the tuner's candidates (so tuning can only
    improve on it), with tiles of at most 64 x 64 for head dims over 32."""
    monkeypatch.setattr(evo_module, "interpreter_active", lambda: False)
    for kind in ("fwd", "dkdv", "dq", "dbias"):
        for S in (1, 48, 768):
            for D in (24, 32, 48, 64, 128):
                config = evo_module._default_blocks(kind, S, D)
                assert config in evo_module._CANDIDATES, (kind, S, D, config)
                if D > 32:
                    assert max(config["BLOCK_M"], config["BLOCK_N"]) <= 64


def test_chunked_reference_matches_plain_reference():
    inputs = make_inputs((1,), 5, 9, 2, 8, torch.float32)
    grad_out = torch.randn(1, 5, 9, 2, 8)
    out, grads = evo_attention_reference_chunked(inputs, grad_out, max_logits=2 * 2 * 81)
    ref = evo_attention_reference(**{n: t.double() if t.is_floating_point() else t
                                     for n, t in inputs.items()})
    assert rel_err(out, ref) < 1e-6
    full = torch.autograd.grad(evo_attention_reference(**inputs), inputs["bias"], grad_out)[0]
    assert rel_err(grads["bias"], full) < 1e-5


def test_backend_choice():
    inputs = make_inputs((1,), 2, 5, 1, 8, torch.float32)
    ref = evo_attention_reference(**inputs)
    with use_kernels("torch"):
        assert torch.equal(evo_attention(**inputs), ref)
    with pytest.raises(ValueError, match="unknown kernels backend"):
        with use_kernels("cuda"):
            pass


@pytest.mark.parametrize(
    "bad,error",
    [
        (dict(k=torch.randn(1, 2, 5, 1, 9)), "k shape"),
        (dict(bias=torch.randn(1, 1, 5, 4)), "bias must be"),
        (dict(mask=torch.ones(1, 2, 5)), "mask must be bool"),
        (dict(mask=torch.ones(1, 3, 5, dtype=torch.bool)), "mask must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, error):
    inputs = {"q": torch.randn(1, 2, 5, 1, 8), "k": torch.randn(1, 2, 5, 1, 8),
              "v": torch.randn(1, 2, 5, 1, 8)}
    inputs.update(bad)
    with pytest.raises((ValueError, TypeError), match=error):
        evo_attention(**inputs, backend="triton")


# --------------------------------------------------------------------------- GPU, real sizes


def check_gpu_bf16(S, N, H, D):
    dtype = torch.bfloat16
    inputs = make_inputs((1,), S, N, H, D, dtype, device="cuda", masked_rows=(3 % S,))
    inputs["mask"][..., N - 17:] = False  # padded tail of keys, as in a padded crop
    out = evo_attention(**inputs, backend="triton")
    grad_out = torch.randn_like(out)
    names = [n for n, t in inputs.items() if t.is_floating_point()]
    grads = dict(zip(names, torch.autograd.grad(out, [inputs[n] for n in names], grad_out)))
    ref, ref_grads = evo_attention_reference_chunked(inputs, grad_out)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    for n in names:
        assert rel_err(grads[n], ref_grads[n]) < TOL[dtype], (n, rel_err(grads[n], ref_grads[n]))
    # Determinism of the bias gradient on the real launch configuration.
    out2 = evo_attention(**inputs, backend="triton")
    again = torch.autograd.grad(out2, inputs["bias"], grad_out)[0]
    assert torch.equal(again, grads["bias"])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "S,N,H,D",
    [(256, 256, 4, 32), (384, 384, 4, 32), (767, 767, 4, 32), (1024, 1024, 4, 32),  # triangle
     (48, 384, 16, 48), (48, 768, 16, 48),  # diffusion: 48 samples share one bias
     (1, 1024, 16, 24), (1, 512, 16, 64)],  # single attention with pair bias
)
def test_gpu_bf16_real_sizes(S, N, H, D):
    check_gpu_bf16(S, N, H, D)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "S,N,H,D",
    [(768, 768, 4, 32), (384, 384, 4, 32), (48, 768, 16, 48), (1, 768, 16, 64), (1, 384, 16, 24),
     (8, 256, 2, 128)],
)
def test_gpu_default_blocks(S, N, H, D, monkeypatch):
    """Every kernel with its default blocks (what a GPU with no tuned choice runs): they
    compile, fit in shared memory and match the reference."""
    monkeypatch.setattr(evo_module, "run_tuned",
                        lambda op, key, device, candidates, default, launch: launch(default))
    check_gpu_bf16(S, N, H, D)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """The ending-node triangle attention at N = 2048: q, k, v and gate are transposed views of
    a [1, N, N, 4 H D + H] projection, so a row's offset passes 2**31 elements. The views give
    the same output and gradients as contiguous copies (whose offsets fit in int32)."""
    N, H, D = 2048, 4, 32
    torch.manual_seed(0)
    proj = torch.randn(1, N, N, 4 * H * D + H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    views = [t.transpose(1, 2) for t in proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3)]
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    bias = torch.randn(1, H, N, N, device="cuda", dtype=torch.bfloat16)
    mask = (torch.rand(1, N, N, device="cuda") > 0.1).transpose(1, 2)
    assert evo_module._Inputs(*views[:3], bias, mask, views[3]).wide
    assert not evo_module._Inputs(*copies[:3], bias, mask, copies[3]).wide
    grad_out = torch.randn(1, N, N, H, D, device="cuda", dtype=torch.bfloat16)
    results = []
    for q, k, v, gate in (views, copies):
        out = evo_attention(q, k, v, bias=bias, mask=mask, gate=gate, backend="triton")
        results.append([out, *torch.autograd.grad(out, [q, k, v, gate], grad_out)])
    for wide, narrow in zip(*results, strict=True):
        assert torch.isfinite(wide).all() and torch.equal(wide, narrow)
