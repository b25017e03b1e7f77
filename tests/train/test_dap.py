"""The row-sharded Pairformer (megafold.train.dap) against the same PairformerStack in one process.

Two ranks run as two processes of this file (gloo on the CPU, NCCL on 2 GPUs) and dump their
gathered outputs, input gradients and all-reduced parameter gradients; the test process runs
the unsharded stack on the same weights, inputs and output cotangents and compares:
- an odd crop (13 tokens, padded to 14 with masked tokens), batch 2 with padding tokens,
  per-block checkpointing: fp32 against a float64 reference (fp32 rounding only: < 1e-5);
- an even crop with dropout on: the same dropout masks (drawn at the global shape from the
  same seed) against the fp32 unsharded run;
- the Triton kernels (under the interpreter) on shards of 5 rows of a 10-token padded crop.
The GPU test adds bf16 autocast, bf16 checkpoint storage and the Triton kernels.
Every parameter is drawn at random (the zero-initialised final projections would otherwise
make every block the identity and most gradients zero).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script by the tests

from megafold.errors import ConfigError  # noqa: E402
from megafold.kernels import use_kernels  # noqa: E402
from megafold.model import preset  # noqa: E402
from megafold.model.pairformer import PairformerStack  # noqa: E402
from megafold.train.dap import AxialShards, all_reduce_gradients, pairformer_rows  # noqa: E402

# name: (tokens, batch, checkpoint, pair_bf16, dropout, kernels)
CPU_CASES = {
    "odd": (13, 2, True, False, 0.0, "torch"),
    "dropout": (12, 1, True, False, 0.25, "torch"),
    "triton": (9, 1, True, False, 0.0, "triton"),  # the Triton kernels (interpreter) on 5-row shards
}
GPU_CASES = {"odd": (253, 1, True, True, 0.0, "triton")}
FP32_TOL = 1e-5  # measured ~1e-7: sharding changes only the order of fp32 sums
# bf16 on the GPU: the sharded run may differ from the unsharded one by another bf16 rounding
# of the same order as the unsharded run's own error against float64.
BF16_TOL = 2e-2


def stack_config(case: tuple, device: str):
    _, _, checkpoint, pair_bf16, dropout, kernels = case
    if device == "cuda":  # "paper" widths, 2 blocks, the GPU path (bf16 autocast)
        return preset("paper", kernels=kernels, pairformer_blocks=2, pair_dropout=dropout,
                      checkpoint=checkpoint, pair_bf16_checkpoint=pair_bf16)  # fmt: skip
    # one block for the Triton interpreter (slow), two otherwise
    return preset("tiny", kernels=kernels, pairformer_blocks=1 if kernels == "triton" else 2, pair_dropout=dropout,
                  checkpoint=checkpoint, pair_bf16_checkpoint=pair_bf16)  # fmt: skip


def case_inputs(case: tuple, device: str, seed: int = 7) -> tuple[PairformerStack, dict[str, torch.Tensor]]:
    """The stack (seeded weights) and the whole inputs and output cotangents of one case."""
    tokens, batch, dropout = case[0], case[1], case[4]
    config = stack_config(case, device)
    torch.manual_seed(seed)
    stack = PairformerStack(config, config.pairformer_blocks, config.c_z, config.c_s).to(device)
    stack.train(dropout > 0)
    generator = torch.Generator().manual_seed(seed + 1)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    with torch.no_grad():
        for name, param in stack.named_parameters():
            if param.dim() == 2:
                param.copy_(draw(*param.shape) / param.shape[1] ** 0.5)
            else:  # LayerNorm weights near 1, biases near 0
                param.copy_(draw(*param.shape) * 0.1 + float(name.endswith("weight")))

    token_mask = torch.ones(batch, tokens, dtype=torch.bool)
    for b in range(batch):
        token_mask[b, tokens - 2 - b :] = False  # crop padding, different per example
    token_mask = token_mask.to(device)
    return stack, {
        "pair": draw(batch, tokens, tokens, config.c_z), "single": draw(batch, tokens, config.c_s),
        "pair_mask": token_mask[:, :, None] & token_mask[:, None, :], "token_mask": token_mask,
        "d_pair": draw(batch, tokens, tokens, config.c_z), "d_single": draw(batch, tokens, config.c_s),
    }  # fmt: skip


def autocast(device: str, enabled: bool = True):
    """bf16 autocast on the GPU (as the "paper" preset trains), nothing on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=enabled and device == "cuda")


def run_unsharded(case: tuple, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    stack, x = case_inputs(case, device)
    stack.to(dtype)
    pair = x["pair"].to(dtype).requires_grad_()
    single = x["single"].to(dtype).requires_grad_()
    backend = "torch" if dtype == torch.float64 else case[5]
    torch.manual_seed(11)  # dropout
    with use_kernels(backend), autocast(device, enabled=dtype != torch.float64):
        pair_out, single_out = stack(pair, single, x["pair_mask"], x["token_mask"])
    loss = (pair_out.float() * x["d_pair"]).sum() + (single_out.float() * x["d_single"]).sum()
    loss.backward()
    result = {"pair_out": pair_out, "single_out": single_out, "d_pair_in": pair.grad, "d_single_in": single.grad}
    result.update({f"grad.{n}": p.grad for n, p in stack.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in result.items()}


def run_sharded(case: tuple, device: str) -> dict[str, torch.Tensor]:
    """This rank's share of one case; returns what rank 0 dumps (gathered, cropped)."""
    stack, x = case_inputs(case, device)
    shards = AxialShards.create(case[0])
    pair = shards.split(x["pair"], (1, 2)).requires_grad_()
    single = shards.split(x["single"], (1,)).requires_grad_()
    pair_mask, token_mask = shards.pad(x["pair_mask"], (1, 2)), shards.pad(x["token_mask"], (1,))
    torch.manual_seed(11)  # dropout: the same draws on every rank
    with use_kernels(case[5]), autocast(device):
        pair_out, single_out = pairformer_rows(stack, pair, single, pair_mask, token_mask, shards)
    d_pair, d_single = shards.split(x["d_pair"], (1, 2)), shards.split(x["d_single"], (1,))
    loss = (pair_out.float() * d_pair).sum() + (single_out.float() * d_single).sum()
    loss.backward()
    all_reduce_gradients(stack, shards)
    n = case[0]
    with torch.no_grad():
        result = {
            "pair_out": shards.gather(pair_out, 1)[:, :n, :n], "single_out": shards.gather(single_out, 1)[:, :n],
            "d_pair_in": shards.gather(pair.grad, 1)[:, :n, :n], "d_single_in": shards.gather(single.grad, 1)[:, :n],
        }  # fmt: skip
    result.update({f"grad.{n}": p.grad for n, p in stack.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in result.items()}


def relative_error(value: torch.Tensor, reference: torch.Tensor, scale: float = 0.0) -> float:
    """||value - reference|| / max(||reference||, scale)."""
    assert torch.isfinite(value).all()
    return float((value - reference).norm() / max(reference.norm().item(), scale, 1e-30))


def errors(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every output and input gradient, and of every parameter gradient
    relative to its own norm or, for those that are zero in exact arithmetic (a LayerNorm bias
    in front of a softmax), to the parameter gradients' norm divided by sqrt(count)."""
    assert result.keys() == reference.keys()
    grads = [v for k, v in reference.items() if k.startswith("grad.")]
    scale = torch.cat([g.flatten() for g in grads]).norm().item() / len(grads) ** 0.5
    found = {}
    for key, value in reference.items():
        assert result[key].shape == value.shape, key
        found[key] = relative_error(result[key], value, scale if key.startswith("grad.") else 0.0)
    return found


def compare(sharded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: float) -> None:
    for key, error in errors(sharded, reference).items():
        assert error < tolerance, (key, error)


# ---------------------------------------------------------------------------- the worker


def worker(rank: int, world: int, init: str, out: Path, device: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init, rank=rank, world_size=world)
    try:
        cases = GPU_CASES if device == "cuda" else CPU_CASES
        dump = {name: run_sharded(case, device) for name, case in cases.items()}
        if rank == 0:
            torch.save(dump, out)
    finally:
        dist.destroy_process_group()


def launch(tmp_path: Path, device: str) -> dict[str, dict[str, torch.Tensor]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "sharded.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0"}
    if device == "cpu":  # the "triton" case runs the kernels in the interpreter, GPU or not
        env["TRITON_INTERPRET"] = "1"
    workers = [
        subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--world", "2", "--init", init,
                          "--out", str(out), "--device", device], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]  # fmt: skip
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(e[-3000:] for e in errors)
    return torch.load(out, weights_only=True)


# ---------------------------------------------------------------------------- the tests


def test_two_ranks_equal_one_process_outputs_and_every_gradient(tmp_path):
    sharded = launch(tmp_path, "cpu")
    for name, case in CPU_CASES.items():
        # against float64; the dropout case against fp32 (the same masks need the same dtype)
        reference = run_unsharded(case, "cpu", torch.float32 if name == "dropout" else torch.float64)
        compare(sharded[name], reference, FP32_TOL)
        if name == "dropout":  # dropout really dropped something: the eval-mode result differs
            assert relative_error(sharded[name]["pair_out"], run_unsharded(
                (*case[:4], 0.0, case[5]), "cpu", torch.float32)["pair_out"]) > 1e-2  # fmt: skip


def test_one_rank_is_the_stack_and_bad_shapes_are_config_errors():
    case = (9, 1, False, False, 0.0, "torch")
    stack, x = case_inputs(case, "cpu")
    shards = AxialShards.create(9)
    assert (shards.size, shards.rows, shards.padded) == (1, 9, 9)
    with torch.no_grad(), use_kernels("torch"):
        expected = stack(x["pair"], x["single"], x["pair_mask"], x["token_mask"])
        got = pairformer_rows(stack, x["pair"], x["single"], x["pair_mask"], x["token_mask"], shards)
    for value, reference in zip(got, expected):
        assert relative_error(value, reference) < FP32_TOL
    with pytest.raises(ConfigError, match="pair has shape"):
        pairformer_rows(stack, x["pair"][:, :8], x["single"], x["pair_mask"], x["token_mask"], shards)
    with pytest.raises(ConfigError, match="not the crop's 9 tokens"):
        AxialShards(9, 2, 0).split(x["pair"][:, :8, :8], (1, 2))
    assert AxialShards(9, 2, 1).split(x["pair"], (1, 2)).shape[1:3] == (5, 10)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_equal_one_gpu_bf16_triton(tmp_path):
    """"paper" widths, 2 blocks, 253 tokens padded to 254, bf16 autocast, triton kernels, NCCL:
    the sharded run is as close to float64 as the unsharded bf16 run (both bf16 roundings)."""
    sharded = launch(tmp_path, "cuda")["odd"]
    case = GPU_CASES["odd"]
    reference = run_unsharded(case, "cuda", torch.float64)
    own_errors = errors(run_unsharded(case, "cuda", torch.float32), reference)
    for key, error in errors(sharded, reference).items():
        assert error < max(BF16_TOL, 2 * own_errors[key]), (key, error, own_errors[key])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    worker(arguments.rank, arguments.world, arguments.init, arguments.out, arguments.device)
