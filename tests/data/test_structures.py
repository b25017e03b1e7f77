import gzip

import numpy as np
import pytest

from megafold.data import load_structure
from megafold.errors import StructureError


def test_mmcif_gz_chains_atoms_and_metadata(structure):
    ubq = structure("1ubq")
    assert ubq.pdb_id == "1ubq"
    assert [(c.kind, len(c.sequence)) for c in ubq.chains] == [("protein", 76)]
    assert ubq.chains[0].sequence[:3] == ("MET", "GLN", "ILE")
    assert ubq.num_atoms == 602  # heavy atoms; the file's 58 waters are dropped
    assert not np.isin(ubq.element, ["H", "D"]).any()
    assert np.isfinite(ubq.coord).all() and ubq.coord.dtype == np.float32
    assert ubq.method == "X-RAY DIFFRACTION" and ubq.resolution == pytest.approx(1.8)
    # atoms are grouped by chain then residue; bonds join atoms of the structure
    assert (np.diff(ubq.residue) >= 0).all()
    assert ubq.bonds.max() < ubq.num_atoms and len(ubq.bonds) > ubq.num_atoms


def test_dna_ligand_and_unobserved_residues(structure):
    entry = structure("2q2k")
    kinds = sorted({c.kind for c in entry.chains})
    assert kinds == ["dna", "ligand", "protein"]
    protein = next(c for c in entry.chains if c.kind == "protein")
    observed = np.unique(entry.residue[entry.chain == entry.chains.index(protein)])
    # SEQRES has 70 residues (His tag included); far fewer carry coordinates
    assert len(protein.sequence) == 70 and len(observed) < 50
    dna = next(c for c in entry.chains if c.kind == "dna")
    assert "5IU" in dna.sequence  # the modified nucleotide stays in the chain
    # the two protein chains are copies of one entity
    proteins = [c for c in entry.chains if c.kind == "protein"]
    assert proteins[0].entity_id == proteins[1].entity_id


def _gemmi_author_labels(shared_data, pdb_id: str) -> set[tuple[str, int, str]]:
    import gemmi

    model = gemmi.read_structure(str(shared_data / "structures" / f"{pdb_id}.cif.gz"))[0]
    return {
        (chain.name, residue.seqid.num, residue.seqid.icode.strip())
        for chain in model
        for residue in chain
        if residue.name not in ("HOH", "DOD")
    }


def _observed_author_labels(entry) -> set[tuple[str, int, str]]:
    return {
        (entry.chains[c].auth_chain_id, entry.chains[c].auth_seq_id[r], entry.chains[c].ins_code[r])
        for c, r in zip(entry.chain.tolist(), entry.residue.tolist())
    }


def test_author_numbering_keeps_insertion_codes(structure, shared_data):
    urokinase = structure("4zhl")  # chymotrypsin numbering: insertion codes A-D
    assert _observed_author_labels(urokinase) == _gemmi_author_labels(shared_data, "4zhl")
    assert {code for chain in urokinase.chains for code in chain.ins_code} >= {"", "A", "B", "C", "D"}
    for chain in urokinase.chains:
        assert len(chain.auth_seq_id) == len(chain.ins_code) == len(chain.sequence)


def test_unobserved_residues_are_numbered_on_from_their_neighbours(structure, shared_data):
    entry = structure("2q2k")
    assert _observed_author_labels(entry) == _gemmi_author_labels(shared_data, "2q2k")
    index = next(i for i, c in enumerate(entry.chains) if c.kind == "protein")
    protein = entry.chains[index]
    observed = np.unique(entry.residue[entry.chain == index])
    first, last = observed.min(), observed.max()
    assert first > 0 and len(protein.sequence) - 1 > last  # unobserved His tag before, tail after
    numbers = np.array(protein.auth_seq_id)
    np.testing.assert_array_equal(np.diff(numbers[: first + 1]), 1)
    np.testing.assert_array_equal(np.diff(numbers[last:]), 1)
    assert all(code == "" for r, code in enumerate(protein.ins_code) if r not in observed)


def test_altloc_keeps_highest_occupancy(structure):
    # 5pti Glu7 side chain: altloc A occupancy 0.7 at CB (33.865, 5.265, -4.204), B 0.3
    pti = structure("5pti")
    chain = next(i for i, c in enumerate(pti.chains) if c.kind == "protein")
    cb = np.nonzero((pti.chain == chain) & (pti.residue == 6) & (pti.atom_name == "CB"))[0]
    assert len(cb) == 1
    np.testing.assert_allclose(pti.coord[cb[0]], [33.865, 5.265, -4.204], atol=1e-3)
    assert pti.occupancy[cb[0]] == pytest.approx(0.7)


def test_microheterogeneity_keeps_one_residue_per_position(structure):
    crambin = structure("1ejg")
    keys = set()
    for chain, residue, name in zip(crambin.chain, crambin.residue, crambin.atom_name):
        assert (chain, residue, name) not in keys
        keys.add((chain, residue, name))


def _pdb_text(shared_data, pdb_id: str) -> str:
    import gemmi

    return gemmi.read_structure(str(shared_data / "structures" / f"{pdb_id}.cif.gz")).make_pdb_string()


def test_pdb_format_matches_mmcif(tmp_path, shared_data, structure):
    path = tmp_path / "1hvr.pdb"
    path.write_text(_pdb_text(shared_data, "1hvr"))
    from_pdb, from_cif = load_structure(path), structure("1hvr")
    assert [(c.kind, c.sequence) for c in from_pdb.chains] == [(c.kind, c.sequence) for c in from_cif.chains]
    assert [(c.auth_seq_id, c.ins_code) for c in from_pdb.chains] == [(c.auth_seq_id, c.ins_code) for c in from_cif.chains]
    assert from_pdb.num_atoms == from_cif.num_atoms
    np.testing.assert_allclose(from_pdb.coord, from_cif.coord, atol=1e-3)


def test_pdb_without_seqres_first_model_waters_and_hydrogens(tmp_path, shared_data, structure):
    lines = [ln for ln in _pdb_text(shared_data, "1ubq").splitlines() if ln.startswith(("ATOM", "HETATM"))]
    atoms = [ln for ln in lines if ln[17:20] != "HOH"]
    extra = [
        "HETATM 9001  O   HOH W   1      10.000  10.000  10.000  1.00 10.00           O",
        "ATOM   9002  H   MET A   1      27.000  24.000   2.000  1.00 10.00           H",
    ]
    shifted = [ln[:30] + f"{float(ln[30:38]) + 50:8.3f}" + ln[38:] for ln in atoms]
    text = "\n".join(["MODEL        1", *atoms, *extra, "ENDMDL", "MODEL        2", *shifted, "ENDMDL", "END"])
    path = tmp_path / "ubq_two_models.pdb.gz"
    path.write_bytes(gzip.compress(text.encode()))
    parsed = load_structure(path)
    assert parsed.num_atoms == 602  # model 1 only, no water, no hydrogen
    np.testing.assert_allclose(parsed.coord, structure("1ubq").coord, atol=1e-3)
    assert len(parsed.chains[0].sequence) == 76  # sequence from the observed residues


MALFORMED = {
    "empty.cif": b"",
    "not_cif.cif": b"this is a README, not a structure\nsecond line\n",
    "no_atoms.cif": b"data_1abc\n_entry.id 1abc\n_cell.length_a 10.0\n",
    "truncated.cif.gz": gzip.compress(b"data_1abc\n" * 2000)[:200],
}


def _ubq_text(shared_data) -> str:
    return gzip.decompress((shared_data / "structures" / "1ubq.cif.gz").read_bytes()).decode()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_raise_structure_error_naming_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(MALFORMED[name])
    with pytest.raises(StructureError, match=name.replace(".", r"\.")):
        load_structure(path)


def test_truncated_atom_table(tmp_path, shared_data):
    text = _ubq_text(shared_data)
    path = tmp_path / "cut.cif"
    path.write_text(text[: text.index("ATOM 300 ") + 25])  # stops mid-row
    with pytest.raises(StructureError, match="cut.cif"):
        load_structure(path)


def test_non_numeric_coordinates(tmp_path, shared_data):
    text = _ubq_text(shared_data)
    start = text.index("\nATOM 1 ") + 1
    line = text[start : text.index("\n", start)]
    fields = line.split()
    fields[10] = "abc"  # Cartn_x
    path = tmp_path / "nan_coords.cif"
    path.write_text(text.replace(line, " ".join(fields)))
    with pytest.raises(StructureError, match=r"nan_coords\.cif.*non-numeric"):
        load_structure(path)


def test_no_polymer(tmp_path):
    text = "\n".join(
        [
            "HETATM    1 FE   HEM A   1      10.000  10.000  10.000  1.00 10.00          FE",
            "HETATM    2  O   HOH A   2      12.000  10.000  10.000  1.00 10.00           O",
            "END",
        ]
    )
    path = tmp_path / "only_ligand.pdb"
    path.write_text(text)
    with pytest.raises(StructureError, match=r"only_ligand\.pdb.*no polymer"):
        load_structure(path)


def test_missing_file(tmp_path):
    with pytest.raises(StructureError, match="nowhere.cif"):
        load_structure(tmp_path / "nowhere.cif")


def test_bzip2_compressed_mmcif(tmp_path, shared_data, structure):
    import bz2

    path = tmp_path / "1ubq.cif.bz2"
    path.write_bytes(bz2.compress(_ubq_text(shared_data).encode()))
    parsed = load_structure(path)
    np.testing.assert_array_equal(parsed.coord, structure("1ubq").coord)
