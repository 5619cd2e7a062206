"""Synthetic head-CT phantoms (data_catalog.phantoms): geometry, HU ranges, lesion statistics, files, baseline."""

from __future__ import annotations

import ast
import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from benchmarks.threshold_baseline import threshold_baseline
from data_catalog import phantoms
from data_catalog.phantoms import PHANTOM_SIZES, Phantom, generate_phantom, write_phantom_dataset

LESION_TYPES = {"IPH", "IVH", "SDH", "EDH", "SAH"}
N_STATS = 40  # small cases for the lesion statistics
N_BASELINE = 12  # of those, cases scored with the threshold baseline


@pytest.fixture(scope="module")
def small_cases() -> list[Phantom]:
    """Small phantoms shared by the statistics tests (~0.2 s each)."""
    return [generate_phantom(seed) for seed in range(N_STATS)]


@pytest.fixture(scope="module")
def small_case(small_cases: list[Phantom]) -> Phantom:
    return small_cases[7]


def _brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels enclosed by the skull (HU > 200) per axial slice, at least 3 voxels away from bone."""
    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    bone = image > 200
    filled = ndimage.binary_fill_holes(np.pad(ndimage.binary_closing(bone, plane, 2), ((0, 0), (0, 0), (1, 1))),
                                       plane)[:, :, 1:-1]
    return filled & ~ndimage.binary_dilation(bone, plane, 3)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a.astype(bool) & b.astype(bool)).sum()) / total


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


# --- geometry, types, orientation ---------------------------------------------------------------------------------


def test_sizes_share_field_of_view():
    full, small = PHANTOM_SIZES["full"], PHANTOM_SIZES["small"]
    assert full["matrix"] == 512 and small["matrix"] == 128
    assert full["slice_mm"] == small["slice_mm"] == 5.0
    assert np.allclose(np.multiply(full["spacing_mm"], full["matrix"]), np.multiply(small["spacing_mm"], 128))
    assert full["spacing_mm"] == (0.43, 0.50)


def test_small_phantom_arrays_and_affine(small_case: Phantom):
    img, lab, aff = small_case.image, small_case.label, small_case.affine
    assert img.dtype == np.int16 and lab.dtype == np.uint8
    assert img.shape == lab.shape
    assert img.shape[:2] == (128, 128) and 24 <= img.shape[2] <= 40
    assert set(np.unique(lab)) <= {0, 1} and lab.any()
    assert aff.shape == (4, 4) and aff.dtype == np.float64
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    sx, sy, sz = _spacing(aff)
    assert sx == pytest.approx(sy) and 1.72 <= sx <= 2.0 and sz == pytest.approx(5.0)
    assert small_case.info["spacing_mm"] == pytest.approx([sx, sy, sz])
    json.dumps(small_case.info)  # JSON-serialisable


def test_tissue_hu_ranges(small_case: Phantom):
    img = small_case.image.astype(np.float64)
    brain = _brain_mask(small_case.image) & (small_case.label == 0)
    assert 20 <= np.median(img[brain]) <= 45
    bone = img > 300
    assert 500 <= np.median(img[bone]) <= 900  # spec: 600..750 after slice averaging
    assert img.max() > 1000  # dense tables survive somewhere
    # padding outside the reconstruction circle, air between it and the head
    pad = small_case.info["pad_value"]
    assert -3024 <= pad <= -2000
    assert (img[0, 0, :] == pad).all() and (img[-1, -1, :] == pad).all()
    xy = (np.arange(128) - 63.5) / 63.5
    ring = (xy[:, None] ** 2 + xy[None, :] ** 2 > 0.93**2) & (xy[:, None] ** 2 + xy[None, :] ** 2 < 0.97**2)
    ring &= np.abs(xy)[None, :] < 0.5  # left/right of the head (the head rest lies behind it)
    assert np.median(img[:, :, -1][ring]) < -900
    # blood: acute range after averaging and noise
    assert 40 <= np.median(img[small_case.label > 0]) <= 85
    info = small_case.info
    assert 3 <= info["noise_sigma_hu"] <= 6 and abs(info["hu_offset"]) <= 5


def test_full_size_matches_small_of_same_seed():
    full, small = generate_phantom(11, "full"), generate_phantom(11, "small")
    assert full.image.shape[:2] == (512, 512) and full.image.shape[2] == small.image.shape[2]
    sf, ss = _spacing(full.affine), _spacing(small.affine)
    assert 0.43 <= sf[0] <= 0.50 and sf[0] * 512 == pytest.approx(ss[0] * 128)
    assert nib.aff2axcodes(full.affine) == ("L", "P", "S")
    assert full.affine[2, 3] == pytest.approx(small.affine[2, 3])  # same slices
    assert full.info["lesion_types"] == small.info["lesion_types"]  # same head and bleeds, finer sampling
    assert full.info["total_volume_ml"] == pytest.approx(small.info["total_volume_ml"], rel=0.25, abs=0.3)
    brain = _brain_mask(full.image) & (full.label == 0)
    assert 20 <= np.median(full.image[brain]) <= 45
    assert 500 <= np.median(full.image[full.image > 300]) <= 900


def test_normal_scan_has_same_head_and_no_label():
    normal, bleed = generate_phantom(5, with_lesion=False), generate_phantom(5)
    assert not normal.label.any() and normal.info["lesions"] == [] and normal.info["total_volume_ml"] == 0
    assert normal.image.shape == bleed.image.shape
    far = ~ndimage.binary_dilation(bleed.label.astype(bool), iterations=3)
    assert np.mean(normal.image[far] != bleed.image[far]) < 0.05  # only mass effect moves anything


def test_cropping_to_the_head_changes_nothing(monkeypatch: pytest.MonkeyPatch):
    """Sub-slices are rendered only inside boxes around the head; whole-slice boxes must give the same scan."""
    cropped = [generate_phantom(seed) for seed in (2, 13)]
    from data_catalog.phantoms import render

    monkeypatch.setattr(render, "_chunk_box", lambda surface, geo, z0, z1: (slice(0, geo.matrix),) * 2)
    for seed, ph in zip((2, 13), cropped, strict=True):
        whole = generate_phantom(seed)
        assert np.array_equal(ph.image, whole.image) and np.array_equal(ph.label, whole.label)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate_phantom(1, size="huge")
    with pytest.raises(ValueError):
        generate_phantom(-1)
    with pytest.raises(ValueError):
        write_phantom_dataset(Path("unused"), 1, 0, 0, seed=1, size="huge")


# --- reproducibility --------------------------------------------------------------------------------------------


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = generate_phantom(3), generate_phantom(3), generate_phantom(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.info == b.info
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


# --- lesion statistics (spec: INSTANCE 2022 training labels) ------------------------------------------------------


def test_lesion_volume_and_component_statistics(small_cases: list[Phantom]):
    volumes = np.array([ph.info["total_volume_ml"] for ph in small_cases])
    comps = np.array([ph.info["n_components"] for ph in small_cases])
    print(f"volume quartiles (ml): {np.percentile(volumes, [0, 25, 50, 75, 100]).round(2)}; "
          f"components median {np.median(comps)}, >1 in {np.mean(comps > 1):.0%}")
    assert volumes.min() < 4 and volumes.max() > 30  # small to large
    assert 0.1 <= np.mean(volumes < 3.8) <= 0.45  # real: a quarter under 3.8 ml
    assert 4 <= np.median(volumes) <= 25  # real median 10.7 ml
    assert comps.min() >= 1 and np.median(comps) <= 4
    assert 0.3 <= np.mean(comps > 1) <= 0.8  # real: 54% have more than one component
    for ph in small_cases:  # n_components is what the label really has
        json.dumps(ph.info)
        lbl = ndimage.label(ph.label, structure=np.ones((3, 3, 3)))[1]
        assert lbl == ph.info["n_components"]
        voxel_ml = np.prod(ph.info["spacing_mm"]) / 1000
        assert ph.info["total_volume_ml"] == pytest.approx(ph.label.sum() * voxel_ml, abs=1e-3)


def test_lesion_types_hu_and_mass_effect(small_cases: list[Phantom]):
    types = set().union(*(ph.info["lesion_types"] for ph in small_cases))
    assert types <= LESION_TYPES and len(types) >= 4
    assert any(len(ph.info["lesion_types"]) > 1 for ph in small_cases)  # mixed cases occur
    for ph in small_cases:
        for les in ph.info["lesions"]:
            assert les["type"] in LESION_TYPES and 35 <= les["hu"] <= 85
            assert les["volume_ml"] >= 0
        big = [les for les in ph.info["lesions"] if les["type"] in ("IPH", "SDH", "EDH")
               and les["planned_ml"] > 40 and les["location"] not in ("cerebellum", "pons")]
        if big:  # the midline moves away from a large space-occupying bleed
            main = max(big, key=lambda les: les["planned_ml"])
            sign = 1 if main["side"] == "left" else -1
            assert ph.info["midline_shift_mm"] * sign < 0


def test_distractors_prevalence(small_cases: list[Phantom]):
    kinds = [{d["kind"].split("_calcification")[0] for d in ph.info["distractors"]} for ph in small_cases]
    pineal = np.mean(["pineal" in k for k in kinds])
    choroid = np.mean(["choroid_plexus" in k for k in kinds])
    assert 0.45 <= pineal <= 0.9 and 0.4 <= choroid <= 0.9  # spec: ~70% and ~65% of adults


# --- threshold baseline -----------------------------------------------------------------------------------------


def test_threshold_baseline_scores_clearly_below_the_labels(small_cases: list[Phantom]):
    cases = small_cases[:N_BASELINE]
    scores = []
    for ph in cases:
        pred = threshold_baseline(ph.image)
        assert pred.dtype == np.uint8 and pred.shape == ph.image.shape
        scores.append(_dice(pred, ph.label))
    mean = float(np.mean(scores))
    print(f"threshold baseline Dice: {mean:.3f} (per case {np.round(scores, 2).tolist()})")
    assert 0.1 < mean < 0.5  # it finds blood, but far from all of it and much else besides


def test_threshold_baseline_stays_inside_the_skull():
    img = np.full((40, 40, 3), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(xx - 20, yy - 20)
    img[r < 15] = 70  # "brain" in the blood range
    img[(r >= 15) & (r < 17)] = 1200  # skull
    img[(r >= 17) & (r < 19)] = 70  # scalp in the blood range: outside the skull, never counted
    pred = threshold_baseline(img)
    assert pred[20, 20].all() and not pred[(r >= 15)].any()
    assert not pred[r >= 14].any()  # a margin next to bone (2 voxels, 4-connected)


# --- files --------------------------------------------------------------------------------------------------------


def test_written_data_root_layout_and_headers(tmp_path: Path):
    summary = write_phantom_dataset(tmp_path / "root", labelled=2, unlabelled=1, test=1, seed=42)
    json.dumps(summary)
    root = tmp_path / "root"
    assert summary["counts"] == {"labelled": 2, "unlabelled": 1, "test": 1}
    assert summary["paths"]["train_data"] == "train/data" and summary["paths"]["unlabelled"] == "unlabelled"
    ids = [c["id"] for c in summary["cases"]]
    assert len(ids) == len(set(ids)) == 4 and ids[0] == "ph_s0042_001"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted([
        "train/data/ph_s0042_001.nii.gz", "train/label/ph_s0042_001.nii.gz",
        "train/data/ph_s0042_002.nii.gz", "train/label/ph_s0042_002.nii.gz",
        "unlabelled/ph_s0042_u001.nii.gz", "test/data/ph_s0042_t001.nii.gz", "test/label/ph_s0042_t001.nii.gz",
        "unlabelled_truth/ph_s0042_u001.nii.gz",
    ])  # nothing else: no temporary files left behind
    for case in summary["cases"]:
        img = nib.load(root / case["image"])
        assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("L", "P", "S")
        expected = generate_phantom(case["seed"])
        assert np.array_equal(np.asarray(img.dataobj), expected.image)
        assert case["info"] == expected.info
        paths = [case["image"]]
        if case["split"] == "unlabelled":
            # no label; the hidden truth lies outside the folders the catalog reads
            assert case["label"] is None and case["truth"] == "unlabelled_truth/ph_s0042_u001.nii.gz"
        lab = nib.load(root / (case["label"] or case["truth"]))
        assert lab.get_data_dtype() == np.uint8
        assert np.allclose(lab.affine, img.affine)
        assert np.array_equal(np.asarray(lab.dataobj), expected.label)
        paths.append(case["label"] or case["truth"])
        for rel in paths:
            raw = (root / rel).read_bytes()
            assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
            hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(gzip.decompress(raw)))  # as stored, not nibabel's view
            assert (float(hdr["scl_slope"]), float(hdr["scl_inter"])) == (1.0, 0.0)
            assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1


def test_written_files_are_byte_reproducible_and_stable(tmp_path: Path):
    first = write_phantom_dataset(tmp_path / "a", labelled=1, unlabelled=1, test=1, seed=7)
    more = write_phantom_dataset(tmp_path / "b", labelled=2, unlabelled=1, test=2, seed=7)  # more cases
    other = write_phantom_dataset(tmp_path / "c", labelled=1, unlabelled=0, test=0, seed=8)
    for case in first["cases"]:
        for rel in filter(None, (case["image"], case["label"])):
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert len(more["cases"]) == 5
    a = (tmp_path / "a" / first["cases"][0]["image"]).read_bytes()
    c = (tmp_path / "c" / other["cases"][0]["image"]).read_bytes()
    assert a != c


# --- house rules --------------------------------------------------------------------------------------------------


def test_phantoms_package_is_a_pure_library():
    files = sorted(Path(phantoms.__file__).parent.glob("*.py"))
    assert {f.stem for f in files} == {"__init__", "api", "anatomy", "geometry", "lesions", "render"}
    for file in files:
        tree = ast.parse(file.read_text())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "print" not in calls, file
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"prefect", "mlflow"}, file
