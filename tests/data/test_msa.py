import numpy as np
import pytest

from megafold.data.msa import Msa, SequenceDatabase, find_msa_file, pair_rows, parse_a3m, read_msa, search_msa, write_a3m
from megafold.data.pipeline import chain_msas, chain_query, make_example

UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
PARR = "MGSSHHHHHHSSGLVPGSHMDKKETKHLLKIKKEDYPQIFDFLENVPRGTKTAHIREALRRYIEEIGENP"


def test_a3m_rows_deletions_species_roundtrip(tmp_path):
    msa = parse_a3m(">query\nMKV-L\n>h1 x OS=Homo sapiens GN=abc\nMKaaV-L\n>h2 OS=Mus musculus PE=1\n-KVl-L\n")
    np.testing.assert_array_equal(msa.rows.astype(str), [list("MKV-L"), list("MKV-L"), list("-KV-L")])
    np.testing.assert_array_equal(msa.deletions, [[0, 0, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 1, 0]])
    assert msa.species() == ["", "Homo sapiens", "Mus musculus"]
    write_a3m(msa, tmp_path / "1abc" / "A.a3m")
    assert find_msa_file(tmp_path, "1abc", "A") == [tmp_path / "1abc" / "A.a3m"]
    again = read_msa(tmp_path / "1abc" / "A.a3m")
    assert again == msa


def test_a3m_with_wrong_column_count_is_rejected():
    with pytest.raises(ValueError, match="query columns"):
        parse_a3m(">q\nMKV\n>bad\nMKVLL\n")


def test_stockholm_and_a3m_from_openfold(shared_data, structure):
    folder = shared_data / "msa_examples" / "2q2k" / "A"
    sto = read_msa(folder / "uniprot_hits.sto.gz", query=PARR)
    assert sto.query == PARR and sto.rows.shape[1] == len(PARR) and sto.depth > 10
    assert sto.species()[1] == "Staphylococcus schleiferi"
    a3m = read_msa(folder / "bfd_uniclust_hits.a3m.gz", query=PARR)
    assert a3m.rows.shape == (a3m.depth, len(PARR))
    # a folder of files per chain is merged (query first, deduplicated) for that chain
    entry = structure("2q2k")
    msas, origin = chain_msas(entry, key="2q2k", msa_dir=shared_data / "msa_examples")
    protein = [c for c, chain in enumerate(entry.chains) if chain.kind == "protein"]
    assert [origin[c] for c in protein] == ["file", "file"]
    merged = msas[protein[0]]
    assert merged.query == PARR and merged.depth > 10
    assert len({row.tobytes() for row in merged.rows}) == merged.depth
    sources = {d.split("_")[0].split("|")[0][:4] for d in merged.descriptions[1:]}
    assert len(sources) >= 2  # rows from several of the files (UniRef90, MGnify, UniProt, BFD)
    dna = next(c for c, chain in enumerate(entry.chains) if chain.kind == "dna")
    assert origin[dna] == "single" and msas[dna].query == "AGTATANACNAGTATATACT"


def test_jackhmmer_search_removes_self_hits():
    mutant = UBIQUITIN[:10] + "W" + UBIQUITIN[11:30] + "W" + UBIQUITIN[31:]
    database = SequenceDatabase(extra={"pdb|1ubq_A": UBIQUITIN, "pdb|9xyz_A": mutant})
    msa = search_msa(UBIQUITIN, database, exclude_prefix="pdb|1ubq_")
    assert msa.query == UBIQUITIN and msa.descriptions[0] == "query"
    assert msa.depth > 5 and msa.rows.shape == (msa.depth, len(UBIQUITIN))
    assert not any(d.startswith("pdb|1ubq_") for d in msa.descriptions)
    assert any(d.startswith("pdb|9xyz_A") for d in msa.descriptions)
    assert any(s for s in msa.species())  # UniProt hits carry OS=
    assert len({row.tobytes() for row in msa.rows}) == msa.depth  # deduplicated
    assert search_msa(UBIQUITIN, database, max_rows=3).depth == 3


def _msa(rows_species):
    aligned = ["MKVL"] + [row for row, _ in rows_species]
    descriptions = ["query"] + [f"hit{i} OS={sp} PE=1" for i, (_, sp) in enumerate(rows_species)]
    return Msa(tuple(aligned), tuple(descriptions))


def test_pairing_by_species():
    a = _msa([("MKVA", "Homo sapiens"), ("MKIL", "Mus musculus"), ("MRVL", "Danio rerio")])
    b = _msa([("MKVC", "Mus musculus"), ("MKVE", "Homo sapiens"), ("MKVD", "Bos taurus")])
    plan = pair_rows([a, b], [1, 2])
    assert plan[0].tolist() == [0, 0]
    a_species, b_species = a.species(), b.species()
    paired = plan[1:3]
    for ra, rb in paired:
        assert a_species[ra] == b_species[rb]
    # the unpaired rest is stacked densely: Danio rerio (A) next to Bos taurus (B)
    assert plan[3:].tolist() == [[3, 3]]
    # homomers are not paired: copies of one entity share rows, stacked as they are
    homomer = pair_rows([a, a], [1, 1])
    assert homomer.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]


def test_msa_features_pair_heteromer_chains(structure):
    entry = structure("4zhl")
    proteins = entry.polymer_chains()
    msas = {
        proteins[0]: Msa.single(chain_query(entry, proteins[0])),
        proteins[1]: Msa.single(chain_query(entry, proteins[1])),
    }
    length0, length1 = (len(chain_query(entry, c)) for c in proteins)
    msas[proteins[0]] = Msa(
        (msas[proteins[0]].query, "-" * length0, "A" * length0),
        ("query", "x OS=Homo sapiens", "y OS=Rattus"),
    )
    msas[proteins[1]] = Msa((msas[proteins[1]].query, "C" * length1), ("query", "z OS=Homo sapiens"))
    example = make_example(entry, msas=msas)
    msa = example["msa"]
    chain0 = example["asym_id"] == proteins[0] + 1
    chain1 = example["asym_id"] == proteins[1] + 1
    # row 1: the Homo sapiens pair (gaps in chain 0, C in chain 1)
    assert (msa[1, chain0] == 31).all() and (msa[1, chain1] == 4).all()
    # row 2: chain 0's unpaired Rattus row, chain 1 has nothing left
    assert (msa[2, chain0] == 0).all() and (msa[2, chain1] == 31).all()
    profile = example["profile"]
    np.testing.assert_allclose(profile.sum(axis=1), 1.0, rtol=1e-6)
    assert example["msa_mask"].all() and not example["has_deletion"].any()


def test_unreadable_or_mismatched_msa_files_name_the_file(tmp_path):
    (tmp_path / "bad.a3m").write_text("no header line\n")
    with pytest.raises(ValueError, match="bad.a3m"):
        read_msa(tmp_path / "bad.a3m")
    (tmp_path / "short.a3m").write_text(">query\nMKV\n")
    with pytest.raises(ValueError, match=r"short\.a3m.*3 query columns.*5 residues"):
        read_msa(tmp_path / "short.a3m", query="MKVLL")
