"""The Trainer: exact resume, the NaN/inf guard, schedule, EMA, accumulation, metrics files."""

import csv
import math

import pytest
import torch

from megafold.errors import CacheError, ConfigError
from megafold.train import TrainConfig, Trainer, learning_rate, load_metrics
from megafold.train.trainer import ema_update


def _losses(path) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_resume_continues_exactly(tiny_config, train_config, tmp_path):
    """6 steps straight == 3 steps, a new process-like Trainer resuming, 3 more: the same losses
    bit for bit (dropout, recycling draws, noise and the loader's crops all continue), across a
    mid-epoch checkpoint (2 entries, batch 1: the checkpoint at step 3 is one sample into epoch 1)."""
    straight = Trainer(tiny_config, train_config(out=str(tmp_path / "straight"), steps=6))
    straight.fit()

    first = Trainer(tiny_config, train_config(out=str(tmp_path / "resumed"), steps=3))
    first.fit()
    assert first.data.state_dict() == {"epoch": 1, "position": 1, "seed": 0}
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    second = Trainer(tiny_config, train_config(out=str(tmp_path / "resumed"), steps=6))
    second.resume()
    assert second.step == 3
    second.fit()

    expected = [row["loss"] for row in straight.history]
    assert len(expected) == 6 and len(set(expected)) == 6
    assert [row["loss"] for row in second.history] == expected
    assert _losses(tmp_path / "resumed" / "metrics.csv") == expected
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    for name, value in straight.ema.state_dict().items():
        assert torch.equal(value, second.ema.state_dict()[name]), name


def test_resume_at_the_end_of_an_epoch(tiny_config, train_config, tmp_path):
    straight = Trainer(tiny_config, train_config(out=str(tmp_path / "straight"), keys=("1znf",), steps=3))
    straight.fit()
    first = Trainer(tiny_config, train_config(out=str(tmp_path / "resumed"), keys=("1znf",), steps=2))
    first.fit()
    assert first.data.state_dict()["position"] == 1  # the epoch is used up, its end not yet seen
    second = Trainer(tiny_config, train_config(out=str(tmp_path / "resumed"), keys=("1znf",), steps=3))
    second.resume()
    second.fit()
    assert [row["loss"] for row in second.history] == [row["loss"] for row in straight.history]


def test_resume_drops_rows_logged_after_the_checkpoint(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=2))
    trainer.fit()
    trainer.config = trainer.config.replace(steps=3, checkpoint_every=1000)
    trainer.train_step()  # a step whose checkpoint never got written (the run died)
    trainer._log({**trainer.history[-1], "step": 3})
    resumed = Trainer(tiny_config, train_config(steps=3))
    resumed.resume()
    assert [row["step"] for row in resumed.history] == [1, 2]
    assert len(_losses(resumed.out / "metrics.csv")) == 2


def test_resume_refuses_another_model_config(tiny_config, train_config):
    Trainer(tiny_config, train_config(steps=1)).fit()
    other = Trainer(tiny_config.replace(c_z=8), train_config(steps=2))
    with pytest.raises(ConfigError, match=r"differs in \['c_z'\]"):
        other.resume()


def test_nan_loss_skips_the_step_and_changes_nothing(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=3))
    trainer.train_step()
    model, ema = _weights(trainer.model), _weights(trainer.ema)
    optimizer = {k: {n: v.clone() for n, v in s.items()} for k, s in trainer.optimizer.state_dict()["state"].items()}
    real_loss = trainer.model.training_loss

    def nan_loss(batch, *args, **kwargs):
        loss, terms = real_loss(batch, *args, **kwargs)
        return loss * float("nan"), {**terms, "loss": float("nan")}

    trainer.model.training_loss = nan_loss
    row = trainer.train_step()
    assert row["skipped"] == 1 and trainer.skipped_steps == 1 and trainer.step == 2
    assert math.isnan(row["loss"]) and math.isnan(row["grad_norm"])
    assert all(torch.equal(v, model[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.state_dict().items())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][n], v) for k, s in optimizer.items() for n, v in s.items())
    assert all(p.grad is None for p in trainer.model.parameters())

    del trainer.model.training_loss  # the real method again: training goes on
    row = trainer.train_step()
    assert row["skipped"] == 0 and trainer.skipped_steps == 1
    assert any(not torch.equal(v, model[k]) for k, v in trainer.model.state_dict().items())


def test_inf_gradient_is_caught_too(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=2))
    weights = _weights(trainer.model)
    parameter = next(p for p in trainer.model.parameters() if p.requires_grad)
    handle = parameter.register_hook(lambda grad: grad * float("inf"))
    row = trainer.train_step()
    handle.remove()
    assert math.isfinite(row["loss"]) and not math.isfinite(row["grad_norm"])
    assert row["skipped"] == 1 and trainer.skipped_steps == 1
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_learning_rate_warms_up_then_decays_in_steps():
    config = TrainConfig(store="x", lr=1.0, warmup_steps=4, decay_every=10, decay_factor=0.5)
    assert [learning_rate(s, config) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert learning_rate(9, config) == 1.0 and learning_rate(10, config) == 0.5 and learning_rate(25, config) == 0.25
    af3 = TrainConfig(store="x")
    assert (af3.lr, af3.warmup_steps, af3.decay_every, af3.decay_factor) == (1.8e-3, 1000, 50_000, 0.95)
    assert (af3.beta1, af3.beta2, af3.eps, af3.clip_norm, af3.ema_decay) == (0.9, 0.95, 1e-8, 10.0, 0.999)


def test_optimizer_is_afs_adam(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=1))
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8


def test_gradients_are_clipped_at_the_norm(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=1, clip_norm=1e-3))
    seen = []
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None])))
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    row = trainer.train_step()
    assert row["grad_norm"] > 1e-3  # the norm before clipping is logged
    assert float(seen[0]) == pytest.approx(1e-3, rel=1e-3)


def test_ema_decay_warms_up_and_reaches_the_configured_decay():
    update = ema_update(0.999)
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    update(averaged, current, torch.tensor(0))
    assert torch.allclose(averaged[0], torch.full((3,), 0.9))  # d = 1/10
    late, after = [torch.zeros(1)], [torch.ones(1)]
    update(late, after, torch.tensor(10**6))
    assert float(late[0]) == pytest.approx(1e-3)  # d = 0.999
    counters = [torch.tensor([3])]
    update(counters, [torch.tensor([5])], torch.tensor(7))
    assert counters[0].item() == 5


def test_grad_accumulation_takes_several_batches_per_step(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=1, grad_accum=2, keys=("1zfd", "1znf", "1sp1")))
    row = trainer.train_step()
    assert trainer.data.state_dict()["position"] == 2 and trainer.step == 1
    assert row["tokens"] == 32  # two crops of 16


def test_time_limit_stops_and_checkpoints(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=1000, max_minutes=1e-4))
    trainer.fit()
    assert 1 <= trainer.step < 1000 and trainer.checkpoint_path.is_file()


def test_metrics_reach_csv_and_zarr_with_evaluation(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=2, eval_every=2, eval_keys=("1znf",), eval_sampler_steps=2))
    trainer.fit()
    dataset = load_metrics(trainer.out)
    assert dataset["step"].values.tolist() == [1, 2]
    assert dataset["loss"].values.tolist() == [row["loss"] for row in trainer.history]
    for name in ("lr", "grad_norm", "step_s", "data_wait_s", "diffusion", "distogram", "skipped"):
        assert name in dataset
    assert dataset["eval_step"].values.tolist() == [2]
    for name in ("eval_ca_lddt", "eval_lddt", "eval_ca_rmsd", "eval_distogram_accuracy", "eval_plddt_mae"):
        assert name in dataset
    assert 0.0 <= float(dataset["eval_ca_lddt"][0]) <= 1.0
    with open(trainer.out / "eval.csv") as handle:
        assert handle.readline().startswith("step,ca_lddt,lddt,ca_rmsd")


def test_evaluation_leaves_the_training_stream_alone(tiny_config, train_config, tmp_path):
    plain = Trainer(tiny_config, train_config(out=str(tmp_path / "a"), steps=2))
    plain.fit()
    evaluated = Trainer(tiny_config, train_config(out=str(tmp_path / "b"), steps=2, eval_every=1, eval_keys=("1znf",), eval_sampler_steps=2))
    evaluated.fit()
    assert [r["loss"] for r in evaluated.history] == [r["loss"] for r in plain.history]


def test_bad_train_configs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="crop_size=0"):
        TrainConfig(store="x", crop_size=0)
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(store="x", max_minutes=-1)
    assert TrainConfig.from_dict(TrainConfig(store="x", keys=("a", "b")).to_dict()).keys == ("a", "b")


def test_unknown_train_or_eval_keys_fail_at_construction(tiny_config, train_config):
    with pytest.raises(CacheError, match=r"no entries \['nope'\]"):
        Trainer(tiny_config, train_config(keys=("1znf", "nope")))
    with pytest.raises(CacheError, match=r"no entries \['nope'\]"):
        Trainer(tiny_config, train_config(keys=("1znf",), eval_keys=("nope",)))


def test_padded_batches_change_no_output(tiny_config, store):
    """pad_batch pads token / MSA-row axes to the multiple and atoms to 8x it; the model reads
    the padded batch exactly as the original (trunk, distogram and denoiser outputs)."""
    from megafold.data.features import collate
    from megafold.kernels import use_kernels
    from megafold.model import AlphaFold3
    from megafold.train.trainer import pad_batch

    batch = collate([store.load("1znf")])  # 25 tokens, 207 atoms, 26 MSA rows
    padded = pad_batch(batch, 16)
    assert padded["token_mask"].shape[1] == 32 and padded["token_bonds"].shape[1:] == (32, 32)
    assert padded["atom_pos"].shape[1] == 256 and padded["msa"].shape[1:] == (32, 32)
    assert int(padded["token_mask"].sum()) == 25 and int(padded["restype"][0, -1]) == 31  # the gap pad
    torch.manual_seed(0)
    model = AlphaFold3(tiny_config).eval()
    with torch.no_grad(), use_kernels("torch"):  # the config's kernels, as model entry points choose
        for param in model.parameters():  # no zero-initialised branch left out of the check
            param.add_(0.05 * torch.randn_like(param))
        plain, wide = model(batch), model(padded)
        torch.testing.assert_close(wide["distogram_logits"][:, :25, :25], plain["distogram_logits"], rtol=1e-5, atol=1e-5)
        noisy = 10 * torch.randn(1, 2, 207, 3)
        sigma = torch.tensor([[2.0, 30.0]])

        def denoise(inputs, x):
            trunk = model.trunk(inputs, 1)
            ctx = model.diffusion_module.prepare(inputs, trunk.s_inputs, trunk.single, trunk.pair)
            return model.diffusion_module(ctx, x, sigma)

        wide_noisy = torch.nn.functional.pad(noisy, (0, 0, 0, 256 - 207))
        torch.testing.assert_close(denoise(padded, wide_noisy)[:, :, :207], denoise(batch, noisy), rtol=1e-4, atol=1e-4)
    assert pad_batch(batch, 0)["atom_pos"] is batch["atom_pos"]


def test_trainer_pads_training_and_evaluation_batches(tiny_config, train_config):
    trainer = Trainer(tiny_config, train_config(steps=1, pad_multiple=24, eval_keys=("1znf",), eval_sampler_steps=2))
    assert trainer.next_batch()["token_mask"].shape[1] == 24  # crop 16 -> 24
    trainer.fit()
    assert 0.0 <= trainer.evaluate()["ca_lddt"] <= 1.0
    with pytest.raises(ConfigError, match="pad_multiple"):
        train_config(pad_multiple=-1)
