"""Checkpoints: plain tensors and values only, atomic under a kill, RNG states round-trip."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megafold.errors import CacheError
from megafold.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_a_checkpoint_holds_only_tensors_and_plain_values(tmp_path, tiny_config, train_config):
    from megafold.train import Trainer

    trainer = Trainer(tiny_config, train_config(out=str(tmp_path / "run"), steps=1))
    trainer.fit()
    state = torch.load(trainer.checkpoint_path, weights_only=True)  # would raise on anything else
    assert set(state) >= {"model", "ema", "optimizer", "schedule", "rng", "loader", "model_config", "train_config", "step"}
    assert state["loader"] == {"epoch": 0, "position": 1, "seed": 0} and state["step"] == 1


def test_replace_failing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def killed(source, destination):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    """A process writes 64 MiB checkpoints in a loop; SIGKILL lands while the temporary file of
    the third is being written: the checkpoint is still the whole second one."""
    path = tmp_path / "checkpoint.pt"
    writer = textwrap.dedent(
        f"""
        import torch
        from megafold.train.checkpoint import save_checkpoint
        for step in range(1, 100):
            print("writing", step, flush=True)
            save_checkpoint({str(path)!r}, {{"step": step, "weights": torch.full((16 * 2**20,), float(step))}})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        while process.stdout.readline().split() != ["writing", "3"]:
            pass
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    state = load_checkpoint(path)
    torn = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # (step 3 only if the rename beat the signal; then nothing was torn)
    assert (state["step"], bool(torn)) in ((2, True), (3, False))
    assert torch.all(state["weights"] == float(state["step"]))


def test_unreadable_or_foreign_files_raise_cache_error(tmp_path):
    with pytest.raises(CacheError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CacheError, match="garbage.pt: not a readable megafold checkpoint"):
        load_checkpoint(garbage)
    code = tmp_path / "code.pt"
    torch.save({"format": 1, "hook": np.random.default_rng}, code)  # needs unpickling code
    with pytest.raises(CacheError, match="code.pt: not a readable"):
        load_checkpoint(code)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(CacheError, match="not a megafold checkpoint"):
        load_checkpoint(foreign)
