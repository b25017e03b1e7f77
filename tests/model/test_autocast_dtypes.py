"""Ops of the diffusion transformer that run outside autocast in the activations' dtype, so that
under bf16 autocast they keep no fp32 copies for backward: AdaLN (AF3 Alg. 26) against its
formula, and the atom windows' softmax."""

import pytest
import torch
import torch.nn.functional as F

from megafold.model.primitives import AdaLN, AtomWindows, Modulation, local_attention


def _inputs(device, dtype, shape=(2, 3, 5, 16)):
    a, scale, shift = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    return a, scale, shift


def test_adaln_equals_the_formula_in_value_and_gradient():
    torch.manual_seed(0)
    norm = AdaLN(16, 12).double()
    a, scale, shift = _inputs("cpu", torch.float64)
    probe = torch.randn(a.shape, dtype=torch.float64)
    got = norm(a, Modulation(scale, shift, None))
    want = scale * F.layer_norm(a, (16,)) + shift
    assert (got - want).norm() <= 1e-12 * want.norm()
    grads = torch.autograd.grad((got * probe).sum(), (a, scale, shift))
    wants = torch.autograd.grad((want * probe).sum(), (a, scale, shift))
    for grad, expected in zip(grads, wants):
        assert (grad - expected).norm() <= 1e-12 * expected.norm()


@pytest.mark.gpu
def test_adaln_under_bf16_autocast_saves_no_fp32_and_matches_fp32():
    """CUDA autocast would run LayerNorm in fp32 and keep fp32 copies of a and LN(a)."""
    torch.manual_seed(0)
    norm = AdaLN(768, 384).cuda()
    a, scale, shift = (t.detach().bfloat16().requires_grad_() for t in _inputs("cuda", torch.float32, (8, 384, 768)))
    saved = []
    with torch.autocast("cuda", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        got = norm(a, Modulation(scale, shift, None))
    assert got.dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 or t.numel() <= 8 * 384 for t in saved), [(t.dtype, t.shape) for t in saved]
    want = scale.float() * F.layer_norm(a.float(), (768,)) + shift.float()
    assert (got.float() - want).norm() <= 1e-2 * want.norm()


@pytest.mark.gpu
def test_local_attention_under_bf16_autocast_keeps_bf16_probabilities():
    """CUDA autocast would run the softmax in fp32 and keep the fp32 probabilities."""
    torch.manual_seed(0)
    B, S, A, H, D = 1, 8, 3072, 4, 32
    windows = AtomWindows(torch.ones(B, A, dtype=torch.bool, device="cuda"), 32, 128)
    q, k, v, g = (torch.randn(B, S, A, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
    bias = torch.randn(B, windows.n_windows, H, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autocast("cuda", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        out = local_attention(
            windows.query_blocks(q, 2), windows.key_windows(k, 2), windows.key_windows(v, 2),
            bias, windows.key_mask, windows.query_blocks(g, 2),
        )
    assert not [t.shape for t in saved if t.dtype == torch.float32]
    with torch.no_grad():
        want = local_attention(
            *(t.float() for t in (windows.query_blocks(q, 2), windows.key_windows(k, 2), windows.key_windows(v, 2), bias)),
            windows.key_mask, windows.query_blocks(g, 2).float(),
        )
    assert (out.float() - want).norm() <= 1e-2 * want.norm()


def test_swiglu_equals_the_formula_in_value_and_gradient():
    """SwiGLU keeps only its input for backward; values and gradients as autograd's."""
    from megafold.model.primitives import SwiGLU

    torch.manual_seed(0)
    h = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    a, b = h.chunk(2, dim=-1)
    want = F.silu(a) * b
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = SwiGLU.apply(h)
    assert len(saved) == 1 and saved[0] is h
    assert (got - want).norm() <= 1e-14 * want.norm()
    (grad,) = torch.autograd.grad((got * probe).sum(), h)
    (expected,) = torch.autograd.grad((want * probe).sum(), h)
    assert (grad - expected).norm() <= 1e-14 * expected.norm()
