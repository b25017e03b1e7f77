"""Fixtures of the training tests: the shipped precache (cached_data/) and a tiny model config."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHED = REPO / "cached_data"
STORE = CACHED / "store.zarr"
STRUCTURES = CACHED / "structures"
SMALL_KEYS = ("1zfd", "1znf")  # zinc fingers, 32 and 25 tokens: fast steps on the CPU


@pytest.fixture(scope="session")
def store_path() -> Path:
    return STORE


@pytest.fixture(scope="session")
def structures() -> Path:
    return STRUCTURES


@pytest.fixture(scope="session")
def store():
    from megafold.precache import open_store

    return open_store(STORE)


@pytest.fixture
def tiny_config():
    """"tiny" shrunk further: a step takes a fraction of a second on the CPU."""
    from megafold.model import preset

    return preset("tiny", kernels="torch", bf16=False, diffusion_samples=2, sampler_steps=3, rollout_steps=2, recycles=2)


@pytest.fixture
def train_config(tmp_path):
    """A TrainConfig on two small shipped entries, crop 16, one process."""
    from megafold.train import TrainConfig

    def make(**changes):
        values = dict(
            store=str(STORE), out=str(tmp_path / "run"), keys=SMALL_KEYS, crop_size=16, steps=4,
            warmup_steps=2, lr=1e-3, checkpoint_every=1000, workers=0, max_msa_rows=16, device="cpu",
            progress=False,
        )  # fmt: skip
        values.update(changes)
        return TrainConfig(**values)

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are too small for intra-op threads: one thread runs these tests
    about 3x faster on 2 busy cores (spinning OpenMP workers fight over them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
