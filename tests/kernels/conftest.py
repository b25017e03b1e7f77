"""Fixtures of the kernel tests."""

import pytest
import torch


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like inside an op return NaN-filled memory: unwritten outputs show."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def empty_like(*args, **kwargs):
        out = real_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
