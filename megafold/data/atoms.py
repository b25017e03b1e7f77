"""biotite ``AtomArray``s: read a structure into one, build one from plain arrays (model
output), write one as mmCIF or PDB text.

Unlike :func:`megafold.data.load_structure` (which reduces a file to megafold's ``Structure``),
these keep every atom and annotation of the file as written (author chain ids and numbering,
B-factors), so that what is written back matches the source. biotite is imported inside the
functions, so ``import megafold.data`` does not need it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from megafold.data.structures import _read_text
from megafold.errors import StructureError

if TYPE_CHECKING:
    from biotite.structure import AtomArray

StructureLike = Union[str, os.PathLike, "AtomArray"]


# --------------------------------------------------------------------------- reading


def _looks_like_mmcif(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped.startswith("data_")
    return False


def load_atoms(structure: StructureLike) -> AtomArray:
    """Read a structure into a biotite ``AtomArray`` (first model, first altloc, B-factors).

    ``structure``: a path to mmCIF/PDB (gzipped or bzip2ed allowed), mmCIF/PDB text (any string with a
    newline), or an ``AtomArray`` (copied). Malformed input raises ``StructureError`` naming
    the file.
    """
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    if isinstance(structure, struc.AtomArray):
        atoms = structure.copy()
        if "b_factor" not in atoms.get_annotation_categories():
            atoms.set_annotation("b_factor", np.zeros(atoms.array_length(), dtype=np.float32))
        source = "atom array"
    else:
        if isinstance(structure, str) and "\n" in structure:
            text, source = structure, "structure text"
        elif isinstance(structure, (str, os.PathLike)):
            path = Path(structure)
            text, source = _read_text(path), str(path)
        else:
            raise StructureError(
                f"expected a path, mmCIF/PDB text or a biotite AtomArray, got {type(structure).__name__}"
            )
        is_mmcif = _looks_like_mmcif(text)
        try:
            if is_mmcif:
                atoms = pdbx.get_structure(
                    pdbx.CIFFile.read(io.StringIO(text)), model=1, extra_fields=["b_factor"]
                )
            else:
                atoms = pdb.PDBFile.read(io.StringIO(text)).get_structure(model=1, extra_fields=["b_factor"])
        except Exception as exc:  # biotite raises many types for bad files; name the file
            kind = "mmCIF" if is_mmcif else "PDB"
            raise StructureError(f"{source}: cannot parse as {kind}: {exc}") from exc
    if atoms.array_length() == 0:
        raise StructureError(f"{source}: no atoms")
    if not np.isfinite(atoms.coord).all():
        raise StructureError(f"{source}: coordinates contain NaN or inf")
    return atoms


def to_numpy(values: Any) -> np.ndarray:
    """A numpy array of ``values`` (a torch tensor on any device and float dtype, or array-like)."""
    if hasattr(values, "detach"):  # a torch tensor on any device, any float dtype
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def atom_array(
    coords: Any,
    atom_names: Any,
    res_names: Any,
    chain_ids: Any,
    res_ids: Any,
    elements: Any,
    *,
    plddt: Any = None,
    hetero: Any = None,
) -> AtomArray:
    """Build a biotite ``AtomArray`` from plain per-atom arrays (numpy or torch).

    coords ``[A, 3]`` in Angstrom; atom_names, res_names, chain_ids, elements ``[A]`` strings;
    res_ids ``[A]`` integers; plddt ``[A]`` in 0..100 (stored as the B-factor), default 0;
    hetero ``[A]`` bool (HETATM), default: every residue that is not an amino acid or a
    nucleotide in the CCD. Wrong shapes or values raise ``StructureError``.
    """
    import biotite.structure as struc

    coords = to_numpy(coords).astype(np.float32)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise StructureError(f"atom arrays: coords must have shape [atoms, 3], got {list(coords.shape)}")
    n_atoms = coords.shape[0]
    if n_atoms == 0:
        raise StructureError("atom arrays: no atoms")
    if not np.isfinite(coords).all():
        raise StructureError(
            f"atom arrays: {int((~np.isfinite(coords)).any(-1).sum())} atoms have NaN/inf coordinates"
        )

    def per_atom(name: str, values: Any) -> np.ndarray:
        array = to_numpy(values)
        if array.shape != (n_atoms,):
            raise StructureError(f"atom arrays: {name} must have shape [{n_atoms}], got {list(array.shape)}")
        return array

    atoms = struc.AtomArray(n_atoms)
    atoms.coord = coords
    atoms.atom_name = per_atom("atom_names", atom_names).astype(str)
    atoms.res_name = per_atom("res_names", res_names).astype(str)
    atoms.chain_id = per_atom("chain_ids", chain_ids).astype(str)
    atoms.element = np.char.upper(per_atom("elements", elements).astype(str))
    res_id_values = per_atom("res_ids", res_ids)
    if not np.issubdtype(res_id_values.dtype, np.integer):
        raise StructureError(f"atom arrays: res_ids must be integers, got dtype {res_id_values.dtype}")
    atoms.res_id = res_id_values
    if plddt is None:
        b_factor = np.zeros(n_atoms, dtype=np.float32)
    else:
        b_factor = per_atom("plddt", plddt).astype(np.float32)
        if not (np.isfinite(b_factor).all() and b_factor.min() >= 0 and b_factor.max() <= 100):
            raise StructureError(
                "atom arrays: plddt must be finite and within 0..100 "
                f"(got {np.nanmin(b_factor):.3g}..{np.nanmax(b_factor):.3g}; scale 0..1 values by 100)"
            )
    atoms.set_annotation("b_factor", b_factor)
    if hetero is None:
        atoms.hetero = ~polymer_atoms(atoms)
    else:
        atoms.hetero = per_atom("hetero", hetero).astype(bool)
    return atoms


# --------------------------------------------------------------------------- writing


def to_pdb(structure: StructureLike) -> str:
    """PDB text of a structure (pLDDT or B-factor in the B-factor column).

    PDB holds at most 99,999 atoms and one-character chain ids; larger or multi-letter-chain
    structures raise ``StructureError`` (use ``to_mmcif``).
    """
    import biotite.structure.io.pdb as pdb

    atoms = load_atoms(structure)
    long_ids = sorted({chain for chain in atoms.chain_id if len(chain) > 1})
    if long_ids:
        raise StructureError(f"chain ids {long_ids[:5]} do not fit PDB's one-character column; use to_mmcif")
    if atoms.array_length() > 99_999:
        raise StructureError(f"{atoms.array_length()} atoms do not fit PDB's serial column; use to_mmcif")
    pdb_file = pdb.PDBFile()
    pdb_file.set_structure(atoms)
    buffer = io.StringIO()
    pdb_file.write(buffer)
    return buffer.getvalue()


def to_mmcif(structure: StructureLike) -> str:
    """mmCIF text (the ``atom_site`` category) of a structure, B-factor column included."""
    import biotite.structure.io.pdbx as pdbx

    atoms = load_atoms(structure)
    cif_file = pdbx.CIFFile()
    pdbx.set_structure(cif_file, atoms)
    buffer = io.StringIO()
    cif_file.write(buffer)
    return buffer.getvalue()


def polymer_atoms(atoms: AtomArray) -> np.ndarray:
    """``[A]`` bool: the atoms of amino acids and nucleotides (by the CCD)."""
    import biotite.structure as struc

    return struc.filter_amino_acids(atoms) | struc.filter_nucleotides(atoms)
