"""What per-block checkpointing keeps alive between the forward and the backward."""

import gc
import weakref

import torch

from megafold.model.primitives import checkpoint_pair_block


def _block(pair, other, scale):
    return torch.tanh(pair * scale), other


def test_bf16_pair_checkpoint_frees_each_blocks_fp32_input():
    # Only the bf16 copy may survive the forward: a stray reference to a block's fp32 input
    # costs twice the stored activations of the whole stack (48 blocks in "paper").
    x = torch.randn(2, 5, 5, 8, requires_grad=True)
    inputs = []
    pair = x * 1.5
    for _ in range(3):
        inputs.append(weakref.ref(pair))
        pair, _ = checkpoint_pair_block(_block, pair, None, 0.7, enabled=True, pair_bf16=True)
    gc.collect()
    assert [ref() is None for ref in inputs] == [True, True, True]
    pair.sum().backward()  # the recompute still works from the bf16 copies
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pair_offload_is_checked_and_a_no_op_off_the_gpu():
    import pytest

    from megafold.errors import ConfigError
    from megafold.model import preset

    with pytest.raises(ConfigError, match="pair_offload"):
        preset("tiny", pair_offload=True, pair_bf16_checkpoint=False, checkpoint=True)
    x = torch.randn(2, 5, 5, 8, requires_grad=True)
    kept, _ = checkpoint_pair_block(_block, x * 1.0, None, 0.7, enabled=True, pair_bf16=True)
    moved, _ = checkpoint_pair_block(_block, x * 1.0, None, 0.7, enabled=True, pair_bf16=True, offload=True)
    assert torch.equal(kept, moved)
