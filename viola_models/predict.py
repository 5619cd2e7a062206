"""Sliding-window prediction of one network or an ensemble, and the ensemble's confidence scores.

One code path serves validation during training, pseudo-labelling and ``viola predict``:
windows of the training patch size (the viola attention normalises over the whole patch, so the
ROI must be the patch it was trained on), Gaussian blending, optional flip test-time augmentation,
softmax probabilities averaged over members.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from viola_models.configs import build_from_config
from viola_models.inference import as_predictor

__all__ = [
    "SCORE_NAMES",
    "EnsembleOutput",
    "MemberCheckpoint",
    "confidence_scores",
    "load_member",
    "pairwise_dice",
    "predict_ensemble",
    "sliding_window_probability",
]

log = logging.getLogger(__name__)


@dataclass
class MemberCheckpoint:
    """What a trained member's checkpoint says about itself (``best.pt`` written by training)."""

    path: Path
    name: str  # e.g. "viola_small-fold0"
    model_name: str
    model_config: dict
    patch_size: tuple[int, int, int]
    val_dice: float = float("nan")
    extra: dict = field(default_factory=dict)


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # damaged, truncated, not a checkpoint, or a pickle that would run code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"checkpoint {path} is unreadable ({first})") from None


def load_member(path: Path) -> tuple[nn.Module, MemberCheckpoint]:
    """Rebuild a trained network from its checkpoint alone (configuration travels with the weights)."""
    ck = _read_checkpoint(Path(path))
    for key in ("model_name", "model_config", "state_dict", "patch_size"):
        if key not in ck:
            raise ValueError(f"checkpoint {path} lacks {key!r}: not a viola-ich member checkpoint")
    cfg = json.loads(ck["model_config"]) if isinstance(ck["model_config"], str) else dict(ck["model_config"])
    model = build_from_config(cfg)
    model.load_state_dict(ck["state_dict"])
    meta = MemberCheckpoint(
        path=Path(path),
        name=str(ck.get("member", Path(path).parent.name)),
        model_name=ck["model_name"],
        model_config=cfg,
        patch_size=tuple(int(v) for v in ck["patch_size"]),
        val_dice=float(ck.get("val_dice", float("nan"))),
        extra={k: ck[k] for k in ("step", "fold", "round") if k in ck},
    )
    return model.eval(), meta


_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))  # identity and one flip per spatial axis


@torch.no_grad()
def sliding_window_probability(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    tta: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Foreground probability (X, Y, Z) of one network on a (C, X, Y, Z) preprocessed image.

    Gaussian-blended windows of ``patch_size`` (the training patch); with ``tta``, the mean over
    the identity and the three single-axis flips. Softmax over the network's two classes.
    """
    device = device or image.device
    x = image.unsqueeze(0).to(device)
    total = None
    flips = _FLIPS if tta else _FLIPS[:1]
    for dims in flips:
        xi = torch.flip(x, dims) if dims else x
        logits = sliding_window_inference(
            xi, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=overlap, mode="gaussian",
        )
        prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
        prob = torch.flip(prob, dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(flips))[0, 0]


@dataclass
class EnsembleOutput:
    """Per-member and mean foreground probabilities on the preprocessed grid (X, Y, Z)."""

    member_probs: torch.Tensor  # (M, X, Y, Z), on the prediction device
    mean_prob: torch.Tensor  # (X, Y, Z)
    member_names: list[str]


def predict_ensemble(
    members: Sequence[tuple[nn.Module, MemberCheckpoint]],
    image: np.ndarray | torch.Tensor,
    overlap: float = 0.5,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = True,
    sw_batch_size: int | None = None,
    predictors: list[Callable] | None = None,
) -> EnsembleOutput:
    """Every member on one preprocessed image (C, X, Y, Z), probabilities averaged (on ``device``).

    ``predictors`` (from :func:`make_predictors`) reuse prepared networks across scans.
    """
    device = torch.device(device)
    preds = predictors or make_predictors(members, device, amp)
    img = torch.as_tensor(image, dtype=torch.float32).to(device)
    if sw_batch_size is None:  # a GPU takes several windows per call; a CPU gains nothing from it
        sw_batch_size = 4 if device.type == "cuda" else 1
    probs = [sliding_window_probability(pred, img, meta.patch_size, overlap, sw_batch_size, tta, device)
             for pred, (_, meta) in zip(preds, members)]
    stack = torch.stack(probs)  # stays on the device: inversion and scores run there too
    return EnsembleOutput(member_probs=stack, mean_prob=stack.mean(0), member_names=[m.name for _, m in members])


def make_predictors(
    members: Sequence[tuple[nn.Module, MemberCheckpoint]], device: torch.device, amp: bool = True
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Evaluation callables for the members on ``device`` (batch norm folded; CUDA graphs and
    bf16 autocast on GPUs that support it)."""
    dtype = torch.bfloat16 if amp and device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return [as_predictor(model, device, dtype) for model, _ in members]


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


def confidence_scores(member_probs: torch.Tensor, voxel_volume_ml: float, threshold: float = 0.5) -> dict:
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
