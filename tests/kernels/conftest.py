"""Fixtures of the kernel tests."""

import importlib

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


@pytest.fixture
def one_block_chunks(request, monkeypatch):
    """Weight-gradient chunks of one row block each in the op module that the test module
    names ``module``; yields the chunk lists the op used."""
    op_module = request.module.module
    monkeypatch.setattr(importlib.import_module("megafold.kernels.layernorm_linear"), "WEIGHT_GRAD_CHUNK_BYTES", 1)
    used, real = [], op_module.row_chunks
    monkeypatch.setattr(op_module, "row_chunks", lambda *args, **kw: used.append(real(*args, **kw)) or used[-1])
    yield used


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device for the tuner (``_common.pick_config``) with tuning on, a cache in
    ``tmp_path`` and nothing shipped or remembered: ``bench`` functions stand in for launches."""
    from megafold.kernels import _common

    monkeypatch.setenv("MEGAFOLD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_common, "device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_common, "_memory_cache", {})
    monkeypatch.setattr(_common, "_untuned", [])
    monkeypatch.setattr(_common, "_fitted", {})
    monkeypatch.setattr(_common, "packaged_tuning_path", lambda device: tmp_path / "none.json")
    monkeypatch.setattr(_common, "device_capability", lambda device: None)
    return torch.device("cuda")


@pytest.fixture
def key_descriptors(monkeypatch):
    """Every pass launches a tensor-descriptor (TMA) candidate (64 x 32 tiles, 3 stages). Yields
    whether each launch got its descriptors (True) or took the pointer path (False), in launch
    order (per forward and backward: forward, dBias where it has a pass of its own, dK dV, dQ)."""
    from megafold.kernels.testing import record_descriptor_use

    evo_module = importlib.import_module("megafold.kernels.evo_attention")
    used = record_descriptor_use(monkeypatch, evo_module, "_key_descriptors", "_query_descriptors",
                                 "_dbias_descriptors")

    def pick(op, key, device, candidates, default, launch):
        tiles = [c for c in candidates if c.get("TMA")]
        assert bool(tiles) == evo_module.descriptors_available()
        if not tiles:
            return launch(default)
        return launch(next(c for c in tiles if (c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) == (64, 32, 3)))

    monkeypatch.setattr(evo_module, "run_tuned", pick)
    return used
