import numpy as np
from pathlib import Path

import pytest
import torch

from megafold.data.features import FEATURES
from megafold.precache import open_store
from megafold.precache.loader import ShardedSampler, loader


def _assert_batch_schema(batch, batch_size, crop_size):
    assert set(batch) == set(FEATURES)
    for name, spec in FEATURES.items():
        assert batch[name].dtype == torch.from_numpy(np.zeros(0, spec.dtype)).dtype, name
        assert batch[name].shape[0] <= batch_size
    n = batch["restype"].shape[1]
    assert n <= crop_size
    assert batch["token_bonds"].shape[1:] == (n, n)
    assert batch["msa"].shape[2] == n and batch["template_pos"].shape[2] == n
    # padding is masked: per example, real tokens come first and atoms point at real tokens
    for b in range(batch["restype"].shape[0]):
        tokens = batch["token_mask"][b]
        real = int(tokens.sum())
        assert tokens[:real].all() and not tokens[real:].any()
        atoms = batch["atom_mask"][b]
        assert (batch["atom_to_token"][b][atoms] < real).all()
    assert torch.isfinite(batch["ref_pos"]).all() and torch.isfinite(batch["atom_pos"]).all()


def test_batches_match_the_schema_and_crop(built_store):
    path = built_store[0]
    data = loader(path, crop_size=48, batch_size=3, workers=2, seed=5)
    assert len(data) == 2  # 4 entries in batches of 3
    batches = list(data)
    assert [b["token_mask"].shape[0] for b in batches] == [3, 1]
    for batch in batches:
        _assert_batch_schema(batch, 3, 48)
    stats = data.stats()
    assert stats["batches"] == 2 and stats["samples"] == 4 and stats["wait_s"] > 0
    assert data.state_dict() == {"epoch": 1, "position": 0, "seed": 5}


def test_worker_count_does_not_change_the_batches(built_store):
    path = built_store[0]
    in_process = list(loader(path, crop_size=32, batch_size=2, workers=0, seed=1))
    in_workers = list(loader(path, crop_size=32, batch_size=2, workers=2, seed=1))
    for a, b in zip(in_process, in_workers):
        for name in FEATURES:
            assert torch.equal(a[name], b[name]), name


def test_resume_mid_epoch_gives_the_same_batches(built_store):
    path = built_store[0]
    reference = loader(path, crop_size=24, batch_size=1, workers=0, seed=3)
    first_epoch = list(reference)
    second_epoch = list(reference)
    assert not all(torch.equal(a["restype"], b["restype"]) for a, b in zip(first_epoch, second_epoch))

    interrupted = loader(path, crop_size=24, batch_size=1, workers=0, seed=3)
    iterator = iter(interrupted)
    next(iterator), next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "position": 2, "seed": 3}

    resumed = loader(path, crop_size=24, batch_size=1, workers=0, seed=99)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for a, b in zip(rest, first_epoch[2:]):
        for name in FEATURES:
            assert torch.equal(a[name], b[name]), name
    assert resumed.state_dict() == {"epoch": 1, "position": 0, "seed": 3}


def test_ranks_get_disjoint_shards():
    shards = [ShardedSampler(10, shuffle=True, seed=0, rank=r, world_size=3, drop_last=False) for r in range(3)]
    seen = [[i for i, _ in s] for s in shards]
    assert [len(s) for s in seen] == [4, 4, 4]  # padded to 12 by wrapping around
    assert set(sum(seen, [])) == set(range(10))
    dropped = [ShardedSampler(10, shuffle=True, seed=0, rank=r, world_size=3, drop_last=True) for r in range(3)]
    flat = sum([[i for i, _ in s] for s in dropped], [])
    assert len(flat) == 9 and len(set(flat)) == 9
    with pytest.raises(ValueError):
        ShardedSampler(10, shuffle=True, seed=0, rank=3, world_size=3, drop_last=False)


def test_distributed_loader_shards_the_store(built_store):
    store = open_store(built_store[0])
    ranks = [loader(store, 16, 1, workers=0, rank=r, world_size=2, seed=4) for r in range(2)]
    samples = [set(data.sampler.order(0).tolist()) for data in ranks]
    assert samples[0].isdisjoint(samples[1]) and samples[0] | samples[1] == set(range(4))
    assert [len(list(data)) for data in ranks] == [2, 2]


@pytest.mark.gpu
def test_cuda_prefetch_delivers_batches_on_the_gpu():
    # The shipped store: GPU machines have neither ../shared/data nor the packages a build needs.
    shipped = Path(__file__).resolve().parents[2] / "cached_data" / "store.zarr"
    keys = open_store(shipped).keys()[:4]
    data = loader(shipped, crop_size=384, batch_size=2, workers=2, device="cuda", keys=keys, shuffle=False)
    arrived = []
    for batch in data:
        assert all(t.is_cuda for t in batch.values())
        arrived.append({name: t.cpu() for name, t in batch.items()})
    assert data.stats()["batches"] == 2
    # The same epoch read on the CPU: the same values arrive, not just tensors on the GPU.
    cpu = loader(shipped, crop_size=384, batch_size=2, workers=0, device="cpu", keys=keys, shuffle=False)
    for on_gpu, on_cpu in zip(arrived, cpu, strict=True):
        for name, value in on_cpu.items():
            assert torch.equal(on_gpu[name], value), name


def test_keys_pick_a_subset_of_the_store(built_store):
    from megafold.errors import CacheError

    path = built_store[0]
    store = open_store(path)
    subset = store.keys()[:2][::-1]
    data = loader(path, crop_size=4096, batch_size=1, shuffle=False, workers=0, keys=subset)
    batches = list(data)
    assert len(data) == len(batches) == 2
    for key, batch in zip(sorted(subset), batches):
        restype = store.load(key)["restype"]
        assert torch.equal(batch["restype"][0], torch.from_numpy(restype)), key
    with pytest.raises(CacheError, match=r"no entries \['nope'\]"):
        loader(path, crop_size=32, batch_size=1, workers=0, keys=[subset[0], "nope"])
