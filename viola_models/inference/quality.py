"""How good is a segmentation? Confidence scores from the members' agreement (no truth needed),
and, where the truth is known, the members' out-of-fold predictions of labelled scans scored the
same way, so that a confidence score can be calibrated against the true Dice.

A member of fold f never trained on fold f's validation scans, so the members of fold f (one per
architecture) form an out-of-fold ensemble for them. Each validation scan gives one point:
confidence scores and the true Dice of the ensemble mask.

Perturbed copies of the scans (noise, blur) are deliberately not used to add points: every member
sees the same corrupted input and makes the same mistakes, so Dice falls while agreement stays
high, which drags the curve down exactly where the trustworthy pseudo-labels are (measured on
phantoms: a copy at agreement 0.78 with Dice 0.43 made unlabelled scans of agreement 0.62-0.71,
whose true Dice was 0.85-0.96, predict 0.49). With few labelled scans the calibration's prior
fills the gaps instead (``data_catalog.selection.fit_calibration``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_catalog.preprocessing import load_preprocessed
from viola_models.inference.backends import InferenceSettings
from viola_models.inference.ensemble import load_member
from viola_models.inference.sliding_window import FOREGROUND_THRESHOLD, make_predictors, predict_ensemble

__all__ = ["SCORE_NAMES", "confidence_scores", "dice", "out_of_fold_scores", "pairwise_dice"]

log = logging.getLogger(__name__)


def pairwise_dice(masks: torch.Tensor) -> float:
    """Mean Dice over all pairs of the (M, ...) boolean masks; a pair of empty masks counts 1.0.

    NaN for fewer than two members (agreement needs someone to agree with).
    """
    m = masks.reshape(masks.shape[0], -1).float()  # (M, N)
    if m.shape[0] < 2:
        return float("nan")
    inter = m @ m.T  # (M, M) overlaps
    sizes = m.sum(1)
    scores = []
    for i, j in itertools.combinations(range(m.shape[0]), 2):
        denom = sizes[i] + sizes[j]
        scores.append(1.0 if denom == 0 else float(2 * inter[i, j] / denom))
    return float(np.mean(scores))


SCORE_NAMES = ("agreement", "union_agreement", "mean_max_probability")
"""Confidence scores a selection rule can rank and calibrate on (see :func:`confidence_scores`)."""


def confidence_scores(member_probs: torch.Tensor, voxel_volume_ml: float,
                      threshold: float = FOREGROUND_THRESHOLD) -> dict:
    """How much to trust the ensemble's mask of one scan, from its members' probabilities.

    ``member_probs``: (M, X, Y, Z) foreground probabilities on the preprocessed grid. Returns:

    * ``consensus``: ``"empty"`` when no member finds blood, ``"disputed"`` when some member does
      but the ensemble mask is empty, else ``"lesion"``. An empty consensus is its own category:
      every score below is NaN for it, so it can never outrank a lesion the members agree on.
    * ``agreement``: mean pairwise Dice of the members' masks (NaN with one member).
    * ``union_agreement``: the fraction of the union of the members' masks where all members
      agree (|intersection| / |union|; NaN with one member).
    * ``mean_max_probability``: mean of max(p, 1 - p) of the ensemble probability p over that
      union: 1 where the members are sure, 0.5 where they are split.
    * ``volume_cv``: coefficient of variation of the members' lesion volumes; ``volume_ml``: the
      ensemble mask's volume on this grid; ``n_members``.
    """
    probs = member_probs.float()
    mean_prob = probs.mean(0)
    masks = probs >= threshold  # (M, X, Y, Z)
    union = masks.any(0)
    ens = mean_prob >= threshold
    n_members = int(masks.shape[0])
    n_union = int(union.sum())
    vols = masks.reshape(n_members, -1).sum(1).double() * voxel_volume_ml  # (M,) ml
    mean_vol = float(vols.mean())
    nan = float("nan")
    consensus = "empty" if n_union == 0 else ("lesion" if bool(ens.any()) else "disputed")
    if consensus == "empty":
        agreement = union_agreement = max_prob = nan
    else:
        agreement = pairwise_dice(masks)
        union_agreement = float(masks.all(0).sum()) / n_union if n_members >= 2 else nan
        p = mean_prob[union]
        max_prob = float(torch.maximum(p, 1.0 - p).mean())
    return {
        "consensus": consensus,
        "n_members": n_members,
        "agreement": agreement,
        "union_agreement": union_agreement,
        "mean_max_probability": max_prob,
        "volume_cv": float(vols.std(unbiased=False) / mean_vol) if mean_vol > 0 else 0.0,
        "volume_ml": float(ens.sum()) * voxel_volume_ml,
    }


def dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    p = torch.as_tensor(pred).bool()
    t = torch.as_tensor(truth).bool()
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def out_of_fold_scores(
    groups: Sequence[tuple[str, Sequence[Path], Sequence[Path]]],
    device: torch.device | str = "cpu",
    overlap: float = 0.5,
    inference: InferenceSettings | None = None,
) -> pd.DataFrame:
    """Confidence scores and true Dice of out-of-fold ensembles.

    ``groups``: (fold name, member checkpoints of that fold, its validation cases as preprocessed
    ``.npz`` paths with labels). Returns one row per case: fold, case, the scores of
    :func:`confidence_scores`, and ``true_dice`` of the ensemble mask against
    the label, both on the preprocessed grid.
    """
    device = torch.device(device)
    rows = []
    for fold, checkpoints, cases in groups:
        if not checkpoints or not cases:
            continue
        members = [load_member(Path(p)) for p in checkpoints]
        predictors = make_predictors(members, device, inference=inference)
        for case_path in cases:
            case = load_preprocessed(Path(case_path))
            if case.label is None:
                raise ValueError(f"{case_path} has no label: out-of-fold scoring needs labelled cases")
            voxel_ml = float(np.prod(case.spacing)) / 1000.0
            out = predict_ensemble(members, case.image, overlap=overlap, device=device, predictors=predictors)
            scores = confidence_scores(out.member_probs, voxel_ml)
            mask = (out.mean_prob >= FOREGROUND_THRESHOLD).cpu().numpy()
            rows.append({"fold": fold, "case": Path(case_path).stem, **scores,
                         "true_dice": dice(mask, case.label[0] > 0)})
        log.info("out-of-fold scores of %s: %d case(s)", fold, len(cases))
    return pd.DataFrame(rows)
