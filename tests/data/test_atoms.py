"""megafold.data.atoms: reading structures into biotite AtomArrays, building them from plain
arrays (model output) and writing mmCIF / PDB text, checked against gemmi."""

import os
from pathlib import Path

import gemmi
import numpy as np
import pytest

import megafold.data.atoms as atoms_io
from megafold.errors import StructureError

STRUCTURES = Path(os.environ["MEGAFOLD_SHARED_DATA"]) / "structures"


def gemmi_atoms(structure: gemmi.Structure) -> list[tuple]:
    """(chain, residue name, residue number, atom name, x, y, z, B) of model 1, first altloc,
    sorted (gemmi groups a chain's ligands differently when it reads PDB and mmCIF)."""
    structure.remove_alternative_conformations()
    return sorted(
        (chain.name, residue.name, residue.seqid.num, atom.name, *atom.pos.tolist(), atom.b_iso)
        for chain in structure[0]
        for residue in chain
        for atom in residue
    )


@pytest.mark.parametrize("pdb_id", ["1ubq", "2q2k", "3mht"])
def test_pdb_and_mmcif_round_trip_real_structures(pdb_id):
    path = STRUCTURES / f"{pdb_id}.cif.gz"
    reference = gemmi_atoms(gemmi.read_structure(str(path)))
    written = {
        "pdb": gemmi.read_pdb_string(atoms_io.to_pdb(path)),
        "mmcif": gemmi.make_structure_from_block(gemmi.cif.read_string(atoms_io.to_mmcif(path)).sole_block()),
    }
    for kind, structure in written.items():
        atoms = gemmi_atoms(structure)
        assert len(atoms) == len(reference), kind
        assert [atom[:4] for atom in atoms] == [atom[:4] for atom in reference], kind
        coords = np.array([atom[4:7] for atom in atoms])
        reference_coords = np.array([atom[4:7] for atom in reference])
        assert np.abs(coords - reference_coords).max() < 1e-3, kind
        b_factors = np.array([atom[7] for atom in atoms])
        assert np.abs(b_factors - np.array([atom[7] for atom in reference])).max() < 0.006, kind


def test_plddt_lands_in_the_b_factor_column():
    rng = np.random.default_rng(1)
    truth = atoms_io.load_atoms(STRUCTURES / "1ubq.cif.gz")
    plddt = rng.uniform(0, 100, size=truth.array_length())
    prediction = atoms_io.atom_array(
        truth.coord + rng.normal(scale=0.5, size=truth.coord.shape),
        truth.atom_name, truth.res_name, truth.chain_id, truth.res_id, truth.element, plddt=plddt,
    )
    pdb_text = atoms_io.to_pdb(prediction)
    columns = [float(line[60:66]) for line in pdb_text.splitlines() if line.startswith(("ATOM", "HETATM"))]
    np.testing.assert_allclose(columns, plddt, atol=0.005 + 1e-9)
    from_mmcif = gemmi_atoms(
        gemmi.make_structure_from_block(gemmi.cif.read_string(atoms_io.to_mmcif(prediction)).sole_block())
    )
    from_pdb = gemmi_atoms(gemmi.read_pdb_string(pdb_text))
    np.testing.assert_allclose([atom[7] for atom in from_mmcif], [atom[7] for atom in from_pdb], atol=0.01)


def test_atom_array_takes_torch_tensors_and_rejects_bad_input():
    import torch

    truth = atoms_io.load_atoms(STRUCTURES / "1ubq.cif.gz")
    names = (truth.atom_name, truth.res_name, truth.chain_id, truth.res_id, truth.element)
    coords = torch.from_numpy(truth.coord).to(torch.bfloat16)
    built = atoms_io.atom_array(coords, *names, plddt=torch.full((truth.array_length(),), 80.0))
    assert built.array_length() == truth.array_length() and not built.hetero.any()
    np.testing.assert_allclose(built.coord, truth.coord, atol=0.5)  # bf16 keeps ~3 digits
    with pytest.raises(StructureError, match=r"coords must have shape \[atoms, 3\]"):
        atoms_io.atom_array(truth.coord[:, :2], *names)
    with pytest.raises(StructureError, match="res_names must have shape"):
        atoms_io.atom_array(truth.coord, truth.atom_name, truth.res_name[:-1], *names[2:])
    bad = truth.coord.copy()
    bad[3, 1] = np.nan
    with pytest.raises(StructureError, match="1 atoms have NaN/inf"):
        atoms_io.atom_array(bad, *names)
    with pytest.raises(StructureError, match="within 0..100"):
        atoms_io.atom_array(truth.coord, *names, plddt=np.full(truth.array_length(), 101.0))
    with pytest.raises(StructureError, match="res_ids must be integers"):
        atoms_io.atom_array(truth.coord, *names[:3], truth.res_id.astype(float), truth.element)


def test_pdb_files_and_text_read_back(tmp_path):
    import gzip

    original = atoms_io.load_atoms(STRUCTURES / "3mht.cif.gz")
    text = atoms_io.to_pdb(original)
    packed = tmp_path / "3mht.pdb.gz"
    with gzip.open(packed, "wt") as handle:
        handle.write(text)
    for source in (text, packed):
        atoms = atoms_io.load_atoms(source)
        assert atoms.array_length() == original.array_length()
        np.testing.assert_allclose(atoms.coord, original.coord, atol=1e-3)
        assert (atoms.res_name == original.res_name).all() and (atoms.hetero == original.hetero).all()


def test_multi_letter_chains_need_mmcif():
    atoms = atoms_io.load_atoms(STRUCTURES / "1ubq.cif.gz")
    atoms.chain_id[:] = "AB"
    with pytest.raises(StructureError, match="use to_mmcif"):
        atoms_io.to_pdb(atoms)
    assert "AB" in atoms_io.to_mmcif(atoms)


def test_load_atoms_names_the_file_on_bad_input(tmp_path):
    with pytest.raises(StructureError, match="missing.cif: no such file"):
        atoms_io.load_atoms(tmp_path / "missing.cif")
    broken = tmp_path / "broken.cif"
    broken.write_text("data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1\n")
    with pytest.raises(StructureError, match="broken.cif: cannot parse as mmCIF"):
        atoms_io.load_atoms(broken)
    with pytest.raises(StructureError, match="structure text: cannot parse as PDB"):
        atoms_io.load_atoms("REMARK nothing here\nEND\n")
