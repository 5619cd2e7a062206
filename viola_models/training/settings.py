"""A member's training settings as validated data (``TrainSettings``, ``AugmentSettings``), and
the schedules they define: the learning rate (warm-up + cosine, paper section 3.4) and the
pseudo-labels' loss ramp."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


def pseudo_ramp(step: int, settings: TrainSettings) -> float:
    """The pseudo-label loss factor at ``step``: exp(-5 (1 - t)^2), t = step / pseudo_rampup_steps,
    rising from 0.007 to 1 and then 1 (1 throughout without a ramp)."""
    if settings.pseudo_rampup_steps <= 0 or step >= settings.pseudo_rampup_steps:
        return 1.0
    t = step / settings.pseudo_rampup_steps
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
