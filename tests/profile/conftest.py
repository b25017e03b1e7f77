"""Shared settings of the profiler tests: a quick "tiny" config (one block per stack) and one
CPU thread (the tensors are tiny; more threads only add overhead and noise)."""

import pytest
import torch

from megafold.model import preset
from megafold.profile.widgets import QUICK_OVERRIDES


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quick_config():
    """"tiny" with one block per stack and the eager kernels."""
    return preset("tiny", kernels="torch", **QUICK_OVERRIDES)
