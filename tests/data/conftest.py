"""Fixtures of the data tests: real files from ../shared/data, parsed once per session."""

from functools import lru_cache
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@lru_cache(maxsize=None)
def _load(pdb_id: str):
    from megafold.data import load_structure

    return load_structure(SHARED_DATA / "structures" / f"{pdb_id}.cif.gz")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def structure():
    """``structure(pdb_id)``: the parsed shared entry (cached across tests)."""
    return _load
