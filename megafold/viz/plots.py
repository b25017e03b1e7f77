"""Plotly heatmaps of predicted aligned error, distograms and contact maps, and an offline
plotly setup for notebooks.

Figures are plain ``plotly.graph_objects.Figure`` objects: ``megafold.viz.report`` embeds
them in a self-contained HTML report; in a notebook call ``init_notebook()`` once so they
render without a CDN. Arrays may be numpy or torch (any device, any float dtype).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from megafold.errors import StructureError
from megafold.data.atoms import StructureLike, load_atoms, to_numpy
from megafold.viz.structure import _pair_by_key

if TYPE_CHECKING:
    import plotly.graph_objects as go

# AF3 distogram: 64 equal bins over 2..22 Angstrom (AF3 supplement, Sec. 4.4).
AF3_DISTOGRAM_EDGES = np.linspace(2.0, 22.0, 65)
PURINE_MARKER_ATOM = "N9"  # present in purines (and modified purines), absent in pyrimidines


def _square_matrix(values: Any, name: str, trailing: int = 0) -> np.ndarray:
    """``values`` as a float64 array ``[N, N, *trailing]``; leading size-1 axes are dropped."""
    array = to_numpy(values).astype(np.float64)
    while array.ndim > 2 + trailing and array.shape[0] == 1:
        array = array[0]
    square = array.shape[:2]
    if array.ndim != 2 + trailing or square[0] != square[1] or square[0] == 0:
        expected = "[N, N]" if trailing == 0 else "[N, N, bins]"
        raise ValueError(f"{name} must have shape {expected}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(array)).sum())} NaN/inf values")
    return array


def _chain_decorations(
    fig: go.Figure, chain_ids: Sequence[str] | None, n: int, *, col: int | None = None
) -> None:
    """Lines at chain boundaries and chain names as ticks, for ``[N, N]`` token heatmaps."""
    if chain_ids is None:
        return
    chains = np.asarray([str(chain) for chain in chain_ids])
    if chains.shape != (n,):
        raise ValueError(f"chain_ids must have one entry per token ({n}), got {len(chains)}")
    starts = np.flatnonzero(np.r_[True, chains[1:] != chains[:-1]])
    ends = np.r_[starts[1:], n]
    centres = ((starts + ends - 1) / 2).tolist()
    labels = chains[starts].tolist()
    axis_ref = {} if col is None else {"row": 1, "col": col}
    for boundary in starts[1:]:
        position = boundary - 0.5
        fig.add_vline(x=position, line={"color": "black", "width": 1}, **axis_ref)
        fig.add_hline(y=position, line={"color": "black", "width": 1}, **axis_ref)
    fig.update_xaxes(tickvals=centres, ticktext=labels, **axis_ref)
    fig.update_yaxes(tickvals=centres, ticktext=labels, **axis_ref)


def _square_axes(fig: go.Figure, n: int, *, col: int | None = None, x_title: str, y_title: str) -> None:
    axis_ref = {} if col is None else {"row": 1, "col": col}
    anchor = "x" if col in (None, 1) else f"x{col}"
    fig.update_xaxes(title_text=x_title, range=[-0.5, n - 0.5], constrain="domain", **axis_ref)
    fig.update_yaxes(
        title_text=y_title, range=[n - 0.5, -0.5], scaleanchor=anchor, constrain="domain", **axis_ref
    )


def pae_figure(
    pae: Any,
    *,
    chain_ids: Sequence[str] | None = None,
    max_error: float = 32.0,
    title: str = "Predicted aligned error",
) -> go.Figure:
    """Heatmap of the predicted aligned error ``[N, N]`` in Angstrom (row i: aligned on token i,
    column j: error of token j), AlphaFold DB's green scale saturating at ``max_error``.

    chain_ids ``[N]``: the chain of each token; chain boundaries are drawn and labelled.
    """
    import plotly.graph_objects as go

    pae = _square_matrix(pae, "pae")
    n = pae.shape[0]
    fig = go.Figure(
        go.Heatmap(
            z=pae,
            zmin=0.0,
            zmax=max_error,
            colorscale="Greens_r",
            colorbar={"title": {"text": "\u00c5"}},
            hovertemplate="aligned %{y}, scored %{x}: %{z:.2f} \u00c5<extra></extra>",
        )
    )
    _square_axes(fig, n, x_title="Scored token", y_title="Aligned token")
    _chain_decorations(fig, chain_ids, n)
    fig.update_layout(title=title, height=520, width=600, plot_bgcolor="white")
    return fig


def _bin_centres(bins: Any, n_bins: int) -> np.ndarray:
    bins = to_numpy(bins).astype(np.float64).ravel()
    if len(bins) == n_bins:
        return bins
    if len(bins) == n_bins + 1:  # edges
        return (bins[1:] + bins[:-1]) / 2
    if len(bins) == n_bins - 1 and n_bins >= 3:  # AlphaFold-style inner breaks, open outer bins
        width = np.diff(bins).mean()
        inner = (bins[1:] + bins[:-1]) / 2
        return np.r_[bins[0] - width / 2, inner, bins[-1] + width / 2]
    raise ValueError(
        f"bins must hold {n_bins} centres, {n_bins + 1} edges or {n_bins - 1} breaks for "
        f"{n_bins} distogram bins, got {len(bins)} values"
    )


def distogram_probabilities(distogram: Any) -> np.ndarray:
    """``[N, N, bins]`` probabilities from logits or probabilities.

    Taken as probabilities when non-negative and summing to 1 (within 1e-3) over the bins,
    as logits otherwise (softmax over the last axis).
    """
    values = _square_matrix(distogram, "distogram", trailing=1)
    if values.min() >= 0 and np.abs(values.sum(-1) - 1).max() < 1e-3:
        return values
    shifted = np.exp(values - values.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def distogram_figure(
    distogram: Any,
    bins: Any = None,
    *,
    contact_cutoff: float = 8.0,
    chain_ids: Sequence[str] | None = None,
    title: str = "Distogram",
) -> go.Figure:
    """Two heatmaps of a distogram ``[N, N, bins]`` (logits or probabilities): the expected
    distance (Angstrom) and the probability that the distance is below ``contact_cutoff``.

    bins: bin centres ``[bins]``, edges ``[bins + 1]`` or AlphaFold-style breaks
    ``[bins - 1]`` in Angstrom; default AF3's 64 bins over 2..22 Angstrom.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    probabilities = distogram_probabilities(distogram)
    n, _, n_bins = probabilities.shape
    centres = _bin_centres(AF3_DISTOGRAM_EDGES if bins is None else bins, n_bins)
    expected = probabilities @ centres
    contact = probabilities[..., centres < contact_cutoff].sum(-1)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Expected distance (\u00c5)", f"P(distance < {contact_cutoff:g} \u00c5)"),
        horizontal_spacing=0.14,
    )
    fig.add_trace(
        go.Heatmap(
            z=expected,
            colorscale="Viridis",
            colorbar={"x": 0.43, "title": {"text": "\u00c5"}},
            hovertemplate="%{y}, %{x}: %{z:.2f} \u00c5<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=contact,
            zmin=0.0,
            zmax=1.0,
            colorscale="Blues",
            colorbar={"x": 1.0},
            hovertemplate="%{y}, %{x}: %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    for col in (1, 2):
        _square_axes(fig, n, col=col, x_title="Token", y_title="Token" if col == 1 else "")
        _chain_decorations(fig, chain_ids, n, col=col)
    fig.update_layout(title=title, height=480, width=980, plot_bgcolor="white")
    return fig


def representative_atoms(structure: StructureLike) -> tuple[np.ndarray, list[str]]:
    """AF3's distogram representative atom of every token: CB (CA for glycine) of amino acids,
    C4 of purines, C2 of pyrimidines, and each heavy atom of ligands and ions (waters left out).

    Returns coordinates ``[N, 3]`` and labels ``[N]`` ("A:LYS48:CB").
    """
    import biotite.structure as struc

    atoms = load_atoms(structure)
    atoms = atoms[~struc.filter_solvent(atoms) & (atoms.element != "H") & (atoms.element != "D")]
    amino = struc.filter_amino_acids(atoms)
    nucleic = struc.filter_nucleotides(atoms)
    keep = ~(amino | nucleic)
    residue_starts = struc.get_residue_starts(atoms, add_exclusive_stop=True)
    for start, stop in zip(residue_starts[:-1], residue_starts[1:]):
        names = atoms.atom_name[start:stop].tolist()
        if amino[start]:
            wanted = "CB" if "CB" in names else "CA"
        elif nucleic[start]:
            wanted = "C4" if PURINE_MARKER_ATOM in names else "C2"
        else:
            continue
        if wanted in names:
            keep[start + names.index(wanted)] = True
    picked = atoms[keep]
    labels = [
        f"{chain}:{res_name}{res_id}{ins}:{atom}"
        for chain, res_name, res_id, ins, atom in zip(
            picked.chain_id, picked.res_name, picked.res_id, picked.ins_code, picked.atom_name
        )
    ]
    if len(labels) == 0:
        raise StructureError("no representative atoms (no polymer CB/CA/C4/C2 and no ligand atoms)")
    return picked.coord.astype(np.float64), labels


def _contacts(coords: np.ndarray, cutoff: float) -> np.ndarray:
    distances = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    return distances < cutoff


def contact_map(
    structure: StructureLike,
    *,
    compare: StructureLike | None = None,
    cutoff: float = 8.0,
    names: tuple[str, str] = ("truth", "prediction"),
    title: str | None = None,
) -> go.Figure:
    """Contact map of a structure: token pairs whose representative atoms (as in
    ``representative_atoms``) are closer than ``cutoff`` Angstrom.

    compare: a second structure over the same tokens (paired by label, e.g. a prediction);
    the map then shows ``structure`` above the diagonal and ``compare`` below it, with
    ``names`` in the legend.
    """
    import plotly.graph_objects as go

    coords, labels = representative_atoms(structure)
    contacts = _contacts(coords, cutoff).astype(float)
    customdata = None
    hover = "%{y} \u2013 %{x}<extra></extra>"
    if compare is not None:
        other_coords, other_labels = representative_atoms(compare)
        pairs = _pair_by_key(labels, other_labels)
        if pairs is None:
            raise StructureError(
                f"contact_map: the structures share too few of their {len(labels)} and "
                f"{len(other_labels)} tokens (tokens pair by chain, residue and atom name)"
            )
        labels = [labels[i] for i in pairs[0]]
        first = _contacts(coords[pairs[0]], cutoff)
        second = _contacts(other_coords[pairs[1]], cutoff)
        upper = np.triu(np.ones_like(first, dtype=bool), k=1)
        contacts = np.where(upper, first, second).astype(float)
        np.fill_diagonal(contacts, np.nan)
        customdata = np.where(upper, names[0], names[1])
        hover = "%{customdata}: %{y} \u2013 %{x}<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=contacts,
            x=labels,
            y=labels,
            zmin=0.0,
            zmax=1.0,
            colorscale=[[0.0, "white"], [1.0, "#1f3b73"]],
            showscale=False,
            customdata=customdata,
            hovertemplate=hover,
        )
    )
    fig.update_xaxes(title_text="Token", showticklabels=False, constrain="domain")
    fig.update_yaxes(
        title_text="Token", showticklabels=False, autorange="reversed", scaleanchor="x", constrain="domain"
    )
    if title is None:
        title = f"Contacts < {cutoff:g} \u00c5"
        if compare is not None:
            title += f" (upper: {names[0]}, lower: {names[1]})"
    fig.update_layout(title=title, height=520, width=560, plot_bgcolor="white")
    return fig


_OFFLINE_RENDERER = "megafold_offline"


def init_notebook() -> None:
    """Make plotly figures in this kernel render without a CDN.

    JupyterLab / Notebook 7 / VS Code render the plotly mimetype with their bundled
    plotly.js; other front ends get HTML with plotly.js embedded once per page (plotly's
    "notebook" renderer, without its MathJax CDN tag). Colab shows each output in its own
    frame, so there every figure carries plotly.js (about 4.8 MB an output).
    """
    import plotly.io as pio
    from plotly.io._base_renderers import HtmlRenderer, NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            return {"text/html": _figure_html(fig_dict, include_plotlyjs=False)}

    class OfflineFrameRenderer(HtmlRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            return {"text/html": _figure_html(fig_dict, include_plotlyjs=True)}

    if "google.colab" in sys.modules:
        pio.renderers[_OFFLINE_RENDERER] = OfflineFrameRenderer()
        pio.renderers.default = _OFFLINE_RENDERER
    else:
        pio.renderers[_OFFLINE_RENDERER] = OfflineNotebookRenderer()
        pio.renderers.default = f"plotly_mimetype+{_OFFLINE_RENDERER}"


def _figure_html(figure: Any, *, include_plotlyjs: bool) -> str:
    """A figure as an HTML fragment: no MathJax, no CDN, its own height."""
    import plotly.io as pio

    fig_dict = figure if isinstance(figure, dict) else figure.to_dict()
    height = fig_dict.get("layout", {}).get("height") or 480
    return pio.to_html(
        fig_dict,
        include_plotlyjs=include_plotlyjs,
        include_mathjax=False,
        full_html=False,
        default_width="100%",
        default_height=f"{height}px",
        config={"responsive": True, "displaylogo": False},
        validate=False,
    )
