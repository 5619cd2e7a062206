"""data_catalog: ingest, validation of bad input, incremental rescans, folds, lineage, locking."""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import filelock
import numpy as np
import pandas as pd
import pytest

from data_catalog import catalog as cat
from data_catalog import scans
from tests.helpers import head_volume, write_case, write_nifti


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    for i in range(4):
        write_case(r, "labelled", f"case{i:02d}", seed=i)
    for i in range(3):
        write_case(r, "unlabelled", f"u{i:02d}", seed=10 + i)
    for i in range(2):
        write_case(r, "test", f"t{i:02d}", seed=20 + i)
    return r


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in root.rglob("*.nii*"):
        st = p.stat()
        out[str(p)] = (st.st_size, st.st_mtime_ns, scans.file_sha256(p))
    return out


def test_ingest_registers_every_scan_with_its_geometry(root):
    report = cat.ingest(root)
    assert report.layout == "INSTANCE 2022"
    assert sorted(report.new) == sorted([f"case{i:02d}" for i in range(4)] + ["u00", "u01", "u02", "t00", "t01"])
    assert report.rejected == []
    df = cat.load_scans(root)
    assert set(df.columns) >= {"scan_id", "role", "image_path", "label_path", "image_hash", "shape", "spacing",
                               "orientation", "added_at", "status", "reason"}
    assert (df["status"] == "ok").all()
    assert df.groupby("role").size().to_dict() == {"labelled": 4, "test": 2, "unlabelled": 3}
    row = df[df.scan_id == "case00"].iloc[0]
    assert row["shape"] == "48x48x12" and row["spacing"] == "4x4x5" and row["orientation"] == "LPS"
    assert row.label_path == "train/label/case00.nii.gz" and len(row.image_hash) == 64
    assert (root / "viola_catalog" / "scans.csv").exists()
    # the table opens with plain pandas
    assert len(pd.read_csv(root / "viola_catalog" / "scans.csv")) == 9


def test_rescan_is_incremental(root, monkeypatch):
    cat.ingest(root)
    calls: list[str] = []
    real_read = scans.read_image

    def counting(path, *a, **k):
        calls.append(Path(path).name)
        return real_read(path, *a, **k)

    monkeypatch.setattr(cat, "read_image", counting)
    again = cat.ingest(root)
    assert again.new == [] and again.changed == [] and again.unchanged == 9 and calls == []

    # a changed file, a new one, a removed one
    img, _, aff = head_volume(seed=99)
    write_nifti(root / "unlabelled" / "u00.nii.gz", img, aff, np.int16)
    write_case(root, "unlabelled", "u09", seed=42)
    (root / "test" / "data" / "t01.nii.gz").unlink()
    (root / "test" / "label" / "t01.nii.gz").unlink()
    third = cat.ingest(root)
    assert third.changed == ["u00"] and third.new == ["u09"] and third.removed == ["t01"]
    assert sorted(calls) == ["u00.nii.gz", "u09.nii.gz"]
    # touching a file without changing its content re-hashes it but does not validate again
    calls.clear()
    os.utime(root / "unlabelled" / "u01.nii.gz", None)
    fourth = cat.ingest(root)
    assert fourth.changed == [] and fourth.new == [] and calls == []


def test_original_files_are_never_modified(root):
    before = _snapshot(root)
    cat.ingest(root)
    cat.update_folds(root, 2, 0)
    assert _snapshot(root) == before


def _bad_cases(root: Path) -> dict[str, str]:
    """Writes one defective labelled scan per defect; returns {scan_id: expected words of the reason}."""
    img, lab, aff = head_volume(seed=3)
    d, lb = root / "train" / "data", root / "train" / "label"
    d.mkdir(parents=True, exist_ok=True)
    lb.mkdir(parents=True, exist_ok=True)
    expected = {}

    (d / "plain.nii.gz").write_text("this is not a scan")
    write_nifti(lb / "plain.nii.gz", lab, aff)
    expected["plain"] = "not gzip"

    (d / "garbage.nii.gz").write_bytes(gzip.compress(os.urandom(1000)))
    write_nifti(lb / "garbage.nii.gz", lab, aff)
    expected["garbage"] = "not a NIfTI"

    write_nifti(d / "cut.nii.gz", img, aff, np.int16)
    raw = gzip.decompress((d / "cut.nii.gz").read_bytes())
    (d / "cut.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    write_nifti(lb / "cut.nii.gz", lab, aff)
    expected["cut"] = "truncated"

    write_nifti(d / "cutgz.nii.gz", img, aff, np.int16)
    gz = (d / "cutgz.nii.gz").read_bytes()
    (d / "cutgz.nii.gz").write_bytes(gz[: len(gz) // 2])
    write_nifti(lb / "cutgz.nii.gz", lab, aff)
    expected["cutgz"] = "truncated"

    write_nifti(d / "flat.nii.gz", img[:, :, 0], np.eye(4), np.int16)
    write_nifti(lb / "flat.nii.gz", lab[:, :, 0], np.eye(4))
    expected["flat"] = "2-D"

    write_nifti(d / "series.nii.gz", np.stack([img, img], -1), aff, np.int16)
    write_nifti(lb / "series.nii.gz", lab, aff)
    expected["series"] = "4-D"

    nan = img.copy()
    nan[3, 3, 3] = np.nan
    write_nifti(d / "nan.nii.gz", nan, aff, np.float32)
    write_nifti(lb / "nan.nii.gz", lab, aff)
    expected["nan"] = "NaN"

    byte = np.clip((img + 1000) / 10, 0, 255)
    write_nifti(d / "eightbit.nii.gz", byte, aff, np.uint8)
    write_nifti(lb / "eightbit.nii.gz", lab, aff)
    expected["eightbit"] = "8-bit"

    write_nifti(d / "zeros.nii.gz", np.zeros_like(img), aff, np.int16)
    write_nifti(lb / "zeros.nii.gz", lab, aff)
    expected["zeros"] = "all voxels are 0"

    write_nifti(d / "shifted.nii.gz", img + 1024, aff, np.int16)
    write_nifti(lb / "shifted.nii.gz", lab, aff)
    expected["shifted"] = "rescale intercept"

    write_nifti(d / "shape.nii.gz", img, aff, np.int16)
    write_nifti(lb / "shape.nii.gz", lab[:, :, :-1], aff)
    expected["shape"] = "label shape"

    moved = aff.copy()
    moved[0, 3] += 2.0
    write_nifti(d / "affine.nii.gz", img, aff, np.int16)
    write_nifti(lb / "affine.nii.gz", lab, moved)
    expected["affine"] = "label affine"

    write_nifti(d / "mask255.nii.gz", img + 1, aff, np.int16)  # distinct content: not a duplicate
    write_nifti(lb / "mask255.nii.gz", lab * 255, aff)
    expected["mask255"] = "0/255"

    multi = lab.copy()
    multi[multi == 1] = 3
    multi[0, 0, 0] = 2
    write_nifti(d / "multi.nii.gz", img + 2, aff, np.int16)
    write_nifti(lb / "multi.nii.gz", multi, aff)
    expected["multi"] = "multi-class"

    write_nifti(d / "nolabel.nii.gz", img, aff, np.int16)
    expected["nolabel"] = "no label found"

    write_nifti(lb / "orphan.nii.gz", lab, aff)
    expected["orphan"] = "label without image"

    good, _, _ = head_volume(seed=77)
    write_nifti(d / "aaa_first.nii.gz", good, aff, np.int16)
    write_nifti(lb / "aaa_first.nii.gz", lab, aff)
    write_nifti(d / "zzz_copy.nii.gz", good, aff, np.int16)
    write_nifti(lb / "zzz_copy.nii.gz", lab, aff)
    expected["zzz_copy"] = "same content as train/data/aaa_first.nii.gz"
    return expected


def test_bad_input_is_rejected_with_a_reason_and_never_stops_the_others(root):
    expected = _bad_cases(root)
    report = cat.ingest(root)
    df = cat.load_scans(root).set_index("scan_id")
    for scan_id, words in expected.items():
        row = df.loc[scan_id]
        assert row.status == "rejected", scan_id
        assert words in row.reason, (scan_id, row.reason)
        assert "\n" not in row.reason and "Traceback" not in row.reason
    # good scans (the original four and the first of the duplicate pair) are all in
    ok = set(df[df.status == "ok"].index)
    assert {"case00", "case01", "case02", "case03", "aaa_first"} <= ok
    assert {p for p, _ in report.rejected} >= {"train/data/plain.nii.gz", "train/label/orphan.nii.gz"}
    assert any("0/255" in line for line in report.lines())


def test_binarize_option_accepts_255_and_multiclass_labels(root):
    _bad_cases(root)
    cat.ingest(root)
    cat.ingest(root, binarize_labels=True)
    df = cat.load_scans(root).set_index("scan_id")
    assert df.loc["mask255"].status == "ok" and df.loc["multi"].status == "ok"
    assert df.loc["mask255"].label_transform == "binarize"
    assert df.loc["nan"].status == "rejected"


def test_duplicate_is_accepted_once_the_original_is_gone(root):
    _bad_cases(root)
    cat.ingest(root)
    (root / "train" / "data" / "aaa_first.nii.gz").unlink()
    (root / "train" / "label" / "aaa_first.nii.gz").unlink()
    cat.ingest(root)
    df = cat.load_scans(root).set_index("scan_id")
    assert df.loc["zzz_copy"].status == "ok"


def test_nnunet_layout(tmp_path):
    r = tmp_path / "nn"
    for i in range(3):
        img, lab, aff = head_volume(seed=i)
        write_nifti(r / "imagesTr" / f"c{i}_0000.nii.gz", img, aff, np.int16)
        write_nifti(r / "labelsTr" / f"c{i}.nii.gz", lab, aff)
    img, lab, aff = head_volume(seed=9)
    write_nifti(r / "imagesTs" / "t0_0000.nii.gz", img, aff, np.int16)
    write_nifti(r / "labelsTs" / "t0.nii.gz", lab, aff)
    write_nifti(r / "imagesTr" / "c0_0001.nii.gz", img, aff, np.int16)
    report = cat.ingest(r)
    assert report.layout == "nnU-Net"
    df = cat.load_scans(r).set_index("image_path")
    assert df.loc["imagesTr/c1_0000.nii.gz"].scan_id == "c1"
    assert df.loc["imagesTr/c1_0000.nii.gz"].label_path == "labelsTr/c1.nii.gz"
    assert df.loc["imagesTs/t0_0000.nii.gz"].role == "test"
    assert "_0000" in df.loc["imagesTr/c0_0001.nii.gz"].reason


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cat.ingest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scans"):
        cat.ingest(tmp_path / "empty")


def test_folds_are_seeded_balanced_and_stable(tmp_path):
    r = tmp_path / "d"
    for i in range(12):
        write_case(r, "labelled", f"s{i:02d}", seed=i, shape=(24, 24, 6))
    cat.ingest(r)
    folds = cat.update_folds(r, 5, seed=3)
    assert sorted(np.bincount(folds.fold, minlength=5)) == [2, 2, 2, 3, 3]
    assert cat.update_folds(r, 5, seed=3).equals(folds)  # persisted, reused
    other = cat.update_folds(r, 5, seed=4)
    assert not other.set_index("scan_id").fold.equals(folds.set_index("scan_id").fold)
    # new labelled scans join without moving anybody
    for i in range(12, 15):
        write_case(r, "labelled", f"s{i:02d}", seed=i, shape=(24, 24, 6))
    cat.ingest(r)
    grown = cat.update_folds(r, 5, seed=3).set_index("scan_id").fold
    assert all(grown[s] == f for s, f in folds.set_index("scan_id").fold.items())
    assert sorted(np.bincount(grown, minlength=5)) == [3, 3, 3, 3, 3]
    # a scan that becomes unusable leaves the split
    (r / "train" / "label" / "s00.nii.gz").unlink()
    cat.ingest(r)
    assert "s00" not in set(cat.update_folds(r, 5, seed=3).scan_id)
    with pytest.raises(ValueError, match="n_folds"):
        cat.update_folds(r, 1)


def test_pseudo_label_lineage_round_trip(root):
    cat.ingest(root)
    rows = [
        {"scan_id": "u00", "round": 1, "mask_path": "pl/u00.nii.gz", "mask_hash": "ab", "teacher_run_id": "run0",
         "members": ["viola/f0", "nnunet/f0"], "consensus": "lesion", "agreement": 0.91, "predicted_dice": 0.85,
         "volume_cv": 0.1, "volume_ml": 12.5, "selected": True, "decision": "selected", "rule": "Dice>=0.8"},
        {"scan_id": "u01", "round": 1, "mask_path": "pl/u01.nii.gz", "mask_hash": "cd", "teacher_run_id": "run0",
         "members": ["viola/f0"], "consensus": "lesion", "agreement": 0.4, "predicted_dice": 0.3,
         "volume_cv": 0.7, "volume_ml": 1.5, "selected": False, "decision": "predicted Dice 0.3 < 0.8",
         "rule": "Dice>=0.8"},
        # a scan that could not be predicted is recorded too, with its reason and no mask
        {"scan_id": "u02", "round": 1, "teacher_run_id": "run0", "selected": False,
         "decision": "not predicted: not gzip", "rule": "Dice>=0.8", "error": "not gzip"},
    ]
    cat.record_pseudo_labels(root, rows)
    table = cat.record_pseudo_labels(root, [{**rows[1], "selected": True, "agreement": 0.85}])
    assert len(table) == 3 and (table.created_at != "").all()
    r1 = table.set_index("scan_id").loc["u01"]
    assert bool(r1.selected) and r1.agreement == 0.85 and r1["round"] == 1
    r2 = table.set_index("scan_id").loc["u02"]
    assert r2.mask_path == "" and r2.decision == "not predicted: not gzip" and not r2.selected
    assert cat.load_pseudo_labels(root, 2).empty
    text = cat.describe(root)
    assert "round 1: 3 scans, 2 selected" in text and "labelled" in text


def test_catalog_hash_follows_content(root):
    cat.ingest(root)
    h1 = cat.catalog_hash(root)
    img, _, aff = head_volume(seed=123)
    write_nifti(root / "unlabelled" / "u01.nii.gz", img, aff, np.int16)
    cat.ingest(root)
    assert cat.catalog_hash(root) != h1


def test_a_second_writer_waits_or_gets_a_clear_error(root):
    cat.ingest(root)
    lock = filelock.FileLock(str(root / "viola_catalog" / ".lock"))
    with lock, pytest.raises(cat.CatalogBusyError, match="another process"):
        cat.ingest(root, lock_timeout_s=0.2)
    # two concurrent writers: both finish, the table stays whole
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cat.record_pseudo_labels(root, [{"scan_id": f"u0{threading.get_ident() % 3}", "round": 1}])
            cat.ingest(root)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cat.load_scans(root)) == 9
    assert not list((root / "viola_catalog").glob("*.tmp*"))


def test_every_entry_of_an_input_folder_gets_a_row_with_its_reason(root):
    unl = root / "unlabelled"
    (unl / "gone.nii.gz").symlink_to(root / "nowhere.nii.gz")
    (unl / "folder.nii.gz").mkdir()
    (unl / "dicom_series").mkdir()
    (unl / ".hidden.nii.gz").write_bytes((unl / "u00.nii.gz").read_bytes() + b"x")
    cat.ingest(root)
    df = cat.load_scans(root).set_index("image_path")
    assert df.loc["unlabelled/gone.nii.gz"].reason == "broken symbolic link"
    assert df.loc["unlabelled/folder.nii.gz"].reason == "a folder named like a scan, not a file"
    assert df.loc["unlabelled/dicom_series"].reason == "an empty folder, not a NIfTI file or a DICOM series"
    assert df.loc["unlabelled/.hidden.nii.gz"].reason.startswith("hidden file")
    others = [p for p in df.index if p.startswith("unlabelled/") and "u0" not in p]
    assert len(others) == 4 and (df.loc[others, "status"] == "rejected").all()
    assert (df.loc[["unlabelled/u00.nii.gz", "unlabelled/u01.nii.gz"], "status"] == "ok").all()


def test_the_same_scan_saved_otherwise_is_a_duplicate(root):
    """Re-compressed, re-typed copies of a test scan are the same voxels: never an unlabelled scan to train on."""
    src = root / "test" / "data" / "t00.nii.gz"
    img = scans.read_image(src)[0]
    aff = scans.read_image(src)[1].affine
    (root / "unlabelled" / "t00_again.nii.gz").write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), 1))
    write_nifti(root / "unlabelled" / "t00_float.nii", img, aff, np.float32)  # uncompressed, float32
    for i in range(3):  # more gzip copies at other levels: still one scan
        (root / "unlabelled" / f"copy{i}.nii.gz").write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), 9 - i))
    cat.ingest(root)
    df = cat.load_scans(root).set_index("scan_id")
    for name in ("t00_again", "t00_float", "copy0", "copy1", "copy2"):
        assert df.loc[name].status == "rejected", name
        assert df.loc[name].reason.startswith("same content as test/data/t00.nii.gz"), df.loc[name].reason
    assert df.loc["t00"].status == "ok"
    assert len(cat.usable_scans(root, "unlabelled")) == 3


def test_a_file_that_vanishes_during_ingest_is_rejected_and_the_rest_goes_on(root, monkeypatch):
    real = cat.file_sha256

    def vanishing(path, *a, **kw):
        if Path(path).name == "u01.nii.gz":
            Path(path).unlink()
        return real(path, *a, **kw)

    monkeypatch.setattr(cat, "file_sha256", vanishing)
    report = cat.ingest(root)
    df = cat.load_scans(root).set_index("scan_id")
    assert df.loc["u01"].status == "rejected" and df.loc["u01"].reason.startswith("cannot read file")
    assert (df.drop(index="u01").status == "ok").all() and len(df) == 9
    assert ("unlabelled/u01.nii.gz", df.loc["u01"].reason) in report.rejected


def test_an_absurd_header_is_refused_before_reading(tmp_path):
    hdr = scans.nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.int16)
    bomb = tmp_path / "bomb.nii.gz"
    # the header and a few zeros: a real file would hold 137 GB of voxels after decompression
    bomb.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)))
    with pytest.raises(scans.ScanError, match="refused before reading"):
        scans.read_image(bomb)
