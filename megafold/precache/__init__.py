"""The ahead-of-time feature cache: build a zarr store, open and verify it, load batches.

GPU-side code imports this package without biotite, gemmi or pyhmmer: the data pipeline
is imported inside the functions that need it.
"""

from megafold.precache.build import BuildReport, build, build_main
from megafold.precache.loader import Loader, loader  # noqa: F811  the function, as CONVENTIONS.md names it
from megafold.precache.store import Store, open_store

__all__ = ["BuildReport", "Loader", "Store", "build", "build_main", "loader", "open_store"]
