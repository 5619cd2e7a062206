"""Training batches: preprocessed cases read from the cache, the paper's nine augmentations (and
the strong ones of pseudo-labelled cases), and a sampler that makes every batch a function of the
step, so a resumed fit sees the batches it would have seen."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
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

from data_catalog.preprocessing import load_preprocessed
from viola_models.training.settings import AugmentSettings, TrainSettings


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
