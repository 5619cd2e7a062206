"""Supervised training of one network on preprocessed cases (paper sections 3.3 and 3.4), in four
parts: ``settings`` (``TrainSettings`` as validated data; the learning-rate schedule and the
pseudo-labels' loss ramp), ``data`` (batches and augmentations, a function of the step), ``losses``
(Dice + focal with ignored voxels, deep supervision) and ``loop`` (``fit``, ``validate``). Functions,
not a trainer class; nothing here knows about the pipeline that calls it.
"""

from viola_models.training.data import StepBatches, make_loaders, pseudo_per_batch
from viola_models.training.loop import FitResult, TrainCallbacks, fit, fit_digest, validate
from viola_models.training.losses import DiceFocalIgnoring, deep_supervision_loss
from viola_models.training.settings import STRONG_AUGMENT, AugmentSettings, TrainSettings, lr_at, pseudo_ramp

__all__ = [
    "STRONG_AUGMENT",
    "AugmentSettings",
    "DiceFocalIgnoring",
    "FitResult",
    "StepBatches",
    "TrainCallbacks",
    "TrainSettings",
    "deep_supervision_loss",
    "fit",
    "fit_digest",
    "lr_at",
    "make_loaders",
    "pseudo_per_batch",
    "pseudo_ramp",
    "validate",
]
