"""Read mmCIF and PDB files (plain, gzipped or bzip2ed) into a :class:`Structure`.

biotite parses mmCIF; PDB files go through gemmi (entities, SEQRES, label_seq_id) into an
in-memory mmCIF first, so both formats take one path. What is kept: the first model, one
conformer per residue (the altloc with the highest occupancy), heavy atoms, no waters,
and the asymmetric unit as written in the file (assemblies are not expanded). Polymer
chains carry their full sequence (SEQRES / ``_entity_poly_seq``), so residues without
coordinates are still part of the chain.
"""

from __future__ import annotations

import bz2
import gzip
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megafold.errors import StructureError

WATERS = frozenset({"HOH", "DOD", "WAT", "H2O"})
CHAIN_KINDS = ("protein", "rna", "dna", "ligand")
_POLY_TYPES = {
    "polypeptide(l)": "protein",
    "polypeptide(d)": "protein",
    "polyribonucleotide": "rna",
    "polydeoxyribonucleotide": "dna",
    "polydeoxyribonucleotide/polyribonucleotide hybrid": "dna",
}
_CATEGORIES_READ = (
    "atom_site", "entity", "entity_poly", "entity_poly_seq", "entry", "exptl", "refine", "reflns",
    "em_3d_reconstruction", "pdbx_database_status", "struct_conn", "chem_comp",
)  # fmt: skip
_PDB_RECORDS = re.compile(
    r"^(HEADER|TITLE|COMPND|SOURCE|KEYWDS|EXPDTA|AUTHOR|REVDAT|JRNL|REMARK|SEQRES|HET|"
    r"HELIX|SHEET|CRYST1|ORIGX|SCALE|MODEL|ATOM|HETATM|DBREF|SEQADV|FORMUL|LINK|SSBOND|"
    r"CISPEP|SITE|ANISOU|TER|MASTER|END|CONECT|NUMMDL|MDLTYP|SPRSDE|OBSLTE|SPLIT|CAVEAT)"
)


@dataclass(frozen=True)
class Chain:
    """One chain instance (``label_asym_id``) of the asymmetric unit."""

    chain_id: str  # label_asym_id
    auth_chain_id: str  # author chain id (PDB chain letter)
    entity_id: int
    kind: str  # one of CHAIN_KINDS
    sequence: tuple[str, ...]  # CCD code of every residue; polymers: the full SEQRES
    # Author numbering of every residue of ``sequence`` (auth_seq_id, pdbx_PDB_ins_code, "" for
    # none) as in the file; residues without coordinates are numbered on from the nearest
    # observed residue of the chain, without insertion code.
    auth_seq_id: tuple[int, ...]
    ins_code: tuple[str, ...]


@dataclass(frozen=True)
class Structure:
    """A parsed structure: chains plus every observed heavy atom, sorted by chain and residue.

    Per-atom arrays have length ``A``; ``residue`` indexes ``chains[chain].sequence``.
    ``bonds`` ``[K, 2]`` holds covalent bonds between observed atoms (CCD bonds within
    residues, ``struct_conn`` covalent links and polymer links between them).
    """

    path: Path
    pdb_id: str
    chains: tuple[Chain, ...]
    chain: np.ndarray  # [A] int32 index into chains
    residue: np.ndarray  # [A] int32 index into the chain's sequence
    atom_name: np.ndarray  # [A] str
    element: np.ndarray  # [A] str, upper case
    coord: np.ndarray  # [A, 3] float32
    occupancy: np.ndarray  # [A] float32
    b_factor: np.ndarray  # [A] float32
    bonds: np.ndarray  # [K, 2] int32
    method: str = ""
    resolution: float | None = None
    deposition_date: str | None = None

    @property
    def num_atoms(self) -> int:
        return len(self.atom_name)

    def polymer_chains(self) -> list[int]:
        return [i for i, c in enumerate(self.chains) if c.kind != "ligand"]


def load_structure(path: str | Path) -> Structure:
    """Parse an mmCIF (``.cif``, ``.mmcif``) or PDB (``.pdb``, ``.ent``) file, plain or compressed
    (gzip, bzip2; recognised by content, not by name).

    Raises StructureError naming the file and the problem for anything malformed: empty,
    truncated, neither mmCIF nor PDB, no atoms, non-numeric coordinates, no polymer.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise StructureError(f"{path}: empty file")
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    if first.lstrip().startswith("data_"):
        block = _cif_block(text, path)
    elif _PDB_RECORDS.match(first):
        block = _pdb_to_cif_block(text, path)
    else:
        raise StructureError(f"{path}: neither mmCIF nor PDB (first line {first[:40]!r})")
    return _structure_from_block(block, path)


def _read_text(path: Path) -> str:
    """The text of a plain, gzipped or bzip2ed file (compression recognised by content)."""
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        return raw.decode("utf-8", errors="replace")
    except (OSError, EOFError, ValueError) as exc:
        raise StructureError(f"{path}: cannot read ({exc}); truncated or corrupt file?") from exc


def _cif_block(text: str, path: Path):
    import biotite.structure.io.pdbx as pdbx

    try:
        return pdbx.CIFFile.read(io.StringIO(text)).block
    except Exception as exc:  # biotite raises bare ValueError/IndexError on broken syntax
        raise StructureError(f"{path}: not a readable mmCIF file ({exc})") from exc


def _pdb_to_cif_block(text: str, path: Path):
    """PDB text -> the same mmCIF block a CIF reader sees, via gemmi's entity set-up."""
    import gemmi

    try:
        structure = gemmi.read_pdb_string(text)
    except Exception as exc:
        raise StructureError(f"{path}: not a readable PDB file ({exc})") from exc
    if len(structure) == 0:
        raise StructureError(f"{path}: no ATOM/HETATM records")
    structure.setup_entities()
    model = structure[0]
    for entity in structure.entities:
        # Without SEQRES the observed residues are the sequence (numbering gaps unfilled).
        if entity.entity_type == gemmi.EntityType.Polymer and not entity.full_sequence:
            entity.full_sequence = [r.name for r in model.get_subchain(entity.subchains[0])]
    structure.deduplicate_entities()
    structure.assign_label_seq_id(force=True)
    return _cif_block(structure.make_mmcif_document().as_string(), path)


def _column(block, category: str, name: str) -> np.ndarray | None:
    if category not in block or name not in block[category]:
        return None
    return np.asarray(block[category][name].as_array(str))


def _structure_from_block(block, path: Path) -> Structure:
    import biotite.structure as struc
    import biotite.structure.io.pdbx as pdbx

    if "atom_site" not in block:
        raise StructureError(f"{path}: no atom records (no _atom_site category)")
    for category in _CATEGORIES_READ:
        try:
            _ = block[category] if category in block else None  # biotite parses categories lazily
        except Exception as exc:
            raise StructureError(f"{path}: malformed _{category} category ({exc}); truncated file?") from exc
    for axis in "xyz":
        raw = _column(block, "atom_site", f"Cartn_{axis}")
        if raw is None:
            raise StructureError(f"{path}: _atom_site has no Cartn_{axis} column")
        try:
            values = raw.astype(np.float64)
        except ValueError as exc:
            raise StructureError(f"{path}: non-numeric coordinates in Cartn_{axis} ({exc})") from exc
        if not np.isfinite(values).all():
            raise StructureError(f"{path}: non-finite coordinates in Cartn_{axis}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = pdbx.get_structure(
                block,
                model=1,
                altloc="occupancy",
                extra_fields=["occupancy", "b_factor", "label_entity_id", "auth_asym_id", "auth_seq_id"],
                use_author_fields=False,
                include_bonds=True,
            )
    except StructureError:
        raise
    except Exception as exc:
        raise StructureError(f"{path}: cannot read atoms ({type(exc).__name__}: {exc})") from exc
    element = np.char.upper(atoms.element.astype(str))
    keep = ~np.isin(element, ["H", "D", "T"]) & ~np.isin(atoms.res_name, list(WATERS))
    atoms = atoms[keep]
    if atoms.array_length() == 0:
        raise StructureError(f"{path}: no heavy non-water atoms in model 1")

    entity_kind = _entity_kinds(block)
    entity_sequence = _entity_sequences(block)
    chains: list[Chain] = []
    chain_index = np.zeros(atoms.array_length(), np.int32)
    residue_index = np.zeros(atoms.array_length(), np.int32)
    keep = np.ones(atoms.array_length(), bool)
    chain_starts = struc.get_chain_starts(atoms, add_exclusive_stop=True)
    entity_numbers: dict[str, int] = {}
    for start, stop in zip(chain_starts[:-1], chain_starts[1:]):
        chain_atoms = atoms[start:stop]
        entity = str(chain_atoms.label_entity_id[0])
        kind = entity_kind.get(entity) or _guess_kind(chain_atoms.res_name)
        residue_starts = struc.get_residue_starts(chain_atoms, add_exclusive_stop=True)
        names = [chain_atoms.res_name[s] for s in residue_starts[:-1]]
        if kind == "ligand":
            sequence = tuple(names)
            positions, dropped = np.arange(len(names)), []
        else:
            sequence, positions, dropped = _align_to_sequence(
                chain_atoms, residue_starts, names, entity_sequence.get(entity)
            )
            for s in dropped:
                keep[start + residue_starts[s] : start + residue_starts[s + 1]] = False
        auth_seq_id, ins_code = _author_numbering(chain_atoms, residue_starts, positions, dropped, len(sequence), path)
        counts = np.diff(residue_starts)
        residue_index[start:stop] = np.repeat(positions, counts)
        chain_index[start:stop] = len(chains)
        chains.append(
            Chain(
                chain_id=str(chain_atoms.chain_id[0]),
                auth_chain_id=str(chain_atoms.auth_asym_id[0]),
                entity_id=entity_numbers.setdefault(entity, len(entity_numbers) + 1),
                kind=kind,
                sequence=tuple(sequence),
                auth_seq_id=auth_seq_id,
                ins_code=ins_code,
            )
        )
    if not any(c.kind != "ligand" for c in chains):
        raise StructureError(f"{path}: no polymer chain (protein, DNA or RNA)")
    # Polymer chains first, then ligands, each in file order: the same chain order
    # whichever way the file interleaves them (PDB files list ligands per chain).
    chain_order = sorted(range(len(chains)), key=lambda i: (chains[i].kind == "ligand", i))
    new_position = np.argsort(chain_order)
    chains = [chains[i] for i in chain_order]
    chain_index = new_position[chain_index].astype(np.int32)

    bonds = atoms.bonds.as_array()[:, :2].astype(np.int64) if atoms.bonds is not None else np.zeros((0, 2))
    old_to_new = np.cumsum(keep) - 1
    bonds = bonds[keep[bonds[:, 0]] & keep[bonds[:, 1]]]
    atoms = atoms[keep]
    chain_index, residue_index = chain_index[keep], residue_index[keep]
    # The file order is chain by chain, but sort so every residue's atoms are contiguous.
    order = np.lexsort((np.arange(len(chain_index)), residue_index, chain_index))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    bonds = np.sort(rank[old_to_new[bonds]], axis=1).astype(np.int32).reshape(-1, 2)
    return Structure(
        path=path,
        pdb_id=_entry_id(block, path),
        chains=tuple(chains),
        chain=chain_index[order],
        residue=residue_index[order],
        atom_name=atoms.atom_name[order].astype(str),
        element=np.char.upper(atoms.element[order].astype(str)),
        coord=atoms.coord[order].astype(np.float32),
        occupancy=atoms.occupancy[order].astype(np.float32),
        b_factor=atoms.b_factor[order].astype(np.float32),
        bonds=np.unique(bonds, axis=0) if len(bonds) else bonds,
        method=_first(block, "exptl", "method") or "",
        resolution=_resolution(block),
        deposition_date=_first(block, "pdbx_database_status", "recvd_initial_deposition_date"),
    )


def _align_to_sequence(chain_atoms, residue_starts, names, full_sequence):
    """Place observed polymer residues on the chain's full sequence.

    Returns (sequence, 0-based position of each observed residue, observed residues to drop).
    Two residues at one sequence position (microheterogeneity) keep the better occupied one.
    """
    seq_ids = chain_atoms.res_id[residue_starts[:-1]].astype(np.int64)
    if full_sequence is None or (seq_ids < 1).any() or seq_ids.max() > len(full_sequence):
        # No usable SEQRES: the observed residues, in order, are the sequence.
        return tuple(names), np.arange(len(names)), []
    sequence = list(full_sequence)
    occupancy = chain_atoms.occupancy
    best: dict[int, int] = {}
    for r, seq_id in enumerate(seq_ids):
        mean_occ = occupancy[residue_starts[r] : residue_starts[r + 1]].mean()
        other = best.get(seq_id)
        if other is None or mean_occ > occupancy[residue_starts[other] : residue_starts[other + 1]].mean():
            best[seq_id] = r
    dropped = [r for r, seq_id in enumerate(seq_ids) if best[seq_id] != r]
    for seq_id, r in best.items():
        sequence[seq_id - 1] = names[r]
    return tuple(sequence), seq_ids - 1, dropped


def _author_numbering(
    chain_atoms, residue_starts, positions, dropped, length: int, path: Path
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(auth_seq_id, insertion code) of each of a chain's ``length`` sequence positions: the
    file's for observed residues, numbered on from the nearest observed one for the rest."""
    first_atoms = residue_starts[:-1]
    try:
        observed_numbers = chain_atoms.auth_seq_id[first_atoms].astype(np.int64)
    except ValueError as exc:
        raise StructureError(f"{path}: non-integer auth_seq_id in chain {chain_atoms.chain_id[0]} ({exc})") from exc
    observed_codes = np.char.strip(chain_atoms.ins_code[first_atoms].astype(str))
    kept = np.setdiff1d(np.arange(len(first_atoms)), np.asarray(dropped, dtype=np.int64))
    observed_positions = np.asarray(positions)[kept]
    observed_numbers, observed_codes = observed_numbers[kept], observed_codes[kept]
    everywhere = np.arange(length)
    nearest = np.abs(everywhere[:, None] - observed_positions[None, :]).argmin(axis=1)
    numbers = observed_numbers[nearest] + everywhere - observed_positions[nearest]
    codes = np.where(observed_positions[nearest] == everywhere, observed_codes[nearest], "")
    codes = np.where(np.isin(codes, ["?", "."]), "", codes)
    return tuple(int(n) for n in numbers), tuple(str(c) for c in codes)


def _entity_kinds(block) -> dict[str, str]:
    kinds: dict[str, str] = {}
    ids, types = _column(block, "entity", "id"), _column(block, "entity", "type")
    if ids is not None and types is not None:
        for entity, entity_type in zip(ids, types):
            if entity_type.lower() != "polymer":
                kinds[entity] = "ligand"
    poly_ids, poly_types = _column(block, "entity_poly", "entity_id"), _column(block, "entity_poly", "type")
    if poly_ids is not None and poly_types is not None:
        for entity, poly_type in zip(poly_ids, poly_types):
            kinds[entity] = _POLY_TYPES.get(poly_type.lower(), "ligand")
    return kinds


def _entity_sequences(block) -> dict[str, list[str]]:
    entity, num, mon = (_column(block, "entity_poly_seq", c) for c in ("entity_id", "num", "mon_id"))
    sequences: dict[str, dict[int, str]] = {}
    if entity is None or num is None or mon is None:
        return {}
    for e, n, m in zip(entity, num, mon):
        sequences.setdefault(e, {}).setdefault(int(n), m)  # first of heterogeneous entries
    return {e: [s[n] for n in sorted(s)] for e, s in sequences.items() if sorted(s) == list(range(1, len(s) + 1))}


def _guess_kind(res_names: np.ndarray) -> str:
    """Chain kind from residue names when the file has no entity records."""
    import biotite.structure.info as info

    names = set(res_names.tolist())
    if len(names & set(info.amino_acid_names())) > len(names) / 2:
        return "protein"
    nucleotides = names & set(info.nucleotide_names())
    if len(nucleotides) > len(names) / 2:
        return "dna" if any(n.startswith("D") for n in nucleotides) else "rna"
    return "ligand"


def _first(block, category: str, name: str) -> str | None:
    values = _column(block, category, name)
    if values is None or not len(values) or values[0] in ("?", "."):
        return None
    return str(values[0])


def _resolution(block) -> float | None:
    for category, name in (
        ("refine", "ls_d_res_high"),
        ("reflns", "d_resolution_high"),
        ("em_3d_reconstruction", "resolution"),
    ):
        value = _first(block, category, name)
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _entry_id(block, path: Path) -> str:
    entry = _first(block, "entry", "id")
    if entry and re.fullmatch(r"[0-9A-Za-z]{4}", entry):
        return entry.lower()
    return path.name.split(".")[0].lower()
