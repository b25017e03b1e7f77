"""Predict structures with a trained model and write them as mmCIF (pLDDT in the B-factor
column) plus the PAE matrix as a ``.npy`` file.

    prediction = predict(model, "1ubq.cif", "outputs/predictions")        # from a structure file
    prediction = predict(model, store.load("1ubq"), "out", truth="1ubq.cif")  # from features

With the source structure at hand (a path, or ``truth=``), the prediction keeps its author
chain ids, residue numbers and residue names, so that ``megafold.viz.superpose`` pairs its
atoms with the truth's; from features alone chains are named A, B, ... by ``asym_id`` and
residues numbered by ``residue_index``.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from megafold.data.features import batch_to, collate
from megafold.errors import StructureError
from megafold.train.metrics import structure_metrics
from megafold.files import atomic_open

PDB_CHAIN_LETTERS = string.ascii_uppercase + string.ascii_lowercase + string.digits


@dataclass
class AtomLabels:
    """What an mmCIF needs per atom besides coordinates (``[A]`` each) and per token ``[N]``."""

    chain_id: np.ndarray
    res_id: np.ndarray
    ins_code: np.ndarray
    res_name: np.ndarray
    atom_name: np.ndarray
    element: np.ndarray
    token_chain_id: np.ndarray


@dataclass
class Prediction:
    """The top-ranked sample (by mean pLDDT) of one structure and where it was written."""

    name: str
    cif_path: Path  # mmCIF, pLDDT (0..100) in the B-factor column
    pae_path: Path  # np.save of pae [N, N] (A)
    summary_path: Path  # JSON: ranking, mean pLDDT, metrics against the truth if known
    coords: np.ndarray  # [A, 3] real atoms only
    plddt: np.ndarray  # [A] 0..100
    pae: np.ndarray  # [N, N] A
    labels: AtomLabels
    ranking: list[float]  # mean pLDDT of every sample, in sample order
    metrics: dict[str, float] = field(default_factory=dict)  # vs the truth (when resolved atoms exist)


def predict(
    model: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    truth: str | os.PathLike | None = None,
    steps: int | None = None,
    samples: int | None = None,
    msa_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> Prediction:
    """Sample ``samples`` structures of ``source`` and write the best one to ``out_dir``.

    source: an mmCIF / PDB path (featurized here: MSAs from ``msa_dir`` if given, else the
        query sequence alone; no templates), a feature example (numpy, no batch axis), or a
        batch of one (tensors ``[1, ...]``). Crop-free: every token of the structure.
    truth: the structure file an example or batch was made from (names chains and residues).
    steps, samples: sampler steps and samples (default: the model config's).
    Writes ``{name}.cif``, ``{name}_pae.npy`` and ``{name}_summary.json``.
    """
    from megafold.data import load_structure

    structure = None
    if isinstance(source, (str, os.PathLike)):
        from megafold.data.pipeline import featurize

        structure = load_structure(source)
        name = name or Path(source).name.split(".")[0]
        example, _ = featurize(structure, key=name, msa_dir=msa_dir)
        batch = collate([example])
    else:
        batch = _as_batch(source)
        if truth is not None:
            structure = load_structure(truth)
        name = name or (Path(truth).name.split(".")[0] if truth is not None else "prediction")
    labels = structure_labels(structure, batch) if structure is not None else feature_labels(batch)

    device = next(model.parameters()).device
    batch = batch_to(batch, device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.sample(batch, steps=steps, samples=samples)
    finally:
        model.train(was_training)
    atom_mask = batch["atom_mask"][0]
    ranking = [float(v) for v in (out["plddt"][0] * atom_mask).sum(-1) / atom_mask.sum()]
    best = int(np.argmax(ranking))
    n_tokens = int(batch["token_mask"][0].sum())
    coords = out["coords"][0, best][atom_mask].float().cpu().numpy()
    plddt = out["plddt"][0, best][atom_mask].clamp(0, 100).float().cpu().numpy()
    pae = out["pae"][0, best, :n_tokens, :n_tokens].float().cpu().numpy()

    metrics = {}
    if bool((batch["atom_resolved"] & batch["atom_mask"]).any()):
        metrics = structure_metrics(
            out["coords"][:, best], batch, plddt=out["plddt"][:, best], distogram_logits=out["distogram_logits"]
        )

    from megafold.data import atom_array, to_mmcif

    atoms = atom_array(
        coords, labels.atom_name, labels.res_name, labels.chain_id, labels.res_id, labels.element, plddt=plddt
    )
    atoms.ins_code = labels.ins_code
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cif_path = _write_atomically(out_dir / f"{name}.cif", to_mmcif(atoms).encode())
    pae_path = _write_atomically(out_dir / f"{name}_pae.npy", _npy_bytes(pae))
    summary = {
        "name": name,
        "sample": best,
        "mean_plddt": ranking[best],
        "ranking_mean_plddt": ranking,
        "tokens": n_tokens,
        "atoms": int(atom_mask.sum()),
        "metrics": metrics,
    }
    summary_path = _write_atomically(out_dir / f"{name}_summary.json", json.dumps(summary, indent=2).encode())
    return Prediction(name, cif_path, pae_path, summary_path, coords, plddt, pae, labels, ranking, metrics)


def _as_batch(source: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A batch of one from a feature example (numpy, no batch axis) or a batch."""
    if "token_mask" not in source:
        raise StructureError("predict: the features lack token_mask (not a megafold feature example or batch)")
    if np.ndim(source["token_mask"]) == 1:
        return collate([{k: np.asarray(v) for k, v in source.items()}])
    batch = {k: torch.as_tensor(v) for k, v in source.items()}
    if batch["token_mask"].shape[0] != 1:
        raise StructureError(f"predict: one structure at a time, got a batch of {batch['token_mask'].shape[0]}")
    return batch


def _chain_name(index: int) -> str:
    """A, B, ..., 9, then AA, AB, ... (index from 0)."""
    letters = PDB_CHAIN_LETTERS
    return letters[index] if index < len(letters) else _chain_name(index // len(letters) - 1) + letters[index % len(letters)]


def _atom_names(chars: np.ndarray) -> np.ndarray:
    """Decode ``ref_atom_name_chars [A, 4]`` (``ord(c) - 32``) into names."""
    return np.array(["".join(chr(int(c) + 32) for c in row).strip() for row in chars])


def _elements(atomic_numbers: np.ndarray) -> np.ndarray:
    import gemmi

    return np.array([gemmi.Element(int(z)).name for z in atomic_numbers])


def feature_labels(batch: Mapping[str, torch.Tensor]) -> AtomLabels:
    """Labels from features alone: chains A, B, ... by asym_id, residues by residue_index,
    residue names from restype (ligands LIG), atom names from ref_atom_name_chars."""
    from megafold.data.tokenize import RESTYPES

    atom_mask = batch["atom_mask"][0].numpy()
    n_tokens = int(batch["token_mask"][0].sum())
    atom_to_token = batch["atom_to_token"][0].numpy()[atom_mask]
    asym = batch["asym_id"][0].numpy()[:n_tokens]
    chain_of = {a: _chain_name(i) for i, a in enumerate(dict.fromkeys(asym.tolist()))}
    token_chain = np.array([chain_of[a] for a in asym.tolist()])
    restype = batch["restype"][0].numpy()[:n_tokens]
    ligand = batch["is_ligand"][0].numpy()[:n_tokens]
    token_res_name = np.where(ligand, "LIG", np.array(RESTYPES)[restype])
    return AtomLabels(
        chain_id=token_chain[atom_to_token],
        res_id=batch["residue_index"][0].numpy()[:n_tokens][atom_to_token].astype(np.int64),
        ins_code=np.full(len(atom_to_token), ""),
        res_name=token_res_name[atom_to_token],
        atom_name=_atom_names(batch["ref_atom_name_chars"][0].numpy()[atom_mask]),
        element=_elements(batch["ref_element"][0].numpy()[atom_mask]),
        token_chain_id=token_chain,
    )


def structure_labels(structure, batch: Mapping[str, torch.Tensor]) -> AtomLabels:
    """Labels of the source structure: author chain ids, residue numbers and insertion codes
    (``Chain.auth_seq_id``, ``Chain.ins_code``), CCD residue names. The batch must hold the
    whole structure."""
    from megafold.data.tokenize import tokenize

    tokens = tokenize(structure)
    n_tokens = int(batch["token_mask"][0].sum())
    atom_mask = batch["atom_mask"][0].numpy()
    if tokens.num_tokens != n_tokens or len(tokens.features["atom_to_token"]) != int(atom_mask.sum()):
        raise StructureError(
            f"{structure.path}: the features hold {n_tokens} tokens / {int(atom_mask.sum())} atoms, the "
            f"structure {tokens.num_tokens} / {len(tokens.features['atom_to_token'])} (a cropped example?)"
        )
    token_keys = list(zip(tokens.chain.tolist(), tokens.residue.tolist()))
    token_labels = [
        (structure.chains[c].auth_chain_id, structure.chains[c].auth_seq_id[r], structure.chains[c].ins_code[r])
        for c, r in token_keys
    ]
    atom_to_token = batch["atom_to_token"][0].numpy()[atom_mask]
    res_names = np.array([structure.chains[c].sequence[r] for c, r in token_keys])
    return AtomLabels(
        chain_id=np.array([label[0] for label in token_labels])[atom_to_token],
        res_id=np.array([label[1] for label in token_labels], np.int64)[atom_to_token],
        ins_code=np.array([label[2] for label in token_labels])[atom_to_token],
        res_name=res_names[atom_to_token],
        atom_name=_atom_names(batch["ref_atom_name_chars"][0].numpy()[atom_mask]),
        element=_elements(batch["ref_element"][0].numpy()[atom_mask]),
        token_chain_id=np.array([label[0] for label in token_labels]),
    )


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path
