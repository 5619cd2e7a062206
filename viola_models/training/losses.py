"""The training loss: Dice + focal over voxels that carry a label (``IGNORE_LABEL`` voxels carry
none), with per-case weights, summed over the deep-supervision heads."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss, DiceFocalLoss, FocalLoss, MaskedDiceLoss
from monai.networks.utils import one_hot

from data_catalog.preprocessing import IGNORE_LABEL


class DiceFocalIgnoring:
    """MONAI's ``DiceFocalLoss(to_onehot_y=True, softmax=True)`` where some voxels carry no loss.

    Voxels labelled ``IGNORE_LABEL`` (uncertain pseudo-label voxels, Lin and Yuh, arXiv 2105.00582)
    are left out of both terms: the softmax Dice over the other voxels (``MaskedDiceLoss`` on a
    one-hot target) and the focal term averaged over them, so they get no gradient. A label
    without such voxels gets exactly ``DiceFocalLoss``. ``logits`` (B, C, X, Y, Z), ``label`` (B, 1, X, Y, Z).
    """

    def __init__(self) -> None:
        self.plain = DiceFocalLoss(to_onehot_y=True, softmax=True)
        self.dice = MaskedDiceLoss(softmax=True)
        self.focal = FocalLoss(reduction="none")  # DiceFocalLoss's own focal term, per voxel and class

    def __call__(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        ignore = label == IGNORE_LABEL
        if not bool(ignore.any()):
            return self.plain(logits, label)
        keep = (~ignore).to(logits.dtype)  # (B, 1, X, Y, Z)
        target = one_hot(torch.where(ignore, torch.zeros_like(label), label), num_classes=logits.shape[1])
        focal = (self.focal(logits, target) * keep).sum() / (keep.sum() * logits.shape[1]).clamp_min(1.0)
        return self.dice(logits, target, mask=keep) + focal


def deep_supervision_loss(output: torch.Tensor, label: torch.Tensor, loss_fn: Callable,
                          sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dice + focal on the main output and each head, weights 1, 1/2, 1/4, ... normalised.

    ``output``: (B, 1 + n, C, X, Y, Z) in training mode with deep supervision, else (B, C, X, Y, Z).
    ``sample_weights`` (B,): each sample's loss is scaled by its weight and the batch averaged
    (per-sample Dice, as the batched loss computes it); all ones gives the unweighted loss.
    """
    if sample_weights is not None and not bool((sample_weights == 1).all()):
        per_sample = [deep_supervision_loss(output[i : i + 1], label[i : i + 1], loss_fn)
                      for i in range(label.shape[0])]
        return sum(w * loss for w, loss in zip(sample_weights.tolist(), per_sample)) / label.shape[0]
    heads = torch.unbind(output, dim=1) if output.dim() == label.dim() + 1 else (output,)
    weights = [0.5**i for i in range(len(heads))]  # MONAI's "exp" mode floors them at 1/16: given here
    return DeepSupervisionLoss(loss_fn, weights=[w / sum(weights) for w in weights])(list(heads), label)
