"""Training: the Trainer (AF3's optimiser, schedule, EMA, NaN guard, resumable checkpoints),
validation metrics and predictions written as mmCIF.

    from megafold.model import preset
    from megafold.train import Trainer, TrainConfig
    Trainer(preset("tiny"), TrainConfig(store="outputs/store", steps=100)).fit()
"""

from megafold.train.checkpoint import load_checkpoint, save_checkpoint
from megafold.train.graphs import GraphedStep
from megafold.train.metrics import (
    all_atom_lddt,
    ca_lddt,
    ca_rmsd,
    distogram_accuracy,
    evaluate,
    lddt,
    plddt_calibration,
    plddt_target,
    structure_metrics,
)
from megafold.train.trainer import TrainConfig, Trainer, learning_rate, load_metrics

__all__ = [
    "GraphedStep",
    "TrainConfig",
    "Trainer",
    "all_atom_lddt",
    "ca_lddt",
    "ca_rmsd",
    "distogram_accuracy",
    "evaluate",
    "learning_rate",
    "lddt",
    "load_checkpoint",
    "load_metrics",
    "plddt_calibration",
    "plddt_target",
    "save_checkpoint",
    "structure_metrics",
]
