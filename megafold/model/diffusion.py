"""Diffusion module (AF3 Alg. 20-22), EDM preconditioning, augmentation and the sampler (Alg. 18-19).

The trunk-dependent conditioning (pair conditioning, pair biases of every transformer block,
atom single and pair features, the atom transformers' modulations) and the transformers' fused
weights are computed once per trunk pass by ``prepare`` and shared by all noised samples, which run in chunks along the
sample axis, by the recomputes of those chunks and by every step of the sampler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from megafold.kernels import layernorm_linear
from megafold.model.config import AlphaFold3Config
from megafold.model.embedders import AtomAttentionDecoder, AtomAttentionEncoder, AtomContext, RelativePositionEncoding
from megafold.model.primitives import (
    DiffusionTransformer,
    FixedConditioning,
    LayerNorm,
    Transition,
    TransformerWeights,
    lecun_normal_,
    ln_params,
)

Batch = Mapping[str, torch.Tensor]


class FourierEmbedding(nn.Module):
    """AF3 Alg. 22: ``cos(2 pi (t w + b))`` with w, b ~ N(0, 1) drawn once (buffers, not trained)."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(c))
        self.register_buffer("bias", torch.randn(c))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``[*] -> [*, c]``."""
        return torch.cos(2 * math.pi * (t[..., None] * self.weight + self.bias))


class DiffusionConditioning(nn.Module):
    """AF3 Alg. 21, split into the noise-independent parts (``pair``, ``single_base``, once per
    trunk pass) and the per-sample noise embedding (``single``)."""

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        c_s, c_z = config.c_s, config.c_z
        self.sigma_data = config.sigma_data
        self.relative_position = RelativePositionEncoding(c_z)
        self.pair_norm_weight, self.pair_norm_bias = ln_params(2 * c_z)
        self.pair_weight = nn.Parameter(lecun_normal_(torch.empty(c_z, 2 * c_z)))
        self.pair_transitions = nn.ModuleList(Transition(c_z, 2, config.transition_chunk) for _ in range(2))
        self.single_norm_weight, self.single_norm_bias = ln_params(c_s + config.c_s_inputs)
        self.single_weight = nn.Parameter(lecun_normal_(torch.empty(c_s, c_s + config.c_s_inputs)))
        self.fourier = FourierEmbedding(config.c_fourier)
        self.noise_norm_weight, self.noise_norm_bias = ln_params(config.c_fourier)
        self.noise_weight = nn.Parameter(lecun_normal_(torch.empty(c_s, config.c_fourier)))
        self.single_transitions = nn.ModuleList(Transition(c_s, 2) for _ in range(2))

    def pair(self, batch: Batch, z_trunk: torch.Tensor) -> torch.Tensor:
        """``[B, N, N, c_z]``."""
        relpos = self.relative_position(batch)
        pair = torch.cat([z_trunk, relpos.to(z_trunk.dtype)], dim=-1)
        pair = layernorm_linear(pair, self.pair_norm_weight, self.pair_norm_bias, self.pair_weight)
        for transition in self.pair_transitions:
            pair = pair + transition(pair)
        return pair

    def single_base(self, s_trunk: torch.Tensor, s_inputs: torch.Tensor) -> torch.Tensor:
        """``[B, N, c_s]``."""
        single = torch.cat([s_trunk, s_inputs.to(s_trunk.dtype)], dim=-1)
        return layernorm_linear(single, self.single_norm_weight, self.single_norm_bias, self.single_weight)

    def single(self, base: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """base ``[B, N, c_s]``, sigma ``[B, S]`` -> ``[B, S, N, c_s]``."""
        noise = self.fourier(0.25 * torch.log(sigma / self.sigma_data))
        noise = layernorm_linear(noise, self.noise_norm_weight, self.noise_norm_bias, self.noise_weight)
        single = base.unsqueeze(1) + noise.unsqueeze(2)
        for transition in self.single_transitions:
            single = single + transition(single)
        return single


@dataclass
class DiffusionContext:
    """Everything the denoiser needs that does not depend on the noised sample."""

    pair: torch.Tensor  # conditioned pair [B, N, N, c_z]
    single_base: torch.Tensor  # [B, N, c_s]
    token_biases: list[torch.Tensor]  # per transformer block [B, H, N, N]
    transformer_weights: TransformerWeights  # the token transformer's fused weights
    atoms: AtomContext
    atom_encoder: FixedConditioning  # the atom transformers' biases, weights and modulations
    atom_decoder: FixedConditioning
    token_mask: torch.Tensor  # [B, N]


class DiffusionModule(nn.Module):
    """AF3 Alg. 20: ``D(x_noisy, sigma)`` with EDM preconditioning (sigma_data = 16)."""

    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        self.sigma_data = config.sigma_data
        self.conditioning = DiffusionConditioning(config)
        self.atom_encoder = AtomAttentionEncoder(
            config.c_atom, config.c_atompair, config.c_token, config.atom_encoder_blocks, config.atom_heads,
            config.atom_queries, config.atom_keys, c_s=config.c_s, c_z=config.c_z,
        )
        self.single_to_token_norm_weight, self.single_to_token_norm_bias = ln_params(config.c_s)
        self.single_to_token_weight = nn.Parameter(lecun_normal_(torch.empty(config.c_token, config.c_s)))
        self.transformer = DiffusionTransformer(
            config.c_token, config.c_s, config.c_z, config.diffusion_blocks, config.diffusion_heads
        )
        self.transformer.checkpoint_blocks = config.diffusion_block_checkpoint
        self.transformer.reentrant = config.checkpoint_reentrant
        self.token_norm = LayerNorm(config.c_token)
        self.atom_decoder = AtomAttentionDecoder(
            config.c_token, config.c_atom, config.c_atompair, config.atom_decoder_blocks, config.atom_heads
        )

    def prepare(
        self, batch: Batch, s_inputs: torch.Tensor, s_trunk: torch.Tensor, z_trunk: torch.Tensor
    ) -> DiffusionContext:
        pair = self.conditioning.pair(batch, z_trunk)
        atoms = self.atom_encoder.prepare(batch, s_trunk, pair)
        return DiffusionContext(
            pair=pair,
            single_base=self.conditioning.single_base(s_trunk, s_inputs),
            token_biases=self.transformer.pair_biases(pair),
            transformer_weights=self.transformer.weights(),
            atoms=atoms,
            atom_encoder=self.atom_encoder.fixed_conditioning(atoms),
            atom_decoder=self.atom_decoder.fixed_conditioning(atoms),
            token_mask=batch["token_mask"],
        )

    def forward(self, ctx: DiffusionContext, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_noisy ``[B, S, A, 3]``, sigma ``[B, S]`` -> denoised positions ``[B, S, A, 3]`` (fp32)."""
        x_noisy = x_noisy.float()
        sigma = sigma.float()[..., None, None]
        sd2 = self.sigma_data**2
        single = self.conditioning.single(ctx.single_base, sigma[..., 0, 0])
        r_noisy = x_noisy / torch.sqrt(sigma**2 + sd2)
        tokens, query_skip = self.atom_encoder(ctx.atoms, ctx.atom_encoder, r_noisy)
        tokens = tokens + layernorm_linear(
            single, self.single_to_token_norm_weight, self.single_to_token_norm_bias, self.single_to_token_weight
        )
        mask = ctx.token_mask.unsqueeze(1).expand(-1, tokens.shape[1], -1)
        tokens = self.transformer(tokens, single, ctx.token_biases, mask, weights=ctx.transformer_weights)
        r_update = self.atom_decoder(self.token_norm(tokens), query_skip, ctx.atoms, ctx.atom_decoder).float()
        return sd2 / (sd2 + sigma**2) * x_noisy + self.sigma_data * sigma / torch.sqrt(sd2 + sigma**2) * r_update

    def denoise_in_chunks(
        self, ctx: DiffusionContext, x_noisy: torch.Tensor, sigma: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """``forward`` over the sample axis in chunks of ``chunk`` (0: all at once); for sampling."""
        if chunk <= 0 or chunk >= x_noisy.shape[1]:
            return self(ctx, x_noisy, sigma)
        return torch.cat(
            [self(ctx, x, s) for x, s in zip(x_noisy.split(chunk, 1), sigma.split(chunk, 1))], dim=1
        )


class GraphedDenoiser:
    """A no-grad denoiser call replayed from a CUDA graph: the sampler calls the diffusion
    module with the same shapes and context at every step, and each eager call is about a
    thousand small launches (host bound), while a replay is one.

    The first call runs eagerly on a side stream (it compiles and tunes the Triton kernels and
    warms the allocator) and then captures the graph; later calls copy their inputs into the
    graph's and replay it. Anything but CUDA inputs with gradients off, inputs of other shapes
    than the first, or a capture that fails, runs ``denoise`` eagerly instead. Autocast's
    weight cache is off while warming up and capturing, so that no cached cast lives in the
    graph's memory.
    """

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.denoise = denoise
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.eager or not x_noisy.is_cuda or torch.is_grad_enabled():
            return self.denoise(x_noisy, sigma)
        if self.graph is None:
            return self._capture(x_noisy, sigma)
        if x_noisy.shape != self.inputs[0].shape or sigma.shape != self.inputs[1].shape:
            return self.denoise(x_noisy, sigma)
        self.inputs[0].copy_(x_noisy)
        self.inputs[1].copy_(sigma)
        self.graph.replay()
        return self.output.clone()

    def _capture(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            # A denoiser of these shapes already ran eagerly in this process (a training step
            # makes a new GraphedDenoiser each step): its kernels are compiled and tuned, so the
            # graph is captured at once and replayed for this call.
            key = (x_noisy.device, x_noisy.shape, x_noisy.dtype, sigma.shape, sigma.dtype)
            result = None
            if key not in _WARMED:
                side = _side_stream(x_noisy.device)
                side.wait_stream(torch.cuda.current_stream(x_noisy.device))
                with torch.cuda.stream(side):
                    result = self.denoise(x_noisy, sigma)
                torch.cuda.current_stream(x_noisy.device).wait_stream(side)
            self.inputs = (x_noisy.clone(), sigma.clone())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.output = self.denoise(*self.inputs)
            except RuntimeError as error:  # e.g. an op that syncs with the host
                warnings.warn(f"GraphedDenoiser: CUDA graph capture failed ({error}); the sampler runs eagerly")
                self.eager = True
                return result if result is not None else self.denoise(x_noisy, sigma)
            self.graph = graph
            if result is None:
                graph.replay()
                result = self.output.clone()
            _WARMED.add(key)
            return result
        finally:
            torch.set_autocast_cache_enabled(cache)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_WARMED: set[tuple] = set()  # (device, shapes, dtypes) a GraphedDenoiser has run eagerly


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device for every capture. A stream of its own per capture would
    cycle through PyTorch's pool of 32, and cuBLAS keeps a workspace (tens of MiB, allocated
    through the caching allocator) for every stream it has run on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def noise_schedule(config: AlphaFold3Config, steps: int, device: torch.device | None = None) -> torch.Tensor:
    """AF3 sampling schedule ``[steps + 1]``: sigma_data * (s_max^(1/p) + t (s_min^(1/p) - s_max^(1/p)))^p."""
    t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    inv = 1.0 / config.schedule_rho
    base = config.schedule_max**inv + t * (config.schedule_min**inv - config.schedule_max**inv)
    return (config.sigma_data * base**config.schedule_rho).float()


def training_noise_levels(config: AlphaFold3Config, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """sigma = sigma_data * exp(noise_mean + noise_std * N(0, 1))."""
    return config.sigma_data * torch.exp(config.noise_mean + config.noise_std * torch.randn(shape, device=device))


def random_rotations(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniformly random rotation matrices ``[*shape, 3, 3]`` (from normalised Gaussian quaternions)."""
    w, x, y, z = torch.nn.functional.normalize(torch.randn(*shape, 4, device=device), dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def centre_random_augmentation(x: torch.Tensor, mask: torch.Tensor, translation: float = 1.0) -> torch.Tensor:
    """AF3 Alg. 19: centre on the masked mean, rotate uniformly, translate by N(0, translation^2).

    x ``[B, S, A, 3]``, mask ``[B, A]`` bool.
    """
    weight = mask.to(x.dtype)[:, None, :, None]
    centre = (x * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp(min=1)
    rotation = random_rotations(x.shape[:2], x.device).to(x.dtype)
    shift = translation * torch.randn(*x.shape[:2], 1, 3, device=x.device, dtype=x.dtype)
    return torch.einsum("bsij,bsaj->bsai", rotation, x - centre) + shift


def sample_diffusion(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    atom_mask: torch.Tensor,
    samples: int,
    schedule: torch.Tensor,
    config: AlphaFold3Config,
) -> torch.Tensor:
    """AF3 Alg. 18. ``denoise(x_noisy [B, S, A, 3], t_hat [B, S]) -> x_denoised``; returns ``[B, S, A, 3]``."""
    B, A = atom_mask.shape
    x = schedule[0] * torch.randn(B, samples, A, 3, device=atom_mask.device)
    for c_prev, c in zip(schedule[:-1].tolist(), schedule[1:].tolist()):
        x = centre_random_augmentation(x, atom_mask)
        gamma = config.gamma_0 if c > config.gamma_min else 0.0
        t_hat = c_prev * (gamma + 1.0)
        x_noisy = x + config.noise_scale * math.sqrt(max(t_hat**2 - c_prev**2, 0.0)) * torch.randn_like(x)
        x_denoised = denoise(x_noisy, x.new_full((B, samples), t_hat))
        delta = (x_noisy - x_denoised) / t_hat
        x = x_noisy + config.step_scale * (c - t_hat) * delta
    return x * atom_mask[:, None, :, None]
