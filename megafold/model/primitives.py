"""Building blocks shared by the trunk and the diffusion module.

Initialisation follows AF3 Sec. 3 (as in AF2) and is written out in every constructor:
LeCun normal for linear layers ("lecun"), zero for the last linear of every residual branch
("final"), zero weight and bias 1 for gates ("gate"; a gate without bias starts at
sigmoid(0) = 0.5), LayerNorm weight 1 and bias 0.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megafold.kernels import evo_attention, layernorm_linear, transition, use_kernels
from megafold.kernels import default_backend
from megafold.kernels.layernorm_linear import autocast_dtype

# Standard deviation of a unit normal truncated to [-2, 2]: dividing by it keeps the
# truncated LeCun initialiser's variance at 1 / fan_in.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated normal (at 2 sigma) with variance 1 / fan_in (fan_in = last dimension)."""
    std = math.sqrt(1.0 / weight.shape[-1]) / _TRUNCATED_NORMAL_STD
    # Inverse-CDF sampling: uniform over the normal's CDF range of [-2, 2], mapped back by
    # erfinv. (torch's trunc_normal_ resamples in a loop: a minute for the "paper" model.)
    edge = math.erf(2.0 / math.sqrt(2.0))
    with torch.no_grad():
        weight.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0))
        return weight.clamp_(-2.0 * std, 2.0 * std)


def init_weight_(weight: torch.Tensor, init: str) -> torch.Tensor:
    """Initialise a ``[out, in]`` weight: "lecun", or "final" / "gate" (both zero)."""
    if init == "lecun":
        return lecun_normal_(weight)
    if init in ("final", "gate"):
        with torch.no_grad():
            return weight.zero_()
    raise ValueError(f"unknown init {init!r}")


class LinearNoBias(nn.Linear):
    """``x W^T`` without bias, initialised by ``init`` ("lecun" | "final" | "gate")."""

    def __init__(self, c_in: int, c_out: int, init: str = "lecun"):
        super().__init__(c_in, c_out, bias=False)
        init_weight_(self.weight, init)


class Linear(nn.Linear):
    """``x W^T + b``; ``init`` as for LinearNoBias, bias filled with ``bias_init``."""

    def __init__(self, c_in: int, c_out: int, init: str = "lecun", bias_init: float = 0.0):
        super().__init__(c_in, c_out, bias=True)
        init_weight_(self.weight, init)
        with torch.no_grad():
            self.bias.fill_(bias_init)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with weight 1 and bias 0; ``affine=False`` drops both, ``bias=False`` the bias."""

    def __init__(self, c: int, affine: bool = True, bias: bool = True):
        super().__init__(c, elementwise_affine=affine, bias=bias)
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()


def ln_params(c: int) -> tuple[nn.Parameter, nn.Parameter]:
    """LayerNorm weight (ones) and bias (zeros) as bare parameters, for the fused ops."""
    return nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))


def shared_dropout(
    x: torch.Tensor, p: float, training: bool, shared_dim: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Dropout whose mask is shared along ``shared_dim``.

    AF3's DropoutRowwise shares the mask between rows (``shared_dim=-3`` on ``[B, I, J, C]``),
    DropoutColumnwise between columns (``shared_dim=-2``). ``keep`` (bool, ``x``'s shape with
    ``shared_dim`` of size 1) is the mask to use; without it one is drawn.
    """
    if not training or p == 0.0:
        return x
    if keep is None:
        shape = list(x.shape)
        shape[shared_dim] = 1
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


_NONREENTRANT = [0]  # > 0 inside ``nonreentrant_checkpoints()``


@contextmanager
def nonreentrant_checkpoints() -> Iterator[None]:
    """Checkpoint every block non-reentrantly inside this block (see ``checkpointed``): the
    profiler's per-module timing hooks the autograd graph of the loss, which a reentrant
    recompute's inner backward is not part of."""
    _NONREENTRANT[0] += 1
    try:
        yield
    finally:
        _NONREENTRANT[0] -= 1


_GRAPHED_UNDER_TRACE = [0]  # > 0 inside ``graphed_chunks_under_trace()``


@contextmanager
def graphed_chunks_under_trace() -> Iterator[None]:
    """Let the training diffusion chunks replay CUDA graphs (``GraphedChunkDenoiser``) inside
    ``nonreentrant_checkpoints()``: for a profiler that times the chunk denoiser as one opaque
    region (``profile_step(..., graphed_diffusion=True)``), so that its traced step launches
    what a training step launches. Distributed runs still run the chunks eagerly."""
    _GRAPHED_UNDER_TRACE[0] += 1
    try:
        yield
    finally:
        _GRAPHED_UNDER_TRACE[0] -= 1


def graphed_chunks_allowed() -> bool:
    """Whether the training diffusion chunks may replay CUDA graphs, whose gradient sums bypass
    autograd: as ``gradients_may_bypass_autograd``, and also inside
    ``nonreentrant_checkpoints()`` where ``graphed_chunks_under_trace()`` allows it."""
    return not _distributed() and (not _NONREENTRANT[0] or _GRAPHED_UNDER_TRACE[0] > 0)


def gradients_may_bypass_autograd() -> bool:
    """Whether gradients may reach tensors and parameters outside the loss's autograd graph (a
    reentrant checkpoint's inner backward, ``GraphedChunkDenoiser``'s sums): not inside
    ``nonreentrant_checkpoints()`` (the profiler's hooks follow that graph) nor in a distributed
    run (DDP's hooks do)."""
    return not _NONREENTRANT[0] and not _distributed()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def checkpointed(fn: Callable, *args, reentrant: bool = False, preserve_rng: bool = True):
    """``torch.utils.checkpoint`` of ``fn(*args)``.

    Non-reentrant by default. ``reentrant=True`` (the pair blocks, whose every input is an
    argument) runs the forward under ``no_grad``: no autograd graph is built and no
    saved-tensor hooks run for the ~12k tensors a "paper" step's blocks would save, host time
    that a launch-bound step pays in full; the backward recomputes with gradients and runs
    its own backward. It needs an argument that requires grad (else it falls back), and
    gradients reach only arguments and parameters: a tensor that ``fn`` closes over would get
    none, so callers with such closures keep the default. Distributed runs and
    ``nonreentrant_checkpoints()`` blocks use the non-reentrant form.

    ``preserve_rng=False`` skips saving and restoring the RNG state around the recompute, for
    an ``fn`` that draws no random numbers (its dropout masks are arguments): that saves host
    time, and reading the CUDA RNG state is not allowed while a CUDA graph is being captured.

    The backward recomputation runs outside the model's ``use_kernels`` block, so the
    kernels backend of the forward is captured here and restored for it (torch restores
    autocast itself); otherwise "auto" could pick other ops and another set of saved tensors.
    """
    backend = default_backend()

    def run(*inputs):
        with use_kernels(backend):
            return fn(*inputs)

    if (
        reentrant
        and gradients_may_bypass_autograd()
        and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    ):
        return checkpoint(run, *args, use_reentrant=True, preserve_rng_state=preserve_rng)
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=preserve_rng)


def tensor_leaves(tree: object) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], object]]:
    """The tensors inside ``tree`` (dataclasses, named and plain tuples, lists, dicts; any other
    object is a constant) and a function that rebuilds the tree around replacement tensors."""
    leaves: list[torch.Tensor] = []

    def walk(node: object) -> Callable[[Sequence[torch.Tensor]], object]:
        if isinstance(node, torch.Tensor):
            index = len(leaves)
            leaves.append(node)
            return lambda new: new[index]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            fields = {f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
            return lambda new: dataclasses.replace(node, **{k: rebuild(new) for k, rebuild in fields.items()})
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            parts = [walk(item) for item in node]
            return lambda new: type(node)(*(rebuild(new) for rebuild in parts))
        if isinstance(node, (list, tuple)):
            parts = [walk(item) for item in node]
            return lambda new: type(node)(rebuild(new) for rebuild in parts)
        if isinstance(node, dict):
            items = {key: walk(value) for key, value in node.items()}
            return lambda new: {key: rebuild(new) for key, rebuild in items.items()}
        return lambda new: node

    rebuild = walk(tree)
    return leaves, rebuild


def checkpointed_with_context(
    fn: Callable, context: object, *args, reentrant: bool = True, preserve_rng: bool = True
):
    """``checkpointed(fn, context, *args, reentrant=...)`` with every tensor of ``context``
    (see ``tensor_leaves``) that requires grad passed as an argument of the checkpoint, so a
    reentrant recompute's gradients reach it (a reentrant checkpoint gives gradients to its
    arguments and parameters only; the non-reentrant form works either way)."""
    leaves, rebuild = tensor_leaves(context)
    with_grad = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
    count = len(args)

    def run(*inputs):
        new = list(leaves)
        for index, tensor in zip(with_grad, inputs[count:]):
            new[index] = tensor
        return fn(rebuild(new), *inputs[:count])

    return checkpointed(run, *args, *(leaves[i] for i in with_grad), reentrant=reentrant, preserve_rng=preserve_rng)


def run_in_chunks(
    fn: Callable[..., torch.Tensor], split: Sequence[torch.Tensor], chunk_size: int, dim: int
) -> torch.Tensor:
    """``fn(*split)`` evaluated on slices of ``dim`` of every tensor in ``split`` and concatenated.

    With gradients on, each slice is checkpointed, so backward holds one slice's
    intermediates at a time: this is what bounds the memory peak, not the slicing alone.
    """
    size = split[0].shape[dim]
    if chunk_size <= 0 or chunk_size >= size:
        return fn(*split)
    outputs = []
    for start in range(0, size, chunk_size):
        length = min(chunk_size, size - start)
        parts = [t.narrow(dim, start, length) for t in split]
        if torch.is_grad_enabled():
            outputs.append(checkpointed(fn, *parts, preserve_rng=False))  # the pair ops draw no random numbers
        else:
            outputs.append(fn(*parts))
    return torch.cat(outputs, dim)


class Transition(nn.Module):
    """SwiGLU transition (AF3 Alg. 11): ``(silu(a) * b) W_out^T``, ``a, b = LN(x) W_in^T``.

    Returns the update ``[*, c]`` for ``x [*, c]``; ``chunk_size`` slices dim 1 (rows).
    Parameters carry the names of ``megafold.kernels.transition``.
    """

    def __init__(self, c: int, n: int = 4, chunk_size: int = 0):
        super().__init__()
        self.chunk_size = chunk_size
        self.ln_weight, self.ln_bias = ln_params(c)
        self.w_in = nn.Parameter(lecun_normal_(torch.empty(2 * n * c, c)))
        self.w_out = nn.Parameter(torch.zeros(c, n * c))  # final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def update(rows: torch.Tensor) -> torch.Tensor:
            return transition(rows, self.ln_weight, self.ln_bias, self.w_in, self.w_out)

        if x.dim() < 3:
            return update(x)
        return run_in_chunks(update, [x], self.chunk_size, dim=1)


class Modulation(NamedTuple):
    """What the conditioning ``s`` contributes to one conditioned module (AF3 Alg. 24-26),
    each ``[B, S or 1, L, c_a]``: the AdaLN ``scale = sigmoid(Linear(LN(s)))`` and
    ``shift = LinearNoBias(LN(s))``, and the output ``gate = sigmoid(Linear(s))``."""

    scale: torch.Tensor
    shift: torch.Tensor
    gate: torch.Tensor


class AdaLN(nn.Module):
    """Adaptive LayerNorm (AF3 Alg. 26): ``sigmoid(Linear(LN(s))) * LN(a) + LinearNoBias(LN(s))``.

    The conditioning half comes precomputed in a ``Modulation`` (``ConditioningWeights``
    projects it for many modules at once); this module holds the parameters and applies it.
    """

    def __init__(self, c_a: int, c_cond: int):
        super().__init__()
        self.norm_a = LayerNorm(c_a, affine=False)
        self.norm_cond = LayerNorm(c_cond, bias=False)
        self.scale = Linear(c_cond, c_a, init="gate", bias_init=1.0)
        self.shift = LinearNoBias(c_cond, c_a)

    def forward(self, a: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        # LN(a) in a's dtype: under autocast (bf16 a) this skips autocast's fp32 copies of a and
        # of LN(a), which backward would keep, and their casts, for a value that is rounded to
        # bf16 before the next product anyway (the kernel's statistics are fp32 either way).
        # (torch.native_layer_norm instead of the context kept an fp32 copy of a for backward on
        # an H100, +1.5 GiB at a "paper" step's peak: the context stays.)
        with torch.autocast(a.device.type, enabled=False):
            normed = F.layer_norm(a, self.norm_a.normalized_shape, eps=self.norm_a.eps)
        return modulation.scale * normed + modulation.shift


@dataclass
class ConditioningWeights:
    """The conditioning projections of several conditioned modules (each with an AdaLN
    ``norm`` and an ``out_gate``), concatenated so that one conditioning ``s`` gives all
    their ``Modulation``s in three matrix products instead of three per module.

    ``norm_cond``'s weight is folded into the scale and shift weights
    (``Linear(LN(s) * w) = Linear'(LN(s))`` with ``W' = W diag(w)``), so the modules share
    one unweighted ``LN(s)``.
    """

    scale_weight: torch.Tensor  # [M * c_a, c_cond], acting on LN(s) without its weight
    scale_bias: torch.Tensor  # [M * c_a]
    shift_weight: torch.Tensor  # [M * c_a, c_cond]
    gate_weight: torch.Tensor  # [M * c_a, c_cond], acting on s
    gate_bias: torch.Tensor  # [M * c_a]

    @classmethod
    def of(cls, modules: Sequence[nn.Module]) -> "ConditioningWeights":
        norms = [module.norm for module in modules]
        norm_weight = torch.stack([norm.norm_cond.weight for norm in norms])[:, None]  # [M, 1, c_cond]
        return cls(
            scale_weight=(torch.stack([norm.scale.weight for norm in norms]) * norm_weight).flatten(0, 1),
            scale_bias=torch.cat([norm.scale.bias for norm in norms]),
            shift_weight=(torch.stack([norm.shift.weight for norm in norms]) * norm_weight).flatten(0, 1),
            gate_weight=torch.cat([module.out_gate.weight for module in modules]),
            gate_bias=torch.cat([module.out_gate.bias for module in modules]),
        )

    def modulations(self, cond_normed: torch.Tensor, cond: torch.Tensor, c_a: int) -> list[Modulation]:
        """One ``Modulation`` per module from ``cond [*, c_cond]`` and its unweighted LayerNorm
        ``cond_normed``."""
        scale = torch.sigmoid(F.linear(cond_normed, self.scale_weight, self.scale_bias))
        shift = F.linear(cond_normed, self.shift_weight)
        gate = torch.sigmoid(F.linear(cond, self.gate_weight, self.gate_bias))
        return [Modulation(*parts) for parts in zip(scale.split(c_a, -1), shift.split(c_a, -1), gate.split(c_a, -1))]


def tokens_to_atoms(x: torch.Tensor, atom_to_token: torch.Tensor) -> torch.Tensor:
    """Broadcast token features to their atoms: ``[B, *, N, c] -> [B, *, A, c]``."""
    B, A = atom_to_token.shape
    lead = x.shape[1:-2]
    index = atom_to_token.view(B, *([1] * len(lead)), A, 1).expand(B, *lead, A, x.shape[-1])
    return torch.gather(x, -2, index)


def atoms_to_tokens_mean(
    x: torch.Tensor, atom_to_token: torch.Tensor, atom_mask: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """Mean over each token's real atoms: ``[B, *, A, c] -> [B, *, N, c]`` (0 for atomless tokens)."""
    B, A = atom_to_token.shape
    lead = x.shape[1:-2]
    weight = atom_mask.to(x.dtype).view(B, *([1] * len(lead)), A, 1)
    index = atom_to_token.view(B, *([1] * len(lead)), A, 1).expand(B, *lead, A, x.shape[-1])
    total = x.new_zeros(B, *lead, n_tokens, x.shape[-1]).scatter_add(-2, index, x * weight)
    count = x.new_zeros(B, n_tokens).scatter_add(1, atom_to_token, atom_mask.to(x.dtype))
    return total / count.clamp(min=1).view(B, *([1] * len(lead)), n_tokens, 1)


class AtomWindows:
    """Layout of sequence-local atom attention (AF3 Alg. 7).

    Atoms are padded to K windows of Q consecutive queries; window k attends to the M keys
    ``[kQ - (M - Q) / 2, kQ + (M + Q) / 2)``, i.e. centred on its queries (AF3: 32 x 128,
    subset centres 15.5, 47.5, ...). Keys outside the molecule or padded are masked.
    """

    def __init__(self, atom_mask: torch.Tensor, queries: int, keys: int):
        """atom_mask: ``[B, A]`` bool."""
        n_atoms = atom_mask.shape[1]
        self.queries, self.keys = queries, keys
        self.n_atoms = n_atoms
        self.n_windows = max(1, -(-n_atoms // queries))
        starts = torch.arange(self.n_windows, device=atom_mask.device) * queries - (keys - queries) // 2
        index = starts[:, None] + torch.arange(keys, device=atom_mask.device)
        in_range = (index >= 0) & (index < n_atoms)
        self.key_index = index.clamp(0, n_atoms - 1)  # [K, M]
        self.key_mask = in_range & atom_mask[:, self.key_index]  # [B, K, M]
        self.query_mask = self.query_blocks(atom_mask, dim=1)  # [B, K, Q]

    def query_blocks(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Split atom axis ``dim`` (length A) into ``(K, Q)``, padding with zeros / False."""
        pad = self.n_windows * self.queries - x.shape[dim]
        if pad:
            widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
            x = F.pad(x, widths)
        return x.unflatten(dim, (self.n_windows, self.queries))

    def key_windows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather each window's keys along atom axis ``dim``: A -> ``(K, M)``."""
        return x.index_select(dim, self.key_index.flatten()).unflatten(dim, (self.n_windows, self.keys))

    def from_query_blocks(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of ``query_blocks``: ``(K, Q)`` at ``dim, dim + 1`` back to A atoms."""
        return x.flatten(dim, dim + 1).narrow(dim, 0, self.n_atoms)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    key_mask: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """Gated attention inside sequence-local atom windows.

    q, gate ``[B, S, K, Q, H, D]`` (K windows of Q queries); k, v ``[B, S, K, M, H, D]``
    (M keys per window); bias ``[B, K, H, Q, M]`` shared by the S samples; key_mask
    ``[B, K, M]`` bool. Returns ``[B, S, K, Q, H, D]``.
    """
    logits = torch.einsum("bskqhd,bskmhd->bskhqm", q, k) * q.shape[-1] ** -0.5
    logits = logits + bias.unsqueeze(1)
    # A finite fill keeps windows without keys (padding) NaN-free; their queries are masked later.
    logits = logits.masked_fill(~key_mask[:, None, :, None, None, :], torch.finfo(logits.dtype).min)
    # Softmax in the logits' dtype (the kernel accumulates in fp32): CUDA autocast would return
    # fp32 probabilities, keep them for backward and cast them back to bf16 for the product.
    # aten's _softmax has no autocast policy (softmax's is fp32): no context needed.
    probs = torch._softmax(logits, -1, False)
    out = torch.einsum("bskhqm,bskmhd->bskqhd", probs, v)
    return out * torch.sigmoid(gate)


class AttentionPairBias(nn.Module):
    """Attention with pair bias (AF3 Alg. 24), gated per head.

    Token level (the Pairformer's single track, S = 1, and the diffusion transformer,
    S = noised samples sharing one bias) runs ``megafold.kernels.evo_attention``; atom level
    (``windows`` given) runs sequence-local attention. ``c_cond = 0`` means no
    conditioning: LayerNorm instead of AdaLN and no output gate from the conditioning.
    """

    def __init__(self, c_a: int, heads: int, c_pair: int, c_cond: int = 0):
        super().__init__()
        self.heads, self.head_dim = heads, c_a // heads
        hidden = heads * self.head_dim
        self.norm = AdaLN(c_a, c_cond) if c_cond else LayerNorm(c_a)
        self.q_proj = Linear(c_a, hidden)
        self.kvg_proj = LinearNoBias(c_a, 3 * hidden)
        init_weight_(self.kvg_proj.weight[2 * hidden :], "gate")
        self.pair_norm_weight, self.pair_norm_bias = ln_params(c_pair)
        self.pair_bias_weight = nn.Parameter(lecun_normal_(torch.empty(heads, c_pair)))
        self.out_proj = LinearNoBias(hidden, c_a, init="final")
        self.out_gate = Linear(c_cond, c_a, init="gate", bias_init=-2.0) if c_cond else None

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k, v and gate projections as one: weight ``[4 * H * D, c_a]``, bias
        ``[4 * H * D]`` (zero beyond q's)."""
        weight = torch.cat([self.q_proj.weight, self.kvg_proj.weight])
        return weight, F.pad(self.q_proj.bias, (0, self.kvg_proj.weight.shape[0]))

    def pair_bias(self, pair: torch.Tensor) -> torch.Tensor:
        """``LinearNoBias(LN(pair))`` per head: ``[B, I, J, c_pair] -> [B, H, I, J]``
        (``[B, K, Q, M, c] -> [B, K, H, Q, M]`` for atom windows), contiguous: it is read
        once per query row and sample."""
        bias = layernorm_linear(pair, self.pair_norm_weight, self.pair_norm_bias, self.pair_bias_weight)
        return bias.movedim(-1, -3).contiguous()

    def forward(
        self,
        a: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor,
        modulation: Modulation | None = None,
        windows: AtomWindows | None = None,
        projection: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Update for ``a [B, S, L, c_a]``.

        bias: ``[B, H, L, L]`` from ``pair_bias`` (token level) or ``[B, K, H, Q, M]`` (windows).
        mask: bool key mask ``[B, S, L]`` (token level) or ``[B, K, M]`` (windows).
        modulation: the conditioning's factors when the module is conditioned.
        projection: ``projection_weights()``, built once by the caller for many calls (one
        product instead of two, which pays only then).
        """
        x = self.norm(a, modulation) if self.out_gate is not None else self.norm(a)
        H, D = self.heads, self.head_dim
        if projection is None:
            q = self.q_proj(x).unflatten(-1, (H, D))
            k, v, g = self.kvg_proj(x).unflatten(-1, (3, H, D)).unbind(-3)
        else:
            q, k, v, g = F.linear(x, *projection).unflatten(-1, (4, H, D)).unbind(-3)
        if windows is None:
            out = evo_attention(q, k, v, bias=bias, mask=mask, gate=g)
        else:
            # a, hence q, k, v, g: [B, S, A, H, D]; the atom axis is dim 2.
            out = local_attention(
                windows.query_blocks(q, 2), windows.key_windows(k, 2), windows.key_windows(v, 2),
                bias, mask, windows.query_blocks(g, 2),
            )
            out = windows.from_query_blocks(out, 2)
        out = self.out_proj(out.flatten(-2))
        if self.out_gate is not None:
            out = modulation.gate * out
        return out


class SwiGLU(torch.autograd.Function):
    """``silu(a) * b`` for ``a, b = h.chunk(2, -1)``, keeping only ``h`` for backward.

    Autograd would also keep ``silu(a)`` (half of ``h`` again); backward recomputes it, and
    writes both gradients into one buffer instead of concatenating them: as many launches.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.mul(grad, F.silu(a), out=grad_b)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        return grad_h


class ConditionedTransitionBlock(nn.Module):
    """SwiGLU transition under AdaLN with an output gate from the conditioning (AF3 Alg. 25)."""

    def __init__(self, c_a: int, c_cond: int, n: int = 2):
        super().__init__()
        self.norm = AdaLN(c_a, c_cond)
        self.proj_in = LinearNoBias(c_a, 2 * n * c_a)
        self.proj_out = LinearNoBias(n * c_a, c_a, init="final")
        self.out_gate = Linear(c_cond, c_a, init="gate", bias_init=-2.0)

    def forward(self, a: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        return modulation.gate * self.proj_out(SwiGLU.apply(self.proj_in(self.norm(a, modulation))))


class DiffusionTransformerBlock(nn.Module):
    def __init__(self, c_a: int, c_cond: int, c_pair: int, heads: int):
        super().__init__()
        self.attention = AttentionPairBias(c_a, heads, c_pair, c_cond)
        self.transition = ConditionedTransitionBlock(c_a, c_cond)


@dataclass
class TransformerWeights:
    """A DiffusionTransformer's weights arranged for few launches: the conditioning
    projections of ``group`` blocks at a time (``ConditioningWeights``) and every block's
    fused q, k, v, gate projection. Derived from the parameters with autograd, so one
    instance serves every call of a training step (all sample chunks, their recomputes and
    the rollout), and the gradients reach the parameters."""

    conditioning: list[ConditioningWeights]  # per group of blocks
    projections: list[tuple[torch.Tensor, torch.Tensor] | None]  # per block; None: the block's own


class DiffusionTransformer(nn.Module):
    """AF3 Alg. 23 with the residual form of Protenix / Boltz: ``a += Attn(a); a += Trans(a)``.

    (The published pseudo-code writes ``a = Attn(a) + Trans(a)``, which drops the skip
    connection of the attention; every public reimplementation keeps it.)
    The pair biases are computed once per trunk pass (``pair_biases``) and shared by all
    noised samples and chunks; so can ``weights()``.
    """

    # Blocks whose conditioning is projected at once: fewer launches against more live memory
    # (3 x [S x L, group x 2 x c_a] at a time; 226 MB in bf16 for 8 samples of 384 tokens).
    conditioning_group = 6
    # With gradients on, checkpoint each block (reentrantly or not: ``checkpointed``): the
    # backward keeps one block's activations, not every block's, at the price of a second
    # forward of each block.
    checkpoint_blocks = False
    reentrant = True

    def __init__(self, c_a: int, c_cond: int, c_pair: int, blocks: int, heads: int):
        super().__init__()
        self.c_a = c_a
        self.blocks = nn.ModuleList(DiffusionTransformerBlock(c_a, c_cond, c_pair, heads) for _ in range(blocks))

    def pair_biases(self, pair: torch.Tensor) -> list[torch.Tensor]:
        """Every block's ``AttentionPairBias.pair_bias`` from one LayerNorm and one projection
        (each block's LayerNorm weight and bias folded into its projection)."""
        attention = [block.attention for block in self.blocks]
        weight = torch.stack([module.pair_bias_weight for module in attention])  # [blocks, H, c_pair]
        norm_weight = torch.stack([module.pair_norm_weight for module in attention])[:, None]
        norm_bias = torch.stack([module.pair_norm_bias for module in attention])[..., None]
        ones = torch.ones(pair.shape[-1], device=pair.device, dtype=weight.dtype)
        biases = layernorm_linear(
            pair, ones, torch.zeros_like(ones), (weight * norm_weight).flatten(0, 1), (weight @ norm_bias).flatten()
        )
        return list(biases.movedim(-1, -3).contiguous().split(attention[0].heads, dim=-3))

    def weights(self, fuse_projections: bool = True) -> TransformerWeights:
        """The fused weights, in autocast's dtype when it is on (cast once, not per call).

        ``fuse_projections=False`` leaves each block its two q / k, v, gate products: fusing
        them costs more launches than it saves unless the weights serve several calls.
        """
        group = self.conditioning_group
        conditioned = [module for block in self.blocks for module in (block.attention, block.transition)]
        conditioning = [
            ConditioningWeights.of(conditioned[i : i + 2 * group]) for i in range(0, len(conditioned), 2 * group)
        ]
        dtype = autocast_dtype(conditioning[0].gate_weight)
        conditioning = [ConditioningWeights(*(t.to(dtype) for t in vars(c).values())) for c in conditioning]
        if not fuse_projections:
            return TransformerWeights(conditioning, [None] * len(self.blocks))
        projections = [block.attention.projection_weights() for block in self.blocks]
        return TransformerWeights(conditioning, [(w.to(dtype), b.to(dtype)) for w, b in projections])

    def fixed_conditioning(self, cond: torch.Tensor, pair: torch.Tensor) -> "FixedConditioning":
        """Everything a call reads besides ``a`` when the conditioning ``cond`` is the same in
        every call (the atom transformers: ``[B, 1, L, c_cond]``): pair biases, fused weights
        and every block's modulations, built once per step with autograd."""
        weights = self.weights()
        return FixedConditioning(self.pair_biases(pair), weights, list(self._modulations(cond, weights)))

    def _modulations(self, cond: torch.Tensor, weights: TransformerWeights) -> Iterator[tuple[Modulation, Modulation]]:
        """Each block's (attention, transition) modulations, one group of blocks at a time."""
        dtype = weights.conditioning[0].gate_weight.dtype
        cond_normed = F.layer_norm(cond, cond.shape[-1:]).to(dtype)
        cond = cond.to(dtype)
        for conditioning in weights.conditioning:
            modulations = iter(conditioning.modulations(cond_normed, cond, self.c_a))
            yield from zip(modulations, modulations)

    def forward(
        self,
        a: torch.Tensor,
        cond: torch.Tensor | None,
        biases: Sequence[torch.Tensor],
        mask: torch.Tensor,
        windows: AtomWindows | None = None,
        weights: TransformerWeights | None = None,
        modulations: Sequence[tuple[Modulation, Modulation]] | None = None,
    ) -> torch.Tensor:
        """a ``[B, S, L, c_a]``, cond ``[B, S or 1, L, c_cond]``; biases and mask as in
        AttentionPairBias; ``weights`` from ``weights()`` (built here when None);
        ``modulations`` precomputed from ``cond`` (then ``cond`` is not read), see
        ``fixed_conditioning``."""
        if weights is None:
            weights = self.weights(fuse_projections=False)
        if modulations is None:
            modulations = self._modulations(cond, weights)
        checkpoint_blocks = self.checkpoint_blocks and torch.is_grad_enabled()
        for block, bias, projection, block_modulations in zip(self.blocks, biases, weights.projections, modulations):
            context = (block, bias, mask, block_modulations, windows, projection)
            if checkpoint_blocks:  # every tensor of the context that needs a gradient is a checkpoint argument
                # no random numbers in a block: no RNG state to keep (reading it inside a CUDA
                # graph capture, GraphedChunkDenoiser's, breaks the generator's graph state)
                a = checkpointed_with_context(_block_update, context, a, reentrant=self.reentrant, preserve_rng=False)
            else:
                a = _block_update(context, a)
        return a


def _block_update(context: tuple, a: torch.Tensor) -> torch.Tensor:
    """One DiffusionTransformer block on ``a``: ``a += Attn(a); a += Trans(a)``."""
    block, bias, mask, (attention_modulation, transition_modulation), windows, projection = context
    a = a + block.attention(a, bias, mask, attention_modulation, windows, projection)
    return a + block.transition(a, transition_modulation)


@dataclass
class FixedConditioning:
    """A DiffusionTransformer's per-step inputs for a conditioning that no call changes
    (``DiffusionTransformer.fixed_conditioning``): shared by every chunk of samples, their
    recomputes and every sampler step, so gradients reach the parameters once."""

    biases: list[torch.Tensor]  # per block, as AttentionPairBias.pair_bias
    weights: TransformerWeights
    modulations: list[tuple[Modulation, Modulation]]  # per block: attention, transition


def checkpoint_pair_block(
    block: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    pair: torch.Tensor,
    other: torch.Tensor | None,
    *args,
    enabled: bool,
    pair_bf16: bool,
    offload: bool = False,
    reentrant: bool = False,
    preserve_rng: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``block(pair, other, *args) -> (pair, other)`` with activation checkpointing
    (reentrant or not: ``checkpointed``).

    With ``pair_bf16`` the checkpoint keeps only a bf16 copy of the pair input; the block is
    recomputed from it in backward, and the fp32 residual stream is carried outside the
    checkpoint as ``pair + (block(pair_bf16) - pair_bf16)``, so rounding touches the block's
    input only, not the accumulated pair representation.

    ``offload`` (CUDA, with ``pair_bf16``) keeps that copy in pinned host memory instead: the
    forward runs on the GPU copy, which is freed when the block returns, and the backward's
    recompute copies the host copy back. Both copies are queued on the compute stream, so
    no synchronisation is needed; they cost 2 bytes per pair element over PCIe each way.

    ``preserve_rng``: as in ``checkpointed`` (False for a block that draws no random numbers).
    """
    if not (enabled and torch.is_grad_enabled()):
        return block(pair, other, *args)
    if not pair_bf16:
        return checkpointed(block, pair, other, *args, reentrant=reentrant, preserve_rng=preserve_rng)
    stored, dtype, device = pair.to(torch.bfloat16), pair.dtype, pair.device
    on_gpu = [None]  # the forward's GPU copy when offloading; emptied once the forward is done
    if offload and pair.is_cuda:
        host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
        on_gpu[0], stored = stored, host.copy_(stored, non_blocking=True)  # differentiable copy

    # The closure names only the dtype and device: the checkpoint keeps it for the recompute,
    # and a reference to ``pair`` would keep every block's fp32 input alive until the backward.
    def delta_block(stored_pair, other_in, *rest):
        if on_gpu[0] is not None:
            stored_pair = on_gpu[0]
        pair_in = stored_pair.to(device, dtype, non_blocking=True)
        pair_out, other_out = block(pair_in, other_in, *rest)
        return pair_out - pair_in, other_out

    delta, other = checkpointed(delta_block, stored, other, *args, reentrant=reentrant, preserve_rng=preserve_rng)
    on_gpu[0] = None
    return pair + delta, other
