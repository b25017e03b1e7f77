"""AlphaFold3 configuration: one flat dataclass of plain values and three presets.

``preset("paper")`` has the published sizes (../shared/AF3_REFERENCE.md) with every memory
switch on; ``preset("small")`` trains on one GPU in minutes; ``preset("tiny")`` runs forward,
backward and a 4-step sampler on the CPU in seconds. Any field can be overridden:
``preset("tiny", c_z=32, kernels="torch")``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from megafold.errors import ConfigError

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class AlphaFold3Config:
    # ---- widths
    c_s: int = 384  # single (token) representation; also the input embedder's token width
    c_z: int = 128  # pair representation
    c_m: int = 64  # MSA representation
    c_atom: int = 128  # atom single
    c_atompair: int = 16  # atom pair
    c_token: int = 768  # diffusion transformer width
    c_template: int = 64  # template pair stack width
    c_fourier: int = 256  # noise-level Fourier embedding
    # ---- depths
    pairformer_blocks: int = 48
    msa_blocks: int = 4
    template_blocks: int = 2
    confidence_blocks: int = 4
    diffusion_blocks: int = 24
    atom_encoder_blocks: int = 3
    atom_decoder_blocks: int = 3
    # ---- heads and hidden sizes
    single_heads: int = 16  # pairformer attention with pair bias, head dim c_s / heads
    tri_attn_heads: int = 4
    tri_attn_head_dim: int = 32
    tri_mul_hidden: int = 128  # the template stack uses c_template
    msa_pwa_heads: int = 8
    msa_pwa_head_dim: int = 32
    opm_hidden: int = 32
    transition_n: int = 4
    diffusion_heads: int = 16
    atom_heads: int = 4
    atom_queries: int = 32  # sequence-local atom attention: queries per window
    atom_keys: int = 128  # keys per window, centred on the queries
    max_atoms_per_token: int = 24  # per-atom confidence heads have one weight slot per atom
    # ---- trunk
    recycles: int = 4  # N_cycle; training draws 1..N_cycle
    pair_dropout: float = 0.25
    msa_dropout: float = 0.15
    # ---- diffusion
    sigma_data: float = 16.0
    noise_mean: float = -1.2  # training sigma = sigma_data * exp(noise_mean + noise_std * N(0,1))
    noise_std: float = 1.5
    diffusion_samples: int = 48  # noised copies per trunk pass in training
    sampler_steps: int = 200
    sampler_samples: int = 5
    gamma_0: float = 0.8
    gamma_min: float = 1.0
    noise_scale: float = 1.003
    step_scale: float = 1.5
    schedule_max: float = 160.0  # times sigma_data
    schedule_min: float = 4e-4
    schedule_rho: float = 7.0
    rollout_steps: int = 20  # mini-rollout that feeds the confidence head in training
    # ---- losses (AF3 Sec. 4, initial training)
    diffusion_loss_weight: float = 4.0
    distogram_loss_weight: float = 0.03
    confidence_loss_weight: float = 1e-4
    bond_loss_weight: float = 0.0  # alpha_bond: 0 in initial training, 1 in fine-tuning
    pae_loss_weight: float = 1.0  # alpha_pae inside the confidence loss
    nucleotide_loss_weight: float = 5.0
    ligand_loss_weight: float = 10.0
    # ---- speed and memory
    kernels: str = "auto"  # "torch" (eager baseline) | "triton" | "auto"
    checkpoint: bool = True  # activation checkpointing per Pairformer / MSA / template block
    checkpoint_reentrant: bool = True  # ... whose forward builds no autograd graph (less host time)
    bf16: bool = True  # bf16 autocast on the forward
    pair_bf16_checkpoint: bool = True  # store the checkpointed pair activations in bf16
    pair_offload: bool = False  # ... and keep them in pinned host memory (CUDA): longer crops
    diffusion_chunk: int = 0  # diffusion samples per chunk (0: all at once)
    diffusion_block_checkpoint: bool = False  # checkpoint each diffusion-transformer block too
    transition_chunk: int = 0  # rows per transition chunk (0: unchunked)
    attention_chunk: int = 0  # rows per triangle-attention chunk (0: unchunked)
    rollout_cuda_graph: bool = True  # sampler steps replay a CUDA graph of the denoiser (CUDA only)
    diffusion_cuda_graph: bool = True  # training: the diffusion chunks' denoiser calls replay CUDA graphs

    @property
    def c_s_inputs(self) -> int:
        """Width of s_inputs: atom-encoder tokens + restype (32) + profile (32) + deletion mean."""
        return self.c_s + 65

    def replace(self, **overrides) -> "AlphaFold3Config":
        return _build(dataclasses.asdict(self), overrides, "config")


_PRESETS: dict[str, dict] = {
    # Chunks of 4 of the 48 diffusion samples, each diffusion-transformer block checkpointed:
    # with the chunks replayed from CUDA graphs (diffusion_cuda_graph) neither costs host time.
    # Crop 384, triton, H100, one machine: 2.16 s / 5.60 GiB a step; without block checkpoints
    # 1.85 s / 6.58 GiB; chunks of 8 with block checkpoints 1.88 s / 6.72 GiB.
    "paper": dict(diffusion_chunk=4, diffusion_block_checkpoint=True),
    "small": dict(
        c_s=128, c_z=64, c_m=32, c_atom=64, c_atompair=16, c_token=256, c_template=32,
        c_fourier=128, pairformer_blocks=8, msa_blocks=2, template_blocks=1,
        confidence_blocks=2, diffusion_blocks=4, atom_encoder_blocks=1, atom_decoder_blocks=1,
        single_heads=8, tri_attn_heads=4, tri_attn_head_dim=16, tri_mul_hidden=64,
        msa_pwa_heads=4, msa_pwa_head_dim=16, opm_hidden=16, diffusion_heads=8,
        recycles=2, diffusion_samples=16, sampler_steps=50, rollout_steps=10,
        checkpoint=False, pair_bf16_checkpoint=False,
    ),
    "tiny": dict(
        c_s=32, c_z=16, c_m=8, c_atom=16, c_atompair=8, c_token=32, c_template=8,
        c_fourier=16, pairformer_blocks=2, msa_blocks=2, template_blocks=1,
        confidence_blocks=1, diffusion_blocks=2, atom_encoder_blocks=1, atom_decoder_blocks=1,
        single_heads=2, tri_attn_heads=2, tri_attn_head_dim=8, tri_mul_hidden=16,
        msa_pwa_heads=2, msa_pwa_head_dim=8, opm_hidden=8, transition_n=2, diffusion_heads=2,
        atom_heads=2, recycles=2, diffusion_samples=2, sampler_steps=4, sampler_samples=2,
        rollout_steps=2, checkpoint=False, bf16=False, pair_bf16_checkpoint=False,
    ),
}

PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides) -> AlphaFold3Config:
    """The config of preset ``name`` ("tiny" | "small" | "paper") with ``overrides`` applied.

    Raises ConfigError naming an unknown preset, an unknown field or a bad value.
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {PRESETS}")
    values = dataclasses.asdict(AlphaFold3Config())
    values.update(_PRESETS[name])
    return _build(values, overrides, f"preset {name!r}")


def _build(values: dict, overrides: dict, origin: str) -> AlphaFold3Config:
    known = {f.name: f for f in fields(AlphaFold3Config)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"{origin}: unknown config field(s) {unknown}")
    values = {**values, **overrides}
    for name, value in values.items():
        kind = known[name].type
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{origin}: {name}={value!r} is not a {kind}")
        values[name] = value
    config = AlphaFold3Config(**values)
    _validate(config, origin)
    return config


def _validate(config: AlphaFold3Config, origin: str) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"{origin}: {message}")

    if config.kernels not in KERNEL_CHOICES:
        fail(f"kernels={config.kernels!r}; expected one of {KERNEL_CHOICES}")
    positive = [
        "c_s", "c_z", "c_m", "c_atom", "c_atompair", "c_token", "c_template", "c_fourier",
        "single_heads", "tri_attn_heads", "tri_attn_head_dim", "tri_mul_hidden", "msa_pwa_heads",
        "msa_pwa_head_dim", "opm_hidden", "transition_n", "diffusion_heads", "atom_heads",
        "atom_queries", "atom_keys", "max_atoms_per_token", "recycles", "diffusion_samples",
        "sampler_steps", "sampler_samples", "rollout_steps", "pairformer_blocks",
        "diffusion_blocks", "atom_encoder_blocks", "atom_decoder_blocks",
    ]
    for name in positive:
        if getattr(config, name) < 1:
            fail(f"{name}={getattr(config, name)} must be >= 1")
    non_negative = [
        "msa_blocks", "template_blocks", "confidence_blocks", "diffusion_chunk",
        "transition_chunk", "attention_chunk", "bond_loss_weight", "pae_loss_weight",
        "diffusion_loss_weight", "distogram_loss_weight", "confidence_loss_weight",
        "nucleotide_loss_weight", "ligand_loss_weight",
    ]
    for name in non_negative:
        if getattr(config, name) < 0:
            fail(f"{name}={getattr(config, name)} must be >= 0")
    for width, heads in (("c_s", "single_heads"), ("c_token", "diffusion_heads"), ("c_atom", "atom_heads")):
        if getattr(config, width) % getattr(config, heads):
            fail(f"{width}={getattr(config, width)} is not divisible by {heads}={getattr(config, heads)}")
    if config.atom_keys < config.atom_queries or (config.atom_keys - config.atom_queries) % 2:
        fail(f"atom_keys={config.atom_keys} must be >= atom_queries={config.atom_queries} "
             "and exceed it by an even number (windows are centred)")
    if config.pair_offload and not (config.checkpoint and config.pair_bf16_checkpoint):
        fail("pair_offload moves the checkpointed bf16 pair copies: it needs checkpoint and pair_bf16_checkpoint")
    for name in ("pair_dropout", "msa_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            fail(f"{name}={getattr(config, name)} must be in [0, 1)")
    if config.sigma_data <= 0 or config.schedule_min <= 0 or config.schedule_max <= config.schedule_min:
        fail("need sigma_data > 0 and 0 < schedule_min < schedule_max")
