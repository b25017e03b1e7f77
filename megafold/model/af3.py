"""AlphaFold3: input embedding, trunk with recycling, diffusion, heads and losses (AF3 Alg. 1).

    model = AlphaFold3(preset("small"))
    loss, terms = model.training_loss(batch)     # terms: floats per loss
    out = model.sample(batch, steps=200, samples=5)  # coords [B, 5, A, 3], plddt, pae, ...

The batch is the feature batch of ``megafold.data.features`` (FEATURES / collate).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from megafold.data.features import FEATURES
from megafold.kernels import use_kernels
from megafold.model.config import AlphaFold3Config
from megafold.model.diffusion import (
    DiffusionContext,
    DiffusionModule,
    GraphedChunkDenoiser,
    GraphedDenoiser,
    centre_random_augmentation,
    noise_schedule,
    sample_diffusion,
    training_noise_levels,
)
from megafold.model.embedders import InputFeatureEmbedder, RelativePositionEncoding
from megafold.model.heads import PAE_BINS, PDE_BINS, PLDDT_BINS, ConfidenceHead, DistogramHead
from megafold.model.losses import (
    bond_loss,
    bonded_atom_pairs,
    confidence_losses,
    distogram_loss,
    edm_weight,
    smooth_lddt_loss_on_pairs,
    smooth_lddt_pairs,
    weighted_mse,
    weighted_rigid_align,
)
from megafold.model.msa import MSAModule
from megafold.model.pairformer import PairformerStack
from megafold.model.primitives import (
    LayerNorm,
    LinearNoBias,
    checkpointed_with_context,
    graphed_chunks_allowed,
)
from megafold.model.template import TemplateEmbedder

Batch = Mapping[str, torch.Tensor]


@dataclass
class TrunkOutput:
    s_inputs: torch.Tensor  # [B, N, c_s_inputs]
    single: torch.Tensor  # [B, N, c_s]
    pair: torch.Tensor  # [B, N, N, c_z]


class AlphaFold3(nn.Module):
    def __init__(self, config: AlphaFold3Config):
        super().__init__()
        self.config = config
        c = config
        self.input_embedder = InputFeatureEmbedder(c)
        self.single_init = LinearNoBias(c.c_s_inputs, c.c_s)
        self.pair_init_i = LinearNoBias(c.c_s_inputs, c.c_z)
        self.pair_init_j = LinearNoBias(c.c_s_inputs, c.c_z)
        self.relative_position = RelativePositionEncoding(c.c_z)
        self.token_bonds = LinearNoBias(1, c.c_z)
        self.recycle_pair_norm = LayerNorm(c.c_z)
        self.recycle_pair = LinearNoBias(c.c_z, c.c_z, init="final")
        self.recycle_single_norm = LayerNorm(c.c_s)
        self.recycle_single = LinearNoBias(c.c_s, c.c_s, init="final")
        self.template_embedder = TemplateEmbedder(c)
        self.msa_module = MSAModule(c)
        self.pairformer = PairformerStack(c, c.pairformer_blocks, c.c_z, c.c_s)
        self.diffusion_module = DiffusionModule(c)
        self.distogram_head = DistogramHead(c.c_z)
        self.confidence_head = ConfidenceHead(c)

    # ------------------------------------------------------------------ trunk

    @contextlib.contextmanager
    def _compute(self, batch: Batch) -> Iterator[None]:
        """The kernels backend of the config and, if on, bf16 autocast."""
        missing = [name for name in FEATURES if name not in batch]
        if missing:
            raise ValueError(f"AlphaFold3: the batch lacks features {missing} (see megafold.data.features)")
        device_type = batch["token_mask"].device.type
        with use_kernels(self.config.kernels), torch.autocast(device_type, torch.bfloat16, enabled=self.config.bf16):
            yield

    def trunk(self, batch: Batch, n_cycles: int) -> TrunkOutput:
        """Input embedding and ``n_cycles`` recycling iterations; gradients flow through the last only."""
        token_mask = batch["token_mask"]
        pair_mask = token_mask[:, :, None] & token_mask[:, None, :]
        s_inputs = self.input_embedder(batch)
        single_init = self.single_init(s_inputs).float()
        pair_init = (
            self.pair_init_i(s_inputs)[:, :, None]
            + self.pair_init_j(s_inputs)[:, None, :]
            + self.relative_position(batch)
            + self.token_bonds(batch["token_bonds"][..., None].to(s_inputs.dtype))
        ).float()
        single, pair = torch.zeros_like(single_init), torch.zeros_like(pair_init)
        grad = torch.is_grad_enabled()
        for cycle in range(n_cycles):
            if grad and cycle == n_cycles - 1 and cycle > 0:
                # bf16 autocast caches its casts of the weights. Casts made in the gradient-free
                # cycles carry no gradient, and torch 2.6 reuses them in this one: the recycled
                # modules' weights would get no gradient at all. Fresh casts here.
                torch.clear_autocast_cache()
            with torch.set_grad_enabled(grad and cycle == n_cycles - 1):
                pair = pair_init + self.recycle_pair(self.recycle_pair_norm(pair.detach()))
                pair = pair + self.template_embedder(batch, pair, pair_mask, token_mask)
                pair = self.msa_module(batch, pair, s_inputs, pair_mask, token_mask)
                single = single_init + self.recycle_single(self.recycle_single_norm(single.detach()))
                pair, single = self.pairformer(pair, single, pair_mask, token_mask)
        return TrunkOutput(s_inputs, single, pair)

    def forward(self, batch: Batch, n_cycles: int | None = None) -> dict[str, torch.Tensor]:
        """Trunk and distogram: single_inputs ``[B, N, c_s_inputs]``, single ``[B, N, c_s]``,
        pair ``[B, N, N, c_z]``, distogram_logits ``[B, N, N, 64]``. ``n_cycles`` defaults to
        ``config.recycles``."""
        with self._compute(batch):
            trunk = self.trunk(batch, n_cycles or self.config.recycles)
            distogram = self.distogram_head(trunk.pair).float()
        return {"single_inputs": trunk.s_inputs, "single": trunk.single, "pair": trunk.pair, "distogram_logits": distogram}

    # ------------------------------------------------------------------ training

    def atom_loss_weights(self, batch: Batch) -> torch.Tensor:
        """Per-atom weights of the diffusion loss ``[B, A]``: 1, +5 nucleotide, +10 ligand."""
        atom_to_token = batch["atom_to_token"]

        def flag(name: str) -> torch.Tensor:
            return torch.gather(batch[name], 1, atom_to_token).float()

        c = self.config
        return 1.0 + c.nucleotide_loss_weight * (flag("is_dna") + flag("is_rna")) + c.ligand_loss_weight * flag("is_ligand")

    def training_loss(self, batch: Batch, n_cycles: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step's loss (AF3 Sec. 4) and its terms as floats.

        Recycling draws 1..config.recycles cycles in training mode unless ``n_cycles`` is given.
        Terms: diffusion (EDM-weighted MSE after alignment, plus bonds), smooth_lddt, bond, mse
        (unweighted, A^2), distogram, plddt, pae, pde, resolved, confidence, loss.
        """
        c = self.config
        if n_cycles is None:
            n_cycles = int(torch.randint(1, c.recycles + 1, ())) if self.training else c.recycles
        with self._compute(batch):
            trunk = self.trunk(batch, n_cycles)
            distogram = distogram_loss(self.distogram_head(trunk.pair), batch)
            ctx = self.diffusion_module.prepare(batch, trunk.s_inputs, trunk.single, trunk.pair)
            diffusion = self._diffusion_terms(batch, ctx)
            confidence = self._confidence_terms(batch, trunk, ctx)
        conf_total = confidence["plddt"] + confidence["pde"] + confidence["resolved"] + c.pae_loss_weight * confidence["pae"]
        loss = (
            c.diffusion_loss_weight * (diffusion["diffusion"] + diffusion["smooth_lddt"])
            + c.distogram_loss_weight * distogram
            + c.confidence_loss_weight * conf_total
        )
        terms = {**diffusion, "distogram": distogram, **confidence, "confidence": conf_total, "loss": loss}
        values = torch.stack([value.detach().float() for value in terms.values()]).tolist()  # one device sync
        return loss, dict(zip(terms, values))

    def _diffusion_terms(self, batch: Batch, ctx: DiffusionContext) -> dict[str, torch.Tensor]:
        """The diffusion batch: ``diffusion_samples`` noised, rotated and translated copies of the
        truth, denoised in chunks of ``diffusion_chunk`` (each chunk checkpointed, so the memory
        of the diffusion batch stays that of one chunk). With ``diffusion_cuda_graph`` and three
        or more chunks the denoiser's checkpoints replay CUDA graphs (``GraphedChunkDenoiser``)."""
        c = self.config
        atom_mask = batch["atom_mask"]
        B, A = atom_mask.shape
        S = c.diffusion_samples
        resolved = batch["atom_resolved"] & atom_mask
        x_true = batch["atom_pos"].float()
        with torch.no_grad():
            x_aug = centre_random_augmentation(x_true[:, None].expand(B, S, A, 3), resolved)
            sigma = training_noise_levels(c, (B, S), x_true.device)
            x_noisy = x_aug + sigma[..., None, None] * torch.randn_like(x_aug)
        weight = self.atom_loss_weights(batch)
        nucleotide = torch.gather(batch["is_dna"] | batch["is_rna"], 1, batch["atom_to_token"])
        pairs = bonded_atom_pairs(batch) if c.bond_loss_weight > 0 else torch.zeros(0, 3, dtype=torch.long)
        lddt_pairs = smooth_lddt_pairs(x_true, nucleotide, resolved)  # once, not per chunk

        chunk = c.diffusion_chunk if 0 < c.diffusion_chunk < S else S
        chunks = -(-S // chunk)
        denoise = None
        if c.diffusion_cuda_graph and chunks >= 3 and torch.is_grad_enabled() and graphed_chunks_allowed():
            # off CUDA the same checkpoints and gradient sums, run eagerly
            denoise = GraphedChunkDenoiser(self.diffusion_module, ctx, chunks, graphs=x_true.is_cuda)

        def chunk_terms(
            ctx: DiffusionContext, x_noisy_c: torch.Tensor, x_aug_c: torch.Tensor, sigma_c: torch.Tensor
        ) -> torch.Tensor:
            if denoise is not None:  # a checkpoint of the denoiser, replayed from CUDA graphs
                x_denoised = denoise(x_noisy_c, sigma_c)
            else:
                x_denoised = self.diffusion_module(ctx, x_noisy_c, sigma_c)
            aligned = weighted_rigid_align(x_denoised, x_aug_c, (weight * resolved)[:, None])
            mse = weighted_mse(x_denoised, aligned, weight[:, None], resolved[:, None])
            lddt = smooth_lddt_loss_on_pairs(x_denoised, lddt_pairs)
            bond = bond_loss(x_denoised, x_true, pairs)
            return torch.stack([mse, lddt, bond])  # [3, B, chunk]

        parts = []
        for start in range(0, S, chunk):
            args = (x_noisy[:, start : start + chunk], x_aug[:, start : start + chunk], sigma[:, start : start + chunk])
            if chunk < S and torch.is_grad_enabled() and denoise is None:
                parts.append(checkpointed_with_context(chunk_terms, ctx, *args, reentrant=c.checkpoint_reentrant,
                                                       preserve_rng=False))  # the noise is drawn outside
            else:
                parts.append(chunk_terms(ctx, *args))
        mse, lddt, bond = torch.cat(parts, dim=-1)
        weighted = edm_weight(sigma, c.sigma_data) * (mse + c.bond_loss_weight * bond)
        return {"diffusion": weighted.mean(), "smooth_lddt": lddt.mean(), "bond": bond.mean(), "mse": mse.mean()}

    def _rollout(self, ctx: DiffusionContext, batch: Batch, samples: int, steps: int) -> torch.Tensor:
        schedule = noise_schedule(self.config, steps, batch["atom_mask"].device)

        def denoise(x_noisy: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
            return self.diffusion_module.denoise_in_chunks(ctx, x_noisy, t_hat, self.config.diffusion_chunk)

        if self.config.rollout_cuda_graph:
            denoise = GraphedDenoiser(denoise)
        return sample_diffusion(denoise, batch["atom_mask"], samples, schedule, self.config)

    def _confidence_terms(self, batch: Batch, trunk: TrunkOutput, ctx: DiffusionContext) -> dict[str, torch.Tensor]:
        """Confidence losses on a mini-rollout of the sampler; nothing reaches the trunk."""
        with torch.no_grad():
            coords = self._rollout(ctx, batch, 1, self.config.rollout_steps)[:, 0]
        logits = self.confidence_head(
            batch, trunk.s_inputs.detach(), trunk.single.detach(), trunk.pair.detach(), coords
        )
        return confidence_losses(logits, coords, batch)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample(
        self, batch: Batch, steps: int | None = None, samples: int | None = None, n_cycles: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Structures from the AF3 sampler with their confidences.

        Returns coords ``[B, S, A, 3]``; plddt ``[B, S, A]`` (0-100); pae, pde ``[B, S, N, N]``
        (A, expected values); resolved ``[B, S, A]`` (probability); the ``*_logits`` behind
        them; distogram_logits ``[B, N, N, 64]``. Defaults: config.sampler_steps,
        config.sampler_samples, config.recycles.
        """
        c = self.config
        steps = steps or c.sampler_steps
        samples = samples or c.sampler_samples
        with self._compute(batch):
            trunk = self.trunk(batch, n_cycles or c.recycles)
            ctx = self.diffusion_module.prepare(batch, trunk.s_inputs, trunk.single, trunk.pair)
            coords = self._rollout(ctx, batch, samples, steps)
            heads = [
                self.confidence_head(batch, trunk.s_inputs, trunk.single, trunk.pair, coords[:, i])
                for i in range(samples)
            ]
            distogram = self.distogram_head(trunk.pair).float()
        logits = {name: torch.stack([h[name] for h in heads], dim=1).float() for name in heads[0]}

        def expected(name: str, centres: torch.Tensor) -> torch.Tensor:
            return (logits[name].softmax(-1) * centres.to(coords.device)).sum(-1)

        return {
            "coords": coords,
            "plddt": 100.0 * expected("plddt_logits", (torch.arange(PLDDT_BINS) + 0.5) / PLDDT_BINS),
            "pae": expected("pae_logits", 0.5 * torch.arange(PAE_BINS) + 0.25),
            "pde": expected("pde_logits", 0.5 * torch.arange(PDE_BINS) + 0.25),
            "resolved": logits["resolved_logits"].softmax(-1)[..., 1],
            **logits,
            "distogram_logits": distogram,
        }


def model_summary(model: nn.Module, depth: int = 2) -> str:
    """Parameter counts per module, down to ``depth`` levels of submodules, as a text table."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[: min(depth, len(parts) - 1)]) or parts[0]
        counts[key] = counts.get(key, 0) + param.numel()
    total = sum(counts.values())
    width = max(len(k) for k in counts) if counts else 10
    lines = [f"{'module':<{width}}  {'parameters':>12}  {'share':>6}"]
    lines += [f"{k:<{width}}  {n:>12,}  {n / total:>6.1%}" for k, n in counts.items()]
    lines.append(f"{'total':<{width}}  {total:>12,}  {1:>6.0%}")
    return "\n".join(lines)
