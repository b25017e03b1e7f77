"""One structure in, one feature example out (the FEATURES schema of ``features.py``).

``featurize`` is the whole deterministic pipeline: tokenize, find or search the MSA of
every protein chain, pair them, search templates, and assemble every feature with masks
(missing data is 0 and masked, never NaN). The precache runs it once per entry ahead of
training; cropping (``crop.py``) is the only per-sample step left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megafold.data.features import FEATURES, MSA_GAP, NUM_RESTYPES
from megafold.data.msa import (
    MAX_MSA_ROWS,
    Msa,
    SequenceDatabase,
    find_msa_file,
    merge_msas,
    pair_rows,
    read_msa,
    search_msa,
)
from megafold.data.structures import Structure
from megafold.data.templates import TemplateDatabase, TemplateHit, search_templates
from megafold.data.tokenize import MSA_LETTERS, RESTYPE_LETTER, UNKNOWN_RESTYPE, Tokens, restype_of, tokenize


def chain_query(structure: Structure, chain_index: int) -> str:
    """One-letter sequence of a polymer chain (modified residues as their parent)."""
    chain = structure.chains[chain_index]
    return "".join(RESTYPE_LETTER[restype_of(name, chain.kind)] for name in chain.sequence)


def self_hit_prefix(pdb_id: str) -> str:
    """Name prefix of the input chains of entry ``pdb_id`` in a search database."""
    return f"pdb|{pdb_id}_"


def input_sequences(structures: Sequence[Structure]) -> dict[str, str]:
    """Protein chain sequences of the inputs, named for the search database."""
    sequences = {}
    for structure in structures:
        for c, chain in enumerate(structure.chains):
            if chain.kind == "protein":
                sequences[f"{self_hit_prefix(structure.pdb_id)}{chain.auth_chain_id}"] = chain_query(structure, c)
    return sequences


def chain_msas(
    structure: Structure,
    *,
    key: str | None = None,
    msa_dir: str | Path | None = None,
    sequence_db: SequenceDatabase | None = None,
    max_rows: int = MAX_MSA_ROWS,
) -> tuple[dict[int, Msa], dict[int, str]]:
    """The MSA of every polymer chain, and where each came from ("file", "search", "single").

    Protein chains read ``{msa_dir}/{key}/{auth_chain}.a3m`` (or .sto, or a folder of them)
    when present, else jackhmmer ``sequence_db`` when given, else the query alone. DNA and
    RNA chains get the query alone (the database holds proteins). Copies of one sequence
    share one MSA.
    """
    key = key or structure.pdb_id
    msas: dict[int, Msa] = {}
    origin: dict[int, str] = {}
    by_query: dict[str, tuple[Msa, str]] = {}
    for c, chain in enumerate(structure.chains):
        if chain.kind == "ligand":
            continue
        query = chain_query(structure, c)
        files = find_msa_file(msa_dir, key, chain.auth_chain_id) if msa_dir and chain.kind == "protein" else []
        if files:
            msa = merge_msas(query, [read_msa(f, query=query) for f in files], max_rows)
            by_query.setdefault(query, (msa, "file"))
            msas[c], origin[c] = msa, "file"
        elif query in by_query:
            msas[c], origin[c] = by_query[query]
        elif chain.kind == "protein" and sequence_db is not None:
            msa = search_msa(query, sequence_db, exclude_prefix=self_hit_prefix(structure.pdb_id), max_rows=max_rows)
            by_query[query] = (msa, "search")
            msas[c], origin[c] = msa, "search"
        else:
            msas[c], origin[c] = Msa.single(query), "single"
    return msas, origin


def chain_templates(
    structure: Structure, msas: Mapping[int, Msa], template_db: TemplateDatabase | None
) -> dict[int, list[TemplateHit]]:
    """Template hits of every protein chain (copies of one sequence share them)."""
    if template_db is None:
        return {}
    hits: dict[int, list[TemplateHit]] = {}
    by_query: dict[str, list[TemplateHit]] = {}
    for c, msa in msas.items():
        if structure.chains[c].kind != "protein":
            continue
        if msa.query not in by_query:
            by_query[msa.query] = search_templates(msa, template_db, query_pdb_id=structure.pdb_id)
        hits[c] = by_query[msa.query]
    return hits


def make_example(
    structure: Structure,
    *,
    tokens: Tokens | None = None,
    msas: Mapping[int, Msa] | None = None,
    templates: Mapping[int, Sequence[TemplateHit]] | None = None,
) -> dict[str, np.ndarray]:
    """Every FEATURES entry of ``structure`` (no batch axis).

    msas: chain index -> MSA of that polymer chain (missing chains: the query alone).
    templates: chain index -> hits (missing: none). With no hit at all the template
    axis has one empty slot (template_mask False).
    """
    tokens = tokens or tokenize(structure)
    example = dict(tokens.features)
    example.update(_msa_features(structure, tokens, msas or {}))
    example.update(_template_features(tokens, templates or {}))
    return {name: np.ascontiguousarray(example[name], dtype=spec.dtype) for name, spec in FEATURES.items()}


def featurize(
    structure: Structure,
    *,
    key: str | None = None,
    msa_dir: str | Path | None = None,
    sequence_db: SequenceDatabase | None = None,
    template_db: TemplateDatabase | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """The whole pipeline for one structure: (example, JSON-able metadata)."""
    tokens = tokenize(structure)
    msas, origin = chain_msas(structure, key=key, msa_dir=msa_dir, sequence_db=sequence_db)
    hits = chain_templates(structure, msas, template_db)
    example = make_example(structure, tokens=tokens, msas=msas, templates=hits)
    return example, describe(structure, tokens, msas, origin, hits)


def describe(
    structure: Structure,
    tokens: Tokens,
    msas: Mapping[int, Msa],
    origin: Mapping[int, str],
    hits: Mapping[int, Sequence[TemplateHit]],
) -> dict:
    """JSON metadata of an example: entry facts and, per chain, what went into it."""
    chains = []
    for c, chain in enumerate(structure.chains):
        chains.append(
            {
                "chain_id": chain.chain_id,
                "auth_chain_id": chain.auth_chain_id,
                "entity_id": chain.entity_id,
                "kind": chain.kind,
                "sequence": chain_query(structure, c) if chain.kind != "ligand" else " ".join(chain.sequence),
                "tokens": int((tokens.chain == c).sum()),
                "msa_depth": msas[c].depth if c in msas else 0,
                "msa_origin": origin.get(c, ""),
                "templates": [h.chain.name for h in hits.get(c, [])],
            }
        )
    return {
        "pdb_id": structure.pdb_id,
        "method": structure.method,
        "resolution": structure.resolution,
        "deposition_date": structure.deposition_date,
        "chains": chains,
    }


# ---------------------------------------------------------------- MSA features


def _letter_table(kind: str) -> np.ndarray:
    """[256] restype index of every MSA byte for a chain of ``kind``."""
    table = np.full(256, UNKNOWN_RESTYPE[kind], np.int64)
    for letter, index in MSA_LETTERS[kind].items():
        table[ord(letter)] = index
    table[ord("-")] = table[ord(".")] = MSA_GAP
    return table


def _msa_features(structure: Structure, tokens: Tokens, msas: Mapping[int, Msa]) -> dict[str, np.ndarray]:
    polymer = structure.polymer_chains()
    chain_msas = [msas.get(c) or Msa.single(chain_query(structure, c)) for c in polymer]
    plan = pair_rows(chain_msas, [structure.chains[c].entity_id for c in polymer])
    n_rows, n_tokens = len(plan), tokens.num_tokens
    msa = np.full((n_rows, n_tokens), MSA_GAP, np.int64)
    deletions = np.zeros((n_rows, n_tokens), np.float32)
    for column, (c, chain_msa) in enumerate(zip(polymer, chain_msas)):
        in_chain = np.nonzero(tokens.chain == c)[0]
        present = plan[:, column] >= 0
        rows = plan[present, column]
        residues = tokens.residue[in_chain]
        letters = chain_msa.rows[rows][:, residues].view(np.uint8)
        table = _letter_table(structure.chains[c].kind)
        msa[np.ix_(np.nonzero(present)[0], in_chain)] = table[letters]
        deletions[np.ix_(np.nonzero(present)[0], in_chain)] = chain_msa.deletions[rows][:, residues]
    msa[0] = tokens.features["restype"]  # the query row is the token's own residue type
    deletions[0] = 0.0
    counts = np.bincount((msa + NUM_RESTYPES * np.arange(n_tokens)).ravel(), minlength=n_tokens * NUM_RESTYPES)
    return {
        "msa": msa,
        "msa_mask": np.ones((n_rows, n_tokens), bool),
        "has_deletion": (deletions > 0).astype(np.float32),
        "deletion_value": (2.0 / np.pi * np.arctan(deletions / 3.0)).astype(np.float32),
        "profile": (counts.reshape(n_tokens, NUM_RESTYPES) / n_rows).astype(np.float32),
        "deletion_mean": deletions.mean(axis=0).astype(np.float32),
    }


# ---------------------------------------------------------------- template features


def _template_features(tokens: Tokens, templates: Mapping[int, Sequence[TemplateHit]]) -> dict[str, np.ndarray]:
    n_templates = max([1, *(len(h) for h in templates.values())])
    n_tokens = tokens.num_tokens
    features = {
        "template_mask": np.zeros(n_templates, bool),
        "template_restype": np.full((n_templates, n_tokens), MSA_GAP, np.int64),
        "template_pos": np.zeros((n_templates, n_tokens, 3), np.float32),
        "template_pos_mask": np.zeros((n_templates, n_tokens), bool),
        "template_backbone": np.zeros((n_templates, n_tokens, 3, 3), np.float32),
        "template_backbone_mask": np.zeros((n_templates, n_tokens), bool),
    }
    for c, hits in templates.items():
        # Tokens of modified residues (one per atom) have no template residue.
        in_chain = np.nonzero((tokens.chain == c) & ~tokens.per_atom)[0]
        residues = tokens.residue[in_chain]
        for t, hit in enumerate(hits):
            query_to_template = np.full(residues.max(initial=0) + 1, -1, np.int64)
            aligned = hit.query_positions < len(query_to_template)
            query_to_template[hit.query_positions[aligned]] = hit.template_positions[aligned]
            template_residue = query_to_template[residues]
            has = template_residue >= 0
            tok, res = in_chain[has], template_residue[has]
            chain = hit.chain
            features["template_mask"][t] = True
            features["template_restype"][t, tok] = chain.restype[res]
            features["template_pos"][t, tok] = chain.rep_pos[res]
            features["template_pos_mask"][t, tok] = chain.rep_mask[res]
            features["template_backbone"][t, tok] = chain.backbone[res]
            features["template_backbone_mask"][t, tok] = chain.backbone_mask[res]
    return features
