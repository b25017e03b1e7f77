"""Structure views (3Dmol.js), heatmaps (plotly) and self-contained HTML reports, all offline.

3Dmol.js ships in ``megafold/viz/static`` and plotly.js comes from the plotly package; nothing
is loaded from a CDN. Heavy imports (biotite, py3Dmol, plotly, IPython) happen on first use.
"""

from megafold.data.atoms import atom_array, load_atoms, to_mmcif, to_pdb
from megafold.viz.plots import (
    contact_map,
    distogram_figure,
    distogram_probabilities,
    init_notebook,
    pae_figure,
    representative_atoms,
)
from megafold.viz.report import Section, render_report, write_report
from megafold.viz.structure import (
    CHAIN_COLORS,
    PLDDT_BANDS,
    THREEDMOL_VERSION,
    StructureView,
    Superposition,
    show,
    structure_view,
    superpose,
    threedmol_script,
    view_html,
)

__all__ = [
    "CHAIN_COLORS",
    "PLDDT_BANDS",
    "THREEDMOL_VERSION",
    "Section",
    "StructureView",
    "Superposition",
    "atom_array",
    "contact_map",
    "distogram_figure",
    "distogram_probabilities",
    "init_notebook",
    "load_atoms",
    "pae_figure",
    "render_report",
    "representative_atoms",
    "show",
    "structure_view",
    "superpose",
    "threedmol_script",
    "to_mmcif",
    "to_pdb",
    "view_html",
    "write_report",
]
