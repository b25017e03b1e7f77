"""Diffusion module (AF3 Alg. 20-22), EDM preconditioning, augmentation and the sampler (Alg. 18-19).

The trunk-dependent conditioning (pair conditioning, pair biases of every transformer block,
atom single and pair features, the atom transformers' modulations) and the transformers' fused
weights are computed once per trunk pass by ``prepare`` and shared by all noised samples, which run in chunks along the
sample axis, by the recomputes of those chunks and by every step of the sampler.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from megafold.kernels import default_backend, layernorm_linear, use_kernels
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
    tensor_leaves,
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
                # thread_local: the loader's copy thread may allocate and copy meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
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


class GraphedChunkDenoiser:
    """The training step's denoiser on the equal chunks of its diffusion batch, forward and
    backward replayed from CUDA graphs: a checkpoint of each chunk (nothing of a chunk is kept
    for the backward but its inputs) whose launches cost one replay instead of thousands.

    A "paper" step denoises 48 samples in chunks, through the atom transformers and 24 token
    transformer blocks, once in the forward and again in the backward (recompute and
    gradients): thousands of small launches per chunk that bound the step at small crops, and
    that made smaller chunks (less memory) cost time. Here a step's first chunk runs eagerly (it
    compiles and tunes the kernels for the step's shapes), the second is captured into a graph
    and replayed, and so are the rest. The backward does the same with the recompute and
    a backward of the chunk; each chunk's gradients of the context tensors and of the module's
    parameters add into their ``.grad`` in place, in a fixed order (deterministic): the
    parameters' directly, the context's into one detached copy per tensor, handed to autograd
    when the last chunk's backward is done. Graphs live for one step. A chunk of another shape
    and any capture that fails run eagerly.

    Use: ``denoise = GraphedChunkDenoiser(module, ctx, chunks)``, then ``denoise(x_noisy, sigma)``
    for each of the ``chunks`` chunks, with gradients on, outside distributed runs (parameter
    gradients are added to ``.grad`` directly, past DDP's hooks). ``graphs=False`` (off CUDA)
    runs every chunk eagerly.
    """

    def __init__(self, module: nn.Module, ctx: "DiffusionContext", chunks: int, graphs: bool = True):
        self.module, self.ctx, self.chunks = module, ctx, chunks
        self.leaves, self.rebuild = tensor_leaves(ctx)
        self.grad_index = [i for i, leaf in enumerate(self.leaves) if leaf.requires_grad]
        self.backend = default_backend()
        self.device = self.leaves[0].device
        device_type = self.device.type
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.shape: tuple | None = None
        self.calls = {"forward": 0, "backward": 0}
        self.graphs: dict[str, tuple] = {}  # "forward" / "backward": (graph, static inputs, outputs)
        self.eager = not graphs  # graphs=False: the same checkpoints and sums, every chunk eager
        self.detached: list[torch.Tensor] | None = None  # the context leaves whose .grad add up a step
        self.detached_ctx: "DiffusionContext | None" = None  # the context around them

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _GraphedChunk.apply(self, x_noisy, sigma, *(self.leaves[i] for i in self.grad_index))

    def _graphed(self, kind: str, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether this call replays a graph (capturing it first when needed)."""
        self.calls[kind] += 1
        if self.calls[kind] == 1:
            self.shape = self.shape or tuple(t.shape for t in inputs[:2])
            return False
        if self.eager or tuple(t.shape for t in inputs[:2]) != self.shape:
            return False
        if kind not in self.graphs:
            if self.calls[kind] >= self.chunks:  # the last chunk: a capture would not pay
                return False
            statics = tuple(t.clone() for t in inputs)
            run = self._forward_graph_body if kind == "forward" else self._accumulate
            graph, outputs = self._capture(lambda: run(*statics))
            if graph is None:
                return False
            self.graphs[kind] = (graph, statics, outputs)
        graph, statics, _ = self.graphs[kind]
        for static, value in zip(statics, inputs):
            static.copy_(value)
        graph.replay()
        return True

    def _capture(self, body: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph | None, object]:
        device = self.device
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # no cast cached in the graph's memory
        graph = torch.cuda.CUDAGraph()
        try:
            with _on_side_stream(device):
                # thread_local: the loader's copy thread (its own stream) may allocate and copy
                # while a step captures; "global" would fail the capture for that
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    outputs = body()
                finally:
                    graph.capture_end()
        except RuntimeError as error:  # e.g. an op that syncs with the host
            oom = _out_of_memory(error)
            if oom is not None:  # the step does not fit: say so as an eager step would
                raise oom from error
            if not _random_numbers_work(device):
                # an invalidated capture ends before CUDA's generator leaves its capture state,
                # and every later random op would fail with a message about offsets
                raise RuntimeError(
                    f"GraphedChunkDenoiser: the CUDA graph capture of a diffusion chunk failed ({error}) "
                    "and left CUDA's random number generator unusable for the rest of this process; "
                    "restart it (in a notebook: restart the kernel) and run with diffusion_cuda_graph=False "
                    "(CLI: --set diffusion_cuda_graph=false)") from error
            warnings.warn(f"GraphedChunkDenoiser: CUDA graph capture failed ({error}); the chunks run eagerly")
            self.eager = True
            return None, None
        finally:
            torch.set_autocast_cache_enabled(cache)
        return graph, outputs

    # forward: no gradients (the autograd Function's forward)

    def _forward_graph_body(self, x_noisy, sigma):
        return self.module(self.ctx, x_noisy, sigma)

    def forward_chunk(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self._graphed("forward", (x_noisy, sigma)):
            out = self.graphs["forward"][2].clone()
        else:
            out = self._forward_graph_body(x_noisy, sigma)
        if self.calls["forward"] == self.chunks:  # the last chunk: free the forward graph's memory
            self.graphs.pop("forward", None)
        return out

    # backward: the chunk's recompute; its gradients add into .grad in place

    def _accumulate(self, x_noisy, sigma, grad) -> None:
        """Recompute the chunk and add its gradients into the ``.grad`` of the context leaves
        (``self.detached``, one detached copy of each for the whole step) and of the module's
        parameters. Autograd adds each parameter's gradient into ``.grad`` as soon as it is
        computed and frees it, so no chunk ever holds a second copy of the module's gradients
        (203 M parameters in "paper": 0.76 GiB), in a graph's pool or out of it. Under capture
        the additions are recorded in place; every replay adds into the same tensors."""
        device_type, enabled, dtype = self.autocast
        with torch.enable_grad(), use_kernels(self.backend), torch.autocast(device_type, dtype, enabled=enabled):
            out = self.module(self.detached_ctx, x_noisy, sigma)
            # The chunk's only leaves that need gradients are these and the parameters, so no
            # ``inputs=``: block checkpoints inside (diffusion_block_checkpoint) may then be
            # reentrant, which runs only under a plain backward.
            torch.autograd.backward(out, grad)

    def _accumulate_eagerly(self, x_noisy, sigma, grad) -> None:
        """``_accumulate`` without a graph, on the captures' side stream when there are graphs.
        Autograd's nodes that add into ``.grad`` remember the stream they were made on, and
        one made here may outlive this call (with block checkpoints, on an H100): a capture
        that then meets one made on the default stream fails ("operation would make the legacy
        stream depend on a capturing blocking stream")."""
        if self.eager:
            return self._accumulate(x_noisy, sigma, grad)
        with _on_side_stream(self.device):
            self._accumulate(x_noisy, sigma, grad)

    def backward_chunk(self, x_noisy: torch.Tensor, sigma: torch.Tensor, grad: torch.Tensor) -> list:
        if self.detached is None:  # the step's first backward (eager: it allocates every .grad)
            self.detached = [self.leaves[i].detach().requires_grad_() for i in self.grad_index]
            leaves = list(self.leaves)
            for index, leaf in zip(self.grad_index, self.detached):
                leaves[index] = leaf
            self.detached_ctx = self.rebuild(leaves)
        if not self._graphed("backward", (x_noisy, sigma, grad)):
            self._accumulate_eagerly(x_noisy, sigma, grad)
        if self.calls["backward"] < self.calls["forward"]:
            return [None] * len(self.grad_index)
        # The last chunk's backward: hand the context's sums to autograd, release the graphs.
        leaf_grads = [leaf.grad for leaf in self.detached]
        self.graphs.clear()
        self.detached = self.detached_ctx = None
        return leaf_grads


@contextmanager
def _on_side_stream(device: torch.device) -> Iterator[torch.cuda.Stream]:
    """Run a block on the device's side stream (``_side_stream``), ordered after the current
    stream's work so far, with the current stream waiting for the block's."""
    current, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield side
    finally:
        current.wait_stream(side)


def _random_numbers_work(device: torch.device) -> bool:
    """Whether CUDA's generator on ``device`` draws (a failed capture can leave it broken)."""
    try:
        torch.empty(1, device=device).uniform_()
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def _out_of_memory(error: BaseException | None) -> torch.OutOfMemoryError | None:
    """The out-of-memory error in ``error``'s chain (a failed capture's ``capture_end`` raises
    its own error on top of the one that broke the capture), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return error
        if "out of memory" in str(error).lower():
            return torch.OutOfMemoryError(str(error))
        error = error.__cause__ or error.__context__
    return None


class _GraphedChunk(torch.autograd.Function):
    """One chunk of ``GraphedChunkDenoiser``: the context tensors that need gradients are inputs,
    so that autograd routes theirs; only the chunk's noised positions and noise levels are kept."""

    @staticmethod
    def forward(ctx, runner: GraphedChunkDenoiser, x_noisy: torch.Tensor, sigma: torch.Tensor, *grad_leaves):
        ctx.runner = runner
        ctx.save_for_backward(x_noisy, sigma)
        return runner.forward_chunk(x_noisy, sigma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_noisy, sigma = ctx.saved_tensors
        return (None, None, None, *ctx.runner.backward_chunk(x_noisy, sigma, grad.contiguous()))


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
