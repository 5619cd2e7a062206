"""Sliding-window probabilities of one network or an ensemble: the one code path of validation
during training, pseudo-labelling, evaluation and ``viola predict``.

Windows of the training patch size (the viola attention normalises over the whole patch, so the
ROI must be the patch it was trained on), Gaussian blending, optional flip test-time augmentation,
softmax probabilities averaged over members; a voxel is foreground when its probability reaches
``FOREGROUND_THRESHOLD``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from viola_models.inference.backends import InferenceSettings, OpenVINOForward, resolve_backend
from viola_models.inference.predictors import as_predictor, fold_batch_norm

if TYPE_CHECKING:  # annotations only: member checkpoints are read in inference.ensemble, which uses this module
    from viola_models.inference.members import MemberCheckpoint

__all__ = ["FOREGROUND_THRESHOLD", "EnsembleOutput", "make_predictors", "predict_ensemble",
           "sliding_window_probability"]

log = logging.getLogger(__name__)

FOREGROUND_THRESHOLD = 0.5  # probability at which a voxel is blood, everywhere a mask is made


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


def _missing_int8(nets: Sequence[OpenVINOForward], members: Sequence[tuple[nn.Module, MemberCheckpoint]],
                  channels: int) -> list[str]:
    """The members whose int8 network for their window is not in the cache."""
    return [meta.name for net, (_, meta) in zip(nets, members) if not net.cached((1, channels, *meta.patch_size))]


def make_predictors(
    members: Sequence[tuple[nn.Module, MemberCheckpoint]], device: torch.device, amp: bool = True,
    inference: InferenceSettings | None = None, int8_checked: bool = False, channels: int | None = None,
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Evaluation callables for the members on ``device``: batch norm folded; on GPUs CUDA graphs
    and bf16 autocast where supported (``amp``); on the CPU the backend and precision of
    ``inference`` (:func:`viola_models.inference.backends.resolve_backend`; default: detected).
    ``int8_checked``: the ensemble passed its int8 check (``auto`` takes its cached int8 networks
    of ``channels`` input channels)."""
    inference = inference or InferenceSettings()
    if device.type == "cuda":
        dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else None
        return [as_predictor(model, device, dtype) for model, _ in members]
    backend, precision = resolve_backend(inference, device, int8_ready=int8_checked)
    if backend == "openvino":
        nets = [OpenVINOForward(fold_batch_norm(model), precision, inference.cache_dir) for model, _ in members]
        missing = _missing_int8(nets, members, channels or 1) if precision == "int8" else []
        if missing and inference.precision == "int8":
            raise ValueError(f"the int8 network of {', '.join(missing)} is not in {nets[0].cache_dir}: it is made "
                             "when a round registers the ensemble; use another precision here")
        if missing:  # auto, on a machine without them: the CPU's float precision (nothing compiled yet)
            precision = resolve_backend(inference, device)[1]
            log.info("int8 networks of %s not in %s: the members run at %s", ", ".join(missing),
                     nets[0].cache_dir, precision)
            for net in nets:
                net.precision = precision
        log.info("members run on %s with %s at %s", device, backend, precision)
        return nets
    log.info("members run on %s with %s at %s", device, backend, precision)
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cpu" else None
    return [as_predictor(model, device, dtype) for model, _ in members]
