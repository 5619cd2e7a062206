"""Figures: PNG overlays of a mask on the paper's three-window view (its Fig. 1), and the
calibration curve of the pseudo-label selection.

Columns: [-200, 1300] HU, [0, 100] HU, [-20, 200] HU and the three windows as RGB; rows: the
axial slices with the most blood. Slices are shown in radiological convention (patient's right
on the image's left, anterior at the top) whatever the file's orientation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from data_catalog.scans import atomic_write
from data_catalog.selection import Calibration

__all__ = ["FIG1_WINDOWS", "calibration_png", "overlay_png"]

FIG1_WINDOWS = ((-200.0, 1300.0), (0.0, 100.0), (-20.0, 200.0))


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def _window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def overlay_png(
    image_hu: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    out_path: Path,
    title: str = "",
    n_slices: int = 3,
    windows: Sequence[tuple[float, float]] = FIG1_WINDOWS,
) -> Path:
    """Write a PNG of ``mask`` outlined on ``image_hu`` (both (X, Y, Z) on the grid of ``affine``).

    Picks the ``n_slices`` axial slices with the most mask voxels (the middle slices when the
    mask is empty). Written atomically; returns ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img = _to_ras(np.asarray(image_hu, dtype=np.float32), affine)
    msk = _to_ras(np.asarray(mask) > 0, affine)
    zooms = np.abs(nib.affines.voxel_sizes(affine))[np.argsort(nib.orientations.io_orientation(affine)[:, 0])]
    per_slice = msk.reshape(-1, msk.shape[2]).sum(0)
    if per_slice.max() > 0:
        slices = sorted(np.argsort(per_slice)[::-1][:n_slices].tolist())
    else:
        mid = img.shape[2] // 2
        slices = list(range(max(0, mid - n_slices // 2), min(img.shape[2], mid - n_slices // 2 + n_slices)))
    aspect = float(zooms[1] / zooms[0])
    fig, axes = plt.subplots(len(slices), len(windows) + 1, figsize=(3 * (len(windows) + 1), 3 * len(slices)),
                             squeeze=False)
    for row, z in enumerate(slices):
        # radiological view: columns run from patient right to left, rows from anterior to posterior
        sl = img[::-1, ::-1, z].T
        ms = msk[::-1, ::-1, z].T
        chans = [_window(sl, lo, hi) for lo, hi in windows]
        for col, ch in enumerate([*chans, np.stack(chans[:3], -1)]):
            ax = axes[row, col]
            ax.imshow(ch, cmap="gray" if ch.ndim == 2 else None, aspect=aspect, interpolation="nearest")
            if ms.any():
                ax.contour(ms.astype(float), levels=[0.5], colors=["#ff4fd8"], linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                label = "3 windows" if col == len(windows) else f"[{windows[col][0]:g}, {windows[col][1]:g}] HU"
                ax.set_title(label, fontsize=9)
        axes[row, 0].set_ylabel(f"slice {z} ({int(ms.sum())} px)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=80, format="png")

    try:
        atomic_write(Path(out_path), write)
    finally:
        plt.close(fig)
    return Path(out_path)


def calibration_png(points: pd.DataFrame, calibration: Calibration, out_path: Path,
                    unlabelled: pd.DataFrame | None = None, threshold: float | None = None) -> Path:
    """Write a PNG of the calibration: the out-of-fold points (score vs true Dice), the fitted
    curve, the rule's target, and, when given, the unlabelled scans' scores against their hidden
    true Dice (phantoms)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    score = calibration.score
    fig, ax = plt.subplots(figsize=(5, 4.2))
    pts = points[points[score].notna()] if score in points else points.iloc[:0]
    ax.scatter(pts[score], pts["true_dice"], s=30, color="#1f5fbf", label="out-of-fold scans")
    if unlabelled is not None and score in unlabelled and "true_dice" in unlabelled:
        ax.scatter(unlabelled[score], unlabelled["true_dice"], s=22, marker="x", color="#d0452f",
                   label="unlabelled (hidden truth)")
    grid = np.linspace(0, 1, 101)
    ax.plot(grid, calibration.predict(grid), color="black", lw=1.5, label=f"fit ({calibration.kind})")
    if threshold is not None:
        ax.axhline(threshold, color="#888888", ls="--", lw=1, label=f"target Dice {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(score.replace("_", " "))
    ax.set_ylabel("true Dice")
    ax.set_title(f"{calibration.n_points} points, Spearman {calibration.spearman:.2f}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    try:
        atomic_write(Path(out_path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)
    return Path(out_path)
