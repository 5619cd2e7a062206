"""Segmentation metrics of the INSTANCE 2022 challenge, plus lesion volumes (ml) and the ABC/2 bedside estimate.

P is the predicted mask, G the reference mask. Both are binary 3-D arrays on the reference's native voxel grid,
with axes (X, Y, Z) matching ``spacing_mm`` (the reference NIfTI's pixdim[1:4], in mm).

- DSC = (2|P∩G| + 1e-5) / (|P| + |G| + 1e-5).
- HD: the maximum (not the 95th percentile) of the two directed surface distances, in mm. Surfaces are
  surfel-based (2x2x2 neighbour codes at voxel corners), as computed by
  ``monai.metrics.utils.get_edge_surface_distance(..., use_subvoxels=True, symmetric=True)``.
- NSD: normalised surface Dice at a tolerance in mm (0.42 mm in the challenge), area-weighted surfels, via
  ``monai.metrics.compute_surface_dice(..., use_subvoxels=True)``.
- RVD = | |P| - |G| | / |G| on voxel counts.

With both masks non-empty these match the official scorer. On empty masks the official scorer gives inf,
errors or nan; this project uses finite values instead, so that per-case tables and means stay usable:

==========================  =====  =====  ==================  =============================
case                        DSC    NSD    HD (mm)             RVD
==========================  =====  =====  ==================  =============================
both empty                  1      1      0                   0
P empty, G not              0 (*)  0      volume diagonal     1
P not empty, G empty        ~0 (*) 0      volume diagonal     NaN (undefined: division by 0)
==========================  =====  =====  ==================  =============================

(*) from the DSC formula: 1e-5 / (|P| + |G| + 1e-5), i.e. about 0. "Volume diagonal" is the diagonal of the
whole image in mm, sqrt(sum((shape_i * spacing_i)^2)): a finite worst case no real prediction can exceed.

Differences from the official scorer: it gives HD = inf in all three cases; NSD = nan when both are empty;
RVD raises (division by zero) when G is empty, including both empty. Here both-empty is perfect agreement on a
case without blood, and the only undefined value is RVD when G is empty; ``summarize`` skips NaN values and
counts them (``n_rvd_undefined``).

Volumes: ``volume_ml`` = voxel count x voxel volume (mm^3) / 1000. ``abc2_volume_ml`` is the bedside ABC/2
estimate, summed over 3-D connected components (26-connectivity). In ``evaluate_case`` it is computed on the
reference mask G: the estimate a clinician would make of the true lesion, to compare with ``gt_volume_ml``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from monai.metrics.utils import get_edge_surface_distance
from scipy import ndimage
from scipy.spatial import ConvexHull

__all__ = ["abc2_volume_ml", "evaluate_case", "summarize", "volume_ml"]

_DSC_SMOOTH = 1e-5
# Margin (voxels) kept around the bounding box of P∪G. Surfels sit in the 2x2x2 cells touching the foreground,
# so one background voxel on each side is enough to close every surface; two leaves room to spare.
_CROP_MARGIN = 2


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be 3 positive finite numbers (mm), got {tuple(spacing_mm)}")
    return spacing  # type: ignore[return-value]


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Return ``mask`` as a bool array; raise ValueError unless it is 3-D with values in {0, 1} only."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array (X, Y, Z), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a binary numeric or bool array, got dtype {mask.dtype}")
    if mask.dtype.kind in "iu":
        # min/max is much cheaper than an element-wise membership test on a 512x512xN volume.
        lo, hi = (mask.min(), mask.max()) if mask.size else (0, 0)
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must be binary (values 0 and 1 only), got values in [{lo}, {hi}]")
    elif not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be binary (values 0 and 1 only); got other values (a probability map?)")
    return mask != 0


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """Slices of the bounding box of a non-empty mask grown by ``margin`` voxels, clipped to the array, and the
    zero padding per axis that restores the part of the margin lying outside the array."""
    slices, pads = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        slices.append(slice(max(lo, 0), min(hi, mask.shape[axis])))
        pads.append((max(-lo, 0), max(hi - mask.shape[axis], 0)))
    return tuple(slices), pads


def _crop_to_union(pred: np.ndarray, gt: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of pred | gt grown by ``margin`` voxels, zero-padding at the borders.

    Padding with background where the box meets the image border matches MONAI, which itself crops with a
    margin and pads outside the image (so a lesion touching the border still gets a closed surface).
    """
    sl, pads = _bounding_box(pred | gt, margin)
    return np.pad(pred[sl], pads), np.pad(gt[sl], pads)


def _surface_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float], nsd_tolerance_mm: float
) -> tuple[float, float]:
    """(HD in mm, NSD) for two non-empty bool masks, as the official scorer computes them."""
    # Surface distances and surfel areas depend only on the masks' geometry (relative positions of the surfels),
    # not on where the masks sit in the image: cropping to the bounding box of P∪G plus a background margin
    # leaves every surfel, its area and every distance unchanged, and saves MONAI from scanning the full volume.
    p_crop, g_crop = _crop_to_union(pred, gt, _CROP_MARGIN)
    p_t = torch.from_numpy(np.ascontiguousarray(p_crop))
    g_t = torch.from_numpy(np.ascontiguousarray(g_crop))
    spacing_list = list(spacing)  # MONAI wants all spacing elements of one type: floats, already ensured

    with warnings.catch_warnings():
        # MONAI 1.6 calls its own get_mask_edges with a deprecated argument and warns on every call; nothing to fix
        # on our side.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        _, (d_pred_to_gt, d_gt_to_pred), _ = get_edge_surface_distance(
            p_t, g_t, spacing=spacing_list, use_subvoxels=True, symmetric=True
        )
        # compute_surface_dice wants one-hot, batch-first tensors [B, C, X, Y, Z]; one foreground channel with
        # include_background=True scores exactly that channel.
        nsd = compute_surface_dice(
            p_t[None, None],
            g_t[None, None],
            class_thresholds=[float(nsd_tolerance_mm)],
            include_background=True,
            spacing=spacing_list,
            use_subvoxels=True,
        )
    hd = max(float(d_pred_to_gt.max()), float(d_gt_to_pred.max()))
    return hd, float(nsd[0, 0])


def volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Volume of a binary 3-D mask in ml: voxel count x voxel volume (mm^3) / 1000."""
    spacing = _check_spacing(spacing_mm)
    voxels = np.count_nonzero(_as_binary(mask, "mask"))
    return voxels * math.prod(spacing) / 1000.0


def _slice_diameters(pixels: np.ndarray, sx: float, sy: float) -> tuple[float, float]:
    """(A, B) in mm of one slice's region: A the largest diameter, B the extent perpendicular to A.

    Diameters are measured between pixel corners, so a single pixel has A = its diagonal and B = the extent of
    the square across that diagonal. Only the leftmost and rightmost pixel of each row can be convex-hull
    vertices, so their corners are enough.
    """
    rows = np.flatnonzero(pixels.any(axis=1))
    sub = pixels[rows]
    first = sub.argmax(axis=1)
    end = sub.shape[1] - sub[:, ::-1].argmax(axis=1)  # one past the last pixel of each row
    # Each row's run of pixels spans [row, row + 1] x [first, end] in pixel-corner coordinates.
    xs = np.concatenate([rows, rows + 1, rows, rows + 1])
    ys = np.concatenate([first, first, end, end])
    corners = np.stack([xs * sx, ys * sy], axis=1).astype(float)
    corners = corners[ConvexHull(corners).vertices]  # pixel corners never all lie on one line
    diff = corners[:, None, :] - corners[None, :, :]
    dist = np.hypot(diff[..., 0], diff[..., 1])
    i, j = np.unravel_index(int(dist.argmax()), dist.shape)
    a_mm = float(dist[i, j])
    direction = (corners[j] - corners[i]) / a_mm
    normal = np.array([-direction[1], direction[0]])
    across = corners @ normal
    return a_mm, float(across.max() - across.min())


def abc2_volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """ABC/2 bedside volume estimate in ml, summed over 3-D connected components (26-connectivity).

    Per component: A = largest in-plane diameter (X-Y plane) on the slice where the component has the largest
    area (the first such slice on ties), B = the extent perpendicular to A on that slice, C = number of Z slices
    containing the component x slice thickness (spacing_mm[2]). Volume = A*B*C/2 with A, B, C in cm (= ml).
    Diameters include the pixel size (measured between pixel corners). 0 for an empty mask.
    """
    sx, sy, sz = _check_spacing(spacing_mm)
    binary = _as_binary(mask, "mask")
    if not binary.any():
        return 0.0
    # Components, slice counts and diameters do not depend on where the mask sits: label only its bounding box.
    binary = binary[_bounding_box(binary, 0)[0]]
    labels, _ = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    total = 0.0
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        areas = component.sum(axis=(0, 1))
        n_slices = int(np.count_nonzero(areas))
        a_mm, b_mm = _slice_diameters(component[:, :, int(areas.argmax())], sx, sy)
        total += (a_mm / 10.0) * (b_mm / 10.0) * (n_slices * sz / 10.0) / 2.0
    return total


def evaluate_case(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], nsd_tolerance_mm: float = 0.42
) -> dict[str, float]:
    """INSTANCE 2022 metrics of one case.

    Returns dsc, hd (mm), nsd, rvd, pred_volume_ml, gt_volume_ml and abc2_volume_ml (ABC/2 of the reference
    mask gt, ml). Empty masks follow the table in the module docstring. Raises ValueError on a shape mismatch
    (never resizes) or non-binary input.
    """
    pred_arr, gt_arr = np.asarray(pred), np.asarray(gt)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(
            f"pred and gt shapes differ: pred {pred_arr.shape} vs gt {gt_arr.shape}; "
            "predictions must be on the reference's native grid"
        )
    spacing = _check_spacing(spacing_mm)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0, got {nsd_tolerance_mm}")
    p = _as_binary(pred_arr, "pred")
    g = _as_binary(gt_arr, "gt")

    n_pred, n_gt = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    n_both = int(np.count_nonzero(p & g))
    dsc = (2.0 * n_both + _DSC_SMOOTH) / (n_pred + n_gt + _DSC_SMOOTH)
    rvd = abs(n_pred - n_gt) / n_gt if n_gt > 0 else (0.0 if n_pred == 0 else math.nan)

    if n_pred and n_gt:
        hd, nsd = _surface_metrics(p, g, spacing, nsd_tolerance_mm)
    elif n_pred or n_gt:
        # One surface is missing: finite worst case instead of the official inf (see the module docstring).
        hd = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, spacing, strict=True)))
        nsd = 0.0
    else:
        hd, nsd = 0.0, 1.0

    voxel_ml = math.prod(spacing) / 1000.0
    return {
        "dsc": float(dsc),
        "hd": float(hd),
        "nsd": float(nsd),
        "rvd": float(rvd),
        "pred_volume_ml": n_pred * voxel_ml,
        "gt_volume_ml": n_gt * voxel_ml,
        "abc2_volume_ml": abc2_volume_ml(g, spacing) if n_gt else 0.0,
    }


def summarize(cases: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over cases, skipping NaN values.

    Returns ``{key: mean}`` for every key seen (NaN if no case defines it), ``n_cases``, and
    ``n_<key>_undefined`` (the number of NaN values skipped) for every key, e.g. ``n_rvd_undefined``.
    """
    keys: list[str] = []
    for case in cases:
        keys.extend(k for k in case if k not in keys)
    summary: dict[str, float] = {}
    undefined: dict[str, float] = {}
    for key in keys:
        values = np.array([float(c[key]) for c in cases if key in c], dtype=float)
        defined = values[~np.isnan(values)]
        summary[key] = float(defined.mean()) if defined.size else math.nan
        undefined[f"n_{key}_undefined"] = int(values.size - defined.size)
    summary["n_cases"] = len(cases)
    summary.update(undefined)
    return summary
