"""Where the truth is known: the members' out-of-fold predictions of labelled scans, scored the
same way as pseudo-labels, so that a confidence score can be calibrated against the true Dice.

A member of fold f never trained on fold f's validation scans, so the members of fold f (one per
architecture) form an out-of-fold ensemble for them. Each validation scan gives one point
(confidence scores, true Dice of the ensemble mask); ``views`` adds perturbed copies of it
(Gaussian noise and blur of growing strength) that populate the harder end of the curve, which
matters when there are only a handful of labelled scans.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import GaussianSmooth

from data_catalog.preprocessing import load_preprocessed
from viola_models.predict import confidence_scores, load_member, make_predictors, predict_ensemble

__all__ = ["dice", "out_of_fold_scores", "perturbed_view"]

log = logging.getLogger(__name__)


def dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    p = torch.as_tensor(pred).bool()
    t = torch.as_tensor(truth).bool()
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def perturbed_view(image: np.ndarray, view: int, n_views: int, seed: int) -> np.ndarray:
    """View 0 is the image; view k of n adds Gaussian noise (sd 0.4 k/n, in units of the
    normalised intensities) and blurs by sigma 1.5 k/n voxels. ``image``: (C, X, Y, Z)."""
    if view == 0:
        return image
    strength = view / max(1, n_views)
    x = torch.as_tensor(image, dtype=torch.float32)
    x = GaussianSmooth(sigma=1.5 * strength)(x)
    gen = torch.Generator().manual_seed(seed * 1009 + view)
    x = x + 0.4 * strength * torch.randn(x.shape, generator=gen)
    return x.numpy()


def out_of_fold_scores(
    groups: Sequence[tuple[str, Sequence[Path], Sequence[Path]]],
    device: torch.device | str = "cpu",
    overlap: float = 0.5,
    views: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Confidence scores and true Dice of out-of-fold ensembles.

    ``groups``: (fold name, member checkpoints of that fold, its validation cases as preprocessed
    ``.npz`` paths with labels). Returns one row per (case, view): fold, case, view, the scores
    of :func:`viola_models.predict.confidence_scores`, and ``true_dice`` of the ensemble mask
    against the label, both on the preprocessed grid.
    """
    device = torch.device(device)
    rows = []
    for fold, checkpoints, cases in groups:
        if not checkpoints or not cases:
            continue
        members = [load_member(Path(p)) for p in checkpoints]
        predictors = make_predictors(members, device)
        for case_path in cases:
            case = load_preprocessed(Path(case_path))
            if case.label is None:
                raise ValueError(f"{case_path} has no label: out-of-fold scoring needs labelled cases")
            truth = case.label[0] > 0
            voxel_ml = float(np.prod(case.spacing)) / 1000.0
            for view in range(views + 1):
                image = perturbed_view(case.image, view, views, seed)
                out = predict_ensemble(members, image, overlap=overlap, device=device, predictors=predictors)
                scores = confidence_scores(out.member_probs, voxel_ml)
                mask = (out.mean_prob >= 0.5).cpu().numpy()
                rows.append({"fold": fold, "case": Path(case_path).stem, "view": view, **scores,
                             "true_dice": dice(mask, truth)})
        log.info("out-of-fold scores of %s: %d case(s) x %d view(s)", fold, len(cases), views + 1)
    return pd.DataFrame(rows)
