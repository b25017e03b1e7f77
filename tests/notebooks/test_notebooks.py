"""Every notebook and tutorial: paired with its jupytext .py, outputs stripped, a setup cell
that works in a fresh Colab runtime, and a headless run on the CPU ("tiny" sizes) with
nbclient, in a scratch directory."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {
    "notebooks": ("profiling_dashboard", "structure_explorer"),
    "tutorials": ("01_evoattention", "02_precache", "03_training", "04_profiling", "05_visualization"),
}
NOTEBOOKS = sorted(path for folder in REQUIRED for path in (REPO / folder).glob("*.ipynb"))


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _params():
    return [pytest.param(path, id=_id(path)) for path in NOTEBOOKS]


def test_every_notebook_is_there_as_a_pair():
    for folder, names in REQUIRED.items():
        for name in names:
            assert (REPO / folder / f"{name}.py").is_file(), f"{folder}/{name}.py"
            assert (REPO / folder / f"{name}.ipynb").is_file(), f"{folder}/{name}.ipynb"
    assert {_id(p) for p in NOTEBOOKS} == {f"{f}/{n}" for f, names in REQUIRED.items() for n in names}


@pytest.mark.parametrize("notebook", _params())
def test_paired_stripped_and_set_up_for_colab(notebook):
    import jupytext

    stored = nbformat.read(notebook, as_version=4)
    from_py = jupytext.read(notebook.with_suffix(".py"))
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in from_py.cells], (
        f"{notebook.name} and its .py differ: run `jupytext --sync {notebook.with_suffix('.py').relative_to(REPO)}`"
    )
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "outputs must be stripped"
    setup = code[0].source
    assert 'find_spec("megafold")' in setup and "pip" in setup, "the first cell installs megafold where it is missing"
    assert "describe_device()" in setup, "the first cell labels results with the device (GPU, ROCm or CPU)"
    assert stored.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("notebook", _params())
def test_runs_headless_on_the_cpu(notebook, tmp_path):
    from nbclient import NotebookClient

    from megafold.profile import describe_device

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # nbclient's stand-in for the Output widget's front end sends every output back to the kernel
    # and deadlocks once they reach a few MB (jupyter/nbclient#312): without it, what widgets
    # display lands in the cell's outputs. test_browser.py runs the real front end.
    client.comm_open_handlers = {"jupyter.widget": lambda msg: None}
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"running on {describe_device()}" in printed
