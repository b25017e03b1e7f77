"""Profiling of AlphaFold3 training steps: time and memory per AF3 module, kernels compared,
the longest crop that fits; plotly figures and an ipywidgets dashboard.

    from megafold.profile import compare, variants, longest_crop, save
    ds = compare(variants("tiny"), crop=32)        # xarray Dataset over config, module, phase
    save(ds, "outputs/profile.zarr")

``megafold.profile.plots`` draws the figures, ``megafold.profile.widgets`` is the dashboard
(both import plotly / ipywidgets on first use).
"""

from megafold.profile.profiler import (
    AF3_MODULES,
    MODULES,
    PARTS,
    PHASES,
    STAGES,
    Variant,
    combine,
    compare,
    default_crop,
    describe_device,
    load,
    longest_crop,
    precompile_kernels,
    profile_step,
    save,
    summary,
    tune_kernels,
    variants,
)

__all__ = [
    "AF3_MODULES",
    "MODULES",
    "PARTS",
    "PHASES",
    "STAGES",
    "Variant",
    "combine",
    "compare",
    "default_crop",
    "describe_device",
    "load",
    "longest_crop",
    "precompile_kernels",
    "profile_step",
    "save",
    "summary",
    "tune_kernels",
    "variants",
]
