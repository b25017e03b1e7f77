import contextlib
import math
import re

import pytest
import torch
from torch import nn

from megafold.model import AlphaFold3, preset
from megafold.model.primitives import (
    AtomWindows,
    LinearNoBias,
    checkpoint_pair_block,
    local_attention,
    nonreentrant_checkpoints,
    shared_dropout,
)


@pytest.mark.parametrize("n_atoms", [20, 100, 128])
def test_atom_windows_are_af3_subsets(n_atoms):
    """Keys of every query = AF3 Alg. 7: m with |l - c| < 16 and |m - c| < 64 for a centre c
    in {15.5, 47.5, ...}."""
    mask = torch.ones(1, n_atoms, dtype=torch.bool)
    mask[0, -3:] = False  # padding atoms are never keys
    windows = AtomWindows(mask, 32, 128)
    centres = 15.5 + 32 * torch.arange(windows.n_windows)
    idx = torch.arange(n_atoms)
    for l in range(n_atoms):
        c = centres[(l - centres).abs() < 16]
        expected = {m for m in range(n_atoms) if (m - c).abs().lt(64).any() and mask[0, m]}
        k, q = divmod(l, 32)
        got = set(windows.key_index[k][windows.key_mask[0, k]].tolist())
        assert got == expected, l
    assert torch.equal(windows.from_query_blocks(windows.query_blocks(idx[None], 1), 1), idx[None])


def test_local_attention_equals_dense_attention_with_af3_mask():
    B, S, A, H, D = 2, 3, 70, 2, 4
    mask = torch.ones(B, A, dtype=torch.bool)
    mask[1, 50:] = False
    windows = AtomWindows(mask, 32, 128)
    q, k, v, g = (torch.randn(B, S, A, H, D, dtype=torch.float64) for _ in range(4))
    dense_bias = torch.randn(B, H, A, A, dtype=torch.float64)
    # dense reference: -inf outside each query's window and on padded keys
    allowed = torch.zeros(B, A, A, dtype=torch.bool)
    for b in range(B):
        for kk in range(windows.n_windows):
            keys = windows.key_index[kk][windows.key_mask[b, kk]]
            allowed[b, 32 * kk : 32 * kk + 32, keys] = True
    logits = torch.einsum("bslhd,bsmhd->bshlm", q, k) / math.sqrt(D) + dense_bias[:, None]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    expected = torch.einsum("bshlm,bsmhd->bslhd", logits.softmax(-1), v) * torch.sigmoid(g)

    query_rows = windows.query_blocks(torch.arange(A)[None], 1)[0].clamp(max=A - 1)  # [K, Q]
    window_bias = dense_bias[:, :, query_rows[:, :, None], windows.key_index[:, None, :]]  # [B, H, K, Q, M]
    out = local_attention(
        windows.query_blocks(q, 2), windows.key_windows(k, 2), windows.key_windows(v, 2),
        window_bias.permute(0, 2, 1, 3, 4), windows.key_mask, windows.query_blocks(g, 2),
    )
    out = windows.from_query_blocks(out, 2)
    real = mask[:, None, :, None, None].expand_as(out)
    torch.testing.assert_close(out[real], expected[real])


def test_shared_dropout():
    x = torch.ones(2, 6, 7, 5)
    rows = shared_dropout(x, 0.5, True, -3)
    assert (rows == rows[:, :1]).all() and set(rows.unique().tolist()) == {0.0, 2.0}
    columns = shared_dropout(x, 0.5, True, -2)
    assert (columns == columns[:, :, :1]).all()
    assert torch.equal(shared_dropout(x, 0.5, False, -3), x)


BARE_LAYER_NORM = re.compile(r"(^|_)(norm|ln)(_in|_out)?_(weight|bias)$")


def _init_ok(name: str, param: torch.Tensor) -> bool:
    """LayerNorm parameters held outside nn.LayerNorm (for the fused ops) start at 1 / 0."""
    leaf = name.rsplit(".", 1)[-1]
    if not BARE_LAYER_NORM.search(leaf):
        return True
    return bool((param == (1 if leaf.endswith("weight") else 0)).all())


def test_initialisation_follows_af3():
    model = AlphaFold3(preset("tiny"))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.weight is None or (module.weight == 1).all()
            assert module.bias is None or (module.bias == 0).all()
    params = dict(model.named_parameters())
    bare = [n for n in params if BARE_LAYER_NORM.search(n.rsplit(".", 1)[-1])]
    assert len(bare) > 30
    for name, param in params.items():
        assert _init_ok(name, param), name
    final = [
        n for n in params
        if n.rsplit(".", 1)[-1] in ("out_proj_weight", "w_out", "out_weight") or n.endswith(("out_proj.weight", "proj_out.weight"))
    ]
    assert len(final) > 20
    for name in final + ["recycle_pair.weight", "distogram_head.proj.weight", "confidence_head.plddt_weight"]:
        assert (params[name] == 0).all(), name
    gates = [n for n in params if n.endswith(("out_gate.bias",))]
    assert gates and all((params[n] == -2).all() for n in gates)  # AF3: biasinit -2
    scales = [n for n in params if n.endswith("scale.bias")]
    assert scales and all((params[n] == 1).all() and (params[n[: -len("bias")] + "weight"] == 0).all() for n in scales)
    tri = model.pairformer.blocks[0].tri_attn_start
    hidden = tri.heads * tri.head_dim
    assert (tri.in_proj_weight[3 * hidden : 4 * hidden] == 0).all()  # gate rows
    assert tri.in_proj_weight[: 3 * hidden].std() > 0

    big = LinearNoBias(2048, 512).weight
    assert big.std().item() == pytest.approx(1 / math.sqrt(2048), rel=0.03)
    assert big.abs().max() <= 2 / math.sqrt(2048) / 0.8796 + 1e-6  # truncated at 2 sigma


def _block(pair, single, weight):
    new_pair = pair + torch.tanh(pair @ weight)
    return new_pair, single * 2


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("pair_bf16", [False, True])
def test_checkpoint_pair_block(pair_bf16, reentrant):
    weight = torch.randn(8, 8, requires_grad=True)
    pair = torch.randn(2, 5, 5, 8, requires_grad=True)
    single = torch.randn(2, 5, 3, requires_grad=True)
    ref_pair, ref_single = _block(pair, single, weight)
    (ref_pair.square().sum() + ref_single.sum()).backward()
    expected = [t.grad.clone() for t in (pair, single, weight)]
    for t in (pair, single, weight):
        t.grad = None
    out_pair, out_single = checkpoint_pair_block(
        _block, pair, single, weight, enabled=True, pair_bf16=pair_bf16, reentrant=reentrant
    )
    (out_pair.square().sum() + out_single.sum()).backward()
    tol = 2e-2 if pair_bf16 else 1e-6  # bf16 keeps 8 mantissa bits of the block input
    assert out_pair.dtype == torch.float32
    assert (out_pair - ref_pair).norm() / ref_pair.norm() < tol
    for got, want in zip((pair.grad, single.grad, weight.grad), expected):
        assert (got - want).norm() / want.norm() < tol


def _dropout_block(pair, single, grad_modes):
    grad_modes.append(torch.is_grad_enabled())
    return pair + shared_dropout(torch.tanh(pair), 0.5, True, -3), single


@pytest.mark.parametrize("forced", [False, True])
def test_reentrant_checkpoint_replays_dropout_and_builds_no_graph_in_forward(forced):
    """The reentrant form runs the block's forward without building an autograd graph, then
    recomputes it in backward with the forward's dropout masks (same gradients as no
    checkpoint); ``nonreentrant_checkpoints()`` switches to the non-reentrant form, whose
    forward builds the graph (and drops what it saves)."""
    pair = torch.randn(2, 6, 6, 4, requires_grad=True)
    single = torch.randn(2, 6, 3, requires_grad=True)
    torch.manual_seed(3)
    ref_pair, _ = _dropout_block(pair, single, [])
    ref_pair.square().sum().backward()
    expected = pair.grad.clone()
    pair.grad = None
    grad_modes: list[bool] = []
    torch.manual_seed(3)
    with nonreentrant_checkpoints() if forced else contextlib.nullcontext():
        out, _ = checkpoint_pair_block(
            _dropout_block, pair, single, grad_modes, enabled=True, pair_bf16=False, reentrant=True
        )
    assert torch.equal(out, ref_pair)
    assert grad_modes == [forced]
    torch.manual_seed(99)  # the recompute must not draw new masks from the current state
    out.square().sum().backward()
    assert grad_modes == [forced, True]
    assert torch.allclose(pair.grad, expected, rtol=1e-6, atol=1e-7)
