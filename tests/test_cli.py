"""The megafold command: user errors in one line (exit 2), train / resume / predict / profile
through the CLI, and (slow) the whole quickstart into a temporary directory."""

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from megafold.cli import main

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "cached_data" / "store.zarr"
STRUCTURES = REPO / "cached_data" / "structures"
TINY = ["--preset", "tiny", "--kernels", "torch", "--workers", "0", "--quiet", "--crop", "16"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv, capsys) -> tuple[int, str, str]:
    """``megafold ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--store", "/no/such/store"], "megafold: error: /no/such/store: no precache store here"),
        (["train", "--store", str(STORE), "--preset", "huge"], "megafold: error: unknown model preset 'huge'"),
        (["train", "--store", str(STORE), "--crop", "0"], "megafold train: error: argument --crop: expected a positive integer, got 0"),
        (["train", "--store", str(STORE), "--crop", "big"], "megafold train: error: argument --crop: expected a positive integer, got 'big'"),
        (["train", "--store", str(STORE), "--steps", "-3"], "megafold train: error: argument --steps: expected a positive integer"),
        (["train", "--store", str(STORE), "--pad-multiple", "-8"], "megafold train: error: argument --pad-multiple: expected a non-negative integer, got -8"),
        (["train"], "megafold train: error: the following arguments are required: --store"),
        (["predict", "/no/such.cif", "--checkpoint", "x.pt"], "megafold: error: /no/such.cif: no such structure file"),
        (["quickstart", "--data", "/no/such/data"], "megafold: error: /no/such/data/structures: no shipped structures here"),
        (["frobnicate"], "megafold: error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["train", "--store", str(STORE), "--set", "chunky=2"], "megafold: error: preset 'tiny': unknown config field"),
        (["train", "--store", str(STORE), "--set", "diffusion_chunk=two"], "megafold: error: preset 'tiny': diffusion_chunk='two' is not a int"),
        (["train", "--store", str(STORE), "--set", "diffusion_chunk"], "megafold train: error: argument --set: expected FIELD=VALUE, got 'diffusion_chunk'"),
        (["profile", "--set", "pair_offload=true", "--device", "cpu"], "megafold: error: preset 'tiny': pair_offload moves"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(argv, capsys)
    assert status == 2
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_user_error_from_the_installed_command_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megafold", "train", "--store", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"megafold: error: {tmp_path / 'missing'}: no precache store here (run `megafold precache SRC... --out {tmp_path / 'missing'}`)"
    ]


def test_train_resume_and_predict_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--store", str(STORE), "--keys", "1znf", "--out", str(out), *TINY]
    status, stdout, _ = run([*base, "--steps", "2", "--set", "diffusion_chunk=1", "--set", "pair_dropout=0.1",
                             "--pad-multiple", "8"], capsys)
    assert status == 0 and "trained to step 2" in stdout
    from megafold.train import load_checkpoint

    state = load_checkpoint(out / "checkpoint.pt")
    saved = state["model_config"]  # --set reached the run's config
    assert saved["diffusion_chunk"] == 1 and saved["pair_dropout"] == 0.1 and saved["kernels"] == "torch"
    assert state["train_config"]["pad_multiple"] == 8

    status, _, err = run([*base, "--steps", "3"], capsys)
    assert status == 2 and "already holds a run" in err and "--resume" in err

    status, _, err = run([*base, "--steps", "3", "--resume", "--set", "diffusion_chunk=1"], capsys)
    assert status == 2 and "--set applies to new runs" in err

    status, stdout, _ = run([*base, "--steps", "3", "--resume"], capsys)
    assert status == 0 and "trained to step 3" in stdout
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3

    status, _, err = run(["train", "--store", str(STORE), "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert status == 2 and "no such checkpoint" in err

    predictions = tmp_path / "predictions"
    status, stdout, _ = run(
        ["predict", str(STRUCTURES / "1znf.cif.gz"), "--checkpoint", str(out / "checkpoint.pt"), "--out", str(predictions),
         "--steps", "2", "--samples", "1", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert status == 0 and "mean pLDDT" in stdout and "ca_lddt" in stdout
    assert sorted(p.name for p in predictions.iterdir()) == ["1znf.cif", "1znf_pae.npy", "1znf_summary.json"]


def test_profile_compares_kernels(capsys, tmp_path):
    status, stdout, _ = run(
        ["profile", "--preset", "tiny", "--crop", "8", "--kernels", "torch", "--forward-only", "--device", "cpu",
         "--out", str(tmp_path / "profile.zarr")],
        capsys,
    )  # fmt: skip
    assert status == 0
    assert stdout.startswith("kernels torch  device CPU") and "step (ms)" in stdout
    assert "TriangleAttention" in stdout and "TriangleMultiplication" in stdout
    assert (tmp_path / "profile.zarr").is_dir()


def test_precache_and_bench_pass_their_arguments_through(capsys, monkeypatch, tmp_path):
    status, _, err = run(["precache"], capsys)
    assert status == 2 and "the following arguments are required" in err
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert main(["bench", "--quick"]) == 0
    assert calls == [[sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--quick"]]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.external, self.headings, self._heading = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if (tag in ("script", "img", "iframe") and attrs.get("src")) or (tag == "link" and attrs.get("href")):
            self.external.append((tag, attrs))
        self._heading = tag == "h2"

    def handle_data(self, data):
        if self._heading:
            self.headings.append(data.strip())
            self._heading = False


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """``megafold quickstart`` (the code path of ``make quickstart``, fewer steps) into a
    temporary directory: an offline report with every section."""
    out = tmp_path / "quickstart"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the command sets it itself
    result = subprocess.run(
        [sys.executable, "-m", "megafold", "quickstart", "--out", str(out), "--steps", "4", "--predict-steps", "4"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report.html"
    assert f"report: {report}" in result.stdout
    page = _Page()
    text = report.read_text()
    page.feed(text)
    assert page.external == []
    assert page.headings == [
        "Summary", "Training loss", "Prediction of 1a8o on the truth", "Predicted aligned error",
        "Profile: kernels torch vs triton",
    ]  # fmt: skip
    assert text.count('class="plotly-graph-div"') == 3 and text.count('id="3dmolviewer_') == 1
    assert "<td>triton</td>" in text and "<td>torch</td>" in text
    summary = json.loads((out / "predictions" / "1a8o_summary.json").read_text())
    assert 0.0 <= summary["metrics"]["ca_lddt"] <= 1.0
    assert len((out / "train" / "metrics.csv").read_text().strip().splitlines()) == 1 + 4


def test_tuning_shows_each_choice_and_every_candidate(capsys, tmp_path):
    key = json.dumps(["transition_bwd", [128, 512, 128, "torch.bfloat16", 1048576], "NVIDIA H100 80GB HBM3"])
    trials = [{"config": {"BLOCK_M": 64, "num_warps": 4}, "ms": 3.7},
              {"config": {"BLOCK_M": 128, "num_warps": 8}, "ms": 3.46},
              {"config": {"BLOCK_M": 256, "num_warps": 8}, "error": "OutOfResources: shared memory"}]
    (tmp_path / "autotune-trials.json").write_text(json.dumps({key: trials}))
    status, out, _ = run(["tuning", "--cache-dir", str(tmp_path), "--trials"], capsys)
    lines = out.splitlines()
    assert status == 0 and len(lines) == 4
    assert lines[0].startswith("transition_bwd (128, 512, 128, torch.bfloat16, 1048576) on NVIDIA H100 80GB HBM3: "
                               "BLOCK_M=128 num_warps=8 3.46 ms, next 3.7000 ms (3 candidates)"), lines[0]
    assert "3.4600 ms" in lines[1] and "3.7000 ms" in lines[2] and "OutOfResources" in lines[3]
    status, out, _ = run(["tuning", "--cache-dir", str(tmp_path), "--op", "triangle"], capsys)
    assert status == 0 and out.startswith("no tuning records")


def test_tuning_names_a_broken_record(capsys, tmp_path):
    (tmp_path / "autotune-trials.json").write_text("{not json")
    status, _, err = run(["tuning", "--cache-dir", str(tmp_path)], capsys)
    assert status == 2 and err.startswith(f"megafold: error: {tmp_path / 'autotune-trials.json'}: not a tuning record")
    assert err.count("\n") == 1



def test_tune_needs_a_gpu_and_names_a_bad_preset(capsys, monkeypatch):
    status, _, err = run(["tune", "--preset", "nosuch"], capsys)
    assert status == 2 and err.startswith("megafold: error: unknown model preset 'nosuch'")
    status, _, err = run(["tune", "--preset", "tiny", "--device", "cpu"], capsys)
    assert status == 2 and "tuning times launches on a GPU" in err and err.count("\n") == 1
    status, _, err = run(["tune", "--preset", "tiny", "--device", "cpu", "--force", "--ops", "triangle"], capsys)
    assert status == 2 and "tuning times launches on a GPU" in err
