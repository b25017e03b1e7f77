"""GraphedStep: a Pairformer training step captured as one CUDA graph replays the eager step."""

import pytest
import torch

from megafold.errors import ConfigError
from megafold.kernels.testing import rel_err
from megafold.model import preset
from megafold.model.pairformer import PairformerStack
from megafold.train.graphs import GraphedStep


def test_graphed_step_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA device"):
        GraphedStep(lambda: None)


def _stack_step(kernels, N=72, reentrant=True):
    torch.manual_seed(0)
    config = preset("paper", kernels=kernels, pairformer_blocks=2, checkpoint_reentrant=reentrant)
    stack = PairformerStack(config, 2, config.c_z, config.c_s).cuda()
    with torch.no_grad():  # random weights everywhere: the zero-initialised outputs would hide errors
        for param in stack.parameters():
            param.add_(0.05 * torch.randn_like(param))
    pair = torch.randn(1, N, N, config.c_z, device="cuda", requires_grad=True)
    single = torch.randn(1, N, config.c_s, device="cuda", requires_grad=True)
    token_mask = torch.ones(1, N, dtype=torch.bool, device="cuda")
    token_mask[:, N - 5 :] = False
    pair_mask = token_mask[:, :, None] & token_mask[:, None, :]

    def body():
        with torch.autocast("cuda", torch.bfloat16):
            out_pair, out_single = stack(pair, single, pair_mask, token_mask)
        loss = out_pair.float().square().mean() + out_single.float().square().mean()
        loss.backward()
        return loss

    return stack, pair, single, body


def _grads(stack, pair, single):
    return [pair.grad.clone(), single.grad.clone()] + [p.grad.clone() for p in stack.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels,reentrant", [("triton", True), ("triton", False), ("torch", True)])
def test_replay_matches_the_eager_step_on_new_inputs(kernels, reentrant):
    """Dropout off: a replay after new inputs are copied in gives the eager step's loss and every
    gradient (the same kernels in the same order; bf16 autocast)."""
    stack, pair, single, body = _stack_step(kernels, reentrant=reentrant)
    stack.eval()
    params = [*stack.parameters(), pair, single]
    graphed = GraphedStep(body, params)
    assert graphed.peak_bytes > 0
    with torch.no_grad():
        pair.copy_(torch.randn_like(pair))
        single.copy_(torch.randn_like(single))
    loss = graphed().clone()
    replayed = _grads(stack, pair, single)
    for param in params:
        param.grad = None
    expected = body()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    # The same kernels on the same data: equal up to the order of atomic adds, far under
    # bf16's 2e-2 (a stale input, a missed gradient or another dropout mask gives O(1)).
    for got, want in zip(replayed, _grads(stack, pair, single)):
        assert rel_err(got, want) < 1e-3


@pytest.mark.gpu
def test_replays_draw_fresh_dropout_masks():
    stack, pair, single, body = _stack_step("triton")
    stack.train()
    graphed = GraphedStep(body, [*stack.parameters(), pair, single])
    first = graphed().clone()
    first_grad = pair.grad.clone()
    second = graphed().clone()
    assert torch.isfinite(first) and torch.isfinite(second) and first != second
    assert torch.isfinite(pair.grad).all() and not torch.equal(pair.grad, first_grad)
