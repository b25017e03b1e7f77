import numpy as np
import pytest

from megafold.data import ccd
from megafold.data.features import validate_example
from megafold.data.pipeline import make_example
from megafold.data.tokenize import RESTYPES, atom_name_chars, tokenize


def _atom_names(features) -> list[str]:
    return ["".join(chr(c + 32) for c in row).strip() for row in features["ref_atom_name_chars"]]


def test_protein_one_token_per_residue(structure):
    tokens = tokenize(structure("1ubq"))
    f = tokens.features
    assert tokens.num_tokens == 76 and not tokens.per_atom.any()
    assert [RESTYPES[r] for r in f["restype"][:3]] == ["MET", "GLN", "ILE"]
    assert f["is_protein"].all() and not (f["is_rna"] | f["is_dna"] | f["is_ligand"]).any()
    np.testing.assert_array_equal(f["residue_index"], np.arange(1, 77))
    names = np.array(_atom_names(f))
    assert (names[f["token_center_atom"]] == "CA").all()
    gly = f["restype"] == RESTYPES.index("GLY")
    assert (names[f["token_rep_atom"][gly]] == "CA").all() and (names[f["token_rep_atom"][~gly]] == "CB").all()
    assert (f["atom_to_token"][f["token_center_atom"]] == np.arange(76)).all()
    assert f["atom_resolved"].all() and len(f["atom_resolved"]) == 602
    assert not f["token_bonds"].any()  # polymer-polymer bonds are not token bonds


def test_dna_modified_residue_and_ligand(structure):
    entry = structure("2q2k")
    tokens = tokenize(entry)
    f = tokens.features
    per_atom_names = {entry.chains[c].sequence[r] for c, r in zip(tokens.chain[tokens.per_atom], tokens.residue[tokens.per_atom])}
    assert per_atom_names == {"5IU", "EPE"}
    is_5iu = np.array([entry.chains[c].sequence[r] == "5IU" for c, r in zip(tokens.chain, tokens.residue)])
    # a modified nucleotide: one token per atom, still DNA, restype of unknown DNA (parent DU)
    assert f["is_dna"][is_5iu].all() and (f["restype"][is_5iu] == RESTYPES.index("DN")).all()
    ligand = f["is_ligand"]
    epe = ccd.component("EPE")
    assert ligand.sum() == len(epe.atom_names) and (f["restype"][ligand] == RESTYPES.index("UNK")).all()
    dna = f["is_dna"] & ~is_5iu
    assert set(RESTYPES[r] for r in f["restype"][dna]) <= {"DA", "DC", "DG", "DT"}
    # one conformer per residue: all atoms of one 5IU share a ref_space_uid
    atoms_5iu = np.isin(f["atom_to_token"], np.nonzero(is_5iu)[0])
    assert len(np.unique(f["ref_space_uid"][atoms_5iu])) == 2
    # intra-ligand CCD bonds become token bonds, symmetric, never on the diagonal
    bonds = f["token_bonds"]
    assert (bonds == bonds.T).all() and not bonds.diagonal().any()
    assert bonds[np.ix_(ligand, ligand)].sum() // 2 == len(epe.bonds)
    # the 5IU atoms bond to their DNA neighbours (O3'-P links): polymer-ligand style bonds
    assert bonds[np.ix_(is_5iu, dna)].any()
    # unobserved protein residues are tokens with unresolved atoms
    assert (~f["atom_resolved"][np.isin(f["atom_to_token"], np.nonzero(f["is_protein"])[0])]).any()


def test_reference_conformer_is_ccd_geometry(structure):
    f = tokenize(structure("1ubq")).features
    names = _atom_names(f)
    first = np.nonzero(f["atom_to_token"] == 0)[0]  # Met1
    pos = {names[i]: f["ref_pos"][i] for i in first}
    assert np.linalg.norm(pos["N"] - pos["CA"]) == pytest.approx(1.46, abs=0.05)
    assert np.linalg.norm(pos["SD"] - pos["CE"]) == pytest.approx(1.79, abs=0.05)
    np.testing.assert_allclose(f["ref_pos"][first].mean(axis=0), 0.0, atol=1e-4)  # centred
    assert f["ref_mask"].all()
    elements = dict(zip((names[i] for i in first), f["ref_element"][first]))
    assert (elements["N"], elements["CA"], elements["SD"]) == (7, 6, 16)


def test_atom_name_chars():
    np.testing.assert_array_equal(atom_name_chars("CA"), [ord("C") - 32, ord("A") - 32, 0, 0])
    np.testing.assert_array_equal(atom_name_chars("C1'"), [35, 17, 7, 0])


@pytest.mark.parametrize("pdb_id", ["1hvr", "3mht", "1ejg", "4oz7"])
def test_examples_validate(structure, pdb_id):
    example = make_example(structure(pdb_id))
    sizes = validate_example(example, pdb_id)
    assert sizes["msa_row"] == 1 and sizes["template"] == 1  # no MSAs or templates passed
    f = example
    assert (f["msa"][0] == f["restype"]).all()
    assert not f["template_mask"].any()
    # masked data is zero
    assert not f["atom_pos"][~f["atom_resolved"]].any()
    assert not f["ref_pos"][~f["ref_mask"]].any()
