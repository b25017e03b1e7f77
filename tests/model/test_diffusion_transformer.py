"""The diffusion transformer's batched computation (fused pair biases, conditioning projected
for groups of blocks, fused q/k/v/gate projections, weights built once per step) against a
straightforward per-block, per-call computation of AF3 Alg. 23-26."""

import pytest
import torch
import torch.nn.functional as F

from megafold.model import AlphaFold3, preset
from megafold.model.primitives import AtomWindows, DiffusionTransformer, FixedConditioning, Modulation


def reference_modulation(module: torch.nn.Module, cond: torch.Tensor) -> Modulation:
    """AdaLN and output gate of one module as AF3 writes them (Alg. 24-26)."""
    normed = module.norm.norm_cond(cond)
    return Modulation(
        torch.sigmoid(module.norm.scale(normed)), module.norm.shift(normed), torch.sigmoid(module.out_gate(cond))
    )


def reference_forward(transformer, a, cond, pair, mask, windows=None):
    """Every block's pair bias, conditioning and projections computed on their own, per call."""
    for block in transformer.blocks:
        bias = block.attention.pair_bias(pair)
        a = a + block.attention(a, bias, mask, reference_modulation(block.attention, cond), windows)
        a = a + block.transition(a, reference_modulation(block.transition, cond))
    return a


def _perturbed(transformer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised gates and outputs would hide most weights
        for param in transformer.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return transformer.double()


@pytest.mark.parametrize("atoms", [False, True], ids=["tokens", "atom-windows"])
def test_batched_transformer_equals_per_block_reference(atoms):
    torch.manual_seed(0)
    B, S, c_a, c_cond, c_pair, heads = 2, 3, 16, 12, 8, 2
    transformer = _perturbed(DiffusionTransformer(c_a, c_cond, c_pair, blocks=5, heads=heads))
    transformer.conditioning_group = 2  # groups of 2, 2 and 1 blocks
    if atoms:
        atom_mask = torch.rand(B, 40) < 0.9
        windows = AtomWindows(atom_mask, queries=8, keys=16)
        pair = torch.randn(B, windows.n_windows, 8, 16, c_pair, dtype=torch.float64)
        mask, L, cond_rows = windows.key_mask, 40, 1
    else:
        windows, L, cond_rows = None, 11, S
        pair = torch.randn(B, L, L, c_pair, dtype=torch.float64)
        mask = torch.rand(B, S, L) < 0.8
    a = torch.randn(B, S, L, c_a, dtype=torch.float64)
    cond = torch.randn(B, cond_rows, L, c_cond, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (a, cond, pair)]
    params = list(transformer.parameters())
    probe = torch.randn(B, S, L, c_a, dtype=torch.float64)

    def run(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = forward()
        return out, torch.autograd.grad((out * probe).sum(), inputs + params)

    def fixed():
        inputs = transformer.fixed_conditioning(cond, pair)
        return transformer(a, None, inputs.biases, mask, windows, inputs.weights, inputs.modulations)

    expected, expected_grads = run(lambda: reference_forward(transformer, a, cond, pair, mask, windows))
    # Float64 round-off, as an absolute floor, scales with the largest gradient: some gradients
    # are zero up to round-off (norm ~1e-15), and an absolute 1e-14 failed on one CPU type.
    atol = 1e-13 * max(g.norm() for g in expected_grads)
    forwards = [
        lambda weights=weights: transformer(a, cond, transformer.pair_biases(pair), mask, windows, weights)
        for weights in (None, transformer.weights(fuse_projections=False), transformer.weights())
    ]
    for forward in forwards + [fixed]:
        got, grads = run(forward)
        assert (got - expected).norm() <= 1e-12 * expected.norm()
        for grad, want in zip(grads, expected_grads):
            assert (grad - want).norm() <= 1e-12 * want.norm() + atol


def _per_call_diffusion(monkeypatch) -> None:
    """Make every DiffusionTransformer compute biases, conditioning and projections per block
    and per call, as before the batching."""
    monkeypatch.setattr(DiffusionTransformer, "pair_biases", lambda self, pair: pair)
    monkeypatch.setattr(DiffusionTransformer, "weights", lambda self, fuse_projections=True: None)
    # The atom transformers' per-step inputs carry the raw pair and conditioning to each call.
    monkeypatch.setattr(
        DiffusionTransformer, "fixed_conditioning", lambda self, cond, pair: FixedConditioning(pair, None, cond)
    )

    def per_call_forward(self, a, cond, pair, mask, windows=None, weights=None, modulations=None):
        return reference_forward(self, a, cond if modulations is None else modulations, pair, mask, windows)

    monkeypatch.setattr(DiffusionTransformer, "forward", per_call_forward)


def test_training_step_and_rollout_equal_the_per_call_computation(make_batch, perturb, monkeypatch):
    """Chunked and checkpointed diffusion batch, its gradients and the confidence rollout."""
    batch = make_batch(("3mht", 10, "ligand"))
    results = []
    for per_call in (False, True):
        if per_call:
            _per_call_diffusion(monkeypatch)
        torch.manual_seed(0)
        model = AlphaFold3(preset("tiny", kernels="torch", diffusion_samples=3, diffusion_chunk=2)).eval()
        perturb(model)
        torch.manual_seed(1)
        loss, terms = model.training_loss(batch, n_cycles=1)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.manual_seed(2)
        coords = model.sample(batch, steps=3, samples=2, n_cycles=1)["coords"]
        results.append((terms, grads, coords))
    (terms, grads, coords), (ref_terms, ref_grads, ref_coords) = results
    for name in ref_terms:
        assert terms[name] == pytest.approx(ref_terms[name], rel=1e-5, abs=1e-7), name
    assert grads.keys() == ref_grads.keys()
    typical = sorted(float(g.norm()) for g in ref_grads.values())[len(ref_grads) // 2]
    for name, grad in ref_grads.items():  # fp32 in another order; some vanish analytically
        assert (grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-4 * typical, name
    assert (coords - ref_coords).norm() <= 1e-5 * ref_coords.norm()
