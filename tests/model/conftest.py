"""Feature batches from real mmCIFs of shared/data/structures for the model tests.

A small stand-in for the data pipeline, read with gemmi: one token per standard residue /
nucleotide, one per atom of anything else; reference conformer = the residue's own true
coordinates, centred (one conformer per residue / ligand); MSA = the query row; an optional
self-template from the true backbone. A spatial crop keeps the CPU tests small.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from megafold.data.features import NUM_RESTYPES, collate
from megafold.kernels import use_kernels
from megafold.model.primitives import lecun_normal_

STRUCTURES = Path("/work/shared/data/structures")

AMINO_ACIDS = {
    name: i
    for i, name in enumerate(
        "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL".split()
    )
}
UNKNOWN_AMINO_ACID = 20
RNA = {"A": 21, "G": 22, "C": 23, "U": 24}
DNA = {"DA": 26, "DG": 27, "DC": 28, "DT": 29}
PURINES = {"A", "G", "DA", "DG"}
COVALENT = 2.0  # A, heavy-atom bond length bound for ligand bonds


def _chars(name: str) -> list[int]:
    return [ord(c) - 32 for c in name.ljust(4)[:4]]


@functools.lru_cache(maxsize=None)
def structure_example(pdb_id: str, n_tokens: int, centre: str = "first", templates: bool = False) -> dict:
    """Example (numpy, FEATURES schema) of ``pdb_id`` cropped to the ``n_tokens`` tokens nearest
    to ``centre``: "first" (first token), "ligand" (first ligand atom) or "dna"."""
    import gemmi

    st = gemmi.read_structure(str(STRUCTURES / f"{pdb_id}.cif.gz"))
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()
    st.remove_alternative_conformations()
    entity_of = {sub: i + 1 for i, ent in enumerate(st.entities) for sub in ent.subchains}

    tokens = []  # dicts: restype, flags, residue/chain ids, atoms [(name, element, pos)], uid
    asym_ids: dict[str, int] = {}
    copies: dict[int, int] = {}
    uid = 0
    for chain in st[0]:
        for residue in chain:
            sub = residue.subchain
            if sub not in asym_ids:
                asym_ids[sub] = len(asym_ids) + 1
                entity = entity_of.get(sub, 0)
                copies[entity] = copies.get(entity, -1) + 1
            entity = entity_of.get(sub, 0)
            atoms = [(a.name, a.element.atomic_number, np.array(a.pos.tolist())) for a in residue]
            names = [a[0] for a in atoms]
            base = dict(asym=asym_ids[sub], entity=entity, sym=copies[entity], residue_index=residue.seqid.num, uid=uid)
            uid += 1
            if residue.name in AMINO_ACIDS and "CA" in names:
                rep = "CB" if "CB" in names else "CA"
                tokens.append(dict(base, restype=AMINO_ACIDS[residue.name], kind="protein", atoms=atoms, centre="CA", rep=rep))
            elif (residue.name in RNA or residue.name in DNA) and "C1'" in names:
                rep = "C4" if residue.name in PURINES else "C2"
                kind = "rna" if residue.name in RNA else "dna"
                restype = RNA.get(residue.name, DNA.get(residue.name))
                tokens.append(dict(base, restype=restype, kind=kind, atoms=atoms, centre="C1'", rep=rep if rep in names else "C1'"))
            else:
                for atom in atoms:
                    tokens.append(dict(base, restype=UNKNOWN_AMINO_ACID, kind="ligand", atoms=[atom], centre=atom[0], rep=atom[0]))

    def position(token, name):
        return next(pos for n, _, pos in token["atoms"] if n == name)

    centres = np.stack([position(t, t["centre"]) for t in tokens])
    anchor = {"first": 0}.get(centre)
    if anchor is None:
        anchor = next(i for i, t in enumerate(tokens) if t["kind"] == centre)
    keep = np.sort(np.argsort(np.linalg.norm(centres - centres[anchor], axis=-1), kind="stable")[:n_tokens])
    tokens = [tokens[i] for i in keep]

    N = len(tokens)
    token_index, counters = [], {}
    for t in tokens:
        counters[t["asym"]] = counters.get(t["asym"], -1) + 1
        token_index.append(counters[t["asym"]])
    atom_rows, atom_to_token, centre_atom, rep_atom = [], [], [], []
    for i, t in enumerate(tokens):
        start = len(atom_rows)
        for name, element, pos in t["atoms"]:
            atom_rows.append((name, element, pos, t["uid"]))
            atom_to_token.append(i)
        names = [a[0] for a in t["atoms"]]
        centre_atom.append(start + names.index(t["centre"]))
        rep_atom.append(start + names.index(t["rep"]))
    A = len(atom_rows)
    atom_pos = np.stack([row[2] for row in atom_rows]).astype(np.float32)
    uids = np.array([row[3] for row in atom_rows])
    ref_pos = atom_pos.copy()
    for u in np.unique(uids):
        ref_pos[uids == u] -= atom_pos[uids == u].mean(0)

    kinds = np.array([t["kind"] for t in tokens])
    restype = np.array([t["restype"] for t in tokens])
    ligand_atoms = np.array([kinds[j] == "ligand" for j in atom_to_token])
    token_bonds = np.zeros((N, N), bool)
    lig = np.nonzero(ligand_atoms)[0]
    if len(lig):
        dist = np.linalg.norm(atom_pos[lig][:, None] - atom_pos[None], axis=-1)
        for a, b in zip(*np.nonzero(dist < COVALENT)):
            i, j = atom_to_token[lig[a]], atom_to_token[b]
            if i != j:
                token_bonds[i, j] = token_bonds[j, i] = True

    example = {
        "token_mask": np.ones(N, bool),
        "restype": restype,
        "residue_index": np.array([t["residue_index"] for t in tokens]),
        "token_index": np.array(token_index),
        "asym_id": np.array([t["asym"] for t in tokens]),
        "entity_id": np.array([t["entity"] for t in tokens]),
        "sym_id": np.array([t["sym"] for t in tokens]),
        "is_protein": kinds == "protein",
        "is_rna": kinds == "rna",
        "is_dna": kinds == "dna",
        "is_ligand": kinds == "ligand",
        "profile": np.eye(NUM_RESTYPES, dtype=np.float32)[restype],
        "deletion_mean": np.zeros(N, np.float32),
        "token_center_atom": np.array(centre_atom),
        "token_rep_atom": np.array(rep_atom),
        "token_rep_mask": np.ones(N, bool),
        "token_bonds": token_bonds,
        "atom_mask": np.ones(A, bool),
        "atom_to_token": np.array(atom_to_token),
        "ref_pos": ref_pos,
        "ref_mask": np.ones(A, bool),
        "ref_element": np.array([row[1] for row in atom_rows]),
        "ref_charge": np.zeros(A, np.float32),
        "ref_atom_name_chars": np.array([_chars(row[0]) for row in atom_rows]),
        "ref_space_uid": uids,
        "atom_pos": atom_pos,
        "atom_resolved": np.ones(A, bool),
        "msa": restype[None],
        "msa_mask": np.ones((1, N), bool),
        "has_deletion": np.zeros((1, N), np.float32),
        "deletion_value": np.zeros((1, N), np.float32),
    }
    T = 1 if templates else 0
    backbone = np.zeros((T, N, 3, 3), np.float32)
    backbone_mask = np.zeros((T, N), bool)
    if templates:
        for i, t in enumerate(tokens):
            names = [a[0] for a in t["atoms"]]
            if t["kind"] == "protein" and all(n in names for n in ("N", "CA", "C")):
                backbone[0, i] = [position(t, n) for n in ("N", "CA", "C")]
                backbone_mask[0, i] = True
    example.update(
        template_mask=np.ones(T, bool),
        template_restype=np.repeat(restype[None], T, axis=0),
        template_pos=np.repeat(atom_pos[rep_atom][None], T, axis=0),
        template_pos_mask=np.ones((T, N), bool),
        template_backbone=backbone,
        template_backbone_mask=backbone_mask,
    )
    return example


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
