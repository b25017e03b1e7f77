"""Test-wide setup. TRITON_INTERPRET must be set before triton or megafold.kernels is imported:
on a machine without a GPU the Triton kernels then run on the CPU under the interpreter."""

import os
from pathlib import Path

import torch

# The real data of ../shared/data (beside the repository in a checkout and in CI). Tests read
# it through MEGAFOLD_SHARED_DATA so that no test hard-codes a machine's path.
_REPO = Path(__file__).resolve().parents[1]
# Where it is missing (a GPU machine given only the repository) the tests that read it fail
# with this path in their error; the kernel tests do not need it.
for _candidate in (_REPO.parent / "shared" / "data", Path("/work/shared/data")):
    if (_candidate / "structures").is_dir():
        break
os.environ.setdefault("MEGAFOLD_SHARED_DATA", str(_candidate))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # A fresh but reproducible draw for every test: the seed comes from the test's name.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
