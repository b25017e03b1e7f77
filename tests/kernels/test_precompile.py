"""megafold.kernels.precompile: records of Triton launches, compiled in worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megafold.kernels.precompile import _decode, _encode, compile_in_processes, record_launches
from megafold.profile import precompile_kernels


def test_arguments_are_recorded_as_what_triton_specializes_on():
    t = torch.zeros(3, dtype=torch.bfloat16)
    assert _encode(t) == ("__tensor__", "bfloat16")
    assert _decode(_encode(t)) is torch.bfloat16
    assert [_decode(_encode(v)) for v in (7, 0.5, True, None, "ieee")] == [7, 0.5, True, None, "ieee"]
    with pytest.raises(TypeError):
        _encode(object())


def test_recording_restores_the_launcher_and_nothing_to_compile_costs_nothing():
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    with pytest.raises(RuntimeError), record_launches([]):
        assert JITFunction.run is not original
        raise RuntimeError("boom")
    assert JITFunction.run is original
    handle = compile_in_processes([])
    assert handle.wait()["records"] == 0 and handle.pool is None


def test_a_cancelled_handle_lets_its_pool_go():
    from concurrent.futures import ProcessPoolExecutor

    from megafold.kernels.precompile import Precompile

    handle = Precompile(1, [], ProcessPoolExecutor(1))
    handle.cancel()
    assert handle.pool is None
    handle.cancel()  # twice is harmless
    assert handle.wait()["compiled"] == 0


def test_no_precompiling_off_cuda():
    assert precompile_kernels("tiny", crop=16, device="cpu") is None


@pytest.mark.gpu
def test_precompiled_kernels_are_loaded_not_compiled(tmp_path):
    """A fresh Triton cache: the recorded launches of a transition compile in two worker
    processes; the real launches afterwards add nothing to the cache (every kernel loads)."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        from megafold.kernels import transition
        from megafold.kernels.precompile import compile_in_processes, record_launches

        def step():
            x = torch.randn(2, 96, 96, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            ln_w, ln_b = torch.ones(128, device="cuda"), torch.zeros(128, device="cuda")
            w_in = torch.randn(1024, 128, device="cuda", requires_grad=True)
            w_out = torch.randn(128, 512, device="cuda", requires_grad=True)
            with torch.autocast("cuda", torch.bfloat16):
                transition(x, ln_w, ln_b, w_in, w_out, backend="triton").float().sum().backward()

        if __name__ == "__main__":
            records = []
            with record_launches(records):
                step()
            result = compile_in_processes(records, workers=2).wait()
            assert result["compiled"] == result["records"] > 0, result
            files = lambda: sum(len(f) for _, _, f in os.walk(os.environ["TRITON_CACHE_DIR"]))
            before = files()
            step()
            torch.cuda.synchronize()
            assert files() == before, (before, files())
            print("ok", result)
        """
    )
    path = tmp_path / "precompile_check.py"
    path.write_text(script)
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "MEGAFOLD_AUTOTUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]

