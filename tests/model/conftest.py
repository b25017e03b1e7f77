"""Feature batches from real mmCIFs of shared/data/structures for the model tests.

Built by the data pipeline (``megafold.data``: CCD tokenization and reference conformers,
query-only MSA) and cut by its spatial cropper around a chosen token, small enough for the
CPU. Optionally the first template slot is filled with the structure itself.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megafold.data import collate, load_structure, make_example
from megafold.data.crop import apply_crop, spatial_crop
from megafold.kernels import use_kernels
from megafold.model.primitives import lecun_normal_

STRUCTURES = Path(os.environ["MEGAFOLD_SHARED_DATA"]) / "structures"


def _atom_names(example: dict) -> np.ndarray:
    chars = example["ref_atom_name_chars"] + 32
    return np.array(["".join(chr(c) for c in row).strip() for row in chars])


def _self_template(example: dict) -> dict:
    """Template slot 0 = the true structure: rep atoms and N, CA, C of every protein token."""
    example = dict(example)
    N = len(example["restype"])
    names = _atom_names(example)
    resolved = example["atom_resolved"]
    backbone = np.zeros((1, N, 3, 3), np.float32)
    backbone_mask = np.zeros((1, N), bool)
    for token in np.nonzero(example["is_protein"])[0]:
        atoms = np.nonzero(example["atom_to_token"] == token)[0]
        found = [atoms[(names[atoms] == name) & resolved[atoms]] for name in ("N", "CA", "C")]
        if all(len(f) for f in found):
            backbone[0, token] = example["atom_pos"][[f[0] for f in found]]
            backbone_mask[0, token] = True
    rep = example["token_rep_atom"]
    example.update(
        template_mask=np.ones(1, bool),
        template_restype=example["restype"][None].copy(),
        template_pos=example["atom_pos"][rep][None].copy(),
        template_pos_mask=(example["token_rep_mask"] & resolved[rep])[None],
        template_backbone=backbone,
        template_backbone_mask=backbone_mask,
    )
    return example


@functools.lru_cache(maxsize=None)
def structure_example(pdb_id: str, n_tokens: int, centre: str = "first", templates: bool = False) -> dict:
    """Example (numpy, FEATURES schema) of ``pdb_id``: the ``n_tokens`` tokens nearest the first
    resolved token of kind ``centre`` ("first": any, "ligand", "dna"); ``templates`` adds a
    self-template."""
    example = make_example(load_structure(STRUCTURES / f"{pdb_id}.cif.gz"))
    centre_atom = example["token_center_atom"]
    resolved = example["atom_resolved"][centre_atom]
    kind = resolved if centre == "first" else resolved & example[f"is_{centre}"]
    anchor = int(np.nonzero(kind)[0][0])
    tokens = spatial_crop(example["atom_pos"][centre_atom], resolved, anchor, n_tokens)
    example = apply_crop(example, tokens)
    return _self_template(example) if templates else example


def real_batch(*specs: tuple) -> dict[str, torch.Tensor]:
    """Collated batch of ``structure_example(*spec)`` for each spec."""
    return collate([structure_example(*spec) for spec in specs])


@pytest.fixture
def mixed_batch() -> dict[str, torch.Tensor]:
    """Protein with a self-template (1ubq), protein + SAH ligand (3mht) and DNA with
    modified nucleotides, one token per atom (2q2k): three sizes, so tokens, atoms and
    templates are padded."""
    return real_batch(("1ubq", 14, "first", True), ("3mht", 24, "ligand"), ("2q2k", 16, "dna"))


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are small: on a busy 2-core machine, intra-op threads cost far
    more in synchronisation than they gain (4x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _eager_kernels():
    """Modules called outside AlphaFold3 (which sets its config's backend) use the torch ops:
    under TRITON_INTERPRET=1, "auto" would run the Triton interpreter, far too slow here."""
    with use_kernels("torch"):
        yield


@pytest.fixture
def make_batch():
    return real_batch


@pytest.fixture
def perturb():
    return perturb_parameters_


def perturb_parameters_(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Add LeCun-scaled noise to every parameter, so zero-initialised layers pass gradients."""
    with torch.no_grad():
        for param in model.parameters():
            noise = lecun_normal_(torch.empty_like(param)) if param.dim() > 1 else torch.randn_like(param) * 0.3
            param.add_(scale * noise)
