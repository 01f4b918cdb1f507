"""Training the networks of :mod:`condkernels.models` with their papers' setups.

``python -m condkernels.train --model cc_mobilenet_v1 --synthetic --epochs 2`` (``--help`` for all
flags; ``torchrun --nproc-per-node N -m condkernels.train ...`` for DDP). Pieces:
:mod:`~condkernels.train.config` (flags, presets), :mod:`~condkernels.train.data`,
:mod:`~condkernels.train.objectives` (the loss of each network kind),
:mod:`~condkernels.train.sync_bn`, :mod:`~condkernels.train.loop` (the trainer),
:mod:`~condkernels.train.report` (progress bar, CSV, plot).
"""

from .config import KINDS, PRESETS, build_parser, model_kind, resolve
from .loop import Trainer, lr_factor, main
from .objectives import (
    BatchShapingObjective, CondConvObjective, DeepMoEObjective, Objective, make_objective,
)
from .sync_bn import GlobalBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchShapingObjective", "CondConvObjective", "DeepMoEObjective", "GlobalBatchNorm", "KINDS", "Objective",
    "PRESETS", "Trainer", "build_parser", "convert_sync_batchnorm", "lr_factor", "main", "make_objective",
    "model_kind", "resolve",
]
