"""Chemical Component Dictionary look-ups: reference conformers, charges, bonds, parents.

Everything comes from the CCD that biotite ships (``biotite.structure.info``); nothing is
downloaded. Hydrogens are dropped: megafold models heavy atoms only, as AF3 does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

HYDROGENS = frozenset({"H", "D", "T"})


@dataclass(frozen=True)
class Component:
    """One CCD entry, heavy atoms only, in CCD atom order.

    ``ideal_pos`` is the CCD ideal conformer (``pdbx_model_Cartn_*_ideal``, the model
    coordinates where the ideal ones are missing), in the CCD's frame: ``[K, 3]``.
    """

    name: str
    type: str  # chem_comp.type, upper case, e.g. "L-PEPTIDE LINKING", "NON-POLYMER"
    parent: str | None  # standard parent of a modified residue (mon_nstd_parent_comp_id)
    atom_names: tuple[str, ...]
    atomic_numbers: np.ndarray  # [K] int
    charges: np.ndarray  # [K] float32
    ideal_pos: np.ndarray  # [K, 3] float32
    pos_mask: np.ndarray  # [K] bool: the CCD gives coordinates for this atom
    leaving: np.ndarray  # [K] bool: pdbx_leaving_atom_flag (OXT, OP3, ...)
    bonds: np.ndarray  # [B, 2] int32 atom index pairs

    def atom_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.atom_names)}


@lru_cache(maxsize=None)
def atomic_number(element: str) -> int:
    """Atomic number of an element symbol in any case ('FE', 'Fe'); 0 when unknown."""
    import gemmi

    return int(gemmi.Element(element.strip() or "X").atomic_number)


@lru_cache(maxsize=None)
def component(name: str) -> Component | None:
    """The CCD entry ``name`` (e.g. "ALA", "HEM"), or None when the CCD does not have it."""
    import biotite.structure.info as info

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fallback coordinates will be used": expected
            atoms = info.residue(name, allow_missing_coord=True)
        leaving = info.get_from_ccd("chem_comp_atom", name, "pdbx_leaving_atom_flag")
        comp_type = info.get_from_ccd("chem_comp", name, "type")
        parent = info.get_from_ccd("chem_comp", name, "mon_nstd_parent_comp_id")
    except KeyError:
        return None
    heavy = ~np.isin(np.char.upper(atoms.element.astype(str)), list(HYDROGENS))
    index_of_heavy = np.cumsum(heavy) - 1
    bonds = atoms.bonds.as_array()[:, :2] if atoms.bonds is not None else np.zeros((0, 2), int)
    bonds = bonds[heavy[bonds[:, 0]] & heavy[bonds[:, 1]]]
    pos = atoms.coord[heavy].astype(np.float32)
    pos_mask = np.isfinite(pos).all(axis=1)
    pos = np.where(pos_mask[:, None], pos, 0.0).astype(np.float32)
    leaving_flags = np.asarray(leaving.as_array()) if leaving is not None else np.array([])
    leaving_flags = (
        leaving_flags[heavy] == "Y" if len(leaving_flags) == len(heavy) else np.zeros(heavy.sum(), bool)
    )
    parent_name = _first_value(parent)
    return Component(
        name=name,
        type=(_first_value(comp_type) or "OTHER").upper(),
        parent=parent_name.split(",")[0].strip() if parent_name else None,
        atom_names=tuple(atoms.atom_name[heavy].tolist()),
        atomic_numbers=np.array([atomic_number(e) for e in atoms.element[heavy]], np.int64),
        charges=atoms.charge[heavy].astype(np.float32),
        ideal_pos=pos,
        pos_mask=pos_mask,
        leaving=leaving_flags,
        bonds=index_of_heavy[bonds].astype(np.int32).reshape(-1, 2),
    )


def _first_value(column) -> str | None:
    if column is None:
        return None
    values = column.as_array()
    value = str(values[0]).strip() if len(values) else ""
    return None if value in ("", "?", ".") else value
