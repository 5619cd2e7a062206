"""DICOM series in (read_image, ingest, predict) and DICOM SEG out, on small series written here with pydicom."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from data_catalog import catalog as cat
from data_catalog import dicom
from data_catalog.scans import ScanError, file_sha256, read_image
from tests.helpers import head_volume, oriented_affine, write_nifti

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SMALL = (16, 20, 10)  # columns, rows, slices


def _ds(values) -> list[str]:
    return [f"{float(v):.10g}" for v in values]  # DICOM decimal strings hold at most 16 characters


def stored_values(hu: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """The int16 values a scanner stores for ``hu``, and the HU they stand for (float32)."""
    stored = np.round((np.asarray(hu, np.float64) - intercept) / slope).astype(np.int16)
    return stored, (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray, affine: np.ndarray, slope: float = 1.0, intercept: float = -1024.0,
                 names: list[str] | None = None, instance_numbers: list[int] | None = None,
                 positions: list | None = None, series_uid: str | None = None, **attrs) -> list[Path]:
    """One CT slice file per z of ``hu`` (X = columns, Y = rows, Z), placed by the RAS ``affine``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ np.asarray(affine, np.float64)
    cols, rows, n = hu.shape
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    stored, _ = stored_values(hu, slope, intercept)
    series_uid = series_uid or generate_uid()
    names = names or [f"slice{k:03d}.dcm" for k in range(n)]
    paths = []
    for k in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Head", "P1", "19700101", "O"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.SeriesInstanceUID = series_uid
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20240101", "120000", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.SeriesNumber = "", "test", 2
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = _ds([*row_dir, *col_dir])
        pos = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3] if positions is None else positions[k]
        ds.ImagePositionPatient = _ds(pos)
        ds.PixelSpacing = _ds([np.linalg.norm(lps[:3, 1]), np.linalg.norm(lps[:3, 0])])  # between rows, columns
        ds.SliceThickness = _ds([np.linalg.norm(lps[:3, 2])])[0]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slope])[0], _ds([intercept])[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows, columns)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)


def _rotated(codes: str, spacing, shape, degrees: float) -> np.ndarray:
    """An in-plane rotation of an axial grid about the world z axis (an oblique slice, stacked straight)."""
    a = np.radians(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot @ oriented_affine(codes, spacing, shape)


# ---------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(("codes", "degrees", "slope", "intercept"), [
    ("LPS", 0.0, 1.0, -1024.0),  # axial, as scanners store it
    ("RAS", 0.0, 0.5, -1000.0),  # axial, other in-plane directions; slope and intercept not 1 and 0
    ("PIR", 0.0, 1.0, -1024.0),  # sagittal
    ("LIP", 0.0, 2.0, -2048.0),  # coronal
    ("LPS", 20.0, 1.0, -1024.0),  # axial rotated in plane
])
def test_a_series_reads_like_the_nifti_of_the_same_data(tmp_path, codes, degrees, slope, intercept):
    img, _, aff = head_volume(shape=SMALL, spacing=(1.5, 1.2, 3.0), codes=codes, seed=1)
    if degrees:
        aff = _rotated(codes, (1.5, 1.2, 3.0), SMALL, degrees)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(SMALL[2])
    # file names and InstanceNumbers in a shuffled, misleading order: only positions count
    write_series(tmp_path / "series", img, aff, slope, intercept, names=[f"IM{i:04d}" for i in shuffled],
                 instance_numbers=[int(i) * 7 % 11 for i in shuffled[::-1]])
    _, hu = stored_values(img, slope, intercept)
    write_nifti(tmp_path / "same.nii.gz", hu, aff, np.float32)
    series, s_info = read_image(tmp_path / "series")
    nifti, n_info = read_image(tmp_path / "same.nii.gz")
    assert series.dtype == np.float32 and series.shape == SMALL
    assert np.array_equal(series, nifti)
    assert np.allclose(s_info.affine, n_info.affine, atol=1e-4)
    assert s_info.orientation == n_info.orientation == (codes if not degrees else n_info.orientation)
    assert np.allclose(s_info.spacing, (1.5, 1.2, 3.0), atol=1e-6) and s_info.shape == n_info.shape


def test_a_stack_stored_downwards_reads_upwards_with_the_same_world_geometry(tmp_path):
    img, _, aff = head_volume(shape=SMALL, spacing=(1.0, 1.0, 2.5), codes="LPI", seed=2)
    write_series(tmp_path / "series", img, aff)
    _, hu = stored_values(img, 1.0, -1024.0)
    series, info = read_image(tmp_path / "series")
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, SMALL[2] - 1  # voxel k of the series is voxel n-1-k of the stored stack
    assert info.orientation == "LPS"
    assert np.array_equal(series, hu[:, :, ::-1])
    assert np.allclose(info.affine, aff @ flip, atol=1e-4)


def test_localizers_dicomdir_and_hidden_files_are_set_aside(tmp_path):
    img, _, aff = head_volume(shape=SMALL, seed=3)
    folder = tmp_path / "series"
    write_series(folder, img, aff)
    reference, _ = read_image(folder)
    scout = write_series(tmp_path / "scout", img[:, :, :1], aff, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])[0]
    scout.rename(folder / "scout.dcm")
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    again, _ = read_image(folder)
    assert np.array_equal(again, reference)


def _reason(folder: Path) -> str:
    with pytest.raises(ScanError) as e:
        read_image(folder)
    reason = str(e.value)
    assert "\n" not in reason
    return reason


def test_defective_series_are_refused_with_one_line_reasons(tmp_path):
    img, _, aff = head_volume(shape=SMALL, spacing=(1.0, 1.0, 3.0), seed=4)
    made = {}

    def series(name, **kw):
        made[name] = tmp_path / name
        return write_series(tmp_path / name, img, aff, **kw)

    series("gap")[4].unlink()
    lps = LPS_TO_RAS @ aff
    uneven = [lps[:3, :3] @ [0, 0, k + (0.4 if k > 5 else 0)] + lps[:3, 3] for k in range(SMALL[2])]
    series("uneven", positions=uneven)
    tilted = [lps[:3, :3] @ [0, 0.5 * k, k] + lps[:3, 3] for k in range(SMALL[2])]  # each slice 0.5 mm further
    series("tilted", positions=tilted)
    series("twice")
    write_series(tmp_path / "twice", img, aff, names=[f"b{k}.dcm" for k in range(SMALL[2])],
                 SeriesDescription="BONE")
    series("scouts", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    made["single"] = tmp_path / "single"
    write_series(tmp_path / "single", img[:, :, :1], aff)
    made["two"] = tmp_path / "two"
    write_series(tmp_path / "two", img[:, :, :2], aff)
    series("notes")
    (made["notes"] / "notes.txt").write_text("reading list")
    paths = series("mixed")
    _edit(paths[3], ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"])
    uid = generate_uid()
    paths = series("sizes", series_uid=uid)
    small = write_series(tmp_path / "small", img[:8, :8, :1], aff, series_uid=uid)[0]
    paths[2].unlink()
    small.rename(paths[2])
    series("mr", Modality="MR")
    paths = series("repeated")
    _edit(paths[5], ImagePositionPatient=pydicom.dcmread(paths[4]).ImagePositionPatient)
    paths = series("jpeg2000")
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51 not really a codestream"])
    ds.save_as(str(paths[0]), enforce_file_format=True)
    made["empty"] = tmp_path / "empty"
    made["empty"].mkdir()
    paths = series("short")
    paths[1].write_bytes(paths[1].read_bytes()[:-100])  # pixel data cut short

    expected = {
        "gap": "missing slice(s): a gap of 6 mm",
        "uneven": "uneven slice spacing",
        "tilted": "not stacked along their normal",
        "twice": "2 series in one folder",
        "scouts": "only localizer (scout) images",
        "single": "a single slice, not a volume",
        "two": "too few slices (2)",
        "notes": "notes.txt: not a DICOM file",
        "mixed": "mixed orientations",
        "sizes": "mismatched image sizes",
        "mr": "modality MR, not CT",
        "repeated": "two slices at the same position",
        "jpeg2000": "cannot decode the compressed transfer syntax JPEG 2000",
        "empty": "no files in the folder",
        "short": "slice001.dcm: unreadable pixel data",
    }
    for name, words in expected.items():
        reason = _reason(made[name])
        assert words in reason, (name, reason)
    assert "'BONE'" in _reason(made["twice"])
    assert "°" in _reason(made["tilted"])


def test_absurd_sizes_are_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    img, _, aff = head_volume(shape=SMALL, seed=5)
    write_series(tmp_path / "series", img, aff)

    def never(*a, **kw):
        raise AssertionError("pixel data read")

    monkeypatch.setattr(dicom, "_decode", never)
    monkeypatch.setattr(dicom, "_MAX_VOXELS", 1000)
    assert "refused before reading" in _reason(tmp_path / "series")
    paths = write_series(tmp_path / "huge", img, aff)
    for p in paths:
        _edit(p, Rows=5000)
    assert "image size 5000x16 outside" in _reason(tmp_path / "huge")


def test_a_series_content_hash_and_signature(tmp_path):
    img, _, aff = head_volume(shape=SMALL, seed=6)
    paths = write_series(tmp_path / "a", img, aff)
    before, sig = file_sha256(tmp_path / "a"), dicom.series_signature(tmp_path / "a")
    assert file_sha256(tmp_path / "a") == before  # stable
    (tmp_path / "a" / ".hidden").write_text("x")
    assert file_sha256(tmp_path / "a") == before  # hidden files are not part of the series
    _edit(paths[3], PatientID="P2")
    assert file_sha256(tmp_path / "a") != before
    assert dicom.series_signature(tmp_path / "a") != sig
    assert dicom.holds_dicom_files(tmp_path / "a") and not dicom.holds_dicom_files(tmp_path)


def test_save_nifti_like_a_series_gives_the_series_grid(tmp_path):
    from data_catalog.scans import save_nifti_like

    img, _, aff = head_volume(shape=SMALL, codes="PIR", seed=7)
    write_series(tmp_path / "s", img, aff)
    _, info = read_image(tmp_path / "s")
    mask = (img > 500).astype(np.uint8)
    save_nifti_like(mask, tmp_path / "s", tmp_path / "mask.nii.gz")
    out = nib.load(tmp_path / "mask.nii.gz")
    assert out.shape == info.shape and np.allclose(out.affine, info.affine, atol=1e-4)
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(out.dataobj), mask)
    assert int(out.header["sform_code"]) == int(out.header["qform_code"]) == 1


# ---------------------------------------------------------------------------------------- catalog
def test_ingest_catalogs_series_folders_and_rejects_bad_ones(tmp_path, monkeypatch):
    from data_catalog.preprocessing import cached_preprocess
    from tests.conftest import PRE

    root = tmp_path / "root"
    img, lab, aff = head_volume(seed=8)
    write_series(root / "train" / "data" / "c1", img, aff)
    write_nifti(root / "train" / "label" / "c1.nii.gz", lab, aff, np.uint8)
    write_series(root / "train" / "data" / "c2", img, aff, series_uid=generate_uid())  # no label
    img2, _, aff2 = head_volume(seed=9)
    write_series(root / "unlabelled" / "u1", img2, aff2, intercept=-1000.0)
    write_nifti(root / "unlabelled" / "u1_copy.nii.gz", stored_values(img2, 1.0, -1000.0)[1], aff2, np.float32)
    write_series(root / "unlabelled" / "gap", img2, aff2)[5].unlink()
    (root / "unlabelled" / "empty").mkdir()
    img3, lab3, aff3 = head_volume(seed=10)
    write_nifti(root / "test" / "data" / "t1.nii.gz", img3, aff3, np.int16)
    write_nifti(root / "test" / "label" / "t1.nii.gz", lab3, aff3, np.uint8)

    report = cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    assert df.loc["train/data/c1"].status == "ok" and df.loc["train/data/c1"].label_path == "train/label/c1.nii.gz"
    assert df.loc["train/data/c1", "shape"] == "48x48x12" and df.loc["train/data/c1", "orientation"] == "LPS"
    assert df.loc["train/data/c2"].reason == ("no label found (expected train/label/c2.nii.gz or a DICOM SEG of "
                                              "the series)")
    assert df.loc["unlabelled/u1"].status == "ok"
    assert df.loc["unlabelled/u1_copy.nii.gz"].reason.startswith("same content as unlabelled/u1")
    assert df.loc["unlabelled/gap"].reason.startswith("missing slice(s)")
    assert df.loc["unlabelled/empty"].status == "rejected"
    assert ("unlabelled/gap", df.loc["unlabelled/gap"].reason) in report.rejected
    assert sorted(cat.usable_scans(root)["scan_id"]) == ["c1", "t1", "u1"]
    row = df.loc["unlabelled/u1"]
    assert row.image_hash == file_sha256(root / "unlabelled" / "u1")

    # a rescan reads nothing unchanged; a rewritten slice makes the series changed
    reads = []
    real = cat.read_image
    monkeypatch.setattr(cat, "read_image", lambda p, *a, **kw: reads.append(p) or real(p, *a, **kw))
    again = cat.ingest(root)
    assert reads == [] and not again.new and not again.changed
    _edit(next((root / "unlabelled" / "u1").iterdir()), PatientID="P9")
    again = cat.ingest(root)
    assert again.changed == ["u1"] and [Path(p).name for p in reads] == ["u1"]

    # preprocessing reads a series by its path, keyed by the catalog's hash
    c1 = cat.usable_scans(root, "labelled").iloc[0]
    path, hit = cached_preprocess(tmp_path / "cache", root / c1.image_path, c1.image_hash, PRE,
                                  root / c1.label_path, c1.label_hash)
    assert not hit and path.exists()


# ---------------------------------------------------------------------------------------- predict
@pytest.fixture()
def series_inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    img, _, aff = head_volume(seed=11)
    write_series(folder / "case_a", img, aff)
    img, _, aff = head_volume(seed=12, codes="PRS")
    write_nifti(folder / "case_b.nii.gz", img, aff, np.int16)
    write_series(folder / "broken", img, aff)[3].unlink()
    return folder


def _sop_uids(folder: Path) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in dicom.read_series_geometry(folder).files]


def test_predict_writes_masks_on_the_series_grid_and_a_dicom_seg(ensemble_dir, series_inputs, tmp_path):
    from viola_models.inference import segment
    from viola_models.inference.ensemble import load_ensemble

    before = {p: file_sha256(p) for p in series_inputs.iterdir()}
    out = tmp_path / "out"
    table = segment.predict_folder(series_inputs, out, load_ensemble(ensemble_dir), dicom_seg=True)
    assert {p: file_sha256(p) for p in series_inputs.iterdir()} == before
    assert list(table.columns) == segment.PREDICTION_COLUMNS
    rows = table.set_index("file_name")
    assert list(rows.status) == ["rejected", "ok", "ok"] and rows.loc["broken"].reason.startswith("missing slice")
    mask = nib.load(out / "case_a.nii.gz")
    _, info = read_image(series_inputs / "case_a")
    assert mask.shape == info.shape and np.allclose(mask.affine, info.affine, atol=1e-4)
    assert mask.get_data_dtype() == np.uint8
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_a.seg.dcm", "case_b.nii.gz",
                                                     "predictions_info.csv"]
    seg = pydicom.dcmread(out / "case_a.seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == info.shape[2]
    assert seg.SegmentSequence[0].SegmentLabel == "Haemorrhage"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom.read_series_geometry(
        series_inputs / "case_a").series_uid
    assert seg.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.2"
    # frame k is slice k of the mask: read it back by its source images
    import highdicom as hd

    back = hd.seg.segread(out / "case_a.seg.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=_sop_uids(series_inputs / "case_a"), segment_numbers=[1])
    assert np.array_equal(back[..., 0].transpose(2, 1, 0), np.asarray(mask.dataobj))
    # and read back as a label, the SEG is the NIfTI mask
    from data_catalog.scans import read_label

    label, label_info = read_label(out / "case_a.seg.dcm", image=series_inputs / "case_a")
    assert np.array_equal(label, np.asarray(mask.dataobj)) and label_info.shape == info.shape


def test_cli_predict_on_one_series_folder_and_without_highdicom(ensemble_dir, series_inputs, tmp_path, monkeypatch):
    from flows.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(series_inputs / "case_a"), str(tmp_path / "one"), "--checkpoints",
                              str(ensemble_dir), "--device", "cpu", "--dicom-seg"])
    assert res.exit_code == 0, res.output
    assert "[1/1] case_a:" in res.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["case_a.nii.gz", "case_a.seg.dcm",
                                                                     "predictions_info.csv"]
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed
    res = runner.invoke(app, ["predict", str(series_inputs), str(tmp_path / "two"), "--checkpoints",
                              str(ensemble_dir), "--device", "cpu", "--dicom-seg"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == ("error: --dicom-seg: writing DICOM SEG needs highdicom, which is not installed: "
                                  "pip install 'viola-ich[dicom]'")
    assert not (tmp_path / "two").exists()


# ---------------------------------------------------------------------------------------- archive trees
def _export_tree(top: Path) -> dict[str, Path]:
    """An archive's export: DICOMDIR, patient/study/series folders, a scout series, a folder of two
    series, an MR series, a folder with no DICOM file."""
    img, _, aff = head_volume(seed=21)
    img2, _, aff2 = head_volume(seed=22)
    made = {"ct1": top / "PAT1" / "ST1" / "SE1", "scout": top / "PAT1" / "ST1" / "SE2",
            "ct2": top / "PAT2" / "ST7" / "SE1", "mixed": top / "PAT2" / "ST7" / "SE3",
            "mr": top / "PAT2" / "ST7" / "SE4"}
    write_series(made["ct1"], img, aff)
    write_series(made["scout"], img[:, :, :1], aff, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_series(made["ct2"], img2, aff2, PatientID="P2")
    write_series(made["mixed"], img2, aff2, names=[f"a{k}.dcm" for k in range(img2.shape[2])])
    write_series(made["mixed"], img2, aff2, names=[f"b{k}.dcm" for k in range(img2.shape[2])])
    write_series(made["mr"], img2, aff2, Modality="MR")
    (top / "PAT2" / "notes").mkdir(parents=True)
    (top / "PAT2" / "notes" / "readme.txt").write_text("not DICOM")
    (top / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    return made


def test_ingest_finds_every_series_of_an_archive_tree_by_uid(tmp_path):
    root = tmp_path / "root"
    made = _export_tree(root / "unlabelled" / "export")
    report = cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    rel = {k: str(v.relative_to(root)) for k, v in made.items()}
    ok = df[df.status == "ok"]
    assert sorted(ok.index) == sorted([rel["ct1"], rel["ct2"]])
    ident = dicom.series_identity(made["ct1"])
    assert df.loc[rel["ct1"], "scan_id"] == ident.scan_id and ident.scan_id.startswith("dcm")
    assert "P1" not in ident.scan_id and df.loc[rel["ct1"], "scan_id"] != df.loc[rel["ct2"], "scan_id"]
    gone = dicom.series_identity(tmp_path / "vanished")  # listed, then gone: named by its path, refused later
    assert gone.scan_id.startswith("dcm") and gone.series_uid == ""
    first = pydicom.dcmread(next(made["ct1"].iterdir()), stop_before_pixels=True)
    assert df.loc[rel["ct1"], "series_uid"] == first.SeriesInstanceUID
    assert df.loc[rel["ct1"], "study_uid"] == first.StudyInstanceUID
    reasons = dict(report.rejected)
    assert "only localizer (scout) images" in reasons[rel["scout"]]
    assert "2 series in one folder" in reasons[rel["mixed"]]
    assert "modality MR, not CT" in reasons[rel["mr"]]
    assert all("\n" not in r for r in reasons.values())
    assert not any("DICOMDIR" in p or "notes" in p for p in df.index)  # an index and a folder of notes: no scans
    # the same tree copied under another name gives the same ids: the copy is the same scan, not a new one
    import shutil

    shutil.copytree(root / "unlabelled" / "export", root / "unlabelled" / "again")
    cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    copy = str(Path("unlabelled") / "again" / made["ct1"].relative_to(root / "unlabelled" / "export"))
    assert df.loc[copy, "scan_id"] == ident.scan_id
    pair = df.loc[[rel["ct1"], copy]]
    assert sorted(pair.status) == ["ok", "rejected"]  # one is kept (the earlier added), the other is its copy
    assert pair[pair.status == "rejected"].reason.iloc[0].startswith("same content as ")


def test_an_empty_tree_is_listed_with_its_reason(tmp_path):
    root = tmp_path / "root"
    (root / "unlabelled" / "export" / "PAT1" / "ST1").mkdir(parents=True)
    (root / "unlabelled" / "export" / "DICOMDIR").write_bytes(b"\0" * 200)
    write_nifti(root / "unlabelled" / "u1.nii.gz", *head_volume(seed=23)[::2], np.int16)
    cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    assert df.loc["unlabelled/export", "reason"] == (
        "no DICOM file in 3 folder(s) below it (and no NIfTI file): not a DICOM series or tree of series")


def test_predict_on_an_archive_tree_names_masks_by_series(ensemble_dir, tmp_path):
    from viola_models.inference import segment
    from viola_models.inference.ensemble import load_ensemble

    made = _export_tree(tmp_path / "export")
    out = tmp_path / "out"
    table = segment.predict_folder(tmp_path / "export", out, load_ensemble(ensemble_dir)).set_index("file_name")
    for key in ("ct1", "ct2"):
        shown = str(made[key].relative_to(tmp_path / "export"))
        assert table.loc[shown, "status"] == "ok"
        assert table.loc[shown, "mask_file"] == f"{dicom.series_identity(made[key]).scan_id}.nii.gz"
        assert (out / table.loc[shown, "mask_file"]).is_file()
    assert table.loc[str(made["mr"].relative_to(tmp_path / "export")), "reason"] == "slice000.dcm: modality MR, not CT"


# ---------------------------------------------------------------------------------------- DICOM SEG labels
def _seg_of(mask: np.ndarray, series: Path, path: Path, **segment) -> Path:
    ds = dicom.make_seg(mask, series)
    for key, value in segment.items():
        if key == "code":
            ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = value[0]
            ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = value[1]
        else:
            setattr(ds.SegmentSequence[0], key, value)
    dicom.save_seg(ds, path)
    return path


def test_a_dicom_seg_is_the_label_of_the_series_it_references(tmp_path):
    from data_catalog.preprocessing import cached_preprocess
    from data_catalog.scans import read_label
    from tests.conftest import PRE

    root = tmp_path / "root"
    img, lab, aff = head_volume(seed=24)
    assert lab.sum() > 0
    write_series(root / "train" / "data" / "c1", img, aff)
    (root / "train" / "label").mkdir(parents=True)
    _seg_of(lab, root / "train" / "data" / "c1", root / "train" / "label" / "reader1.dcm")
    other, _, aff_o = head_volume(seed=25)
    write_series(tmp_path / "elsewhere", other, aff_o)
    _seg_of(lab, tmp_path / "elsewhere", root / "train" / "label" / "stray.dcm")
    write_series(root / "train" / "data" / "c2", other, aff_o)
    _seg_of(lab, root / "train" / "data" / "c2", root / "train" / "label" / "brain.dcm", SegmentLabel="Brain",
            code=("12738006", "Brain"))
    (root / "train" / "label" / "notes.txt").write_text("reader's notes")
    report = cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    reasons = dict(report.rejected)
    assert df.loc["train/data/c1", "status"] == "ok"
    assert df.loc["train/data/c1", "label_path"] == "train/label/reader1.dcm"
    assert "which is not among the image series beside it" in reasons["train/label/stray.dcm"]
    assert reasons["train/data/c2"] == ("label train/label/brain.dcm: brain.dcm: no haemorrhage segment "
                                        "(segments: 1 'Brain'); a label marks haemorrhage")
    assert reasons["train/label/notes.txt"] == "not a NIfTI file name (.nii or .nii.gz) nor a DICOM SEG file"
    # the label on the series' grid equals the mask it was written from, through preprocessing too
    label, _ = read_label(root / "train" / "label" / "reader1.dcm", image=root / "train" / "data" / "c1")
    assert np.array_equal(label, lab.astype(np.uint8))
    write_nifti(tmp_path / "c1.nii.gz", lab, aff, np.uint8)
    row = cat.usable_scans(root, "labelled").iloc[0]
    from_seg, _ = cached_preprocess(tmp_path / "cache", root / row.image_path, row.image_hash, PRE,
                                    root / row.label_path, row.label_hash)
    from_nifti, _ = cached_preprocess(tmp_path / "cache", root / row.image_path, row.image_hash, PRE,
                                      tmp_path / "c1.nii.gz", file_sha256(tmp_path / "c1.nii.gz"))
    from data_catalog.preprocessing import load_preprocessed

    assert np.array_equal(load_preprocessed(from_seg).label, load_preprocessed(from_nifti).label)
    with pytest.raises(ScanError, match="a DICOM SEG labels a DICOM series; no image was given"):
        read_label(root / "train" / "label" / "reader1.dcm")
