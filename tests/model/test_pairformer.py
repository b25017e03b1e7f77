import torch

from megafold.model import preset
from megafold.model.msa import MSAPairWeightedAveraging, OuterProductMean
from megafold.model.pairformer import PairformerBlock, TriangleAttention
from megafold.model.primitives import Transition


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return module


def _pair(B=2, N=9, c=16):
    pair = torch.randn(B, N, N, c)
    mask = torch.ones(B, N, N, dtype=torch.bool)
    mask[1, 6:] = False
    mask[1, :, 6:] = False
    return pair, mask


def test_ending_node_attention_is_starting_node_on_the_transpose():
    start = _randomise(TriangleAttention(16, heads=2, head_dim=8, ending=False))
    end = TriangleAttention(16, heads=2, head_dim=8, ending=True)
    end.load_state_dict(start.state_dict())
    pair, mask = _pair()
    expected = start(pair.transpose(1, 2), mask.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(end(pair, mask), expected)


def _triangle_attention_by_definition(module: TriangleAttention, pair, mask):
    """AF3 Alg. 14 (starting node) / 15 (ending node) written out with einsum."""
    H, D = module.heads, module.head_dim
    z = torch.nn.functional.layer_norm(pair, (pair.shape[-1],), module.norm_weight, module.norm_bias)
    proj = z @ module.in_proj_weight.T
    q, k, v, g = proj[..., : 4 * H * D].unflatten(-1, (4, H, D)).unbind(-3)  # [B, I, J, H, D]
    b = proj[..., 4 * H * D :]  # [B, I, J, H]
    if module.ending:  # a_ijk = softmax_k(q_ij . k_kj + b_ki), keys k of column j
        logits = torch.einsum("bijhd,bkjhd->bijhk", q, k) / D**0.5 + b.permute(0, 2, 3, 1)[:, :, None]
        keys = mask.transpose(1, 2)[:, None, :, None, :]  # mask[k, j] -> [B, 1, J, 1, K]
    else:  # a_ijk = softmax_k(q_ij . k_ik + b_jk), keys k of row i
        logits = torch.einsum("bijhd,bikhd->bijhk", q, k) / D**0.5 + b.permute(0, 1, 3, 2)[:, None]
        keys = mask[:, :, None, None, :]
    # A query whose keys are all masked attends to nothing (output 0), as the op defines.
    a = torch.softmax(logits.masked_fill(~keys, float("-inf")), dim=-1).nan_to_num(0.0)
    o = torch.einsum("bijhk,bkjhd->bijhd" if module.ending else "bijhk,bikhd->bijhd", a, v)
    return (torch.sigmoid(g) * o).flatten(-2) @ module.out_proj_weight.T


def test_triangle_attention_matches_alg_14_and_15():
    pair, mask = _pair()
    for ending in (False, True):
        module = _randomise(TriangleAttention(16, heads=2, head_dim=8, ending=ending))
        out = module(pair, mask)
        expected = _triangle_attention_by_definition(module, pair, mask)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_chunked_triangle_attention_and_transition_match_unchunked():
    pair, mask = _pair()
    for ending in (False, True):
        whole = _randomise(TriangleAttention(16, heads=2, head_dim=8, ending=ending))
        chunked = TriangleAttention(16, heads=2, head_dim=8, ending=ending, chunk_size=4)
        chunked.load_state_dict(whole.state_dict())
        x = pair.clone().requires_grad_(True)
        whole(x, mask).square().sum().backward()
        grad = x.grad.clone()
        x.grad = None
        out = chunked(x, mask)
        out.square().sum().backward()
        torch.testing.assert_close(out, whole(pair, mask))
        torch.testing.assert_close(x.grad, grad)
    whole = _randomise(Transition(16, 2))
    chunked = Transition(16, 2, chunk_size=2)
    chunked.load_state_dict(whole.state_dict())
    torch.testing.assert_close(chunked(pair), whole(pair))


def test_padding_never_reaches_real_entries():
    config = preset("tiny")
    block = _randomise(PairformerBlock(16, 32, tri_mul_hidden=16, tri_attn_heads=2, tri_attn_head_dim=8, single_heads=2))
    block.eval()
    pair, mask = _pair()
    single = torch.randn(2, 9, 32)
    token_mask = mask[:, 0] | mask[:, :, 0]
    token_mask[1, 6:] = False
    out_pair, out_single = block(pair, single, mask, token_mask)
    garbage_pair, garbage_single = pair.clone(), single.clone()
    garbage_pair[~mask] = 1e3 * torch.randn(int((~mask).sum()), 16)
    garbage_single[~token_mask] = 1e3
    pair2, single2 = block(garbage_pair, garbage_single, mask, token_mask)
    torch.testing.assert_close(pair2[mask], out_pair[mask])
    torch.testing.assert_close(single2[token_mask], out_single[token_mask])
    assert config.pair_dropout == 0.25


def test_msa_pair_weighted_averaging_matches_its_definition():
    """AF3 Alg. 10: o_si = sigmoid(g_si) * sum_j softmax_j(b_ij) v_sj per head."""
    module = _randomise(MSAPairWeightedAveraging(8, 16, heads=2, head_dim=4))
    msa = torch.randn(2, 5, 9, 8)
    pair, _ = _pair()
    msa_mask = torch.rand(2, 5, 9) < 0.8
    msa_mask[:, :, 0] = True
    out = module(msa, pair, msa_mask)

    ln = torch.nn.functional.layer_norm
    m = ln(msa, (8,), module.msa_norm_weight, module.msa_norm_bias)
    value, gate = (m @ module.value_gate_weight.T).unflatten(-1, (2, 2, 4)).unbind(-3)  # [B, S, N, H, D]
    bias = ln(pair, (16,), module.pair_norm_weight, module.pair_norm_bias) @ module.pair_bias_weight.T  # [B, N, N, H]
    logits = bias[:, None].masked_fill(~msa_mask[:, :, None, :, None], float("-inf"))  # [B, S, I, J, H]
    weights = logits.softmax(3)
    averaged = torch.einsum("bsijh,bsjhd->bsihd", weights, value) * torch.sigmoid(gate)
    expected = averaged.flatten(-2) @ module.out_proj_weight.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_outer_product_mean_module_follows_alg_9():
    module = _randomise(OuterProductMean(8, 16, c_hidden=4))
    msa = torch.randn(1, 6, 5, 8)
    mask = torch.rand(1, 6, 5) < 0.7
    out = module(msa, mask)
    m = torch.nn.functional.layer_norm(msa, (8,), module.norm_weight, module.norm_bias)
    a, b = (m @ module.proj_weight.T * mask[..., None]).chunk(2, -1)
    outer = torch.einsum("bsic,bsjd->bijcd", a, b).flatten(-2)
    count = torch.einsum("bsi,bsj->bij", mask.float(), mask.float())[..., None]
    expected = (outer / (1e-3 + count)) @ module.out_weight.T + module.out_bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_checkpointed_recompute_reuses_the_dropout_masks_it_was_given():
    """The stack draws each block's dropout masks before its checkpoint and the checkpoint keeps
    no RNG state: the recompute in backward must see the forward's masks, so checkpointed and
    plain runs from one seed give the same output and gradients. Dropout must also drop."""
    from megafold.model.pairformer import PairformerStack

    results = []
    for checkpoint, reentrant in ((False, False), (True, False), (True, True)):
        config = preset("tiny", pairformer_blocks=2, checkpoint=checkpoint, checkpoint_reentrant=reentrant,
                        pair_dropout=0.25)
        torch.manual_seed(0)
        stack = _randomise(PairformerStack(config, 2, 16, 32, tri_mul_hidden=16)).train()
        pair, mask = _pair()
        pair.requires_grad_(True)
        single = torch.randn(2, 9, 32, requires_grad=True)
        token_mask = mask[:, 0] | mask[:, :, 0]
        torch.manual_seed(1)
        out_pair, out_single = stack(pair, single, mask, token_mask)
        (out_pair.square().sum() + out_single.square().sum()).backward()
        grads = [pair.grad, single.grad] + [p.grad for p in stack.parameters()]
        results.append((out_pair.detach(), grads))
        if not checkpoint:
            with torch.no_grad():
                assert not torch.allclose(stack.eval()(pair, single, mask, token_mask)[0], out_pair)
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for grad, expected in zip(grads, results[0][1]):
            torch.testing.assert_close(grad, expected)


def test_dropout_keep_masks_drop_a_quarter_and_scale_the_rest():
    block = PairformerBlock(16, 0, tri_mul_hidden=16, tri_attn_heads=2, tri_attn_head_dim=8).train()
    keep = block.dropout_keep(torch.zeros(2, 50, 50, 16))
    assert keep.shape == (4, 2, 50, 16) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    assert block.eval().dropout_keep(torch.zeros(2, 5, 5, 16)) is None
