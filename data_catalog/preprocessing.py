"""Preprocessing of the paper (section 3.4), its inverse, and a content-addressed cache.

Layers, from arrays to files (each testable without the next):

* ``preprocess_arrays``: HU volume + affine (+ label) -> reoriented, resampled, three-window,
  foreground-cropped, z-scored (3, X, Y, Z) volume and its new affine (MONAI transforms).
* ``preprocess_scan``: the same from NIfTI files (validated by ``data_catalog.scans``).
* ``cached_preprocess``: ``preprocess_scan`` behind a disk cache keyed by the inputs' content
  hashes, the settings and ``PREPROCESS_VERSION``: an unchanged scan is never recomputed, a
  changed file or setting recomputes exactly what it must.
* ``invert_to_native``: a prediction on the preprocessed grid back onto the scan's own grid
  (exactly its shape and affine), by resampling through the two affines.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, Spacing, SpatialCrop, SpatialResample
from monai.transforms.utils import generate_spatial_bounding_box
from pydantic import BaseModel, ConfigDict, field_validator

from data_catalog.scans import ScanError, atomic_write, read_image, read_label

__all__ = [
    "IGNORE_LABEL",
    "PREPROCESS_VERSION",
    "PreprocessSettings",
    "PreprocessedCase",
    "cache_key",
    "cached_preprocess",
    "invert_to_native",
    "load_preprocessed",
    "preprocess_arrays",
    "preprocess_scan",
]

log = logging.getLogger(__name__)

# bump when the arrays this module produces change for the same inputs and settings
PREPROCESS_VERSION = "2"


class PreprocessSettings(BaseModel):
    """Settings of the paper's preprocessing (section 3.4); the defaults are the paper's.

    The authors' final models used ``target_spacing=(0.902, 0.902, 4.997)`` and windows
    ``[[0, 100], [-15, 200], [-100, 1300]]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    orientation: str = "RAS"
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 5.0)  # mm
    windows: tuple[tuple[float, float], ...] = ((0, 100), (-20, 200), (-200, 1300))  # HU, one channel each
    label_interpolation: Literal["nearest", "linear"] = "nearest"  # linear: resample as float, threshold 0.5
    crop_foreground: bool = True
    foreground_hu: float = -200.0  # voxels above this HU are foreground (the head) for the crop
    crop_margin: int = 2  # voxels
    normalize: bool = True  # non-zero, channel-wise z-score

    @field_validator("windows")
    @classmethod
    def _windows_ordered(cls, v: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if not v or any(hi <= lo for lo, hi in v):
            raise ValueError(f"each window must be (low, high) with high > low, got {v}")
        return v

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"target_spacing must be positive, got {v}")
        return v

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        v = v.upper()
        pairs = ("LR", "AP", "SI")
        if len(v) != 3 or sorted(next((i for i, p in enumerate(pairs) if c in p), -1) for c in v) != [0, 1, 2]:
            raise ValueError(f"orientation must be one code of each pair L/R, A/P, S/I, like 'RAS'; got {v!r}")
        return v

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


@dataclass
class PreprocessedCase:
    """A preprocessed scan: network input, optional label, and what is needed to go back.

    ``image`` (C, X, Y, Z) float32, C = number of windows; ``label`` (1, X, Y, Z) uint8 or None;
    ``affine`` maps preprocessed voxel indices to world (RAS+ mm); ``native_shape`` and
    ``native_affine`` describe the original scan's grid.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def _window(hu: torch.Tensor, windows: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """(1, X, Y, Z) HU -> (C, X, Y, Z) in [0, 1]: each window min-max scaled and clipped."""
    return torch.cat([((hu - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in windows], dim=0)


IGNORE_LABEL = 2  # a preprocessed label's value for voxels that carry no loss (uncertain pseudo-label voxels)


def preprocess_arrays(
    image: np.ndarray, affine: np.ndarray, label: np.ndarray | None, settings: PreprocessSettings,
    ignore: np.ndarray | None = None,
) -> PreprocessedCase:
    """Reorient, resample, window, crop to the head and normalise one scan (paper section 3.4).

    ``image``: (X, Y, Z) HU; ``affine``: its 4x4 voxel-to-world matrix; ``label``: (X, Y, Z)
    {0, 1} or None. The image is resampled trilinearly, the label as set in the settings.
    ``ignore`` (X, Y, Z) {0, 1}, with a label: voxels to leave out of the loss, resampled as the
    label is; they get the label value ``IGNORE_LABEL``.
    """
    native_shape = tuple(int(s) for s in image.shape)
    native_affine = np.asarray(affine, dtype=np.float64)
    aff = torch.as_tensor(native_affine)
    img = MetaTensor(torch.as_tensor(np.asarray(image, dtype=np.float32))[None], affine=aff)
    orient = Orientation(axcodes=settings.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    img = orient(img)
    # the resampled grid is computed once from the image and reused for the label
    img = Spacing(pixdim=settings.target_spacing, mode="bilinear", padding_mode="border")(img)
    linear = settings.label_interpolation == "linear"

    def to_grid(mask: np.ndarray) -> MetaTensor:  # a {0, 1} map onto the image's new grid, {0, 1} again
        m = orient(MetaTensor(torch.as_tensor(np.asarray(mask, dtype=np.float32))[None], affine=aff.clone()))
        m = Spacing(pixdim=settings.target_spacing, mode="bilinear" if linear else "nearest",
                    padding_mode="zeros")(m, output_spatial_shape=img.shape[1:])
        return MetaTensor((m.as_tensor() >= 0.5).to(torch.float32), affine=m.affine)

    lab = None
    if label is not None:
        lab = to_grid(label)
        if ignore is not None:
            lab = MetaTensor(torch.where(to_grid(ignore).as_tensor() > 0, float(IGNORE_LABEL), lab.as_tensor()),
                             affine=lab.affine)
    if settings.crop_foreground:
        threshold = settings.foreground_hu
        start, end = generate_spatial_bounding_box(img, select_fn=lambda x: x > threshold, margin=settings.crop_margin)
        if any(e <= s for s, e in zip(start, end)):
            start, end = [0, 0, 0], list(img.shape[1:])  # nothing above the threshold: keep all
        crop = SpatialCrop(roi_start=start, roi_end=end)
        img = crop(img)
        lab = crop(lab) if lab is not None else None
    out_affine = img.affine.numpy().astype(np.float64)
    chans = _window(img.as_tensor(), settings.windows)
    if settings.normalize:
        chans = NormalizeIntensity(nonzero=True, channel_wise=True)(chans)
    chans = torch.as_tensor(chans, dtype=torch.float32)
    return PreprocessedCase(
        image=chans.numpy(),
        label=None if lab is None else lab.as_tensor().numpy().astype(np.uint8),
        affine=out_affine,
        native_shape=native_shape,
        native_affine=native_affine,
    )


def preprocess_scan(
    image_path: Path, label_path: Path | None, settings: PreprocessSettings, binarize_label: bool = False,
    ignore_path: Path | None = None,
) -> PreprocessedCase:
    """``preprocess_arrays`` on NIfTI files (ScanError with a reason for unusable files); ``ignore_path``:
    a {0, 1} map on the label's grid of the voxels to leave out of the loss."""
    image, info = read_image(Path(image_path))
    label = ignore = None
    if label_path:
        label, _ = read_label(Path(label_path), binarize=binarize_label, image=Path(image_path))
        if ignore_path:
            ignore, _ = read_label(Path(ignore_path))
            if ignore.shape != label.shape:
                raise ScanError(f"{ignore_path}: shape {ignore.shape} is not the label's {label.shape}")
    return preprocess_arrays(image, info.affine, label, settings, ignore)


def cache_key(
    image_hash: str, label_hash: str | None, settings: PreprocessSettings, binarize_label: bool = False,
    ignore_hash: str | None = None,
) -> str:
    """Content address of a preprocessed case: input hashes, settings and code version."""
    data = {"image": image_hash, "label": label_hash or "", "binarize": bool(binarize_label),
            "settings": settings.model_dump(mode="json"), "version": PREPROCESS_VERSION}
    if ignore_hash:
        data["ignore"] = ignore_hash
    payload = json.dumps(data, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _image_path(path: Path) -> Path:
    return Path(path).with_suffix(".image.npy")


def _save(case: PreprocessedCase, path: Path) -> None:
    """The image as a plain .npy (read back in one copy), then the rest as .npz: the .npz is written
    last and marks a complete entry."""
    arrays = {"affine": case.affine, "native_affine": case.native_affine,
              "native_shape": np.asarray(case.native_shape, dtype=np.int64)}
    if case.label is not None:
        arrays["label"] = case.label

    def write_image(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(case.image))

    def write_meta(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(_image_path(path), write_image)
    atomic_write(path, write_meta)


def load_preprocessed(path: Path) -> PreprocessedCase:
    """Read a cached case written by ``cached_preprocess`` (``path``: its .npz)."""
    with np.load(path) as z:
        meta = {k: np.asarray(z[k]) for k in z.files}
    return PreprocessedCase(
        image=np.load(_image_path(path)),
        label=meta.get("label"),
        affine=meta["affine"],
        native_shape=tuple(int(v) for v in meta["native_shape"]),
        native_affine=meta["native_affine"],
    )


def cached_preprocess(
    cache_dir: Path,
    image_path: Path,
    image_hash: str,
    settings: PreprocessSettings,
    label_path: Path | None = None,
    label_hash: str | None = None,
    binarize_label: bool = False,
    ignore_path: Path | None = None,
    ignore_hash: str | None = None,
) -> tuple[Path, bool]:
    """Path of the preprocessed case in ``cache_dir``, computing it on a miss; returns (path, hit).

    The caller supplies the content hashes (the catalog's): a file whose content changes gets a
    new key, and so does any change of settings or of ``PREPROCESS_VERSION``.
    """
    ignore = ignore_path if label_path else None
    key = cache_key(image_hash, label_hash if label_path else None, settings, binarize_label,
                    ignore_hash if ignore else None)
    path = Path(cache_dir) / key[:2] / f"{key}.npz"
    if path.exists() and _image_path(path).exists():
        return path, True
    case = preprocess_scan(Path(image_path), Path(label_path) if label_path else None, settings, binarize_label,
                           Path(ignore) if ignore else None)
    _save(case, path)
    log.debug("preprocessed %s -> %s", image_path, path)
    return path, False


def invert_to_native(
    values: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    native_affine: np.ndarray,
    native_shape: tuple[int, int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample (C, X, Y, Z) values on the preprocessed grid onto the native grid of the scan.

    Returns (C, *native_shape). Positions outside the preprocessed (cropped) volume get 0, so
    send foreground probabilities (not background) through it. ``mode`` "bilinear" suits
    probabilities, "nearest" label maps.
    """
    src = MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=torch.as_tensor(affine))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(native_affine), spatial_size=tuple(int(s) for s in native_shape)
    )
    return out.as_tensor() if isinstance(out, MetaTensor) else out

