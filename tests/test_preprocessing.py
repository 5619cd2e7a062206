"""data_catalog.preprocessing: the paper's pipeline, its inverse, and the content-addressed cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from data_catalog import preprocessing as pp
from data_catalog.scans import file_sha256
from tests.helpers import head_volume, oriented_affine, write_nifti


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_output_grid_channels_and_windows():
    img, lab, aff = head_volume(shape=(48, 48, 12), spacing=(4.0, 4.0, 5.0), codes="LPS")
    s = pp.PreprocessSettings(target_spacing=(2.0, 2.0, 5.0), normalize=False)
    case = pp.preprocess_arrays(img, aff, lab, s)
    assert case.image.dtype == np.float32 and case.image.shape[0] == 3
    assert case.label.shape == (1, *case.image.shape[1:]) and set(np.unique(case.label)) <= {0, 1}
    assert np.allclose(case.spacing, (2.0, 2.0, 5.0))
    assert "".join(__import__("nibabel").aff2axcodes(case.affine)) == "RAS"
    assert case.native_shape == (48, 48, 12) and np.allclose(case.native_affine, aff)
    # windows: brain (30 HU) -> 0.3 in [0, 100], 50/220 in [-20, 200], 230/1500 in [-200, 1300];
    # the same head without a bleed, so that the centre voxel is brain
    plain = pp.preprocess_arrays(head_volume(shape=(48, 48, 12), spacing=(4.0, 4.0, 5.0), codes="LPS",
                                             lesions=())[0], aff, None, s)
    centre = tuple(n // 2 for n in plain.image.shape[1:])
    assert np.allclose(plain.image[(slice(None), *centre)], [0.30, 50 / 220, 230 / 1500], atol=0.06)
    # the bleed (70 HU): 0.7 in the first window
    bleed = case.image[0][case.label[0] == 1]
    assert np.median(bleed) == pytest.approx(0.70, abs=0.08)
    assert case.image.min() >= 0 and case.image.max() <= 1
    # cropped to the head: the box is smaller than the resampled field of view
    assert case.image.shape[1] < 48 * 4 / 2


def test_nonzero_channelwise_zscore():
    img, lab, aff = head_volume()
    case = pp.preprocess_arrays(img, aff, lab, pp.PreprocessSettings(target_spacing=(4.0, 4.0, 5.0)))
    for ch in case.image:
        nz = ch[ch != 0]
        assert abs(nz.mean()) < 1e-3 and abs(nz.std() - 1) < 1e-2


@pytest.mark.parametrize(
    ("codes", "label_interpolation"),
    [("LPS", "nearest"), ("LPS", "linear"), ("PRS", "nearest"), ("ALS", "nearest"), ("SLP", "linear")],
)
def test_label_round_trip_on_real_geometry(codes, label_interpolation):
    """512 x 512 x 32 at 0.45 x 0.45 x 5 mm (INSTANCE geometry), any orientation: Dice >= 0.97 back home."""
    shape = (512, 512, 32) if codes[2] in "SI" else (32, 512, 512)
    spacing = (0.45, 0.45, 5.0) if codes[2] in "SI" else (5.0, 0.45, 0.45)
    img, lab, aff = head_volume(shape=shape, spacing=spacing, codes=codes,
                                lesions=((20, 10, 5, 12.0), (-30, -25, -20, 8.0), (5, 40, 30, 18.0)))
    s = pp.PreprocessSettings(label_interpolation=label_interpolation)
    case = pp.preprocess_arrays(img, aff, lab, s)
    back = pp.invert_to_native(case.label.astype(np.float32), case.affine, case.native_affine, case.native_shape)
    assert tuple(back.shape) == (1, *shape)
    mask = back[0].numpy() >= 0.5
    assert _dice(mask, lab == 1) >= 0.97


def test_inverse_is_exactly_on_the_native_grid(tmp_path):
    img, lab, aff = head_volume(codes="PRS")
    case = pp.preprocess_arrays(img, aff, lab, pp.PreprocessSettings(target_spacing=(3.0, 3.0, 4.0)))
    probs = np.random.default_rng(0).random((2, *case.image.shape[1:])).astype(np.float32)
    back = pp.invert_to_native(probs, case.affine, case.native_affine, case.native_shape)
    assert tuple(back.shape) == (2, *img.shape) and isinstance(back, torch.Tensor)
    # written with the source's header, the mask has the source's shape and affine
    src = write_nifti(tmp_path / "src.nii.gz", img, aff, np.int16)
    from data_catalog.scans import save_nifti_like

    save_nifti_like((back[0].numpy() > 0.5).astype(np.uint8), src, tmp_path / "mask.nii.gz")
    import nibabel as nib

    out, ref = nib.load(tmp_path / "mask.nii.gz"), nib.load(src)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert out.get_data_dtype() == np.uint8


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="high > low"):
        pp.PreprocessSettings(windows=((100, 0),))
    with pytest.raises(ValidationError, match="positive"):
        pp.PreprocessSettings(target_spacing=(1, 0, 5))
    with pytest.raises(ValidationError, match="one code of each pair"):
        pp.PreprocessSettings(orientation="RRS")
    with pytest.raises(ValidationError):
        pp.PreprocessSettings(colour="violet")


def test_cache_hits_and_misses_exactly_when_it_must(tmp_path, monkeypatch):
    img, lab, aff = head_volume()
    ip = write_nifti(tmp_path / "img.nii.gz", img, aff, np.int16)
    lp = write_nifti(tmp_path / "lab.nii.gz", lab, aff, np.uint8)
    cache = tmp_path / "cache"
    s = pp.PreprocessSettings(target_spacing=(4.0, 4.0, 5.0))
    calls = []
    real = pp.preprocess_scan
    monkeypatch.setattr(pp, "preprocess_scan", lambda *a, **k: calls.append(a[0]) or real(*a, **k))

    def run(settings=s):
        return pp.cached_preprocess(cache, ip, file_sha256(ip), settings, lp, file_sha256(lp))

    p1, hit1 = run()
    p2, hit2 = run()
    assert (hit1, hit2) == (False, True) and p1 == p2 and len(calls) == 1
    case = pp.load_preprocessed(p1)
    assert case.label is not None and case.image.shape[0] == 3
    # a changed setting: recomputed, the old entry stays valid for the old setting
    p3, hit3 = run(pp.PreprocessSettings(target_spacing=(4.0, 4.0, 5.0), windows=((0, 80),)))
    assert not hit3 and p3 != p1 and len(calls) == 2
    assert run()[1] is True
    # changed content (same path): a new key
    write_nifti(ip, img + 5, aff, np.int16)
    p4, hit4 = run()
    assert not hit4 and p4 != p1 and len(calls) == 3
    # a new code version invalidates everything
    monkeypatch.setattr(pp, "PREPROCESS_VERSION", "999")
    assert run()[1] is False and len(calls) == 4
    assert not list(cache.rglob("*.tmp*"))


def test_affine_helper_orientation():
    import nibabel as nib

    for codes in ("LPS", "RAS", "PRS", "ALS"):
        assert "".join(nib.aff2axcodes(oriented_affine(codes, (1, 2, 3), (4, 5, 6)))) == codes
