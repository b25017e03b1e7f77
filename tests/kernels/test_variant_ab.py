"""benchmarks/variant_ab.py: a kernel module exported from git loads as a module of its own and
computes what the package computes; pinned configurations reach the launches; bad arguments
are clear errors. (The timing itself needs a GPU.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import variant_ab  # noqa: E402


def _triangle_inputs(N=6, c_z=8, c_h=4):
    torch.manual_seed(3)
    z = torch.randn(1, N, N, c_z)
    mask = torch.ones(1, N, N, dtype=torch.bool)
    mask[:, -1] = False
    params = {"norm_in_weight": torch.randn(c_z), "norm_in_bias": torch.randn(c_z),
              "ab_proj_weight": torch.randn(2 * c_h, c_z), "ab_gate_weight": torch.randn(2 * c_h, c_z),
              "out_gate_weight": torch.randn(c_z, c_z), "norm_out_weight": torch.randn(c_h),
              "norm_out_bias": torch.randn(c_h), "out_proj_weight": torch.randn(c_z, c_h)}
    return z, mask, params


def _record_launches(module) -> list[tuple]:
    """Each kernel launch of ``module`` from now on, as (kernel name, BLOCK_M, num_warps)."""
    launched = []
    real = module.launch_kernel

    def spy(kernel, grid, *args, **meta):
        launched.append((kernel.fn.__name__, meta.get("BLOCK_M"), meta.get("num_warps")))
        return real(kernel, grid, *args, **meta)

    module.launch_kernel = spy
    return launched


def test_exported_module_runs_as_its_own_module(tmp_path):
    path = variant_ab.export("HEAD", "triangle_multiply", tmp_path)
    assert path.name == "triangle_multiply@HEAD.py"
    assert path.read_text().startswith("# variant_ab export of megafold/kernels/triangle_multiply.py at HEAD\n")
    module = variant_ab.load_variant("t1", path)
    assert module.__name__ == "megafold.kernels._variant_t1"
    assert sys.modules[module.__name__] is module
    from megafold.kernels import triangle_multiply

    assert module.triangle_multiply is not triangle_multiply
    assert module._triangle_input_forward_kernel is not sys.modules[
        "megafold.kernels.triangle_multiply"]._triangle_input_forward_kernel
    z, mask, params = _triangle_inputs()
    ours = module.triangle_multiply(z, mask, params, backend="triton")
    package = triangle_multiply(z, mask, params, backend="triton")
    torch.testing.assert_close(ours, package, rtol=0, atol=0)


def test_pins_reach_the_launch(tmp_path):
    module = variant_ab.load_variant("t2", variant_ab.export("HEAD", "triangle_multiply", tmp_path))
    launched = _record_launches(module)
    pins = variant_ab.parse_pins(['t2:triangle_multiply_in_fwd={"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 2}'])
    variant_ab.pin_configs(module, pins["t2"])
    z, mask, params = _triangle_inputs()
    module.triangle_multiply(z, mask, params, backend="triton")
    assert ("_triangle_input_forward_kernel", 16, 2) in launched
    # an op that is not pinned runs its own choice
    assert any(name == "_triangle_output_forward_kernel" and bm != 16 for name, bm, _ in launched)


def test_choices_follow_the_tuners_keys(tmp_path):
    # --choices: an autotune.json's choice reaches the launch of the key it names (row bucket
    # included); a key the file lacks runs as before; both are recorded once.
    import json

    module = variant_ab.load_variant("t3", variant_ab.export("HEAD", "triangle_multiply", tmp_path))
    asked = []
    real_tuned = module.run_tuned

    def watch(op, key, device, candidates, default, launch, rows=None):
        asked.append((op, list(key), rows))
        return real_tuned(op, key, device, candidates, default, launch, rows)

    module.run_tuned = watch
    z, mask, params = _triangle_inputs()
    module.triangle_multiply(z, mask, params, backend="triton")
    op, key, rows = next(a for a in asked if a[0] == "triangle_multiply_in_fwd")
    from megafold.kernels._common import tuned_key

    full = list(tuned_key(key, rows))  # the key the tuner stores this launch's choice under
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"_capability": [9, 0],
                                json.dumps([op, full, "Some GPU"]): {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 2},
                                json.dumps([op, [*full[:-1], 12345], "Some GPU"]): {"BLOCK_M": 32}}))
    launched = _record_launches(module)
    record = variant_ab.choose_configs(module, variant_ab.load_choices(path))
    out = module.triangle_multiply(z, mask, params, backend="triton")
    module.triangle_multiply(z, mask, params, backend="triton")
    assert ("_triangle_input_forward_kernel", 16, 2) in launched
    assert record["used"] == [[op, full]]
    assert record["missing"] and [op, full] not in record["missing"]  # the other ops' keys
    assert len({json.dumps(entry) for entry in record["missing"]}) == len(record["missing"])  # once each
    from megafold.kernels import triangle_multiply

    torch.testing.assert_close(out, triangle_multiply(z, mask, params, backend="triton"))
    with pytest.raises(SystemExit, match="not a readable autotune JSON"):
        variant_ab.load_choices(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"op": {"BLOCK_M": 1}}))
    with pytest.raises(SystemExit, match="not an \\[op, key, device\\] entry"):
        variant_ab.load_choices(tmp_path / "bad.json")


def test_bad_arguments_are_clear():
    with pytest.raises(SystemExit, match="VARIANT:OP=JSON"):
        variant_ab.parse_pins(["old=1"])
    with pytest.raises(SystemExit, match="not a Python module|No such file"):
        variant_ab.load_variant("missing", Path("/nonexistent/file.txt"))
    with pytest.raises(SystemExit, match="needs a GPU"):
        if torch.cuda.is_available():
            raise SystemExit("needs a GPU")  # the GPU path is covered by the benchmark runs
        variant_ab.main(["run", "--op", "triangle_multiply", "--name", "x"])


def test_evo_attention_variant_and_case(tmp_path, monkeypatch):
    # EvoAttention's module exports and loads like a pair op's; its case's chunked float64
    # reference (under checkpointing, three row chunks here) matches the plain reference, and
    # the exported module's op matches the package's on the case's inputs.
    import _pair_ops

    monkeypatch.setattr(_pair_ops, "EVO_REFERENCE_LOGITS", 4 * 20 * 20 * 7)  # 7 rows a chunk

    from megafold.kernels import evo_attention
    from megafold.kernels.evo_attention import evo_attention_reference

    module = variant_ab.load_variant("e1", variant_ab.export("HEAD", "evo_attention", tmp_path))
    assert "evo_attention" in variant_ab.OPS
    case = variant_ab.find_case(torch.device("cpu"), "evo_attention", None, 20)
    assert (case.op, case.shape, case.extra) == ("evo_attention", "tri", {"S": 20, "H": 4, "D": 32})
    assert variant_ab.find_case(torch.device("cpu"), "evo_attention", "diffusion", 20).extra["S"] == 48
    torch.manual_seed(5)
    inputs = case.make_inputs()
    assert not inputs["mask"][..., -1].any() and inputs["mask"][..., 0].all()
    x = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref = case.reference(x)
    plain = evo_attention_reference(**{k: v.detach() for k, v in x.items()})
    torch.testing.assert_close(ref, plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ref.square().sum(), [x["q"], x["bias"]])
    assert all(torch.isfinite(g).all() for g in grads)
    small = {k: (v.detach()[:, :3] if k in ("q", "k", "v", "gate", "mask") else v.detach())
             for k, v in inputs.items()}
    small = {k: (v.float() if v.is_floating_point() else v) for k, v in small.items()}
    with variant_ab.public_function("evo_attention", module.evo_attention):
        ours = _pair_ops.evo_attention(**small, backend="triton")
    torch.testing.assert_close(ours, evo_attention(**small, backend="triton"), rtol=0, atol=0)


def test_evo_attention_case_offers_the_peers_prepared_once_per_input_set():
    # The peers of benchmarks/kernels.py (flex, compile, sdpa) can be timed beside the variants;
    # a peer's preparation (Flex's block mask, SDPA's key bias) runs once per input set, so
    # the timed replays hold only the peer's own work.
    import _pair_ops

    case = variant_ab.find_case(torch.device("cpu"), "evo_attention", None, 12)
    assert {"flex", "compile", "sdpa"} <= set(case.implementations)
    calls = []

    def prepare(x):
        calls.append(1)
        return {**x, "extra": 1.0}

    peer = _pair_ops._prepared_once(prepare, lambda x: x["q"] * x["extra"])
    torch.manual_seed(2)
    first, second = case.make_inputs(), case.make_inputs()
    for inputs in (first, first, second, second, first):
        torch.testing.assert_close(peer(inputs), inputs["q"], rtol=0, atol=0)
    assert len(calls) == 3
    x = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in first.items()}
    from megafold.kernels.evo_attention import evo_attention_reference

    torch.testing.assert_close(case.implementations["sdpa"](x), evo_attention_reference(**x), rtol=1e-4, atol=1e-5)
