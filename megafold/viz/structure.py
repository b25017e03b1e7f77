"""3Dmol.js views of structures and predictions, rendered offline.

A view shows one structure, or a prediction superposed on its true structure (the truth in
grey). Polymers (protein and nucleic acid) are drawn as cartoon, ligands as sticks, ions as
small spheres, waters are left out. Colours: AlphaFold's pLDDT bands (``color="plddt"``, read
from the B-factor column, 0..100) or one colour per chain (``color="chain"``).

3Dmol.js is not fetched from a CDN: the package ships ``static/3Dmol-min.js`` (the npm
``3dmol`` build of the same version as py3Dmol) and every view carries it inline, guarded so
that a page runs it once. Inputs are an mmCIF/PDB path (optionally gzipped), mmCIF/PDB text,
or a biotite ``AtomArray`` (``megafold.data.atoms``: ``atom_array`` builds one from plain
arrays, e.g. model output; ``load_atoms``, ``to_mmcif`` and ``to_pdb`` read and write them).

biotite, py3Dmol and IPython are imported inside the functions that need them, so
``import megafold.viz`` costs nothing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from megafold.data.atoms import StructureLike, load_atoms, polymer_atoms, to_mmcif
from megafold.errors import StructureError

if TYPE_CHECKING:
    import py3Dmol
    from biotite.structure import AtomArray

ColorBy = Literal["plddt", "chain"]

THREEDMOL_VERSION = "2.5.5"
_STATIC = Path(__file__).with_name("static")

# AlphaFold DB colours. A band holds pLDDT above its lower bound (the last one holds the rest).
PLDDT_BANDS: tuple[tuple[float, str, str], ...] = (
    (90.0, "#0053D6", "Very high (pLDDT > 90)"),
    (70.0, "#65CBF3", "Confident (70 < pLDDT \u2264 90)"),
    (50.0, "#FFDB13", "Low (50 < pLDDT \u2264 70)"),
    (float("-inf"), "#FF7D45", "Very low (pLDDT \u2264 50)"),
)
# Tableau 20 without its greys: grey is kept for the true structure.
CHAIN_COLORS: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
)
TRUTH_COLOR = "#9E9E9E"

# py3Dmol loads this URL only if no 3Dmol.js is on the page; ours is always inlined first, so
# reaching it means the inline copy failed. A data: URL keeps the page free of any CDN address.
_PY3DMOL_JS_URL = "data:text/javascript,console.error(%22megafold.viz%3A%20inline%203Dmol.js%20failed%22)"

_HOVER_JS = """function(atom, viewer) {
  if (!atom.label) {
    atom.label = viewer.addLabel(
      atom.chain + " " + atom.resn + " " + atom.resi + " " + atom.atom + "  " + LABEL + " " + atom.b.toFixed(1),
      {position: atom, backgroundColor: "#fffff0", fontColor: "black", fontSize: 12});
  }
}"""
_UNHOVER_JS = """function(atom, viewer) {
  if (atom.label) { viewer.removeLabel(atom.label); delete atom.label; }
}"""


# --------------------------------------------------------------------------- superposition


def _anchor_atoms(atoms: AtomArray) -> np.ndarray:
    """Indices of one atom per polymer residue: CA for amino acids, C1' for nucleotides."""
    import biotite.structure as struc

    amino = struc.filter_amino_acids(atoms) & (atoms.atom_name == "CA")
    nucleic = struc.filter_nucleotides(atoms) & (atoms.atom_name == "C1'")
    return np.flatnonzero(amino | nucleic)


def _atom_keys(atoms: AtomArray, indices: np.ndarray) -> list[tuple]:
    return list(
        zip(
            atoms.chain_id[indices],
            atoms.res_id[indices],
            atoms.ins_code[indices],
            atoms.res_name[indices],
            atoms.atom_name[indices],
        )
    )


def _pair_by_key(
    keys: Sequence[Hashable], other_keys: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices (into ``keys``, into ``other_keys``) of the entries both share, in the order of
    ``keys``; None when fewer than 3 or fewer than half of the shorter list pair up, which
    means the two are not the same system (numbering that agrees only by chance)."""
    other_index = {key: i for i, key in enumerate(other_keys)}
    pairs = [(i, other_index[key]) for i, key in enumerate(keys) if key in other_index]
    if len(pairs) < max(3, min(len(keys), len(other_keys)) / 2):
        return None
    first, second = zip(*pairs)
    return np.array(first), np.array(second)


class Superposition(NamedTuple):
    moved: AtomArray  # the mobile structure, rigidly moved onto the fixed one
    rmsd: float  # Angstrom, over the paired anchor atoms after the fit
    n_pairs: int  # paired anchor atoms (CA / C1')


def superpose(mobile: StructureLike, fixed: StructureLike) -> Superposition:
    """Rigidly move ``mobile`` (e.g. a prediction) onto ``fixed`` (e.g. the truth), Kabsch.

    Anchor atoms are CA of amino acids and C1' of nucleotides, paired by chain, residue
    number, insertion code, residue name and atom name. If that pairs fewer than half of the
    smaller structure's anchors (a prediction that renamed chains or renumbered residues),
    anchors are paired in order, which needs equally many on both sides; otherwise
    ``StructureError``.
    """
    import biotite.structure as struc

    mobile_atoms, fixed_atoms = load_atoms(mobile), load_atoms(fixed)
    mobile_anchor, fixed_anchor = _anchor_atoms(mobile_atoms), _anchor_atoms(fixed_atoms)
    pairs = _pair_by_key(_atom_keys(mobile_atoms, mobile_anchor), _atom_keys(fixed_atoms, fixed_anchor))
    if pairs is not None:
        mobile_pick, fixed_pick = mobile_anchor[pairs[0]], fixed_anchor[pairs[1]]
    elif len(mobile_anchor) == len(fixed_anchor) >= 3:
        mobile_pick, fixed_pick = mobile_anchor, fixed_anchor
    else:
        raise StructureError(
            f"cannot pair the structures for superposition: {len(mobile_anchor)} vs "
            f"{len(fixed_anchor)} CA/C1' atoms, too few with the same chain, residue number and "
            "name (give both the same chain ids and residue numbering)"
        )
    fitted, transform = struc.superimpose(fixed_atoms[fixed_pick], mobile_atoms[mobile_pick])
    rmsd = float(struc.rmsd(fixed_atoms[fixed_pick], fitted))
    return Superposition(transform.apply(mobile_atoms), rmsd, len(mobile_pick))


# --------------------------------------------------------------------------- 3Dmol views


@lru_cache(maxsize=1)
def threedmol_script() -> str:
    """A ``<script>`` element holding the shipped 3Dmol.js, safe to repeat on one page.

    It defines ``$3Dmol`` once per page (later copies skip the library) even where
    RequireJS/CommonJS globals exist (the UMD wrapper would otherwise register a module and
    leave ``$3Dmol`` undefined), then resolves py3Dmol's ``$3Dmolpromise`` so py3Dmol loads
    nothing from the network.
    """
    library = (_STATIC / "3Dmol-min.js").read_text(encoding="utf-8")
    return (
        f'<script data-megafold-lib="3Dmol.js {THREEDMOL_VERSION}">\n'
        'if (typeof window.$3Dmol === "undefined") {\n'
        "(function (define, exports, module) {\n"
        f"{library}\n"
        "}).call(window);\n"
        "}\n"
        "if (window.$3Dmol) { window.$3Dmolpromise = Promise.resolve(); }\n"
        "</script>\n"
    )


def _js_number_key(value: float) -> str:
    # The key 3Dmol.js looks up for a B-factor: JavaScript's Number -> string conversion.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _view_model_text(atoms: AtomArray) -> str:
    """mmCIF text for 3Dmol.js: waters dropped, polymer residues as ATOM (HETATM breaks the
    cartoon, e.g. at MSE), B-factors at two decimals so colour-map keys match exactly."""
    import biotite.structure as struc

    atoms = atoms[~struc.filter_solvent(atoms)]
    atoms.hetero = ~polymer_atoms(atoms)
    atoms.b_factor = np.round(atoms.b_factor.astype(np.float64), 2)
    return to_mmcif(atoms)


def _plddt_colors(atoms: AtomArray) -> dict[str, str]:
    colors = {}
    for value in np.unique(np.round(atoms.b_factor.astype(np.float64), 2)):
        colors[_js_number_key(value)] = next(color for lower, color, _ in PLDDT_BANDS if value > lower)
    return colors


def _chain_colors(atoms: AtomArray) -> dict[str, str]:
    """A colour for every chain that is drawn (waters are not), in order of appearance."""
    import biotite.structure as struc

    chains = list(dict.fromkeys(atoms.chain_id[~struc.filter_solvent(atoms)].tolist()))
    return {chain: CHAIN_COLORS[i % len(CHAIN_COLORS)] for i, chain in enumerate(chains)}


def _style_model(
    view: py3Dmol.view, model: int, cartoon: dict, ligands: dict[str | None, dict], *, opacity: float = 1.0
) -> None:
    """Cartoon for polymers, sticks for ligands, spheres for ions; ``ligands`` maps a chain
    (None: all chains) to its colour spec."""
    view.setStyle({"model": model}, {"cartoon": {**cartoon, "opacity": opacity}})
    for chain, spec in ligands.items():
        selection = {"model": model, "hetflag": True, **({} if chain is None else {"chain": chain})}
        view.setStyle(selection, {"stick": {**spec, "radius": 0.2, "opacity": opacity}})
        view.setStyle({**selection, "bonds": 0}, {"sphere": {**spec, "scale": 0.35}})


def _swatch(color: str, label: str) -> str:
    return (
        '<span style="white-space:nowrap"><span style="display:inline-block;width:12px;'
        f'height:12px;border-radius:2px;vertical-align:-1px;background:{color}"></span> '
        f"{html.escape(label)}</span>"
    )


@dataclass
class StructureView:
    """A py3Dmol view plus its legend. Displays itself in a notebook (``_repr_html_``).

    ``view`` takes further py3Dmol calls (``view.addSurface(...)``, ``view.spin(True)``);
    ``rmsd`` is the superposition RMSD (Angstrom) when a truth was given, else None.
    """

    view: py3Dmol.view
    legend_html: str
    rmsd: float | None = None

    def html(self, *, include_library: bool = True) -> str:
        """The view as an HTML snippet; ``include_library=False`` leaves out 3Dmol.js for a
        page that carries it once (``megafold.viz.report`` does)."""
        body = self.view.write_html()
        library = threedmol_script() if include_library else ""
        return f'{library}<div class="megafold-structure">\n{body}\n{self.legend_html}\n</div>\n'

    def _repr_html_(self) -> str:
        return self.html()


def structure_view(
    structure: StructureLike,
    *,
    truth: StructureLike | None = None,
    color: ColorBy = "chain",
    superpose_on_truth: bool = True,
    width: int = 640,
    height: int = 480,
) -> StructureView:
    """A 3Dmol.js view of ``structure``, optionally superposed on ``truth`` (drawn in grey).

    color: "plddt" (AlphaFold bands from the B-factor column, 0..100) or "chain".
    superpose_on_truth: move ``structure`` onto ``truth`` (``superpose``) before drawing;
    False if both already share a frame.
    """
    import py3Dmol

    if color not in ("plddt", "chain"):
        raise ValueError(f"color must be 'plddt' or 'chain', got {color!r}")
    atoms = load_atoms(structure)
    view = py3Dmol.view(width=width, height=height, js=_PY3DMOL_JS_URL)
    legend = []
    rmsd = None
    model = 0
    if truth is not None:
        truth_atoms = load_atoms(truth)
        if superpose_on_truth:
            fit = superpose(atoms, truth_atoms)
            atoms, rmsd = fit.moved, fit.rmsd
        view.addModel(_view_model_text(truth_atoms), "cif")
        grey = {"color": TRUTH_COLOR}
        _style_model(view, model, grey, {None: grey}, opacity=0.55)
        legend.append(_swatch(TRUTH_COLOR, "truth"))
        model += 1
    view.addModel(_view_model_text(atoms), "cif")
    if color == "plddt":
        by_plddt = {"colorscheme": {"prop": "b", "map": _plddt_colors(atoms)}}
        _style_model(view, model, by_plddt, {None: by_plddt})
        legend += [_swatch(band_color, label) for _, band_color, label in PLDDT_BANDS]
    else:
        chain_colors = _chain_colors(atoms)
        # Ligands keep element colours with carbons in their chain's colour, to stand out.
        chains_with_ligands = set(atoms.chain_id[~polymer_atoms(atoms)].tolist())
        ligand_chains = [chain for chain in chain_colors if chain in chains_with_ligands]
        _style_model(
            view,
            model,
            {"colorscheme": {"prop": "chain", "map": chain_colors}},
            {
                chain: {"colorscheme": {"prop": "elem", "map": {"C": chain_colors[chain]}}}
                for chain in ligand_chains
            },
        )
        legend += [_swatch(chain_color, f"chain {chain}") for chain, chain_color in chain_colors.items()]
    if rmsd is not None:
        legend.append(f"<span>RMSD {rmsd:.2f} \u00c5 (CA/C1\u2032 after superposition)</span>")
    view.setHoverable(
        {}, True, _HOVER_JS.replace("LABEL", json.dumps("pLDDT" if color == "plddt" else "B")), _UNHOVER_JS
    )
    view.zoomTo()
    legend_html = (
        '<div class="megafold-legend" style="font:12px sans-serif;'
        f'display:flex;flex-wrap:wrap;gap:4px 14px;margin:4px 0;max-width:{width}px">'
        + "".join(legend)
        + "</div>"
    )
    return StructureView(view, legend_html, rmsd)


def view_html(
    structure: StructureLike,
    *,
    truth: StructureLike | None = None,
    color: ColorBy = "chain",
    superpose_on_truth: bool = True,
    width: int = 640,
    height: int = 480,
) -> str:
    """A self-contained HTML snippet (3Dmol.js inline) of ``structure_view(...)``."""
    return structure_view(
        structure, truth=truth, color=color, superpose_on_truth=superpose_on_truth, width=width, height=height
    ).html()


def show(
    structure: StructureLike | StructureView,
    *,
    truth: StructureLike | None = None,
    color: ColorBy = "chain",
    superpose_on_truth: bool = True,
    width: int = 640,
    height: int = 480,
) -> None:
    """Display a structure view in a notebook, offline (3Dmol.js inline in the output, so it
    also works where each output is its own frame, as in Colab and VS Code)."""
    from IPython.display import HTML, display

    if not isinstance(structure, StructureView):
        structure = structure_view(
            structure,
            truth=truth,
            color=color,
            superpose_on_truth=superpose_on_truth,
            width=width,
            height=height,
        )
    display(HTML(structure.html()))
