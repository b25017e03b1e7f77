"""Per-sample steps at load time: cropping (AF3 Sec. 2.7) and conformer rotation.

Three croppers, chosen at random with AF3's PDB weights 0.2 / 0.4 / 0.4:
  contiguous        a contiguous stretch of every chain, chains visited in random order;
  spatial           the ``crop_size`` tokens nearest a random resolved token;
  spatial_interface the same, around a random token within 15 A of another chain.
A crop is a sorted token subset; every feature is cut to it, atoms follow their tokens
and index features (atom_to_token, token_center_atom, token_rep_atom) are renumbered.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from megafold.data.features import FEATURES, MSA_GAP

CROP_WEIGHTS = {"contiguous": 0.2, "spatial": 0.4, "spatial_interface": 0.4}
INTERFACE_DISTANCE = 15.0
_TIE_BREAK = 1e-3  # AF3 adds this times the token index so equal distances order stably


def crop_example(
    example: Mapping[str, np.ndarray],
    crop_size: int,
    rng: np.random.Generator,
    *,
    method: str | None = None,
    weights: Mapping[str, float] = CROP_WEIGHTS,
    max_msa_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Crop ``example`` to at most ``crop_size`` tokens.

    method: one of CROP_WEIGHTS, or None to draw one with ``weights``. Examples that fit
    are kept whole. MSA rows without any residue in the crop are dropped; with
    ``max_msa_rows`` a random subset of the rest is kept (the query row always).
    """
    tokens, _ = choose_crop(example, crop_size, rng, method=method, weights=weights)
    return apply_crop(example, tokens, rng=rng, max_msa_rows=max_msa_rows)


def choose_crop(
    example: Mapping[str, np.ndarray],
    crop_size: int,
    rng: np.random.Generator,
    *,
    method: str | None = None,
    weights: Mapping[str, float] = CROP_WEIGHTS,
) -> tuple[np.ndarray, str]:
    """The sorted token indices ``[<= crop_size]`` of a crop, and the method that made it."""
    n_tokens = len(example["restype"])
    if crop_size <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if method is None:
        names = list(weights)
        p = np.asarray([weights[n] for n in names], np.float64)
        method = names[rng.choice(len(names), p=p / p.sum())]
    if method not in CROP_WEIGHTS:
        raise ValueError(f"unknown crop method {method!r}; expected one of {list(CROP_WEIGHTS)}")
    if n_tokens <= crop_size:
        return np.arange(n_tokens), method
    if method == "contiguous":
        return contiguous_crop(example["asym_id"], crop_size, rng), method
    center = example["atom_pos"][example["token_center_atom"]]
    resolved = example["atom_resolved"][example["token_center_atom"]]
    if not resolved.any():
        return contiguous_crop(example["asym_id"], crop_size, rng), "contiguous"
    reference = None
    if method == "spatial_interface":
        reference = _interface_token(center, resolved, example["asym_id"], rng)
        if reference is None:  # one chain, or chains that never touch
            method = "spatial"
    if reference is None:
        reference = rng.choice(np.nonzero(resolved)[0])
    return spatial_crop(center, resolved, reference, crop_size), method


def contiguous_crop(asym_id: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """AF-Multimer Alg. 1: a random contiguous stretch of each chain, chains in random order."""
    chains, starts, lengths = np.unique(asym_id, return_index=True, return_counts=True)
    selected = []
    n_added, n_remaining = 0, int(lengths.sum())
    for k in rng.permutation(len(chains)):
        length = int(lengths[k])
        n_remaining -= length
        most = min(crop_size - n_added, length)
        least = min(length, max(0, crop_size - n_added - n_remaining))
        size = int(rng.integers(least, most + 1))
        n_added += size
        offset = int(rng.integers(0, length - size + 1))
        selected.append(np.arange(starts[k] + offset, starts[k] + offset + size))
    return np.sort(np.concatenate(selected))


def spatial_crop(center: np.ndarray, resolved: np.ndarray, reference: int, crop_size: int) -> np.ndarray:
    """The ``crop_size`` tokens nearest token ``reference``; unresolved ones only to fill up."""
    distance = np.linalg.norm(center - center[reference], axis=-1)
    distance = np.where(resolved, distance, np.inf) + _TIE_BREAK * np.arange(len(center))
    return np.sort(np.argpartition(distance, crop_size - 1)[:crop_size])


def _interface_token(center, resolved, asym_id, rng, block: int = 256) -> int | None:
    """A uniformly drawn resolved token within INTERFACE_DISTANCE of another chain.

    Candidates are tested in a random order, a block at a time (the first that passes is
    a uniform draw), so a typical complex costs one ``[256, N]`` block of squared
    distances, not the full ``[N, N]`` matrix.
    """
    if len(np.unique(asym_id)) < 2:
        return None
    others = np.nonzero(resolved)[0]
    other_pos = center[others].astype(np.float32)
    other_sq = (other_pos**2).sum(-1)
    candidates = rng.permutation(others)
    for start in range(0, len(candidates), block):
        chunk = candidates[start : start + block]
        pos = center[chunk].astype(np.float32)
        sq_distance = (pos**2).sum(-1)[:, None] + other_sq[None] - 2.0 * pos @ other_pos.T
        near_other = (sq_distance < INTERFACE_DISTANCE**2) & (asym_id[chunk, None] != asym_id[None, others])
        hit = np.nonzero(near_other.any(axis=1))[0]
        if len(hit):
            return int(chunk[hit[0]])
    return None


def apply_crop(
    example: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    max_msa_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Cut every feature to the sorted token indices ``tokens``."""
    n_tokens = len(example["restype"])
    keep_token = np.zeros(n_tokens, bool)
    keep_token[tokens] = True
    new_token = np.cumsum(keep_token) - 1
    keep_atom = keep_token[example["atom_to_token"]]
    new_atom = np.cumsum(keep_atom) - 1

    msa = example["msa"][:, tokens]
    msa_rows = _msa_rows(msa, rng, max_msa_rows)
    all_rows = len(msa_rows) == len(msa)
    out: dict[str, np.ndarray] = {}
    for name, spec in FEATURES.items():
        value = example[name]
        dims = spec.dims
        if dims[:1] == ("token",):
            value = value[tokens]
            if dims[1:2] == ("token2",):
                value = value[:, tokens]
        elif dims[:1] == ("atom",):
            value = value[keep_atom]
        elif dims[:1] == ("msa_row",):
            value = msa if name == "msa" else value[:, tokens]  # columns first: the cheap cut
            value = value if all_rows else value[msa_rows]
        elif dims[:1] == ("template",) and len(dims) > 1:
            value = value[:, tokens]
        out[name] = value
    out["atom_to_token"] = new_token[out["atom_to_token"]]
    out["token_center_atom"] = new_atom[out["token_center_atom"]]
    out["token_rep_atom"] = new_atom[out["token_rep_atom"]]
    return out


def _msa_rows(msa: np.ndarray, rng, max_rows: int | None) -> np.ndarray:
    """Rows of the cropped MSA ``[S, n]`` to keep: the query plus rows with a residue."""
    informative = np.nonzero((msa[1:] != MSA_GAP).any(axis=1))[0] + 1
    if max_rows is not None and len(informative) > max_rows - 1:
        if rng is None:
            raise ValueError("sub-sampling MSA rows needs an rng")
        informative = np.sort(rng.choice(informative, max(max_rows - 1, 0), replace=False))
    return np.concatenate([[0], informative])


def random_rotate_conformers(example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rotate each reference conformer (one ref_space_uid) by its own random rotation.

    AF3 feeds ref_pos with a random rotation per conformer, so the model cannot read
    anything from the CCD's arbitrary frame. Conformers are centred in the precache.
    """
    uid = example["ref_space_uid"]
    unique, inverse = np.unique(uid, return_inverse=True)
    q, r = np.linalg.qr(rng.standard_normal((len(unique), 3, 3)))
    rotations = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar-uniform
    rotations[np.linalg.det(rotations) < 0, :, 0] *= -1  # proper rotations only
    out = dict(example)
    pos = np.einsum("aij,aj->ai", rotations[inverse], example["ref_pos"]).astype(np.float32)
    out["ref_pos"] = np.where(example["ref_mask"][:, None], pos, 0.0).astype(np.float32)
    return out
