"""Supervised training of one network on preprocessed cases (paper sections 3.3 and 3.4).

Functions, not a trainer class: ``make_loaders`` (data and the paper's nine augmentations),
``train_step``, ``validate`` (sliding-window mean Dice) and ``fit`` (the loop: warm-up + cosine
schedule, periodic validation, best checkpoint by mean Dice, atomic checkpoints, resume after a
kill). Settings are one pydantic object; callbacks let the caller track progress (the pipeline's
tasks log to MLflow through them) without this module knowing about it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DeepSupervisionLoss, DiceFocalLoss, FocalLoss, MaskedDiceLoss
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)
from monai.utils import set_determinism
from pydantic import BaseModel, ConfigDict, Field

from data_catalog.preprocessing import IGNORE_LABEL, load_preprocessed
from data_catalog.scans import atomic_write
from viola_models.backends import cpu_bf16_supported
from viola_models.configs import build_from_config, count_parameters, model_config
from viola_models.sliding_window import FOREGROUND_THRESHOLD, sliding_window_probability

__all__ = [
    "STRONG_AUGMENT",
    "AugmentSettings",
    "DiceFocalIgnoring",
    "FitResult",
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

log = logging.getLogger(__name__)


class AugmentSettings(BaseModel):
    """Probabilities and ranges of the paper's augmentations (section 3.4); 0 turns one off."""

    model_config = ConfigDict(extra="forbid")

    zoom_prob: float = 0.15
    zoom_range: tuple[float, float] = (0.9, 1.2)
    noise_prob: float = 0.15
    noise_std: float = 0.01
    smooth_prob: float = 0.15
    smooth_sigma: tuple[float, float] = (0.5, 1.15)
    rotate90_prob: float = 0.1  # in-plane quarter turns (the patch is square in-plane, anisotropic in z)
    shift_prob: float = 0.5
    shift_offset: float = 0.1
    scale_prob: float = 0.15
    scale_factor: float = 0.3
    flip_prob: float = 0.25  # per axis, independently
    contrast_prob: float = 0.15
    contrast_gamma: tuple[float, float] = (0.78, 1.25)
    # beyond the paper's nine, off unless asked for (the strong noise of a student's pseudo-labelled
    # samples, ``STRONG_AUGMENT``): an in-plane rotation with scaling, and cut-out boxes in the image
    affine_prob: float = 0.0
    affine_rotate_deg: float = 15.0
    affine_scale: float = 0.1
    cutout_prob: float = 0.0
    cutout_holes: int = 4
    cutout_fraction: float = 0.15  # each box's side, as a fraction of the patch's side


# Noise on the pseudo-labelled samples of a student (Noisy Student, CVPR 2020; ST++, CVPR 2022):
# the paper's augmentations at higher probabilities and ranges, plus rotation and cut-out, so the
# student cannot reach the teacher's masks by copying the teacher's view of the scan
STRONG_AUGMENT = AugmentSettings(
    zoom_prob=0.3, zoom_range=(0.85, 1.25), noise_prob=0.5, noise_std=0.05, smooth_prob=0.3,
    smooth_sigma=(0.5, 1.5), rotate90_prob=0.25, shift_prob=0.8, shift_offset=0.2, scale_prob=0.5,
    scale_factor=0.3, flip_prob=0.5, contrast_prob=0.5, contrast_gamma=(0.6, 1.6), affine_prob=0.5,
    affine_rotate_deg=15.0, affine_scale=0.1, cutout_prob=0.5, cutout_holes=4, cutout_fraction=0.15)


class TrainSettings(BaseModel):
    """One member's training; defaults are the paper's supervised round."""

    model_config = ConfigDict(extra="forbid")

    model: str = "viola_l"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    patch_size: tuple[int, int, int] = (160, 160, 16)
    batch_size: int = 2
    max_steps: int = 72_000
    # the paper's SGD needs thousands of steps; AdamW learns within a CPU demo's few hundred
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 7e-3
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5  # nnU-Net's value; the paper does not state one
    warmup_steps: int = 1_000
    grad_clip: float | None = 12.0  # nnU-Net's gradient-norm clip, keeps momentum 0.99 stable
    val_every: int = 200
    val_overlap: float = 0.5
    pos_neg_ratio: tuple[float, float] = (1.0, 1.0)
    # bf16 autocast where the device has it natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp16
    # with a grad scaler on older GPUs; fp32 on other CPUs
    amp: bool = True
    # torch.compile of the training forward and backward: "default" fuses the elementwise work (the
    # viola attention's above all); "reduce-overhead" also replays each step as a CUDA graph (static
    # shapes: every batch has the patch size). Same arithmetic as eager up to float rounding, except
    # that dropout masks come from the compiled graph's own generator.
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    # which weights a run keeps as best.pt: the best validation Dice, or the last step's. With fewer
    # than ``min_val_cases`` validation cases the best step is not chosen (one case's Dice, often 0
    # on a hard case, says nothing about a step): the last weights are kept, and the result says why
    checkpoint: Literal["best", "last"] = "best"
    min_val_cases: int = Field(2, ge=1)
    # items marked pseudo-labelled (``fit(pseudo=...)``): their share of every batch (0: drawn from
    # one pool with the labelled items), their augmentation (None: ``augment``), and the steps over
    # which their loss weight ramps up from 0 (exp(-5 (1 - t)^2), Laine and Aila 2017; 0: none)
    pseudo_fraction: float = Field(0.0, ge=0, lt=1)
    pseudo_augment: AugmentSettings | None = None
    pseudo_rampup_steps: int = Field(0, ge=0)


@dataclass
class TrainCallbacks:
    """Hooks called by ``fit``; each receives plain numbers (step, metrics) or a path."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_validation: Callable[[int, float, bool], None] | None = None
    on_checkpoint: Callable[[Path], None] | None = None


@dataclass
class FitResult:
    best_dice: float
    best_step: int
    steps: int
    best_checkpoint: Path
    seconds: float
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    selection: str = "best validation Dice"  # how best.pt was chosen (``TrainSettings.checkpoint``)

    def to_json(self) -> dict:
        d = asdict(self)
        d["best_checkpoint"] = str(self.best_checkpoint)
        return d


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine annealing to 0 at ``max_steps``.

    Not MONAI's ``WarmupCosineSchedule``, which gives the same values after the warm-up but not
    during it: its warm-up starts at lr 0 (step 0 learns nothing; ours is lr / warmup_steps, as in
    the authors' code), and past ``t_total`` its cosine rises again where ours stays at 0 (a
    fine-tune continued beyond its steps). ``tests/test_training.py`` shows both."""
    if settings.warmup_steps > 0 and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class LoadPreprocessed(MapTransform):
    """Loads a cached case (``data_catalog.preprocessing``) named by ``d["path"]``: image and label."""

    def __init__(self) -> None:
        super().__init__(keys=["path"])

    def __call__(self, data: dict) -> dict:
        case = load_preprocessed(Path(data["path"]))
        if case.label is None:
            raise ValueError(f"{data['path']} has no label: only labelled cases can be trained on")
        return {**data, "image": case.image.astype(np.float32, copy=False),
                "label": case.label.astype(np.float32)}


def pseudo_ramp(step: int, settings: TrainSettings) -> float:
    """The pseudo-label loss factor at ``step``: exp(-5 (1 - t)^2), t = step / pseudo_rampup_steps,
    rising from 0.007 to 1 and then 1 (1 throughout without a ramp)."""
    if settings.pseudo_rampup_steps <= 0 or step >= settings.pseudo_rampup_steps:
        return 1.0
    t = step / settings.pseudo_rampup_steps
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def _augmentations(settings: TrainSettings, augment: AugmentSettings | None = None) -> list:
    a, keys = augment or settings.augment, ["image", "label"]
    pos, neg = settings.pos_neg_ratio
    extra = []
    if a.affine_prob > 0:  # in-plane only: the slices are 2.5-5x thicker than the pixels are wide
        extra.append(RandAffined(keys, prob=a.affine_prob, rotate_range=(0.0, 0.0, math.radians(a.affine_rotate_deg)),
                                 scale_range=(a.affine_scale, a.affine_scale, 0.0), mode=("bilinear", "nearest"),
                                 padding_mode="zeros"))
    if a.cutout_prob > 0:
        side = [max(1, round(a.cutout_fraction * p)) for p in settings.patch_size]
        extra.append(RandCoarseDropoutd("image", holes=a.cutout_holes, spatial_size=side, fill_value=0.0,
                                        prob=a.cutout_prob))
    return [
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=settings.patch_size, pos=pos, neg=neg,
                               num_samples=1),
        RandZoomd(keys, prob=a.zoom_prob, min_zoom=a.zoom_range[0], max_zoom=a.zoom_range[1],
                  mode=("trilinear", "nearest"), keep_size=True),
        RandGaussianNoised("image", prob=a.noise_prob, mean=0.0, std=a.noise_std),
        RandGaussianSmoothd("image", prob=a.smooth_prob, sigma_x=a.smooth_sigma, sigma_y=a.smooth_sigma,
                            sigma_z=a.smooth_sigma),
        RandRotate90d(keys, prob=a.rotate90_prob, spatial_axes=(0, 1)),
        RandShiftIntensityd("image", offsets=a.shift_offset, prob=a.shift_prob),
        RandScaleIntensityd("image", factors=a.scale_factor, prob=a.scale_prob),
        *[RandFlipd(keys, prob=a.flip_prob, spatial_axis=ax) for ax in range(3)],
        RandAdjustContrastd("image", prob=a.contrast_prob, gamma=a.contrast_gamma),
        *extra,
    ]


class _SeededSamples(torch.utils.data.Dataset):
    """Items addressed as (index, sample seed): the random transforms of each sample are seeded by
    its own seed, so a sample's augmentation does not depend on what was drawn before it. Index i
    is item ``where[i] = (dataset, position)``: labelled and pseudo-labelled items live in datasets
    of their own, each with its own augmentation."""

    def __init__(self, datasets: Sequence[CacheDataset], where: Sequence[tuple[int, int]]) -> None:
        self.datasets, self.where = list(datasets), list(where)

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, sample_seed = key
        d, pos = self.where[index]
        ds = self.datasets[d]
        ds.transform.set_random_state(seed=sample_seed)
        return ds[pos]


class StepBatches(torch.utils.data.Sampler):
    """The batches of steps ``start_step`` .. ``max_steps - 1`` as lists of (index, sample seed).

    A pure function of (seed, step): the g-th sample overall is position g mod N of epoch
    g div N, whose order is a permutation drawn from (seed, epoch), and its augmentation seed is
    drawn from (seed, g). Training resumed at step s therefore sees exactly the batches an
    uninterrupted run sees from step s on, whatever the number of loader workers.

    A second group of ``n_second_items`` items (indices ``n_items`` onwards, e.g. the pseudo-labelled
    items) with ``n_second`` > 0: each batch takes ``batch_size - n_second`` samples from the first
    items and ``n_second`` from the second, each group with its own epochs (seeded by (seed, epoch,
    1) and (seed, g, 1)), so the ratio is the same in every batch however many items each group has.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, start_step: int, max_steps: int,
                 n_second_items: int = 0, n_second: int = 0) -> None:
        if n_second and not 0 < n_second < batch_size:
            raise ValueError(f"{n_second} sample(s) of the second group in a batch of {batch_size}: need 0 < n < "
                             "batch size")
        self.n, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.n_second_items, self.n_second = n_second_items, n_second if n_second_items else 0

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def _group(self, step: int, per_batch: int, n: int, offset: int, salt: tuple[int, ...],
               perms: dict[int, np.ndarray]) -> list[tuple[int, int]]:
        out = []
        for g in range(step * per_batch, (step + 1) * per_batch):
            epoch, pos = divmod(g, n)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = np.random.default_rng([self.seed, epoch, *salt]).permutation(n)
            sample_seed = int(np.random.SeedSequence([self.seed, g, *salt]).generate_state(1)[0])
            out.append((offset + int(perms[epoch][pos]), sample_seed))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first: dict[int, np.ndarray] = {}
        second: dict[int, np.ndarray] = {}
        n_first = self.batch_size - self.n_second
        for step in range(self.start_step, self.max_steps):
            batch = self._group(step, n_first, self.n, 0, (), first)
            if self.n_second:
                batch += self._group(step, self.n_second, self.n_second_items, self.n, (1,), second)
            yield batch


def pseudo_per_batch(settings: TrainSettings, n_labelled: int, n_pseudo: int) -> int:
    """How many samples of each batch are pseudo-labelled: ``pseudo_fraction`` of the batch, at
    least 1 and at most all but one; 0 without pseudo-labelled (or without labelled) items or
    without a fraction (one pool)."""
    if settings.pseudo_fraction <= 0 or not n_pseudo or not n_labelled or settings.batch_size < 2:
        return 0
    return min(settings.batch_size - 1, max(1, round(settings.pseudo_fraction * settings.batch_size)))


def make_loaders(train_items: Sequence[Path], settings: TrainSettings, seed: int | None = None,
                 item_weights: Sequence[float] | None = None, start_step: int = 0,
                 pseudo: Sequence[bool] | None = None) -> DataLoader:
    """A loader of augmented patches from the cached cases (all held in memory): one batch per
    step from ``start_step`` to ``settings.max_steps``, each a pure function of (seed, step).

    Each batch carries ``weight`` (B,): the loss weight of each patch's case (1 by default), and
    ``pseudo`` (B,): 1 for a patch of an item marked pseudo-labelled. Those items get
    ``settings.pseudo_augment`` and, with ``settings.pseudo_fraction``, a fixed share of every
    batch (:func:`pseudo_per_batch`).
    """
    seed = settings.seed if seed is None else seed
    weights = [1.0] * len(train_items) if item_weights is None else [float(w) for w in item_weights]
    flags = [False] * len(train_items) if pseudo is None else [bool(f) for f in pseudo]
    if len(weights) != len(train_items) or len(flags) != len(train_items):
        raise ValueError(f"{len(weights)} item weight(s) and {len(flags)} pseudo flag(s) for {len(train_items)} "
                         "training item(s)")
    if not train_items:
        raise ValueError("no training items")
    base = [LoadPreprocessed(), SpatialPadd(["image", "label"], spatial_size=settings.patch_size)]
    n_second = pseudo_per_batch(settings, flags.count(False), flags.count(True))
    # two groups when the batch has a fixed ratio or the pseudo-labelled items their own noise
    split = n_second > 0 or (settings.pseudo_augment is not None and any(flags))
    groups = [[i for i, f in enumerate(flags) if not f], [i for i, f in enumerate(flags) if f]] if split \
        else [list(range(len(train_items)))]
    datasets, where = [], {}
    for k, members in enumerate(groups):
        if not members:
            continue
        augment = settings.pseudo_augment if k == 1 else settings.augment
        data = [{"path": str(train_items[i]), "weight": weights[i], "pseudo": float(flags[i])} for i in members]
        datasets.append(CacheDataset(data=data, transform=Compose(base + _augmentations(settings, augment)),
                                     cache_rate=1.0, num_workers=0, progress=False))
        where |= {i: (len(datasets) - 1, pos) for pos, i in enumerate(members)}
    order = [i for members in groups for i in members]  # sampler index -> item: group 0 first, then group 1
    if n_second:
        batches = StepBatches(len(groups[0]), settings.batch_size, seed, start_step, settings.max_steps,
                              n_second_items=len(groups[1]), n_second=n_second)
    else:
        batches = StepBatches(len(order), settings.batch_size, seed, start_step, settings.max_steps)
    # its own generator: creating the loader's iterator must not draw from the global torch stream,
    # which dropout uses and a resume restores
    return DataLoader(_SeededSamples(datasets, [where[i] for i in order]), batch_sampler=batches,
                      num_workers=settings.num_workers, generator=torch.Generator().manual_seed(seed))


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


@torch.no_grad()
def validate(model: torch.nn.Module, val_items: Sequence[Path], settings: TrainSettings,
             device: torch.device) -> float:
    """Mean Dice of the foreground over the validation cases (sliding window at the patch size).

    A case where both prediction and label are empty scores 1.
    """
    if not val_items:
        return float("nan")
    was_training = model.training
    model.eval()
    amp_dtype = _amp_dtype(settings, device)
    scores = []
    for path in val_items:
        case = load_preprocessed(Path(path))
        image = torch.as_tensor(case.image, dtype=torch.float32)
        label = torch.as_tensor(case.label[0] > 0)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            prob = sliding_window_probability(model, image, settings.patch_size, settings.val_overlap,
                                              device=device).cpu()
        pred = prob >= FOREGROUND_THRESHOLD
        denom = int(pred.sum() + label.sum())
        scores.append(1.0 if denom == 0 else 2.0 * float((pred & label).sum()) / denom)
    model.train(was_training)
    return float(np.mean(scores))


def _amp_dtype(settings: TrainSettings, device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (CUDA, or a CPU with AVX512-BF16 / AMX), fp16 on
    older GPUs, else None (fp32)."""
    if not settings.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_supported() else None


def _selection(settings: TrainSettings, n_val: int) -> str:
    """How ``fit`` chooses best.pt: by validation Dice only when asked to and with enough cases."""
    if settings.checkpoint == "last":
        return "last step's weights (checkpoint = last)"
    if n_val < settings.min_val_cases:
        return (f"last step's weights: {n_val} validation case(s), fewer than the {settings.min_val_cases} "
                "a best step is chosen by")
    return "best validation Dice"


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                           nesterov=settings.nesterov, weight_decay=settings.weight_decay)


def _save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _rng_state() -> dict:
    """Global random states, as plain types and tensors (``last.pt`` is read with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.as_tensor(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fit_digest(train_items: Sequence[Path], val_items: Sequence[Path], settings: TrainSettings,
               init_weights: Path | None = None, item_weights: Sequence[float] | None = None,
               pseudo: Sequence[bool] | None = None) -> str:
    """The reuse and resume key of a training run: the settings, the content of every training and
    validation item (the preprocessing cache names its files by content), the loss weights, which
    items are pseudo-labelled, and the content of the initial weights. Any change gives a new key,
    and the run starts again."""
    payload = {
        "settings": settings.model_dump(mode="json"),
        "train": [Path(p).name for p in train_items],
        "val": [Path(p).name for p in val_items],
        "weights": None if item_weights is None else [round(float(w), 6) for w in item_weights],
        "init": _file_sha256(Path(init_weights)) if init_weights else None,
    }
    if pseudo is not None and any(pseudo):
        payload["pseudo"] = [bool(f) for f in pseudo]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _finished(out_dir: Path, digest: str) -> FitResult | None:
    """The result of a member already trained in ``out_dir`` on the same inputs (``digest``); a
    result of other inputs is removed."""
    done_file = out_dir / "result.json"
    if not done_file.exists():
        return None
    done = json.loads(done_file.read_text())
    if done.get("digest") != digest:
        done_file.unlink()
        return None
    log.info("%s: already trained (best Dice %.4f at step %d)", out_dir.name, done["best_dice"], done["best_step"])
    return FitResult(**{k: v for k, v in done.items() if k != "digest"} | {"best_checkpoint": out_dir / "best.pt"})


@dataclass
class _Run:
    """One fit in progress: the network, its optimiser and loss scaler, and where it stands."""

    out_dir: Path
    digest: str
    cfg: dict
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    step: int = 0
    best_dice: float = -math.inf
    best_step: int = -1
    history: list = field(default_factory=list)

    def save_last(self) -> None:
        """``last.pt``: everything needed to resume exactly here."""
        _save_atomic({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                      "scaler": self.scaler.state_dict(), "step": self.step, "best_dice": self.best_dice,
                      "best_step": self.best_step, "history": self.history, "rng": _rng_state(),
                      "digest": self.digest}, self.out_dir / "last.pt")

    def resume(self) -> None:
        """Continue from ``last.pt`` when it was written for the same inputs (``digest``)."""
        last = self.out_dir / "last.pt"
        if not last.exists():
            return
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # a planted or damaged file is never executed, only refused
            raise ValueError(f"{last} is not a resumable checkpoint ({type(e).__name__}); delete it to start "
                             "this member again") from None
        if state.get("digest") != self.digest:
            log.warning("%s: last.pt was written for other inputs or settings; starting again", self.out_dir.name)
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_dice, self.best_step = state["step"], state["best_dice"], state["best_step"]
        self.history = state["history"]
        _set_rng_state(state["rng"])
        log.info("%s: resuming at step %d (best Dice %.4f)", self.out_dir.name, self.step, self.best_dice)


def _start(out_dir: Path, digest: str, settings: TrainSettings, init_weights: Path | None,
           device: torch.device) -> _Run:
    """A seeded network (from ``init_weights`` when given), its optimiser, resumed where a killed
    fit left it."""
    set_determinism(seed=settings.seed)
    cfg = model_config(settings.model, **settings.model_overrides)
    model = build_from_config(cfg).to(device)
    if init_weights:
        ck = torch.load(init_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["state_dict"])
        log.info("%s: fine-tuning from %s", out_dir.name, init_weights)
    opt = _optimizer(model, settings)
    amp_dtype = _amp_dtype(settings, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    run = _Run(out_dir, digest, cfg, model, opt, scaler, amp_dtype)
    run.resume()
    return run


def _train_step(run: _Run, forward, batch: dict, settings: TrainSettings, loss_fn, device: torch.device
                ) -> tuple[float, float]:
    """One optimiser step on ``batch`` (pseudo-labels' loss ramped in); returns (loss, learning rate)."""
    lr = lr_at(run.step, settings)
    for group in run.opt.param_groups:
        group["lr"] = lr
    # plain tensors: MONAI's MetaTensor dispatches every operation through Python, and torch.compile refuses it
    image, label = (torch.as_tensor(batch[k]).as_subclass(torch.Tensor).to(device) for k in ("image", "label"))
    run.opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        out = forward(image)
    weight = batch["weight"].to(device)
    ramp = pseudo_ramp(run.step, settings)
    if ramp < 1.0:
        is_pseudo = batch["pseudo"].to(device) > 0
        weight = torch.where(is_pseudo, weight * ramp, weight)
    loss = deep_supervision_loss(out, label, loss_fn, weight)
    run.scaler.scale(loss).backward()
    if settings.grad_clip:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.step += 1
    return float(loss.detach()), lr


def _validate(run: _Run, val_items: Sequence[Path], settings: TrainSettings, device: torch.device, selection: str,
              cb: TrainCallbacks, meta: dict | None) -> None:
    """Validate; keep ``best.pt`` when the weights are the best so far (by ``selection``), then
    ``last.pt``."""
    dice = validate(run.model, val_items, settings, device)
    # without validation cases worth choosing by, the latest weights are the best we know
    improved = selection != "best validation Dice" or math.isnan(dice) or dice > run.best_dice
    if improved:
        run.best_dice, run.best_step = dice, run.step
        _save_atomic({"model_name": settings.model, "model_config": json.dumps(run.cfg),
                      "state_dict": run.model.state_dict(), "patch_size": list(settings.patch_size),
                      "val_dice": dice, "step": run.step, **(meta or {})}, run.out_dir / "best.pt")
    run.history.append({"step": run.step, "val/dice": dice})
    log.info("%s: step %d validation Dice %.4f%s", run.out_dir.name, run.step, dice, " (best)" if improved else "")
    if cb.on_validation:
        cb.on_validation(run.step, dice, improved)
    run.save_last()
    if cb.on_checkpoint:
        cb.on_checkpoint(run.out_dir / "last.pt")


class _LossWindow:
    """The training loss and seconds per step since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.loss, self.n = time.perf_counter(), 0.0, 0

    def add(self, loss: float) -> None:
        self.loss, self.n = self.loss + loss, self.n + 1

    def report(self, run: _Run, lr: float, settings: TrainSettings, cb: TrainCallbacks) -> None:
        sec = (time.perf_counter() - self.t) / self.n
        metrics = {"train/loss": self.loss / self.n, "train/lr": lr, "train/sec_per_step": sec}
        run.history.append({"step": run.step, **metrics})
        log.info("%s: step %d/%d loss %.4f lr %.2e (%.2f s/step, about %.1f min left)", run.out_dir.name, run.step,
                 settings.max_steps, metrics["train/loss"], lr, sec, sec * (settings.max_steps - run.step) / 60)
        if cb.on_log:
            cb.on_log(run.step, metrics)
        self.reset()


def fit(
    train_items: Sequence[Path],
    val_items: Sequence[Path],
    settings: TrainSettings,
    out_dir: Path,
    init_weights: Path | None = None,
    callbacks: TrainCallbacks | None = None,
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
    item_weights: Sequence[float] | None = None,
    pseudo: Sequence[bool] | None = None,
) -> FitResult:
    """Train one network; idempotent and resumable in ``out_dir``.

    Writes ``last.pt`` (everything needed to resume) every ``val_every`` steps, ``best.pt`` (a
    member checkpoint: configuration + weights, see ``viola_models.ensemble.load_member``) whenever
    the validation Dice improves, and ``result.json`` when done; a finished ``out_dir`` with the
    same :func:`fit_digest` returns its result without training, and a killed one resumes exactly
    where ``last.pt`` left it (batches and augmentations are a function of the step). ``init_weights``
    (a member checkpoint) starts fine-tuning from another network's weights; ``item_weights``
    scales each training item's loss; ``pseudo`` marks the pseudo-labelled items (their batch
    share, augmentation and loss ramp: ``TrainSettings.pseudo_*``). ``meta`` is stored in ``best.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cb = callbacks or TrainCallbacks()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    digest = fit_digest(train_items, val_items, settings, init_weights, item_weights, pseudo)
    done = _finished(out_dir, digest)
    if done is not None:
        return done
    run = _start(out_dir, digest, settings, init_weights, device)
    resumed_from = run.step
    loader = make_loaders(train_items, settings, item_weights=item_weights, start_step=resumed_from, pseudo=pseudo)
    selection = _selection(settings, len(val_items))
    if "validation case(s)" in selection:  # a fallback, not a choice: the user should know
        log.warning("%s: best.pt holds the %s", out_dir.name, selection)
    batches, started, window = iter(loader), time.perf_counter(), _LossWindow()
    log.info("%s: %s (%s parameters), %d training / %d validation cases, %d steps on %s", out_dir.name,
             settings.model, f"{count_parameters(run.model):,}", len(train_items), len(val_items), settings.max_steps,
             device)
    loss_fn = DiceFocalIgnoring()
    run.model.train()
    forward = run.model if settings.compile == "off" else torch.compile(run.model, mode=settings.compile)
    while run.step < settings.max_steps:
        loss, lr = _train_step(run, forward, next(batches), settings, loss_fn, device)
        window.add(loss)
        if run.step % settings.log_every == 0 or run.step == settings.max_steps:
            window.report(run, lr, settings, cb)
        if run.step % settings.val_every == 0 or run.step == settings.max_steps:
            _validate(run, val_items, settings, device, selection, cb, meta)
    result = FitResult(best_dice=run.best_dice, best_step=run.best_step, steps=run.step,
                       best_checkpoint=out_dir / "best.pt", seconds=time.perf_counter() - started,
                       resumed_from=resumed_from, history=run.history, selection=selection)
    text = json.dumps(result.to_json() | {"digest": digest}, indent=1)
    atomic_write(out_dir / "result.json", lambda tmp: tmp.write_text(text))
    return result
