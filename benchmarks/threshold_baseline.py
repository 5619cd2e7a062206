"""The floor a trained model must beat: a fixed HU threshold inside the brain.

Used by the phantom tests (the phantoms must not be solvable by thresholding) and as a reference
line in the data benchmark.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def threshold_baseline(image: np.ndarray, lo: float = 50, hi: float = 90) -> np.ndarray:
    """Naive ICH segmentation: voxels with ``lo <= HU <= hi`` inside the brain (uint8 mask, image's shape).

    "Inside the brain", per axial slice: bone is HU > 200; the region it encloses (holes of the bone mask after a
    2-voxel closing, so small gaps in the skull do not open it) minus the bone and its 2-voxel in-plane
    neighbourhood (which removes most of the partial-volume rim at the inner table).
    """
    img = np.asarray(image)
    plane = np.zeros((3, 3, 3), bool)  # in-plane 4-connectivity: every operation stays inside its slice
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    bone = img > 200
    closed = ndimage.binary_closing(bone, structure=plane, iterations=2, border_value=0)
    # one empty slice above and below, so the end slices are not "border" for the hole filling
    filled = ndimage.binary_fill_holes(np.pad(closed, ((0, 0), (0, 0), (1, 1))), structure=plane)[:, :, 1:-1]
    inside = filled & ~ndimage.binary_dilation(bone, structure=plane, iterations=2)
    return (inside & (img >= lo) & (img <= hi)).astype(np.uint8)
