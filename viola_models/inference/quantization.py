"""int8 CPU networks: their calibration windows, and the check that decides whether ``auto`` may
use them for an ensemble.

The check runs every member and the ensemble mean on whole preprocessed scans twice, in fp32
eager PyTorch (the reference) and through the int8 networks, and passes when every mask of
``GUARD_MIN_VOXELS`` or more voxels (the reference's) is reproduced with Dice >= ``GUARD_DICE``
and its volume within ``GUARD_VOLUME``, and no int8 mask of that size appears where the reference
has none. With no mask big enough to compare, nothing is proven and the check does not pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from viola_models.inference.sliding_window import FOREGROUND_THRESHOLD, sliding_window_probability

__all__ = ["GUARD_DICE", "GUARD_MIN_VOXELS", "GUARD_VOLUME", "Int8Check", "calibration_windows", "check_int8"]

GUARD_DICE = 0.99
GUARD_VOLUME = 0.01  # relative
GUARD_MIN_VOXELS = 100


def calibration_windows(images: Sequence[np.ndarray], patch_size: Sequence[int], n: int,
                        seed: int = 0) -> list[np.ndarray]:
    """``n`` windows (1, C, *patch_size) cut from the preprocessed images (C, X, Y, Z) at seeded
    random places, the images taken in turn; an image smaller than the patch is padded with its
    edge values, as the sliding window would see it."""
    if not images:
        raise ValueError("calibration needs at least one preprocessed image")
    rng = np.random.default_rng(seed)
    patch = tuple(int(p) for p in patch_size)
    out = []
    for i in range(n):
        img = np.asarray(images[i % len(images)], dtype=np.float32)
        pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, img.shape[1:])]
        img = np.pad(img, pad, mode="edge") if any(b for _, b in pad) else img
        corner = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, img.shape[1:])]
        sl = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        out.append(np.ascontiguousarray(img[(slice(None), *sl)])[None])
    return out


@dataclass
class Int8Check:
    """The outcome of :func:`check_int8`; ``rows``: one per (network, scan) compared."""

    passed: bool
    reason: str
    checked: int = 0
    min_dice: float = math.nan
    max_volume_error: float = math.nan
    rows: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "checked": self.checked,
                "min_dice": None if math.isnan(self.min_dice) else round(self.min_dice, 6),
                "max_volume_error": None if math.isnan(self.max_volume_error) else round(self.max_volume_error, 6)}


def _compare(ref: torch.Tensor, low: torch.Tensor) -> dict:
    a, b = ref >= FOREGROUND_THRESHOLD, low >= FOREGROUND_THRESHOLD
    va, vb = int(a.sum()), int(b.sum())
    inter = int((a & b).sum())
    dice = 2 * inter / (va + vb) if va + vb else 1.0
    return {"voxels": va, "int8_voxels": vb, "dice": dice, "volume_error": abs(vb - va) / va if va else math.nan}


def check_int8(reference: Sequence[Callable], int8: Sequence[Callable], names: Sequence[str],
               patch_sizes: Sequence[Sequence[int]], images: Sequence[np.ndarray],
               overlap: float = 0.25) -> Int8Check:
    """Compare the int8 networks with their fp32 references on whole preprocessed images: each
    member, and the members' mean (``"ensemble"``), per image (see the module's docstring)."""
    rows = []
    for k, image in enumerate(images):
        x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        refs, lows = [], []
        for name, ref_fn, low_fn, patch in zip(names, reference, int8, patch_sizes):
            refs.append(sliding_window_probability(ref_fn, x, patch, overlap, 1))
            lows.append(sliding_window_probability(low_fn, x, patch, overlap, 1))
            rows.append({"network": name, "scan": k, **_compare(refs[-1], lows[-1])})
        rows.append({"network": "ensemble", "scan": k,
                     **_compare(torch.stack(refs).mean(0), torch.stack(lows).mean(0))})
    big = [r for r in rows if r["voxels"] >= GUARD_MIN_VOXELS]
    spurious = [r for r in rows if r["voxels"] < GUARD_MIN_VOXELS <= r["int8_voxels"]]
    if spurious:
        s = spurious[0]
        return Int8Check(False, f"{s['network']} on scan {s['scan']}: {s['int8_voxels']} voxels where fp32 finds "
                         f"{s['voxels']}", len(big), rows=rows)
    if not big:
        return Int8Check(False, f"no fp32 mask of {GUARD_MIN_VOXELS}+ voxels on {len(images)} scan(s) to compare "
                         "against", rows=rows)
    min_dice = min(r["dice"] for r in big)
    max_vol = max(r["volume_error"] for r in big)
    result = Int8Check(True, "", len(big), min_dice, max_vol, rows)
    worst = min(big, key=lambda r: r["dice"])
    if min_dice < GUARD_DICE:
        result.passed, result.reason = False, (f"{worst['network']} on scan {worst['scan']}: Dice {min_dice:.4f} "
                                               f"< {GUARD_DICE} against fp32")
    elif max_vol > GUARD_VOLUME:
        off = max(big, key=lambda r: r["volume_error"])
        result.passed, result.reason = False, (f"{off['network']} on scan {off['scan']}: volume off by "
                                               f"{max_vol:.2%} (> {GUARD_VOLUME:.0%}) against fp32")
    else:
        result.reason = (f"Dice >= {min_dice:.4f}, volume within {max_vol:.2%} on {len(big)} mask(s) of "
                         f"{GUARD_MIN_VOXELS}+ voxels")
    return result
