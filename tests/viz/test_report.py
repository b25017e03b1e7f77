"""megafold.viz.report: one self-contained, valid, offline HTML file, written atomically."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

import megafold.viz as viz
from megafold.viz.structure import _STATIC

STRUCTURES = Path(os.environ["MEGAFOLD_SHARED_DATA"]) / "structures"
LIBRARY_3DMOL = (_STATIC / "3Dmol-min.js").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    rng = np.random.default_rng(6)
    truth = viz.load_atoms(STRUCTURES / "1ubq.cif.gz")
    prediction = viz.atom_array(
        truth.coord + rng.normal(scale=0.7, size=truth.coord.shape),
        truth.atom_name,
        truth.res_name,
        truth.chain_id,
        truth.res_id,
        truth.element,
        plddt=rng.uniform(30, 100, size=truth.array_length()),
    )
    pae = rng.gamma(2.0, 3.0, size=(76, 76))
    sections = [
        viz.Section("Overview", text="Loss <fell> & rose.\n\nSecond paragraph."),
        viz.Section("Prediction vs truth", view=viz.structure_view(prediction, truth=truth, color="plddt")),
        viz.Section("DNA", view=viz.structure_view(STRUCTURES / "2q2k.cif.gz")),
        viz.Section("PAE", figure=viz.pae_figure(pae)),
        viz.Section("Contacts", figure=viz.contact_map(truth, compare=prediction)),
        viz.Section(
            "Profile",
            table=[
                {"module": "TriangleAttention", "ms": 12.34567, "calls": 4},
                {"module": "<Transition>", "ms": float("nan")},
            ],
        ),
        viz.Section("Raw", html="<p id='raw-snippet'>kept as is</p>"),
    ]
    path = viz.write_report(
        tmp_path_factory.mktemp("report") / "nested" / "report.html", sections, title="Quick & start"
    )
    return path, path.read_text(encoding="utf-8")


def test_report_is_valid_html_with_every_section(full_report, parse_html):
    path, text = full_report
    document = parse_html(text)
    assert text.count('<section id="section-') == 7
    assert "Loss &lt;fell&gt; &amp; rose." in text and "<p>Second paragraph.</p>" in text
    assert "<title>Quick &amp; start</title>" in text
    assert "<p id='raw-snippet'>kept as is</p>" in text
    assert document.doctype == "DOCTYPE html"
    assert document.cells == [
        "module",
        "ms",
        "calls",
        "TriangleAttention",
        "12.35",
        "4",
        "<Transition>",
        "nan",
    ]
    assert text.count('class="plotly-graph-div"') == 2
    assert text.count('id="3dmolviewer_') == 2
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_report_embeds_each_library_once_and_loads_nothing_remote(full_report, parse_html):
    from plotly.offline import get_plotlyjs

    _, text = full_report
    document = parse_html(text)
    assert document.external == []  # no <script src>, <link href>, <img src>
    assert text.count(get_plotlyjs()) == 1
    assert text.count(LIBRARY_3DMOL) == 1
    scripts_outside_libraries = [
        script for script in document.scripts if get_plotlyjs() not in script and LIBRARY_3DMOL not in script
    ]
    assert scripts_outside_libraries, "figure and view scripts are inline"
    for script in scripts_outside_libraries:
        assert not re.search(r"https?://", script), script[:200]
    html_outside_scripts = text
    for script in document.scripts:
        html_outside_scripts = html_outside_scripts.replace(script, "")
    assert not re.search(r"https?://", html_outside_scripts)


def test_report_without_figures_or_views_carries_no_library(tmp_path, parse_html):
    path = viz.write_report(tmp_path / "small.html", [viz.Section("Only text", text="hello")])
    text = path.read_text()
    parse_html(text)
    assert len(text) < 10_000 and "Plotly" not in text and "$3Dmol" not in text


def test_table_accepts_a_dataframe(parse_html):
    import pandas as pd

    frame = pd.DataFrame({"kernels": ["torch", "triton"], "step_s": [2.5, 1.25]})
    document = parse_html(viz.render_report([viz.Section("Speed", table=frame)]))
    assert document.cells == ["kernels", "step_s", "torch", "2.5", "triton", "1.25"]


def test_a_failed_write_leaves_the_previous_report_intact(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    viz.write_report(path, [viz.Section("First", text="version one")])
    before = path.read_bytes()

    with pytest.raises(TypeError, match="table row 0 is a list"):
        viz.write_report(path, [viz.Section("Bad", table=[["not", "a", "mapping"]])])
    assert path.read_bytes() == before

    def killed_before_rename(source, destination):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        viz.write_report(path, [viz.Section("Second", text="version two")])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left
    monkeypatch.undo()

    viz.write_report(path, [viz.Section("Second", text="version two")])
    assert "version two" in path.read_text()
    with pytest.raises(TypeError, match=r"sections\[0\] is a str"):
        viz.write_report(path, ["not a section"])
