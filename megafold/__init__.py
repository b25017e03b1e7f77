"""megafold: fast, memory-lean AlphaFold3-style training.

Public entry points live in the subpackages: ``megafold.kernels`` (fused ops),
``megafold.model`` (AlphaFold3), ``megafold.data`` and ``megafold.precache`` (features),
``megafold.train``, ``megafold.profile`` and ``megafold.viz``.
"""

from megafold.errors import CacheError, ConfigError, MegafoldError, StructureError

__version__ = "0.1.0"

__all__ = ["CacheError", "ConfigError", "MegafoldError", "StructureError", "__version__"]
