"""Structures in, AF3 features out: parsing, tokenization, MSAs, templates, cropping.

The feature schema lives in ``features.py``. biotite, gemmi and pyhmmer are imported
inside the functions that use them, so GPU-side code imports this package without them.
"""

from megafold.data.atoms import atom_array, load_atoms, to_mmcif, to_pdb
from megafold.data.crop import CROP_WEIGHTS, crop_example, random_rotate_conformers
from megafold.data.features import FEATURES, batch_to, collate, validate_example
from megafold.data.msa import Msa, SequenceDatabase, parse_a3m, read_msa, search_msa, write_a3m
from megafold.data.pipeline import featurize, make_example
from megafold.data.structures import Chain, Structure, load_structure
from megafold.data.templates import TemplateDatabase, search_templates, template_chains
from megafold.data.tokenize import RESTYPES, Tokens, tokenize

__all__ = [
    "CROP_WEIGHTS",
    "Chain",
    "FEATURES",
    "Msa",
    "RESTYPES",
    "SequenceDatabase",
    "Structure",
    "TemplateDatabase",
    "Tokens",
    "atom_array",
    "batch_to",
    "collate",
    "crop_example",
    "featurize",
    "load_atoms",
    "load_structure",
    "make_example",
    "parse_a3m",
    "random_rotate_conformers",
    "read_msa",
    "search_msa",
    "search_templates",
    "template_chains",
    "to_mmcif",
    "to_pdb",
    "tokenize",
    "validate_example",
    "write_a3m",
]
