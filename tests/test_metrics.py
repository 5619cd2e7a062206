"""viola_models.evaluation.metrics: INSTANCE 2022 metrics, volumes and ABC/2 against hand-computed cases.

Surfel geometry used by the hand computations (DeepMind / MONAI ``use_subvoxels=True``): surface elements sit in
the 2x2x2 cells between voxel centres, i.e. at voxel corners, and distances are measured between those corner
points. With spacing (sx, sy, sz), a cell's surface area depends on how many of its 8 voxels are foreground:
- 4 in, forming a face (flat face cell, normal along x): a rectangle sy*sz;
- 2 in, adjacent along z (edge cell): a rectangle of length sz and width sqrt((sx/2)^2 + (sy/2)^2);
- 1 in (corner cell): the triangle through the midpoints of the three cell edges leaving that voxel,
  area |(sy*sz, sx*sz, sx*sy)| / 8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_surface_dice
from monai.metrics.utils import get_edge_surface_distance

from viola_models.evaluation.metrics import abc2_volume_ml, evaluate_case, summarize, volume_ml

ANISO = (0.5, 0.5, 5.0)


def _box(shape: tuple[int, int, int], lo: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    return mask


def _face(s1: float, s2: float) -> float:
    return s1 * s2


def _edge(s_along: float, s1: float, s2: float) -> float:
    return s_along * math.hypot(s1 / 2, s2 / 2)


def _corner(sx: float, sy: float, sz: float) -> float:
    return math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8


# ---------------------------------------------------------------- DSC, RVD, identical masks


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_identical_masks_are_perfect(dtype):
    gt = _box((12, 12, 8), (3, 4, 2), (5, 4, 3)).astype(dtype)
    result = evaluate_case(gt.copy(), gt, ANISO)
    assert result["dsc"] == pytest.approx(1.0)
    assert result["hd"] == 0.0
    assert result["nsd"] == pytest.approx(1.0)
    assert result["rvd"] == 0.0
    assert set(result) == {"dsc", "hd", "nsd", "rvd", "pred_volume_ml", "gt_volume_ml", "abc2_volume_ml"}


def test_dsc_and_rvd_of_two_overlapping_boxes():
    # P: 4x4x4 = 64 voxels; G: 4x4x6 = 96 voxels starting one slice higher, so they share 4x4x3 = 48 voxels.
    pred = _box((10, 10, 10), (2, 2, 2), (4, 4, 4))
    gt = _box((10, 10, 10), (2, 2, 3), (4, 4, 6))
    result = evaluate_case(pred, gt, (0.8, 0.8, 2.0))
    assert result["dsc"] == pytest.approx((2 * 48 + 1e-5) / (64 + 96 + 1e-5), rel=1e-12)
    assert result["rvd"] == pytest.approx(32 / 96, rel=1e-12)
    voxel_ml = 0.8 * 0.8 * 2.0 / 1000
    assert result["pred_volume_ml"] == pytest.approx(64 * voxel_ml)
    assert result["gt_volume_ml"] == pytest.approx(96 * voxel_ml)


# ---------------------------------------------------------------- HD and NSD on shifted shapes


def test_single_voxel_shifted_along_z():
    # One voxel has 8 corner cells (one per voxel corner), all of the same area. Shifted by one slice, the 4 cells on
    # the shared face coincide (distance 0); each of the other 4 is one slice (5 mm) from the other voxel's cells.
    # So HD = 5 mm, and NSD = (4 + 4) / (8 + 8) = 0.5 below 5 mm and 1 from 5 mm on (distances <= tau count).
    pred = np.zeros((8, 8, 8), dtype=np.uint8)
    gt = np.zeros_like(pred)
    pred[3, 3, 3] = 1
    gt[3, 3, 4] = 1
    assert evaluate_case(pred, gt, ANISO)["hd"] == pytest.approx(5.0, rel=1e-6)
    assert evaluate_case(pred, gt, ANISO)["nsd"] == pytest.approx(0.5, rel=1e-5)
    assert evaluate_case(pred, gt, ANISO, nsd_tolerance_mm=4.99)["nsd"] == pytest.approx(0.5, rel=1e-5)
    assert evaluate_case(pred, gt, ANISO, nsd_tolerance_mm=5.0)["nsd"] == pytest.approx(1.0, rel=1e-6)


def test_box_shifted_one_voxel_along_x_anisotropic():
    sx, sy, sz = ANISO
    nx, ny, nz = 6, 5, 4
    pred = _box((20, 20, 12), (4, 6, 3), (nx, ny, nz))
    gt = _box((20, 20, 12), (5, 6, 3), (nx, ny, nz))
    # Surface cells of P: the boundary of the cell box [3, 9] x [5, 10] x [2, 6] (corner-cell indices); G's is the
    # same shifted by +1 in x. Directed distances P -> G:
    # - P's left face (x = 3, rim included) lies one cell (sx = 0.5 mm) before G's left face: 0.5 mm;
    # - P's right face interior (x = 9) lies inside G: min(sx to G's right face, >= sy to G's sides) = 0.5 mm;
    # - the rest, the side tube for x in [4, 9], lies on G's side tube: 0 mm.
    # So HD = 0.5 mm. By mirror symmetry G -> P has the same areas at the same distances, hence
    # NSD(tau < 0.5) = area(tube part) / area(P surface) and NSD(tau >= 0.5) = 1.
    f_x, f_y, f_z = _face(sy, sz), _face(sx, sz), _face(sx, sy)
    e_x, e_y, e_z = _edge(sx, sy, sz), _edge(sy, sx, sz), _edge(sz, sx, sy)
    c = _corner(sx, sy, sz)
    total = (
        2 * (ny - 1) * (nz - 1) * f_x
        + 2 * (nx - 1) * (nz - 1) * f_y
        + 2 * (nx - 1) * (ny - 1) * f_z
        + 4 * ((nx - 1) * e_x + (ny - 1) * e_y + (nz - 1) * e_z)
        + 8 * c
    )
    left_face = (ny - 1) * (nz - 1) * f_x + 2 * (ny - 1) * e_y + 2 * (nz - 1) * e_z + 4 * c
    right_face_interior = (ny - 1) * (nz - 1) * f_x
    expected_nsd = (total - left_face - right_face_interior) / total

    result = evaluate_case(pred, gt, ANISO)  # default tolerance 0.42 mm < 0.5 mm
    assert result["hd"] == pytest.approx(0.5, rel=1e-6)
    assert result["nsd"] == pytest.approx(expected_nsd, rel=1e-5)
    assert evaluate_case(pred, gt, ANISO, nsd_tolerance_mm=0.5)["nsd"] == pytest.approx(1.0, rel=1e-6)


def test_box_shifted_one_slice_along_z_has_hd_of_one_slice():
    # P's bottom face sits one slice below G's bottom face and outside G: its cells are exactly sz = 5 mm from G's
    # surface (G's bottom face directly above; G's side walls start at the same height, so they are no closer).
    # Every other directed distance is at most 5 mm (the top face of P is 5 mm from G's top face).
    pred = _box((16, 16, 10), (4, 4, 2), (6, 6, 4))
    gt = _box((16, 16, 10), (4, 4, 3), (6, 6, 4))
    result = evaluate_case(pred, gt, ANISO, nsd_tolerance_mm=5.0)
    assert result["hd"] == pytest.approx(5.0, rel=1e-6)
    assert result["nsd"] == pytest.approx(1.0, rel=1e-6)


def test_lesion_touching_the_border_scores_as_in_the_interior():
    # Distances depend only on geometry: the same pair at the image corner (where the crop must pad) and in the
    # interior must score the same (the single-voxel values worked out above).
    at_border_p = np.zeros((6, 6, 6), dtype=np.uint8)
    at_border_g = np.zeros_like(at_border_p)
    at_border_p[0, 0, 0] = 1
    at_border_g[0, 0, 1] = 1
    result = evaluate_case(at_border_p, at_border_g, ANISO)
    assert result["hd"] == pytest.approx(5.0, rel=1e-6)
    assert result["nsd"] == pytest.approx(0.5, rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")  # raised inside MONAI 1.6 itself
def test_cropping_matches_monai_on_the_full_volume():
    # The bounding-box crop is only for speed: compare with MONAI's calls on the uncropped arrays.
    rng = np.random.default_rng(0)
    shape = (40, 36, 12)
    spacing = [0.45, 0.6, 3.0]
    gt = np.zeros(shape, dtype=bool)
    gt[10:25, 8:20, 3:8] = True
    pred = gt.copy()
    pred[rng.integers(0, 40, 30), rng.integers(0, 36, 30), rng.integers(0, 12, 30)] = True
    pred[12:16, 8:11, 3:5] = False
    pred[38:, 0:2, 10:] = True  # a false positive at the image border, far from the lesion
    p_t, g_t = torch.from_numpy(pred), torch.from_numpy(gt)
    _, (d_pg, d_gp), _ = get_edge_surface_distance(p_t, g_t, spacing=spacing, use_subvoxels=True, symmetric=True)
    nsd_full = compute_surface_dice(
        p_t[None, None],
        g_t[None, None],
        class_thresholds=[0.42],
        include_background=True,
        spacing=spacing,
        use_subvoxels=True,
    )
    result = evaluate_case(pred, gt, spacing)
    assert result["hd"] == pytest.approx(max(float(d_pg.max()), float(d_gp.max())), rel=1e-6)
    assert result["nsd"] == pytest.approx(float(nsd_full[0, 0]), rel=1e-6)


# ---------------------------------------------------------------- empty masks


SHAPE = (10, 12, 8)
# Diagonal of the whole image in mm: sqrt((10*0.5)^2 + (12*0.5)^2 + (8*5)^2).
DIAGONAL_MM = math.sqrt(5.0**2 + 6.0**2 + 40.0**2)


def test_both_empty_is_perfect_agreement():
    empty = np.zeros(SHAPE, dtype=np.uint8)
    result = evaluate_case(empty, empty.copy(), ANISO)
    assert result == {
        "dsc": 1.0,
        "hd": 0.0,
        "nsd": 1.0,
        "rvd": 0.0,
        "pred_volume_ml": 0.0,
        "gt_volume_ml": 0.0,
        "abc2_volume_ml": 0.0,
    }


def test_empty_prediction_with_blood():
    gt = _box(SHAPE, (2, 2, 2), (3, 2, 2))  # 12 voxels
    result = evaluate_case(np.zeros(SHAPE, dtype=np.uint8), gt, ANISO)
    assert result["dsc"] == pytest.approx(1e-5 / (12 + 1e-5))
    assert result["nsd"] == 0.0
    assert result["rvd"] == 1.0
    assert result["hd"] == pytest.approx(DIAGONAL_MM)
    # ABC/2 is taken on the reference; a box's ABC/2 is its volume (see test_abc2_of_a_box).
    assert result["abc2_volume_ml"] == pytest.approx(12 * 0.5 * 0.5 * 5.0 / 1000)


def test_prediction_without_blood_in_reference():
    pred = _box(SHAPE, (2, 2, 2), (3, 2, 2))
    result = evaluate_case(pred, np.zeros(SHAPE, dtype=np.uint8), ANISO)
    assert result["dsc"] == pytest.approx(1e-5 / (12 + 1e-5))
    assert result["nsd"] == 0.0
    assert result["hd"] == pytest.approx(DIAGONAL_MM)
    assert math.isnan(result["rvd"])
    assert result["gt_volume_ml"] == 0.0
    assert result["abc2_volume_ml"] == 0.0
    assert all(math.isfinite(v) for k, v in result.items() if k != "rvd")


# ---------------------------------------------------------------- input errors


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 12, 8\).*\(10, 12, 9\)"):
        evaluate_case(np.zeros((10, 12, 8), dtype=np.uint8), np.zeros((10, 12, 9), dtype=np.uint8), ANISO)


@pytest.mark.parametrize(
    "bad",
    [
        np.full(SHAPE, 2, dtype=np.uint8),
        np.full(SHAPE, -1, dtype=np.int16),
        np.full(SHAPE, 0.5, dtype=np.float32),
    ],
)
def test_non_binary_input_is_rejected(bad):
    ok = np.zeros(SHAPE, dtype=np.uint8)
    with pytest.raises(ValueError, match="binary"):
        evaluate_case(bad, ok, ANISO)
    with pytest.raises(ValueError, match="binary"):
        evaluate_case(ok, bad, ANISO)
    with pytest.raises(ValueError, match="binary"):
        volume_ml(bad, ANISO)


def test_bad_spacing_and_dimensions_are_rejected():
    mask = np.zeros(SHAPE, dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(mask, mask, (0.5, 0.5))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(mask, mask, (0.5, 0.0, 5.0))
    with pytest.raises(ValueError, match="3-D"):
        evaluate_case(mask[..., 0], mask[..., 0], ANISO)


# ---------------------------------------------------------------- volumes and ABC/2


def test_volume_ml_with_anisotropic_spacing():
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1:3, 1:4, 2] = True  # 6 voxels of 0.5 x 0.8 x 5.0 = 2 mm^3 each -> 12 mm^3 = 0.012 ml
    assert volume_ml(mask, (0.5, 0.8, 5.0)) == pytest.approx(0.012)
    assert volume_ml(np.zeros((5, 5, 5), dtype=np.uint8), (0.5, 0.8, 5.0)) == 0.0


@pytest.mark.parametrize(("w", "h", "d", "spacing"), [(6, 3, 4, (0.5, 0.8, 5.0)), (1, 1, 1, (0.5, 0.5, 5.0))])
def test_abc2_of_a_box(w, h, d, spacing):
    # A w x h pixel rectangle spans W = w*sx by H = h*sy mm between its pixel corners. A = its diagonal
    # sqrt(W^2 + H^2); B = its extent across the diagonal = twice the corner-to-diagonal distance = 2*W*H/A.
    # C = d * sz. So ABC/2 = W*H*d*sz: the exact box volume (a single pixel has A = B = its diagonal).
    sx, sy, sz = spacing
    big_w, big_h = w * sx, h * sy
    a_mm = math.hypot(big_w, big_h)
    b_mm = 2 * big_w * big_h / a_mm
    expected_ml = (a_mm / 10) * (b_mm / 10) * (d * sz / 10) / 2
    assert expected_ml == pytest.approx(w * h * d * sx * sy * sz / 1000)
    mask = _box((12, 12, 8), (2, 3, 1), (w, h, d))
    assert abc2_volume_ml(mask, spacing) == pytest.approx(expected_ml, rel=1e-9)


def test_abc2_sums_components_and_uses_26_connectivity():
    s, sz = 0.5, 5.0
    mask = np.zeros((12, 12, 6), dtype=np.uint8)
    # Component 1: a 2x2 square on slice 0 plus one pixel on slice 1 touching it only at a corner (26-connected).
    # Largest slice is the 2x2 square: A = B = 2*sqrt(2)*s, A*B = 8 s^2; C = 2 slices -> 8 s^2 sz mm^3.
    # (As two 6-connected components it would be 4 s^2 sz + s^2 sz = 5 s^2 sz.)
    mask[0:2, 0:2, 0] = 1
    mask[2, 2, 1] = 1
    # Component 2, far away: a 3x1x2 box, ABC/2 = its volume 3 s^2 * 2 sz = 6 s^2 sz.
    mask[8:11, 9, 3:5] = 1
    expected_ml = (8 + 6) * s * s * sz / 1000
    assert abc2_volume_ml(mask, (s, s, sz)) == pytest.approx(expected_ml, rel=1e-9)
    assert abc2_volume_ml(np.zeros((4, 4, 4), dtype=bool), (s, s, sz)) == 0.0


@pytest.mark.parametrize("angle_deg", [0.0, 30.0])
def test_abc2_of_an_ellipsoid(angle_deg):
    # Semi-axes a = 20 mm, b = 12 mm (in-plane, rotated by angle_deg), c = 15 mm (along z).
    # Analytic ABC/2 = (2a)(2b)(2c)/2 = 4abc = 14.4 ml; true volume 4/3*pi*abc ~ 15.08 ml (ABC/2 ~ 0.95x of it).
    a, b, c = 20.0, 12.0, 15.0
    spacing = (0.5, 0.5, 2.5)
    x, y, z = np.meshgrid(
        (np.arange(100) - 49.5) * spacing[0],
        (np.arange(100) - 49.5) * spacing[1],
        (np.arange(16) - 7.5) * spacing[2],
        indexing="ij",
    )
    t = math.radians(angle_deg)
    u = x * math.cos(t) + y * math.sin(t)
    v = -x * math.sin(t) + y * math.cos(t)
    mask = (u / a) ** 2 + (v / b) ** 2 + (z / c) ** 2 <= 1
    estimate = abc2_volume_ml(mask, spacing)
    assert estimate == pytest.approx(4 * a * b * c / 1000, rel=0.15)
    assert 0.5 < estimate / volume_ml(mask, spacing) < 1.5


def test_evaluate_case_reports_abc2_of_the_reference():
    pred = _box((12, 12, 8), (2, 2, 2), (2, 2, 2))
    gt = _box((12, 12, 8), (2, 2, 2), (5, 4, 3))
    # ABC/2 of the 5x4x3 reference box = its volume (test_abc2_of_a_box), not the prediction's.
    assert evaluate_case(pred, gt, ANISO)["abc2_volume_ml"] == pytest.approx(5 * 4 * 3 * 0.5 * 0.5 * 5.0 / 1000)


# ---------------------------------------------------------------- summarize


def test_summarize_skips_nan_and_counts_it():
    cases = [
        {"dsc": 0.8, "hd": 10.0, "rvd": 0.2},
        {"dsc": 0.6, "hd": 30.0, "rvd": math.nan},
        {"dsc": 1.0, "hd": 0.0, "rvd": 0.0},
    ]
    summary = summarize(cases)
    assert summary["dsc"] == pytest.approx(0.8)
    assert summary["hd"] == pytest.approx(40.0 / 3)
    assert summary["rvd"] == pytest.approx(0.1)  # (0.2 + 0.0) / 2, the NaN case skipped
    assert summary["n_cases"] == 3
    assert summary["n_rvd_undefined"] == 1
    assert summary["n_dsc_undefined"] == 0


def test_summarize_all_undefined_and_empty():
    summary = summarize([{"rvd": math.nan}])
    assert math.isnan(summary["rvd"])
    assert summary["n_rvd_undefined"] == 1
    assert summarize([]) == {"n_cases": 0}
