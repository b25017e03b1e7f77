"""Data-parallel training on the CPU: 2 gloo ranks under a real torchrun against one process.

The model's random draws (augmentation, noise levels, noise, the confidence rollout) all go
through ``torch.randn`` / ``torch.randn_like`` with the batch as the leading axis. Both setups
replace them by ``PerExampleNoise``: each example's numbers come from its own generator,
keyed by (step, call, example's place in the global batch, sample), so example 1 gets the
same noise on rank 1 (batch 1) as in the second row of a one-process batch of 2. Dropout is
off (p = 0) and one recycle is used, so nothing else is random.

DDP averages per-rank losses; a one-process batch averages its loss terms over the batch.
The two agree when every term is a mean of per-example means. The diffusion terms are; the
distogram pools its pairs over the batch, equal here (both crops have 16 tokens); the
plDDT and resolved heads pool atoms over the batch, and the two proteins differ in atom
count, so their gradients would differ by ~1.5% for that reason alone (not DDP's): the
confidence loss weight is 0 here.

Run as a script (by torchrun, from the tests) it is the worker of one rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "cached_data" / "store.zarr"
KEYS = ("1zfd", "1znf")  # cropped to 16 tokens each: the same token counts, different proteins

# fp32 tolerances, as ||ddp - ref|| / ||ref|| for gradients and ||p_ddp - p_ref|| / ||p_ref - p_before||
# for the weights (the error relative to the update itself: relative to the weights it would
# hide). The two setups add the two examples' contributions in another order (an all-reduce
# of per-rank means vs one batched backward), so the gradients agree to fp32 rounding
# (measured ~3e-7). Adam divides by sqrt(v) ~ |g|: step 1's updates agree to ~1e-7, but
# from step 2 on the gradients are taken at weights that differ by that rounding, and Adam
# amplifies it on entries with small |g| (measured 2e-5 of step 2's update, more on step 3).
# 1e-3 leaves margin for other BLAS builds; a bug (a missing all-reduce, a sum instead of a
# mean, another sample) gives O(1).
GRAD_TOL = 1e-5
UPDATE_TOL = 1e-3
DEVICE_VARIABLE = "MEGAFOLD_DDP_TEST_DEVICE"  # "cuda": the same check with NCCL on 2 GPUs


def model_config():
    from megafold.model import preset

    return preset(
        "tiny", kernels="torch", bf16=False, checkpoint=False, diffusion_samples=2, sampler_steps=3,
        rollout_steps=2, recycles=1, pair_dropout=0.0, msa_dropout=0.0, confidence_loss_weight=0.0,
    )  # fmt: skip


def train_config(out: Path, batch_size: int, steps: int):
    from megafold.train import TrainConfig

    return TrainConfig(
        store=str(STORE), out=str(out), keys=KEYS, crop_size=16, batch_size=batch_size, steps=steps,
        warmup_steps=2, lr=1e-3, checkpoint_every=1000, workers=0, max_msa_rows=16, progress=False,
        device=os.environ.get(DEVICE_VARIABLE, "cpu"),
    )  # fmt: skip


class PerExampleNoise:
    """``torch.randn`` / ``randn_like`` whose draws for example ``b`` of the local batch are
    those of example ``offset + b`` of the global batch, whatever the batch size or padding:
    rows along the sample axis are drawn separately, so padding (at the end) leaves the real
    atoms' numbers unchanged."""

    def __init__(self, trainer, offset: int):
        self.trainer, self.offset = trainer, offset
        self.step, self.calls = -1, 0
        self.randn, self.randn_like = torch.randn, torch.randn_like

    def install(self, monkeypatch=None) -> None:
        for name, fn in (("randn", self.draw), ("randn_like", self.draw_like)):
            if monkeypatch is not None:
                monkeypatch.setattr(torch, name, fn)
            else:
                setattr(torch, name, fn)

    def draw(self, *size, device=None, dtype=None, **_):
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if self.trainer.step != self.step:
            self.step, self.calls = self.trainer.step, 0
        self.calls += 1
        out = np.empty(size, np.float64)
        for b in range(size[0]):
            key = [self.step, self.calls, self.offset + b]
            if len(size) >= 3:
                for s in range(size[1]):
                    out[b, s] = np.random.default_rng([*key, s]).standard_normal(size[2:])
            else:
                out[b] = np.random.default_rng(key).standard_normal(size[1:])
        return torch.from_numpy(out).to(device=device, dtype=dtype or torch.get_default_dtype())

    def draw_like(self, tensor, **_):
        return self.draw(tuple(tensor.shape), device=tensor.device, dtype=tensor.dtype)


def strict_fp32(trainer):
    """The trainer turns TF32 on for CUDA; the tolerances here are fp32's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in trainer.model.state_dict().items()}


def gradients(trainer) -> dict[str, torch.Tensor]:
    """The next step's averaged gradient (``train_step`` zeroes it afterwards: keep a copy)."""
    kept: dict[str, torch.Tensor] = {}
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        kept.update({n: p.grad.detach().cpu().clone() for n, p in trainer.model.named_parameters()})
        trainer.optimizer.step = original
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    return kept


# ---------------------------------------------------------------------------- the worker


def worker(out: Path, dumps: Path) -> None:
    """One rank: 1 step (checkpoint), its gradient and weights dumped; a 2nd step (checkpoint)."""
    from megafold.train import Trainer

    torch.set_num_threads(1)
    trainer = strict_fp32(Trainer(model_config(), train_config(out, batch_size=1, steps=1)))
    PerExampleNoise(trainer, offset=trainer.rank).install()
    initial = weights(trainer)
    grads = gradients(trainer)
    trainer.fit()
    dump = {"initial": initial, "grads": grads, "step1": weights(trainer)}
    trainer.config = trainer.config.replace(steps=2)
    trainer.fit()
    dump["step2"] = weights(trainer)
    dump["ema"] = {k: v.cpu().clone() for k, v in trainer.ema.state_dict().items()}
    dump["rows"] = trainer.history
    torch.save(dump, dumps / f"rank{trainer.rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tmp_path: Path, nproc: int) -> tuple[Path, Path]:
    out, dumps = tmp_path / "ddp", tmp_path / "dumps"
    dumps.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", __file__, "--out", str(out), "--dumps", str(dumps),
    ]  # fmt: skip
    # the repo first, then whatever the caller's path held (zarr may live there, as on the GPU machines)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, dumps


# ---------------------------------------------------------------------------- the tests


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None) -> float:
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in b])
    scale = torch.cat([(b[k].double() - (base[k].double() if base else 0)).flatten() for k in b])
    assert torch.isfinite(diff).all()
    return float(diff.norm() / scale.norm())


def test_two_ranks_equal_one_process_with_the_global_batch_and_resume_on_one(tmp_path, monkeypatch):
    """2 gloo ranks x batch 1 == 1 process x batch 2, step by step; rank 0 alone writes; the
    2-rank checkpoint resumes on 1 process at the same sample, continuing the 1-process run."""
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    check_ddp_against_one_process(tmp_path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_equal_one_gpu_with_the_global_batch_and_resume_on_one(tmp_path, monkeypatch):
    """The same on 2 GPUs (NCCL, NVLink multicast off) against 1 GPU, fp32 (TF32 off: the
    tolerances are fp32's; GPU reductions add in another order, well inside them)."""
    monkeypatch.setenv(DEVICE_VARIABLE, "cuda")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    check_ddp_against_one_process(tmp_path, monkeypatch)


def check_ddp_against_one_process(tmp_path, monkeypatch):
    from megafold.train import Trainer

    out, dumps = torchrun(tmp_path, nproc=2)
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))

    reference = strict_fp32(Trainer(model_config(), train_config(tmp_path / "reference", batch_size=2, steps=3)))
    PerExampleNoise(reference, offset=0).install(monkeypatch)
    initial = weights(reference)
    for name, value in initial.items():  # the same initial weights (seeded before the model)
        assert torch.equal(value.cpu(), rank0["initial"][name]), name
    grads = gradients(reference)
    reference.train_step()
    after = {1: weights(reference)}
    assert _relative(rank0["grads"], grads) < GRAD_TOL
    assert _relative(rank0["step1"], after[1], initial) < UPDATE_TOL
    reference.train_step()
    after[2] = weights(reference)
    assert _relative(rank0["step2"], after[2], after[1]) < UPDATE_TOL

    # Every rank holds the same weights and EMA, bit for bit; the logged loss is the mean.
    for name, value in rank0["step2"].items():
        assert torch.equal(value, rank1["step2"][name]), name
    for name, value in rank0["ema"].items():
        assert torch.equal(value, rank1["ema"][name]), name
    assert [row["loss"] for row in rank0["rows"]] == [row["loss"] for row in rank1["rows"]]

    # Rank 0 alone wrote the run directory: one metrics row per step, not one per rank.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.zarr"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["loader"]["position"] == 2  # global samples of epoch 1: 1 per rank
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # per-rank streams

    # Resume on 1 process with the global batch: the same next samples as the 1-process run.
    reference.train_step()  # first: a model built later would draw from the reference's noise
    resumed = strict_fp32(Trainer(model_config(), train_config(out, batch_size=2, steps=3)))
    resumed.resume()
    assert resumed.step == 2 and resumed.data.position == 2
    for name, value in resumed.model.state_dict().items():  # the ranks' weights were saved on the CPU
        assert torch.equal(value.cpu(), rank0["step2"][name]), name
    PerExampleNoise(resumed, offset=0).install(monkeypatch)
    resumed.fit()
    assert resumed.data.state_dict() == reference.data.state_dict()
    assert _relative(weights(resumed), weights(reference), after[2]) < UPDATE_TOL
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dumps", type=Path, required=True)
    arguments = parser.parse_args()
    worker(arguments.out, arguments.dumps)
