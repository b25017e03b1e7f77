"""The feature batch: one schema shared by the data pipeline, the precache and the model.

Names follow AlphaFold3's Table 5 (../shared/AF3_REFERENCE.md). An *example* is a dict of
numpy arrays without a batch axis; a *batch* is a dict of torch tensors with a leading
batch axis ``B``, padded to the longest example, with bool masks marking real entries.

Dimension names (also the xarray dimension names of the precache):
  token     N   one token per standard residue / nucleotide, one per ligand atom
  atom      A   every heavy atom
  msa_row   S   MSA rows (row 0 is the query sequence)
  template  T   template hits
  token2 / xyz / bb / chars / restype_class: inner axes of the arrays below.

Index features that point at other entries (``atom_to_token``, ``token_center_atom``,
``token_rep_atom``) hold indices *within their own example*; padded entries point at 0
and are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

NUM_RESTYPES = 32  # 20 amino acids + UNK, 4 RNA + UNK, 4 DNA + UNK, gap  (AF3 Table 5)
NUM_ELEMENTS = 128
NUM_ATOM_NAME_CHARS = 64
MSA_GAP = 31


@dataclass(frozen=True)
class FeatureSpec:
    dims: tuple[str, ...]  # named axes, without the batch axis
    dtype: np.dtype
    pad: float | int | bool = 0
    doc: str = ""


def _f(dims, dtype, pad=0, doc=""):
    return FeatureSpec(tuple(dims), np.dtype(dtype), pad, doc)


FEATURES: dict[str, FeatureSpec] = {
    # ---- per token [N]
    "token_mask": _f(["token"], bool, False, "real token (False = padding)"),
    "restype": _f(["token"], np.int64, MSA_GAP, "residue type index 0..31"),
    "residue_index": _f(["token"], np.int64, 0, "residue number in its chain (label_seq_id)"),
    "token_index": _f(["token"], np.int64, 0, "token number within the chain"),
    "asym_id": _f(["token"], np.int64, 0, "chain instance id (1..)"),
    "entity_id": _f(["token"], np.int64, 0, "entity id (1..)"),
    "sym_id": _f(["token"], np.int64, 0, "copy number among chains of one entity"),
    "is_protein": _f(["token"], bool, False),
    "is_rna": _f(["token"], bool, False),
    "is_dna": _f(["token"], bool, False),
    "is_ligand": _f(["token"], bool, False),
    "profile": _f(["token", "restype_class"], np.float32, 0.0, "MSA residue distribution, 32"),
    "deletion_mean": _f(["token"], np.float32, 0.0),
    "token_center_atom": _f(["token"], np.int64, 0, "atom index of CA / C1' / the ligand atom"),
    "token_rep_atom": _f(["token"], np.int64, 0, "distogram atom: CB (CA for Gly), C4/C2, ligand atom"),
    "token_rep_mask": _f(["token"], bool, False, "the representative atom was observed"),
    # ---- per token pair [N, N]
    "token_bonds": _f(["token", "token2"], bool, False, "polymer-ligand / ligand-ligand bonds"),
    # ---- per atom [A]
    "atom_mask": _f(["atom"], bool, False, "real atom (False = padding)"),
    "atom_to_token": _f(["atom"], np.int64, 0, "token index of each atom"),
    "ref_pos": _f(["atom", "xyz"], np.float32, 0.0, "reference conformer position (A)"),
    "ref_mask": _f(["atom"], bool, False, "reference conformer has this atom"),
    "ref_element": _f(["atom"], np.int64, 0, "atomic number (0..127)"),
    "ref_charge": _f(["atom"], np.float32, 0.0),
    "ref_atom_name_chars": _f(["atom", "chars"], np.int64, 0, "4 chars, ord(c) - 32"),
    "ref_space_uid": _f(["atom"], np.int64, 0, "one id per residue / ligand conformer"),
    "atom_pos": _f(["atom", "xyz"], np.float32, 0.0, "ground-truth position (A)"),
    "atom_resolved": _f(["atom"], bool, False, "the atom was observed in the structure"),
    # ---- MSA [S, N]
    "msa": _f(["msa_row", "token"], np.int64, MSA_GAP, "residue index 0..31, row 0 = query"),
    "msa_mask": _f(["msa_row", "token"], bool, False),
    "has_deletion": _f(["msa_row", "token"], np.float32, 0.0),
    "deletion_value": _f(["msa_row", "token"], np.float32, 0.0, "2/pi * arctan(d / 3)"),
    # ---- templates [T, N]
    "template_mask": _f(["template"], bool, False, "real template hit"),
    "template_restype": _f(["template", "token"], np.int64, MSA_GAP),
    "template_pos": _f(["template", "token", "xyz"], np.float32, 0.0, "representative atom"),
    "template_pos_mask": _f(["template", "token"], bool, False),
    "template_backbone": _f(["template", "token", "bb", "xyz"], np.float32, 0.0, "N, CA, C"),
    "template_backbone_mask": _f(["template", "token"], bool, False),
}

# Axes a batch pads to a common length; "token2" pads with "token".
PADDED_DIMS = ("token", "token2", "atom", "msa_row", "template")
FIXED_SIZES = {"xyz": 3, "bb": 3, "chars": 4, "restype_class": NUM_RESTYPES}


def validate_example(example: Mapping[str, np.ndarray], name: str = "example") -> dict[str, int]:
    """Check keys, dtypes and shapes of one example; return its dimension sizes.

    Raises ValueError naming the example and the offending feature.
    """
    sizes: dict[str, int] = {}
    missing = [key for key in FEATURES if key not in example]
    if missing:
        raise ValueError(f"{name}: missing features {missing}")
    for key, spec in FEATURES.items():
        value = np.asarray(example[key])
        if value.ndim != len(spec.dims):
            raise ValueError(f"{name}: {key} has {value.ndim} axes, expected {spec.dims}")
        for dim, size in zip(spec.dims, value.shape):
            dim = "token" if dim == "token2" else dim
            expected = FIXED_SIZES.get(dim, sizes.setdefault(dim, size))
            if size != expected:
                raise ValueError(f"{name}: {key} axis {dim!r} is {size}, expected {expected}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{name}: {key} holds NaN or inf (missing data must be masked)")
    return sizes


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad examples to common sizes and stack them into a batch of tensors ``[B, ...]``."""
    if not examples:
        raise ValueError("collate needs at least one example")
    all_sizes = [validate_example(ex, f"example {i}") for i, ex in enumerate(examples)]
    target = {dim: max(s.get(dim, 0) for s in all_sizes) for dim in PADDED_DIMS}
    target["token2"] = target["token"]
    batch: dict[str, torch.Tensor] = {}
    for key, spec in FEATURES.items():
        shape = [target.get(d, FIXED_SIZES.get(d)) for d in spec.dims]
        out = np.full([len(examples), *shape], spec.pad, dtype=spec.dtype)
        for i, ex in enumerate(examples):
            value = np.asarray(ex[key], dtype=spec.dtype)
            out[(i, *(slice(0, n) for n in value.shape))] = value
        batch[key] = torch.from_numpy(out)
    return batch


def batch_to(batch: Mapping[str, torch.Tensor], device, non_blocking: bool = False) -> dict:
    """Move every tensor of a batch to ``device``."""
    return {
        k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }
