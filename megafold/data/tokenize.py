"""AF3 tokenization: tokens, atoms, reference conformers and token bonds of a Structure.

One token per standard amino acid or nucleotide; one token per heavy atom for ligands and
for modified (non-standard) polymer residues (AF3 Sec. 2.6). Polymer residues without
coordinates are tokens too, with their reference-conformer atoms marked unresolved.
Reference conformers, charges and intra-residue bonds come from the CCD (``ccd.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megafold.data import ccd
from megafold.data.features import MSA_GAP, NUM_ELEMENTS
from megafold.data.structures import Structure

PROTEIN_RESIDUES = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)  # fmt: skip
RNA_RESIDUES = ("A", "G", "C", "U")
DNA_RESIDUES = ("DA", "DG", "DC", "DT")
# AF3 Table 5 order: 20 amino acids + UNK, 4 RNA + N, 4 DNA + DN, gap.
RESTYPES = (*PROTEIN_RESIDUES, "UNK", *RNA_RESIDUES, "N", *DNA_RESIDUES, "DN", "-")
RESTYPE_INDEX = {name: i for i, name in enumerate(RESTYPES)}
UNKNOWN_RESTYPE = {"protein": 20, "rna": 25, "dna": 30, "ligand": 20}  # ligands: "unknown amino acid"
PROTEIN_LETTERS = "ARNDCQEGHILKMFPSTWYV"
# One-letter MSA alphabets per chain kind -> restype index (unlisted letters: the kind's unknown).
MSA_LETTERS = {
    "protein": {**{c: i for i, c in enumerate(PROTEIN_LETTERS)}, "X": 20},
    "rna": {"A": 21, "G": 22, "C": 23, "U": 24, "T": 24},
    "dna": {"A": 26, "G": 27, "C": 28, "T": 29, "U": 29},
}
RESTYPE_LETTER = np.array([*PROTEIN_LETTERS, "X", *"AGCUN", *"AGCTN", "-"])
# Selenomethionine is methionine for modelling purposes (as in AF3's pipeline).
CANONICAL = {"MSE": ("MET", {"SE": "SD"})}
_CENTER_ATOM = {"protein": "CA", "rna": "C1'", "dna": "C1'"}
_PURINES = {"A", "G", "DA", "DG", "N", "DN"}


@dataclass(frozen=True)
class Tokens:
    """Token- and atom-level features of one structure (AF3 Table 5, without MSA/templates).

    ``features`` holds the FEATURES entries of the token, token2 and atom axes.
    ``chain`` / ``residue`` ``[N]`` say which chain and sequence position each token is
    (used to place MSA columns and template residues on tokens).
    """

    features: dict[str, np.ndarray]
    chain: np.ndarray  # [N] int index into Structure.chains
    residue: np.ndarray  # [N] int 0-based position in the chain's sequence
    per_atom: np.ndarray  # [N] bool: token of a ligand or modified residue (one atom each)

    @property
    def num_tokens(self) -> int:
        return len(self.chain)


def restype_of(name: str, kind: str) -> int:
    """Restype index (0..31) of a residue named ``name`` in a chain of ``kind``."""
    if kind == "ligand":
        return UNKNOWN_RESTYPE["ligand"]
    name = CANONICAL.get(name, (name, None))[0]
    index = RESTYPE_INDEX.get(name)
    if index is not None and _kind_of_restype(index) == kind:
        return index
    component = ccd.component(name)
    parent = component.parent if component else None
    index = RESTYPE_INDEX.get(parent) if parent else None
    if index is not None and _kind_of_restype(index) == kind:
        return index
    return UNKNOWN_RESTYPE[kind]


def is_standard(name: str, kind: str) -> bool:
    """A residue AF3 tokenizes as one token (standard residue of its polymer kind, or UNK/N/DN)."""
    name = CANONICAL.get(name, (name, None))[0]
    index = RESTYPE_INDEX.get(name)
    return kind != "ligand" and index is not None and index != MSA_GAP and _kind_of_restype(index) == kind


def _kind_of_restype(index: int) -> str:
    return "protein" if index <= 20 else "rna" if index <= 25 else "dna" if index <= 30 else "gap"


def atom_name_chars(name: str) -> np.ndarray:
    """AF3 ref_atom_name_chars: 4 characters, each ``ord(c) - 32`` (spaces pad with 0)."""
    padded = name[:4].ljust(4)
    return np.array([min(max(ord(c) - 32, 0), 63) for c in padded], np.int64)


def tokenize(structure: Structure) -> Tokens:
    """Tokens, atoms, reference conformers and token bonds of ``structure``."""
    tok: dict[str, list] = {k: [] for k in (
        "restype", "residue_index", "token_index", "asym_id", "entity_id", "sym_id",
        "is_protein", "is_rna", "is_dna", "is_ligand", "token_center_atom", "token_rep_atom",
        "chain", "residue", "per_atom",
    )}  # fmt: skip
    atom: dict[str, list] = {k: [] for k in (
        "atom_to_token", "ref_pos", "ref_mask", "ref_element", "ref_charge",
        "ref_atom_name_chars", "ref_space_uid", "atom_pos", "atom_resolved", "source_atom",
    )}  # fmt: skip
    intra_bonds: list[np.ndarray] = []  # CCD bonds of per-atom residues, in example atom indices
    entity_copies: dict[int, int] = {}
    chain_bounds = np.searchsorted(structure.chain, np.arange(len(structure.chains) + 1))
    space_uid = 0
    for chain_index, chain in enumerate(structure.chains):
        sym_id = entity_copies[chain.entity_id] = entity_copies.get(chain.entity_id, 0) + 1
        lo, hi = chain_bounds[chain_index], chain_bounds[chain_index + 1]
        residue_bounds = lo + np.searchsorted(structure.residue[lo:hi], np.arange(len(chain.sequence) + 1))
        token_in_chain = 0
        for position, name in enumerate(chain.sequence):
            observed = range(residue_bounds[position], residue_bounds[position + 1])
            if chain.kind == "ligand" and not len(observed):
                continue
            names, ref_pos, ref_mask, elements, charges, bonds = _residue_atoms(structure, name, observed)
            single_token = is_standard(name, chain.kind)
            first_atom = len(atom["atom_to_token"])
            first_token = len(tok["restype"])
            n_tokens = 1 if single_token else len(names)
            restype = restype_of(name, chain.kind)
            for t in range(n_tokens):
                tok["restype"].append(restype)
                tok["residue_index"].append(position + 1)
                tok["token_index"].append(token_in_chain)
                tok["asym_id"].append(chain_index + 1)
                tok["entity_id"].append(chain.entity_id)
                tok["sym_id"].append(sym_id)
                for kind in ("protein", "rna", "dna", "ligand"):
                    tok[f"is_{kind}"].append(chain.kind == kind)
                tok["chain"].append(chain_index)
                tok["residue"].append(position)
                tok["per_atom"].append(not single_token)
                token_in_chain += 1
            if single_token:
                center, rep = _center_and_rep(names, name, chain.kind)
                tok["token_center_atom"].append(first_atom + center)
                tok["token_rep_atom"].append(first_atom + rep)
                atom["atom_to_token"].extend([first_token] * len(names))
            else:
                tok["token_center_atom"].extend(range(first_atom, first_atom + len(names)))
                tok["token_rep_atom"].extend(range(first_atom, first_atom + len(names)))
                atom["atom_to_token"].extend(range(first_token, first_token + len(names)))
                intra_bonds.append(bonds + first_atom)
            observed_index = {structure.atom_name[i]: i for i in observed}
            source = [observed_index.get(_observed_name(n, name), -1) for n in names]
            atom["source_atom"].extend(source)
            atom["ref_pos"].append(ref_pos)
            atom["ref_mask"].append(ref_mask)
            atom["ref_element"].extend(elements)
            atom["ref_charge"].extend(charges)
            atom["ref_atom_name_chars"].extend(atom_name_chars(n) for n in names)
            atom["ref_space_uid"].extend([space_uid] * len(names))
            space_uid += 1

    source_atom = np.asarray(atom.pop("source_atom"), np.int64)
    resolved = source_atom >= 0
    atom_pos = np.zeros((len(source_atom), 3), np.float32)
    atom_pos[resolved] = structure.coord[source_atom[resolved]]
    n_tokens = len(tok["restype"])
    features = {
        "token_mask": np.ones(n_tokens, bool),
        **{k: np.asarray(tok[k], np.int64) for k in (
            "restype", "residue_index", "token_index", "asym_id", "entity_id", "sym_id",
            "token_center_atom", "token_rep_atom")},  # fmt: skip
        **{f"is_{k}": np.asarray(tok[f"is_{k}"], bool) for k in ("protein", "rna", "dna", "ligand")},
        "atom_mask": np.ones(len(source_atom), bool),
        "atom_to_token": np.asarray(atom["atom_to_token"], np.int64),
        "ref_pos": np.concatenate(atom["ref_pos"]).astype(np.float32),
        "ref_mask": np.concatenate(atom["ref_mask"]).astype(bool),
        "ref_element": np.clip(np.asarray(atom["ref_element"], np.int64), 0, NUM_ELEMENTS - 1),
        "ref_charge": np.asarray(atom["ref_charge"], np.float32),
        "ref_atom_name_chars": np.asarray(atom["ref_atom_name_chars"], np.int64).reshape(-1, 4),
        "ref_space_uid": np.asarray(atom["ref_space_uid"], np.int64),
        "atom_pos": atom_pos,
        "atom_resolved": resolved,
    }
    features["token_rep_mask"] = resolved[features["token_rep_atom"]]
    per_atom = np.asarray(tok["per_atom"], bool)
    features["token_bonds"] = _token_bonds(
        structure, source_atom, features["atom_to_token"], per_atom, intra_bonds, n_tokens
    )
    return Tokens(
        features=features,
        chain=np.asarray(tok["chain"], np.int64),
        residue=np.asarray(tok["residue"], np.int64),
        per_atom=per_atom,
    )


def _observed_name(ccd_name: str, residue_name: str) -> str:
    """The name an atom has in the file (MSE's SD is SE there)."""
    renames = CANONICAL.get(residue_name, (None, {}))[1]
    back = {new: old for old, new in renames.items()}
    return back.get(ccd_name, ccd_name)


def _residue_atoms(structure: Structure, name: str, observed: range):
    """Atom names, reference conformer, elements, charges and intra-residue bonds of a residue.

    With a CCD entry: its heavy atoms minus leaving atoms that were not observed (OXT is
    kept at a C-terminus where the file has it). Without one: the observed atoms, no
    reference conformer (ref_mask False).
    """
    canonical, renames = CANONICAL.get(name, (name, {}))
    component = ccd.component(canonical)
    observed_names = {renames.get(n, n) for n in structure.atom_name[observed]}
    if component is None:
        names = [renames.get(n, n) for n in structure.atom_name[observed]]
        elements = [ccd.atomic_number(e) for e in structure.element[observed]]
        k = len(names)
        return names, np.zeros((k, 3), np.float32), np.zeros(k, bool), elements, [0.0] * k, np.zeros((0, 2), np.int64)
    keep = np.array([not leaving or n in observed_names for n, leaving in zip(component.atom_names, component.leaving)], bool)
    new_index = np.cumsum(keep) - 1
    bonds = component.bonds[keep[component.bonds[:, 0]] & keep[component.bonds[:, 1]]]
    ref_pos, ref_mask = component.ideal_pos[keep].copy(), component.pos_mask[keep]
    if ref_mask.any():  # centred, so that rotating it (crop.random_rotate_conformers) keeps it in place
        ref_pos[ref_mask] -= ref_pos[ref_mask].mean(axis=0)
    return (
        [n for n, k in zip(component.atom_names, keep) if k],
        ref_pos,
        ref_mask,
        component.atomic_numbers[keep].tolist(),
        component.charges[keep].tolist(),
        new_index[bonds].astype(np.int64),
    )


def _center_and_rep(names: list[str], residue: str, kind: str) -> tuple[int, int]:
    """Indices (within the residue) of the token centre atom and the distogram atom."""
    index = {n: i for i, n in enumerate(names)}
    center = index.get(_CENTER_ATOM[kind], 0)
    residue = CANONICAL.get(residue, (residue, None))[0]
    if kind == "protein":
        rep = index.get("CA" if residue == "GLY" else "CB", center)
    else:
        rep = index.get("C4" if residue in _PURINES else "C2", center)
    return center, rep


def _token_bonds(structure, source_atom, atom_to_token, per_atom, intra_bonds, n_tokens) -> np.ndarray:
    """[N, N] bool: bonds that involve a per-atom token (ligand-ligand, ligand-polymer)."""
    to_example = np.full(structure.num_atoms, -1, np.int64)
    to_example[source_atom[source_atom >= 0]] = np.nonzero(source_atom >= 0)[0]
    file_bonds = to_example[structure.bonds] if len(structure.bonds) else np.zeros((0, 2), np.int64)
    file_bonds = file_bonds[(file_bonds >= 0).all(axis=1)]
    # Covalent links only: AF3 drops bonds longer than 2.4 A (metal coordination etc.).
    coord = structure.coord[source_atom.clip(0)]
    length = np.linalg.norm(coord[file_bonds[:, 0]] - coord[file_bonds[:, 1]], axis=-1)
    bonds = np.concatenate([file_bonds[length < 2.4], *intra_bonds]) if intra_bonds else file_bonds[length < 2.4]
    token_pairs = atom_to_token[bonds.astype(np.int64)]
    token_pairs = token_pairs[(token_pairs[:, 0] != token_pairs[:, 1]) & per_atom[token_pairs].any(axis=1)]
    matrix = np.zeros((n_tokens, n_tokens), bool)
    matrix[token_pairs[:, 0], token_pairs[:, 1]] = True
    matrix[token_pairs[:, 1], token_pairs[:, 0]] = True
    return matrix
