import math

import pytest
import torch

from megafold.data.features import validate_example
from megafold.model import AlphaFold3, model_summary, preset, synthetic_batch, synthetic_example
from megafold.model.diffusion import random_rotations

TERMS = {"diffusion", "smooth_lddt", "bond", "mse", "distogram", "plddt", "pae", "pde", "resolved", "confidence", "loss"}

# Parameters that get no gradient in a training step. None: the paper's stops (recycling
# before the last cycle, the confidence head's inputs) cut gradient paths, not parameters,
# the noise-level Fourier weights are buffers, and the last MSA block, whose MSA updates
# would feed nothing, has no such parameters (see msa.MSABlock).
NO_GRADIENT: set[str] = set()
# Parameters whose gradient is zero in exact arithmetic, by the paper's design: LayerNorm
# biases that only add a per-head constant to every logit of a softmax (LN(z) -> LinearNoBias
# pair biases), and the decoder's output LayerNorm bias, a global translation of the
# prediction, which the aligned MSE, smooth LDDT and bond losses ignore.
SHIFT_INVARIANT = (
    "attention.pair_norm_bias", "pair_weighted_averaging.pair_norm_bias", "atom_decoder.out_norm_bias"
)


def tiny(**overrides):
    return preset("tiny", kernels="torch", **overrides)


def test_training_loss_and_backward_on_real_structures(mixed_batch, perturb):
    torch.manual_seed(0)
    # Unit loss weights put the gradients of all heads on one scale for the check below.
    model = AlphaFold3(tiny(bond_loss_weight=1.0, confidence_loss_weight=1.0, distogram_loss_weight=1.0))
    perturb(model)  # zero-initialised output layers would hide upstream parameters
    model.train()
    loss, terms = model.training_loss(mixed_batch, n_cycles=2)
    assert set(terms) == TERMS
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert terms["bond"] > 0  # 3mht's SAH is bonded
    assert terms["loss"] == pytest.approx(float(loss.detach()))
    loss.backward()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.grad is None} == NO_GRADIENT
    assert not [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    norms = {n: float(p.grad.norm()) for n, p in params.items()}
    typical = sorted(norms.values())[len(norms) // 2]
    shift_invariant = {n for n in params if n.endswith(SHIFT_INVARIANT)}
    assert shift_invariant and all(norms[n] < 1e-5 * typical for n in shift_invariant)
    assert not [n for n in params if n not in shift_invariant and norms[n] < 1e-4 * typical]


def test_confidence_loss_sends_no_gradient_into_the_trunk(mixed_batch, perturb):
    model = AlphaFold3(tiny(diffusion_loss_weight=0.0, distogram_loss_weight=0.0, confidence_loss_weight=1.0))
    perturb(model)
    loss, _ = model.training_loss(mixed_batch, n_cycles=1)
    loss.backward()
    reached = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert reached == {"confidence_head"}


def test_sample_on_real_structures(mixed_batch, perturb):
    model = AlphaFold3(tiny()).eval()
    perturb(model)
    out = model.sample(mixed_batch, steps=4, samples=3)
    B, A = mixed_batch["atom_mask"].shape
    N = mixed_batch["token_mask"].shape[1]
    assert out["coords"].shape == (B, 3, A, 3)
    assert out["plddt"].shape == (B, 3, A) and out["resolved"].shape == (B, 3, A)
    assert out["pae"].shape == out["pde"].shape == (B, 3, N, N)
    for name, value in out.items():
        assert torch.isfinite(value).all(), name
    padded_atoms = ~mixed_batch["atom_mask"]
    assert (out["coords"][padded_atoms[:, None].expand(-1, 3, -1)] == 0).all()
    assert (out["plddt"] >= 0).all() and (out["plddt"] <= 100).all() and (out["pae"] >= 0).all()
    assert not torch.equal(out["coords"][:, 0], out["coords"][:, 1])  # independent noise per sample


def _rotate_conformers(batch: dict) -> dict:
    """Each reference conformer rotated and translated by its own random transform."""
    batch = dict(batch)
    uid = batch["ref_space_uid"]
    groups, inverse = torch.unique(uid, return_inverse=True)
    rotation = random_rotations((len(groups),), uid.device)[inverse]
    shift = 10 * torch.randn(len(groups), 3)[inverse]
    batch["ref_pos"] = torch.einsum("baij,baj->bai", rotation, batch["ref_pos"]) + shift
    return batch


def test_trunk_is_invariant_to_rotating_reference_conformers(mixed_batch, perturb):
    model = AlphaFold3(tiny()).eval()
    perturb(model)
    with torch.no_grad():
        reference = model(mixed_batch, n_cycles=2)
        rotated = model(_rotate_conformers(mixed_batch), n_cycles=2)
    token_mask = mixed_batch["token_mask"]
    for name in ("single", "pair", "distogram_logits"):
        ref, out = reference[name][token_mask], rotated[name][token_mask]
        assert (out - ref).norm() / ref.norm() < 1e-5, name
    # ... and the features do see the conformers: perturbing their shape changes the trunk.
    bent = dict(mixed_batch, ref_pos=mixed_batch["ref_pos"] + 0.5 * torch.randn_like(mixed_batch["ref_pos"]))
    with torch.no_grad():
        changed = model(bent, n_cycles=2)["single"][token_mask]
    assert (changed - reference["single"][token_mask]).norm() / reference["single"][token_mask].norm() > 1e-3


def test_padding_does_not_change_the_trunk(mixed_batch, make_batch, perturb):
    model = AlphaFold3(tiny()).eval()
    perturb(model)
    alone = make_batch(("3mht", 24, "ligand"))
    with torch.no_grad():
        batched = model(mixed_batch, n_cycles=2)
        single = model(alone, n_cycles=2)
    N = alone["token_mask"].shape[1]
    for name in ("single", "pair"):
        ref = single[name][0]
        out = batched[name][1][:N] if name == "single" else batched[name][1][:N, :N]
        assert (out - ref).norm() / ref.norm() < 1e-5, name


def _loss_and_grads(model, batch, kernels):
    model.config = model.config.replace(kernels=kernels)
    model.zero_grad()
    torch.manual_seed(1)
    loss, terms = model.training_loss(batch)
    loss.backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_kernels_torch_and_triton_agree(make_batch, perturb):
    """Same loss and gradients under the eager ops and the Triton kernels (interpreter on the
    CPU, fp32): loss terms within 1e-4 relative; every gradient within 1e-3 of its norm
    (plus 1e-5 of a typical gradient's norm, for the ones that vanish analytically)."""
    config = tiny(pairformer_blocks=1, msa_blocks=2, template_blocks=1, confidence_blocks=1, diffusion_blocks=1,
                  recycles=1, rollout_steps=1, bond_loss_weight=1.0)
    model = AlphaFold3(config).eval()
    perturb(model)
    batch = make_batch(("1ubq", 6, "first", True))
    eager_terms, eager_grads = _loss_and_grads(model, batch, "torch")
    fused_terms, fused_grads = _loss_and_grads(model, batch, "triton")
    for name, value in eager_terms.items():
        assert fused_terms[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert eager_grads.keys() == fused_grads.keys()
    # Gradients that vanish analytically (SHIFT_INVARIANT) hold only rounding noise: an
    # absolute allowance of 1e-5 of a typical gradient norm covers it.
    typical = sorted(float(g.norm()) for g in eager_grads.values())[len(eager_grads) // 2]
    for name, grad in eager_grads.items():
        assert (fused_grads[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-5 * typical, name


def test_synthetic_batch_is_valid_and_trains():
    example = synthetic_example(10, atoms_per_token=5, msa_rows=3, templates=2, seed=3)
    sizes = validate_example(example)
    assert sizes["token"] == 10 and sizes["atom"] == 50 and sizes["msa_row"] == 3 and sizes["template"] == 2
    batch = synthetic_batch(10, atoms_per_token=5, msa_rows=3, templates=2, batch_size=2, seed=3)
    assert batch["atom_pos"].shape == (2, 50, 3)
    assert not torch.equal(batch["atom_pos"][0], batch["atom_pos"][1])
    loss, terms = AlphaFold3(tiny()).training_loss(batch)
    loss.backward()
    assert math.isfinite(terms["loss"])
    with pytest.raises(ValueError, match="atoms_per_token"):
        synthetic_example(4, atoms_per_token=2)


def test_missing_feature_is_named(mixed_batch):
    batch = {k: v for k, v in mixed_batch.items() if k != "ref_pos"}
    with pytest.raises(ValueError, match="ref_pos"):
        AlphaFold3(tiny())(batch)


def test_model_summary_counts_every_parameter():
    model = AlphaFold3(tiny())
    summary = model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in summary.splitlines()[-1]
    for name in ("pairformer", "diffusion_module.transformer", "confidence_head", "msa_module", "template_embedder"):
        assert name in summary


@pytest.mark.slow
def test_tiny_overfits_one_real_structure(make_batch):
    """Training "tiny" on one crop of ubiquitin halves its diffusion loss within 120 steps
    (about 50 in practice). The loss is measured on fixed noise draws before and after."""
    torch.manual_seed(0)
    batch = make_batch(("1ubq", 16))
    model = AlphaFold3(tiny(diffusion_samples=8, pair_dropout=0.0, msa_dropout=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)

    def diffusion_loss() -> float:
        model.eval()
        values = []
        with torch.no_grad():
            for seed in range(3):
                torch.manual_seed(100 + seed)
                values.append(model.training_loss(batch, n_cycles=1)[1]["diffusion"])
        model.train()
        return sum(values) / len(values)

    start = diffusion_loss()
    history = []
    for step in range(1, 121):
        loss, _ = model.training_loss(batch, n_cycles=1)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimiser.step()
        if step % 10 == 0:
            history.append(diffusion_loss())
            if history[-1] < 0.5 * start:
                break
    assert history[-1] < 0.5 * start, (start, history)


def _train_step(config, batch, perturb):
    torch.manual_seed(0)
    model = AlphaFold3(config).train()
    perturb(model)
    torch.manual_seed(1)
    loss, terms = model.training_loss(batch, n_cycles=2)
    loss.backward()
    return terms, {n: p.grad for n, p in model.named_parameters()}


def test_memory_switches_keep_the_result(mixed_batch, perturb):
    """Checkpointing (with dropout on: the recomputation must redraw the same masks) and
    row chunking change nothing in fp32; bf16 autocast with bf16 pair checkpoints stays
    within bf16 tolerance (loss terms 5e-2, whole gradient 1e-1)."""
    plain_terms, plain_grads = _train_step(tiny(), mixed_batch, perturb)
    typical = sorted(float(g.norm()) for g in plain_grads.values())[len(plain_grads) // 2]
    for reentrant in (False, True):  # reentrant: the diffusion context's tensors are checkpoint arguments
        lean = tiny(checkpoint=True, transition_chunk=3, attention_chunk=5, diffusion_chunk=1,
                    diffusion_block_checkpoint=True, checkpoint_reentrant=reentrant)  # fmt: skip
        terms, grads = _train_step(lean, mixed_batch, perturb)
        for name, value in plain_terms.items():
            assert terms[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():  # fp32 summed in another order; see SHIFT_INVARIANT
            assert (grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-4 * typical, (reentrant, name)

    bf16 = lean.replace(bf16=True, pair_bf16_checkpoint=True)
    terms, grads = _train_step(bf16, mixed_batch, perturb)
    for name in ("diffusion", "smooth_lddt", "distogram", "mse"):
        assert terms[name] == pytest.approx(plain_terms[name], rel=5e-2), name
    flat = torch.cat([g.flatten() for g in plain_grads.values()])
    flat_bf16 = torch.cat([grads[n].flatten().float() for n in plain_grads])
    assert (flat_bf16 - flat).norm() / flat.norm() < 1e-1


def test_atom_loss_weights(mixed_batch):
    weights = AlphaFold3(tiny()).atom_loss_weights(mixed_batch)
    kind = {name: torch.gather(mixed_batch[name], 1, mixed_batch["atom_to_token"]) for name in ("is_protein", "is_dna", "is_ligand")}
    assert (weights[kind["is_protein"]] == 1).all()
    assert (weights[kind["is_dna"]] == 6).all() and kind["is_dna"].any()
    assert (weights[kind["is_ligand"]] == 11).all() and kind["is_ligand"].any()


def test_the_last_recycling_cycle_casts_the_weights_afresh(monkeypatch, perturb):
    """bf16 autocast caches its weight casts; casts cached in the gradient-free cycles carry no
    gradient, and torch 2.6 reused them in the last cycle, so the recycled modules' weights got
    none. The trunk clears the cache before the cycle that takes gradients (only then)."""
    import sys

    real = torch.clear_autocast_cache
    calls = []

    def clear():  # counts the model's own calls (leaving an autocast block clears it too)
        if sys._getframe(1).f_code.co_filename.endswith("af3.py"):
            calls.append(torch.is_grad_enabled())
        real()

    monkeypatch.setattr(torch, "clear_autocast_cache", clear)
    torch.manual_seed(0)
    model = AlphaFold3(tiny(bf16=True)).train()
    perturb(model)  # zero-initialised layers would pass no gradient
    batch = synthetic_batch(10, atoms_per_token=5, msa_rows=3, templates=1, seed=3)
    model.training_loss(batch, n_cycles=1)
    assert calls == []  # one cycle: nothing was cast without gradients
    loss, _ = model.training_loss(batch, n_cycles=3)
    assert len(calls) == 1
    with torch.no_grad():
        model.training_loss(batch, n_cycles=3)
    assert len(calls) == 1  # no cycle takes gradients: the cached casts serve them all
    loss.backward()
    recycled = [model.recycle_pair.weight, model.recycle_single.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recycled)
