import numpy as np

from megafold.data.msa import Msa
from megafold.data.pipeline import chain_query, make_example
from megafold.data.templates import TemplateDatabase, search_templates, template_chains
from megafold.data.tokenize import RESTYPES

ZINC_FINGERS = ["1zaa", "1sp1", "1zfd", "1znf", "1sp2", "1ard"]


def _database(structure, ids):
    return TemplateDatabase([c for pdb_id in ids for c in template_chains(structure(pdb_id))])


def test_template_chain_backbone(structure):
    (chain,) = template_chains(structure("1ubq"))
    assert chain.name == "1ubq_A" and len(chain.restype) == 76
    assert chain.backbone_mask.all() and chain.rep_mask.all()
    # N-CA bond length from the observed backbone
    np.testing.assert_allclose(np.linalg.norm(chain.backbone[:, 0] - chain.backbone[:, 1], axis=-1), 1.46, atol=0.08)


def test_hits_exclude_own_entry_and_near_identical(structure):
    database = _database(structure, ZINC_FINGERS + ["1ubq", "1ubi"])
    query_entry = structure("1zfd")
    msa = Msa.single(chain_query(query_entry, 0))
    hits = search_templates(msa, database, query_pdb_id="1zfd")
    assert 1 <= len(hits) <= 4
    assert all(h.chain.pdb_id != "1zfd" and h.identity <= 0.95 for h in hits)
    assert [h.e_value for h in hits] == sorted(h.e_value for h in hits)
    assert {h.chain.pdb_id for h in hits} <= set(ZINC_FINGERS)  # homologues, not ubiquitin
    # 1ubi is ubiquitin again: 100% identical to 1ubq, so never its template
    ubq = structure("1ubq")
    assert all(h.chain.pdb_id != "1ubi" for h in search_templates(Msa.single(chain_query(ubq, 0)), database, query_pdb_id="1ubq"))


def test_template_features_follow_the_alignment(structure):
    database = _database(structure, ZINC_FINGERS)
    entry = structure("1zfd")
    hits = search_templates(Msa.single(chain_query(entry, 0)), database, query_pdb_id="1zfd")
    example = make_example(entry, templates={0: hits})
    assert example["template_mask"].sum() == len(hits)
    hit = hits[0]
    tokens = hit.query_positions  # one token per residue in this protein-only entry
    np.testing.assert_array_equal(example["template_restype"][0, tokens], hit.chain.restype[hit.template_positions])
    np.testing.assert_allclose(example["template_pos"][0, tokens], hit.chain.rep_pos[hit.template_positions])
    unaligned = np.setdiff1d(np.arange(len(example["restype"])), tokens)
    assert (example["template_restype"][0, unaligned] == RESTYPES.index("-")).all()
    assert not example["template_backbone_mask"][0, unaligned].any()
    assert not example["template_pos"][~example["template_pos_mask"]].any()
