"""The trainer on a GPU: "small" in bf16 with the Triton kernels, as the quickstart runs it."""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_small_trains_in_bf16_with_triton_kernels(train_config, tmp_path):
    from megafold.model import preset
    from megafold.train import Trainer, load_checkpoint
    from megafold.train.predict import predict

    config = preset("small", kernels="triton")
    assert config.bf16
    trainer = Trainer(config, train_config(device="cuda", crop_size=256, steps=6, workers=2, keys=("1ubq", "2q2k", "1hvr"), max_msa_rows=None))
    trainer.fit()
    assert trainer.skipped_steps == 0
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in trainer.history)
    assert all(row["peak_gib"] > 0 for row in trainer.history)
    state = load_checkpoint(trainer.checkpoint_path)  # to the CPU
    assert state["rng"]["cuda"] and all(t.device.type == "cpu" for t in state["model"].values())

    resumed = Trainer(config, train_config(device="cuda", crop_size=256, steps=7, workers=2, keys=("1ubq", "2q2k", "1hvr"), max_msa_rows=None))
    resumed.resume()
    resumed.fit()
    assert resumed.step == 7 and math.isfinite(resumed.history[-1]["loss"])

    prediction = predict(trainer.ema.module, trainer.store.load("1ubq"), tmp_path, steps=20, samples=2)
    assert prediction.plddt.shape[0] == prediction.coords.shape[0] and torch.isfinite(torch.from_numpy(prediction.pae)).all()
