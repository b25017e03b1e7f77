"""One self-contained HTML report: sections of text, plotly figures, structure views, tables.

plotly.js and 3Dmol.js are embedded once each (only if a section needs them), so the file
opens offline, from disk or as an attachment. The file is written atomically.
"""

from __future__ import annotations

import datetime
import html
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megafold.viz.plots import _figure_html
from megafold.viz.structure import StructureView, threedmol_script
from megafold.files import atomic_open

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0 auto; max-width: 1100px; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
nav ol { padding-left: 1.4em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f4f4f6; text-align: left; }
td.num { text-align: right; }
"""


@dataclass(frozen=True)
class Section:
    """One report section: a title and any of text, a figure, a structure view, a table and
    an HTML snippet (shown in that order).

    text: plain text (escaped; blank lines separate paragraphs).
    figure: a plotly figure.
    view: a ``megafold.viz.StructureView`` (``structure_view(...)``).
    table: rows as mappings (columns in order of first appearance), or a pandas DataFrame.
    html: a trusted HTML snippet, inserted as is.
    """

    title: str
    text: str | None = None
    figure: go.Figure | None = None
    view: StructureView | None = None
    table: Sequence[Mapping[str, Any]] | pd.DataFrame | None = None
    html: str | None = None


def _format_cell(value: Any) -> tuple[str, bool]:
    """(text, is_number) for a table cell; floats with 4 significant digits."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        number = float(value)
        return ("nan" if math.isnan(number) else f"{number:.4g}"), True
    return str(value), False


def _table_rows(table: Any) -> list[Mapping[str, Any]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a pandas DataFrame
        return table.to_dict(orient="records")
    rows = list(table)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"table row {index} is a {type(row).__name__}, expected a mapping of column -> value"
            )
    return rows


def _table_html(table: Any) -> str:
    rows = _table_rows(table)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            text, is_number = _format_cell(row.get(column))
            css = ' class="num"' if is_number else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _text_html(text: str) -> str:
    paragraphs = [part.strip() for part in re.split(r"\n\s*\n", text) if part.strip()]
    return "\n".join(f"<p>{html.escape(paragraph)}</p>" for paragraph in paragraphs)


def _section_html(index: int, section: Section) -> str:
    parts = [f'<section id="section-{index}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.text is not None:
        parts.append(_text_html(section.text))
    if section.figure is not None:
        parts.append(_figure_html(section.figure, include_plotlyjs=False))
    if section.view is not None:
        parts.append(section.view.html(include_library=False))
    if section.table is not None:
        parts.append(_table_html(section.table))
    if section.html is not None:
        parts.append(section.html)
    parts.append("</section>")
    return "\n".join(parts)


def render_report(sections: Sequence[Section], *, title: str = "megafold report") -> str:
    """The report as one HTML document (what ``write_report`` writes)."""
    from plotly.offline import get_plotlyjs

    import megafold

    sections = list(sections)
    for index, section in enumerate(sections):
        if not isinstance(section, Section):
            raise TypeError(f"sections[{index}] is a {type(section).__name__}, expected megafold.viz.Section")
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="megafold {megafold.__version__}">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
    ]
    if any(section.figure is not None for section in sections):
        head.append("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>")
        head.append(f'<script data-megafold-lib="plotly.js">{get_plotlyjs()}</script>')
    if any(section.view is not None for section in sections):
        head.append(threedmol_script())
    head.append("</head>")
    toc = "".join(
        f'<li><a href="#section-{index}">{html.escape(section.title)}</a></li>'
        for index, section in enumerate(sections)
    )
    created = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Written {html.escape(created)} by megafold {megafold.__version__}.</p>',
        f"<nav><ol>{toc}</ol></nav>",
        *(_section_html(index, section) for index, section in enumerate(sections)),
        "</body>",
        "</html>",
    ]
    return "\n".join(head + body) + "\n"


def write_report(
    path: str | os.PathLike, sections: Sequence[Section], *, title: str = "megafold report"
) -> Path:
    """Write ``sections`` as one self-contained HTML file at ``path`` and return the path.

    The whole document is rendered first and then written to a temporary file beside
    ``path`` and renamed over it, so a failure or a kill never leaves a torn report (an
    existing one stays as it was).
    """
    path = Path(path)
    document = render_report(sections, title=title)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(document)
    return path
