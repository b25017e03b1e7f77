"""Template search: hmmsearch of a chain's MSA profile against the input structures' chains.

The template database is built from the structures being precached (every protein chain,
its full sequence and its observed backbone). Hits from the query's own PDB entry, hits
over 95% identity (AF3's guard against copying the answer) and hits with E-value over
1e-3 are excluded; at most 4 are kept, best E-value first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megafold.data.msa import Msa
from megafold.data.structures import Structure
from megafold.data.tokenize import CANONICAL, RESTYPE_LETTER, restype_of

MAX_TEMPLATES = 4
MAX_IDENTITY = 0.95
MIN_COVERAGE = 0.1  # of the query, as AF3's min_align_ratio
# A small database gives no real homologue a low E-value by chance: hits weaker than this
# are noise, not templates.
MAX_EVALUE = 1e-3
# AF3's permissive hmmsearch flags; the filters above do the selection.
HMMSEARCH_OPTIONS = dict(E=100.0, domE=100.0, incE=100.0, incdomE=100.0, F1=0.1, F2=0.1, F3=0.1)
_BACKBONE = ("N", "CA", "C")


@dataclass(frozen=True)
class TemplateChain:
    """One protein chain usable as a template: ``[L]`` residues of its full sequence."""

    name: str  # "{pdb_id}_{auth_chain_id}"
    pdb_id: str
    restype: np.ndarray  # [L] int64
    rep_pos: np.ndarray  # [L, 3] float32: CB (CA for glycine)
    rep_mask: np.ndarray  # [L] bool
    backbone: np.ndarray  # [L, 3, 3] float32: N, CA, C
    backbone_mask: np.ndarray  # [L] bool: all three observed

    @property
    def sequence(self) -> str:
        return "".join(RESTYPE_LETTER[self.restype])


@dataclass(frozen=True)
class TemplateHit:
    chain: TemplateChain
    query_positions: np.ndarray  # [K] 0-based query residues aligned to ...
    template_positions: np.ndarray  # [K] ... these template residues
    identity: float
    e_value: float


def template_chains(structure: Structure) -> list[TemplateChain]:
    """Every protein chain of ``structure`` as a template (one per entity: copies are alike)."""
    chains, seen_entities = [], set()
    for chain_index, chain in enumerate(structure.chains):
        if chain.kind != "protein" or chain.entity_id in seen_entities:
            continue
        seen_entities.add(chain.entity_id)
        length = len(chain.sequence)
        restype = np.array([restype_of(name, "protein") for name in chain.sequence], np.int64)
        in_chain = structure.chain == chain_index
        positions = {}
        for atom in np.nonzero(in_chain)[0]:
            positions[(int(structure.residue[atom]), str(structure.atom_name[atom]))] = structure.coord[atom]
        backbone = np.zeros((length, 3, 3), np.float32)
        backbone_mask = np.zeros(length, bool)
        rep_pos = np.zeros((length, 3), np.float32)
        rep_mask = np.zeros(length, bool)
        for r, name in enumerate(chain.sequence):
            atoms = [positions.get((r, a)) for a in _BACKBONE]
            if all(a is not None for a in atoms):
                backbone[r] = atoms
                backbone_mask[r] = True
            rep_name = "CA" if CANONICAL.get(name, (name,))[0] == "GLY" else "CB"
            rep = positions.get((r, rep_name))
            if rep is not None:
                rep_pos[r], rep_mask[r] = rep, True
        chains.append(
            TemplateChain(
                name=f"{structure.pdb_id}_{chain.auth_chain_id}",
                pdb_id=structure.pdb_id,
                restype=restype,
                rep_pos=rep_pos,
                rep_mask=rep_mask,
                backbone=backbone,
                backbone_mask=backbone_mask,
            )
        )
    return chains


class TemplateDatabase:
    """Template chains plus their digital sequences for hmmsearch."""

    def __init__(self, chains: Sequence[TemplateChain]):
        import pyhmmer

        self.chains = list(chains)
        self.alphabet = pyhmmer.easel.Alphabet.amino()
        self.sequences = pyhmmer.easel.DigitalSequenceBlock(
            self.alphabet,
            [
                pyhmmer.easel.TextSequence(name=c.name.encode(), sequence=c.sequence).digitize(self.alphabet)
                for c in self.chains
            ],
        )
        self.by_name = {c.name: c for c in self.chains}


def search_templates(
    msa: Msa,
    database: TemplateDatabase,
    *,
    query_pdb_id: str,
    max_hits: int = MAX_TEMPLATES,
    max_identity: float = MAX_IDENTITY,
    max_evalue: float = MAX_EVALUE,
) -> list[TemplateHit]:
    """Templates for the query of ``msa``: hmmsearch of its profile HMM, then filtered."""
    import pyhmmer

    if not len(database.chains) or max_hits <= 0:
        return []
    hmm = _profile_hmm(msa, database.alphabet)
    query = msa.rows[0]
    hits: list[TemplateHit] = []
    (top_hits,) = pyhmmer.hmmer.hmmsearch([hmm], database.sequences, cpus=1, **HMMSEARCH_OPTIONS)
    for hit in top_hits:
        name = hit.name.decode() if isinstance(hit.name, bytes) else hit.name
        chain = database.by_name[name]
        if chain.pdb_id == query_pdb_id or hit.evalue > max_evalue:
            continue
        domain = hit.best_domain
        query_positions, template_positions = _aligned_pairs(domain.alignment)
        if len(query_positions) < MIN_COVERAGE * len(query):
            continue
        same = query[query_positions] == RESTYPE_LETTER[chain.restype[template_positions]].astype("S1")
        identity = float(same.mean())
        if identity > max_identity:
            continue
        hits.append(TemplateHit(chain, query_positions, template_positions, identity, float(hit.evalue)))
    hits.sort(key=lambda h: h.e_value)
    return hits[:max_hits]


def _profile_hmm(msa: Msa, alphabet):
    """A profile HMM with one match state per query position (symfrac 0 keeps every column)."""
    import pyhmmer

    rows = [row.tobytes().decode() for row in msa.rows]
    text = pyhmmer.easel.TextMSA(
        name=b"query",
        sequences=[
            pyhmmer.easel.TextSequence(name=f"row{i}".encode(), sequence=_clean(row)) for i, row in enumerate(rows)
        ],
    )
    builder = pyhmmer.plan7.Builder(alphabet, symfrac=0.0)
    hmm, _, _ = builder.build_msa(text.digitize(alphabet), pyhmmer.plan7.Background(alphabet))
    return hmm


def _clean(row: str) -> str:
    return "".join(c if c in "ACDEFGHIKLMNPQRSTVWY-" else "X" for c in row)


def _aligned_pairs(alignment) -> tuple[np.ndarray, np.ndarray]:
    """0-based (query, template) residue pairs of a domain alignment; HMM state = query residue."""
    query_pos, template_pos = alignment.hmm_from - 1, alignment.target_from - 1
    q_out, t_out = [], []
    for h, t in zip(alignment.hmm_sequence, alignment.target_sequence):
        if h != "." and t != "-":
            q_out.append(query_pos)
            t_out.append(template_pos)
        if h != ".":
            query_pos += 1
        if t != "-":
            template_pos += 1
    return np.asarray(q_out, np.int64), np.asarray(t_out, np.int64)
