"""A valid random feature batch of any size, for benchmarks and smoke tests (no data needed)."""

from __future__ import annotations

import numpy as np
import torch

from megafold.data.features import NUM_RESTYPES, batch_to, collate

_ATOM_NAMES = ("N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ", "OG", "SD", "CZ", "NH1", "NH2")
_ELEMENTS = {"N": 7, "C": 6, "O": 8, "S": 16}


def _name_chars(name: str) -> list[int]:
    return [ord(c) - 32 for c in name.ljust(4)[:4]]


def synthetic_example(
    n_tokens: int, atoms_per_token: int = 8, msa_rows: int = 16, templates: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """One protein-like example: a helical chain of ``n_tokens`` residues with
    ``atoms_per_token`` heavy atoms each (N, CA, C, O, CB, ...), an MSA of ``msa_rows`` rows
    (the query and mutated copies) and ``templates`` noisy self-templates."""
    if not 4 <= atoms_per_token <= len(_ATOM_NAMES):
        raise ValueError(f"atoms_per_token must be in 4..{len(_ATOM_NAMES)}, got {atoms_per_token}")
    rng = np.random.default_rng(seed)
    N, K = n_tokens, atoms_per_token
    A = N * K
    turn = np.deg2rad(100.0) * np.arange(N)
    ca = np.stack([2.3 * np.cos(turn), 2.3 * np.sin(turn), 1.5 * np.arange(N)], axis=-1)
    offsets = rng.normal(scale=1.2, size=(N, K, 3))
    offsets[:, 1] = 0.0  # atom 1 is CA
    atom_pos = (ca[:, None] + offsets).reshape(A, 3).astype(np.float32)
    # Reference conformers: the residue's own atoms, centred and in a random orientation.
    q = rng.normal(size=(N, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q.T
    rot = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=-1).reshape(N, 3, 3)
    centred = offsets - offsets.mean(1, keepdims=True)
    ref_pos = np.einsum("nij,nkj->nki", rot, centred).reshape(A, 3).astype(np.float32)

    names = _ATOM_NAMES[:K]
    restype = rng.integers(0, 20, size=N)
    token_index = np.arange(N)
    atom_to_token = np.repeat(token_index, K)
    rep_slot = 4 if K > 4 else 1
    msa = np.repeat(restype[None], msa_rows, axis=0)
    mutate = rng.random(msa.shape) < 0.2
    mutate[0] = False
    msa[mutate] = rng.integers(0, 21, size=int(mutate.sum()))
    profile = np.stack([np.bincount(msa[:, i], minlength=NUM_RESTYPES) for i in range(N)]).astype(np.float32)
    profile /= profile.sum(-1, keepdims=True)

    backbone = atom_pos.reshape(N, K, 3)[:, :3]
    example = {
        "token_mask": np.ones(N, bool),
        "restype": restype,
        "residue_index": token_index + 1,
        "token_index": token_index,
        "asym_id": np.ones(N, np.int64),
        "entity_id": np.ones(N, np.int64),
        "sym_id": np.zeros(N, np.int64),
        "is_protein": np.ones(N, bool),
        "is_rna": np.zeros(N, bool),
        "is_dna": np.zeros(N, bool),
        "is_ligand": np.zeros(N, bool),
        "profile": profile,
        "deletion_mean": np.zeros(N, np.float32),
        "token_center_atom": token_index * K + 1,
        "token_rep_atom": token_index * K + rep_slot,
        "token_rep_mask": np.ones(N, bool),
        "token_bonds": np.zeros((N, N), bool),
        "atom_mask": np.ones(A, bool),
        "atom_to_token": atom_to_token,
        "ref_pos": ref_pos,
        "ref_mask": np.ones(A, bool),
        "ref_element": np.tile([_ELEMENTS[n[0]] for n in names], N),
        "ref_charge": np.zeros(A, np.float32),
        "ref_atom_name_chars": np.tile([_name_chars(n) for n in names], (N, 1)),
        "ref_space_uid": atom_to_token,
        "atom_pos": atom_pos,
        "atom_resolved": np.ones(A, bool),
        "msa": msa,
        "msa_mask": np.ones((msa_rows, N), bool),
        "has_deletion": np.zeros((msa_rows, N), np.float32),
        "deletion_value": np.zeros((msa_rows, N), np.float32),
        "template_mask": np.ones(templates, bool),
        "template_restype": np.repeat(restype[None], templates, axis=0),
        "template_pos": (atom_pos.reshape(N, K, 3)[None, :, rep_slot] + rng.normal(scale=1.0, size=(templates, N, 3))).astype(np.float32),
        "template_pos_mask": np.ones((templates, N), bool),
        "template_backbone": (backbone[None] + rng.normal(scale=0.5, size=(templates, N, 3, 3))).astype(np.float32),
        "template_backbone_mask": np.ones((templates, N), bool),
    }
    return example


def synthetic_batch(
    n_tokens: int,
    atoms_per_token: int = 8,
    msa_rows: int = 16,
    templates: int = 1,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A collated batch of ``batch_size`` synthetic examples (see ``synthetic_example``) on ``device``."""
    examples = [synthetic_example(n_tokens, atoms_per_token, msa_rows, templates, seed + i) for i in range(batch_size)]
    return batch_to(collate(examples), device)
