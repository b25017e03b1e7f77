import pytest
import torch

from megafold.model import AlphaFold3, preset
from megafold.model.diffusion import (
    centre_random_augmentation,
    noise_schedule,
    random_rotations,
    sample_diffusion,
)
from megafold.model.losses import pairwise_distances, weighted_rigid_align


def test_noise_schedule_endpoints():
    config = preset("paper")
    schedule = noise_schedule(config, 200)
    assert schedule.shape == (201,)
    assert float(schedule[0]) == pytest.approx(16 * 160, rel=1e-5)
    assert float(schedule[-1]) == pytest.approx(16 * 4e-4, rel=1e-4)
    assert (schedule[1:] < schedule[:-1]).all()


def test_random_rotations_and_augmentation_are_rigid():
    rotation = random_rotations((64,), torch.device("cpu"))
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(64), atol=1e-5, rtol=0)
    x = 10 * torch.randn(2, 4, 30, 3)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    moved = centre_random_augmentation(x, mask)
    torch.testing.assert_close(pairwise_distances(moved), pairwise_distances(x), atol=1e-4, rtol=1e-4)
    centre = moved[1, :, :20].mean(-2)  # the masked centre lands on the N(0, 1) translation
    assert centre.norm(dim=-1).max() < 6


def test_edm_preconditioning_at_initialisation(make_batch):
    """The decoder's output layer starts at zero, so D(x, sigma) = sigma_data^2 / (sigma_data^2 + sigma^2) x."""
    model = AlphaFold3(preset("tiny", kernels="torch"))
    batch = make_batch(("1ubq", 8))
    with torch.no_grad():
        out = model(batch, n_cycles=1)
        ctx = model.diffusion_module.prepare(batch, out["single_inputs"], out["single"], out["pair"])
        x = 20 * torch.randn(1, 3, batch["atom_mask"].shape[1], 3)
        sigma = torch.tensor([[1.0, 16.0, 100.0]])
        denoised = model.diffusion_module(ctx, x, sigma)
    expected = 256 / (256 + sigma[..., None, None] ** 2) * x
    torch.testing.assert_close(denoised, expected)


@pytest.mark.parametrize("samples,chunk,graph,blocks", [(3, 1, False, False), (3, 1, True, False),
                                                        (5, 2, True, False), (3, 1, True, True)])
def test_chunked_diffusion_batch_gives_the_same_loss_and_gradients(make_batch, perturb, samples, chunk, graph, blocks):
    """Chunks checkpointed (graph off), or through GraphedChunkDenoiser (graph on: on the CPU its
    eager path, the same checkpoints and gradient sums; 5 samples in chunks of 2 end with a
    shorter chunk; with block checkpoints inside, which must not be reentrant under its
    torch.autograd.grad), against the whole diffusion batch at once. Two steps' gradients
    accumulate, so the second adds to ``.grad`` that the first left."""
    batch = make_batch(("3mht", 12, "ligand"))
    results = []
    for chunk_size in (0, chunk):
        torch.manual_seed(0)
        config = preset("tiny", kernels="torch", diffusion_samples=samples, diffusion_chunk=chunk_size,
                        diffusion_cuda_graph=graph, diffusion_block_checkpoint=blocks)
        model = AlphaFold3(config).eval()
        perturb(model)
        for seed in (1, 2):
            torch.manual_seed(seed)
            loss, terms = model.training_loss(batch)
            loss.backward()
        results.append((terms, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (terms0, grads0), (terms1, grads1) = results
    for name in terms0:
        assert terms1[name] == pytest.approx(terms0[name], rel=1e-5, abs=1e-7), name
    assert grads0.keys() == grads1.keys()
    typical = sorted(float(g.norm()) for g in grads0.values())[len(grads0) // 2]
    for name, grad in grads0.items():  # fp32 summed in another order; some vanish analytically
        assert (grads1[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-4 * typical, name


def test_sampler_with_an_oracle_denoiser_reaches_the_structure():
    """Alg. 18 with a denoiser that returns the truth, rigidly aligned to its input: the
    sampler must end on a rigid copy of the truth (RMSD ~ 0) despite the re-centring,
    random rotations and noise injection of every step."""
    truth = 10 * torch.randn(1, 50, 3)
    mask = torch.ones(1, 50, dtype=torch.bool)
    mask[0, -5:] = False

    def oracle(x_noisy, t_hat):
        return weighted_rigid_align(x_noisy, truth[:, None].expand_as(x_noisy), mask[:, None].float().expand(x_noisy.shape[:3]))

    config = preset("tiny")
    x = sample_diffusion(oracle, mask, 2, noise_schedule(config, 30), config)
    assert x.shape == (1, 2, 50, 3) and (x[:, :, -5:] == 0).all()
    aligned = weighted_rigid_align(x, truth[:, None].expand_as(x), mask[:, None].float().expand(1, 2, 50))
    rmsd = ((x - aligned)[:, :, :45].square().sum(-1).mean(-1)).sqrt()
    assert (rmsd < 0.05).all(), rmsd
