"""A compact but complete AlphaFold3 (Abramson et al. 2024), module names as in the paper.

    from megafold.model import AlphaFold3, preset
    model = AlphaFold3(preset("tiny", kernels="torch"))
    loss, terms = model.training_loss(batch)
"""

from megafold.model.af3 import AlphaFold3, TrunkOutput, model_summary
from megafold.model.config import PRESETS, AlphaFold3Config, preset
from megafold.model.synthetic import synthetic_batch, synthetic_example

__all__ = [
    "PRESETS",
    "AlphaFold3",
    "AlphaFold3Config",
    "TrunkOutput",
    "model_summary",
    "preset",
    "synthetic_batch",
    "synthetic_example",
]
