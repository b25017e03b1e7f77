"""The sampler's CUDA-graphed denoiser (GraphedDenoiser): eager off CUDA, the same
structures from graph replays on CUDA; and how the training chunks' graphs
(GraphedChunkDenoiser) report a capture that runs out of memory."""

import warnings

import pytest
import torch

from megafold.model import AlphaFold3, preset, synthetic_batch
from megafold.model.diffusion import _WARMED, GraphedDenoiser, noise_schedule, sample_diffusion


def _counting(denoise):
    calls = []

    def counted(x_noisy, sigma):
        calls.append(x_noisy.shape)
        return denoise(x_noisy, sigma)

    return counted, calls


def test_graphed_denoiser_runs_eagerly_on_the_cpu():
    config = preset("tiny")
    mask = torch.ones(1, 30, dtype=torch.bool)
    denoise, calls = _counting(lambda x, sigma: 0.5 * x)
    torch.manual_seed(0)
    graphed = sample_diffusion(GraphedDenoiser(denoise), mask, 2, noise_schedule(config, 5), config)
    torch.manual_seed(0)
    eager = sample_diffusion(lambda x, sigma: 0.5 * x, mask, 2, noise_schedule(config, 5), config)
    assert len(calls) == 5
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_graphed_rollout_equals_the_eager_rollout_on_cuda(kernels):
    """"small" model in fp32, 6 sampler steps: one eager warm-up call, one capture, then
    replays; a second denoiser of the same shapes captures without a warm-up and replays its
    first call too; a replayed call and the sampled structures equal the eager ones. (fp32: under bf16
    autocast cuBLAS may pick other GEMM algorithms inside a capture, and a randomly perturbed
    model amplifies those roundings over the sampler's steps: the first H100 run in bf16 differed
    by 0.45% after 6 steps.)"""
    _WARMED.clear()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AlphaFold3(preset("small", kernels=kernels, bf16=False)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    batch = synthetic_batch(64, atoms_per_token=8, msa_rows=16, device="cuda", seed=0)
    with torch.no_grad(), model._compute(batch):
        trunk = model.trunk(batch, 1)
        ctx = model.diffusion_module.prepare(batch, trunk.s_inputs, trunk.single, trunk.pair)
        denoise, calls = _counting(lambda x, sigma: model.diffusion_module(ctx, x, sigma))
        x = torch.randn(1, 2, batch["atom_mask"].shape[-1], 3, device="cuda") * 30.0
        sigma = torch.full((1, 2), 12.0, device="cuda")
        graphed_call = GraphedDenoiser(denoise)
        for _ in range(3):  # warm-up, capture, replay
            replayed = graphed_call(x, sigma)
        once = denoise(x, sigma)
        schedule = noise_schedule(model.config, 6, batch["atom_mask"].device)
        results = []
        for wrapped in (GraphedDenoiser(denoise), denoise):
            torch.manual_seed(1)
            results.append(sample_diffusion(wrapped, batch["atom_mask"], 2, schedule, model.config))
    graphed, eager = results
    assert len(calls) == 2 + 1 + 1 + 6  # warm-up and capture, one eager call, a capture, 6 eager steps
    assert (replayed - once).norm() <= 1e-5 * once.norm()
    assert torch.isfinite(graphed).all()
    assert (graphed - eager).norm() <= 1e-4 * eager.norm()


def test_a_capture_that_runs_out_of_memory_reports_out_of_memory():
    """GraphedChunkDenoiser re-raises an out-of-memory error found anywhere in a failed
    capture's exception chain (capture_end raises its own error on top), so the longest-crop
    search still sees "out of memory"; other errors are not mistaken for one."""
    from megafold.model.diffusion import _out_of_memory

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as error:
        found = _out_of_memory(error)
    assert isinstance(found, torch.OutOfMemoryError) and "2.00 GiB" in str(found)
    assert _out_of_memory(RuntimeError("operation not permitted when stream is capturing")) is None
    assert isinstance(_out_of_memory(RuntimeError("HIP out of memory")), torch.OutOfMemoryError)


# Run in a child process: a capture that breaks CUDA's generator leaves it broken for the rest
# of the process, and every later test that draws random numbers on the GPU would fail.
_BROKEN_CAPTURE_CHILD = """
import sys, warnings
sys.path.insert(0, {root!r})
import torch
from megafold.model import AlphaFold3, diffusion, preset, synthetic_batch

body = diffusion.GraphedChunkDenoiser._forward_graph_body

def syncing(self, x_noisy, sigma):
    out = body(self, x_noisy, sigma)
    if torch.cuda.is_current_stream_capturing():
        float(out.sum())  # a host sync: not allowed while a stream captures
    return out

diffusion.GraphedChunkDenoiser._forward_graph_body = syncing
config = preset("small", kernels="torch", bf16=False, diffusion_samples=6, diffusion_chunk=2)
model = AlphaFold3(config).cuda()
batch = synthetic_batch(32, atoms_per_token=4, msa_rows=8, device="cuda", seed=0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        loss, _ = model.training_loss(batch, n_cycles=1)
        loss.backward()
    except RuntimeError as error:
        text = str(error)
        assert "diffusion_cuda_graph=False" in text and "capture" in text and "restart" in text, text
        print("RAISED")
        sys.exit(0)
assert any("capture failed" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert torch.isfinite(loss)
print("FELL BACK")
"""


@pytest.mark.gpu
def test_a_capture_that_breaks_the_random_generator_says_how_to_turn_graphs_off():
    """A host sync inside the capture of a training chunk invalidates it. If CUDA's generator
    is left in its capture state (torch 2.11 on an H100 did that), falling back to eager chunks
    would fail at the next random op with a message about offsets: the step must instead
    raise one error that names the capture, ``diffusion_cuda_graph=False`` and a restart. If
    the generator survived, the chunks fall back to eager ones with a warning and the step ends."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.run([sys.executable, "-c", _BROKEN_CAPTURE_CHILD.format(root=root)],
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    assert child.stdout.strip().splitlines()[-1] in ("RAISED", "FELL BACK"), child.stdout
