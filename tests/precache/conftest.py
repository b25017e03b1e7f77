"""A small store built once per session from real entries of ../shared/data."""

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ENTRIES = ("1ubq", "2q2k", "1znf", "1hvr")


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    for pdb_id in ENTRIES:
        shutil.copy(SHARED_DATA / "structures" / f"{pdb_id}.cif.gz", folder)
    return folder


@pytest.fixture(scope="session")
def built_store(sources, tmp_path_factory):
    """(store path, msa dir, build report) of a 2-worker build of ENTRIES with MSA search."""
    from megafold.precache import build

    root = tmp_path_factory.mktemp("precache")
    store, msa_dir = root / "store.zarr", root / "msas"
    report = build([sources], store, workers=2, msa_dir=msa_dir, progress=False)
    return store, msa_dir, report


@pytest.fixture
def store_copy(built_store, tmp_path):
    """A private copy of the built store, free to damage."""
    store, msa_dir, _ = built_store
    shutil.copytree(store, tmp_path / "store.zarr")
    return tmp_path / "store.zarr", msa_dir
