"""The labelled scans and a round's selected pseudo-labels as an nnU-Net v2 raw dataset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_catalog import catalog
from data_catalog.nnunet import check_nnunet_dataset, write_nnunet_dataset
from data_catalog.scans import file_sha256, read_image, save_nifti_like
from tests.helpers import head_volume, write_case


@pytest.fixture
def root(tmp_path):
    """Two labelled scans, two unlabelled (one a DICOM series), one test scan; round 1 selected the
    DICOM series' pseudo-label and rejected the other."""
    from tests.test_dicom import write_series

    r = tmp_path / "data"
    write_case(r, "labelled", "lab_a", seed=1)
    write_case(r, "labelled", "lab.b", seed=2)  # a dot: not an nnU-Net case name as it is
    write_case(r, "unlabelled", "unl_a", seed=3)
    hu, _, aff = head_volume(seed=4)
    write_series(r / "unlabelled" / "unl_dicom", hu, aff)
    write_case(r, "test", "tst_a", seed=5)
    catalog.ingest(r)
    pseudo_dir = r / "viola_work" / "rounds" / "round_001" / "pseudo"
    pseudo_dir.mkdir(parents=True)
    rows = []
    for scan_id, selected in (("unl_dicom", True), ("unl_a", False)):
        image_rel = catalog.usable_scans(r).set_index("scan_id").loc[scan_id, "image_path"]
        image, _ = read_image(r / image_rel)
        mask = (image > 60).astype(np.uint8)  # stands in for the teacher's mask
        save_nifti_like(mask, r / image_rel, pseudo_dir / f"{scan_id}.nii.gz")
        rel = f"viola_work/rounds/round_001/pseudo/{scan_id}.nii.gz"
        rows.append({"scan_id": scan_id, "round": 1, "mask_path": rel,
                     "teacher_run_id": "t0", "predicted_dice": 0.8, "selected": selected,
                     "decision": "kept" if selected else "rejected"})
    catalog.record_pseudo_labels(r, rows)
    return r


def _hashes(folder):
    return {p: file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and "viola_catalog" not in p.parts}


def test_the_labelled_scans_and_selected_pseudo_labels_become_an_nnunet_dataset(root, tmp_path):
    before = _hashes(root)
    done = write_nnunet_dataset(root, tmp_path / "raw", 1, dataset_id=42, name="ICH")
    folder = done["folder"]
    assert folder == tmp_path / "raw" / "Dataset042_ICH" and (done["labelled"], done["pseudo_labels"], done["test"]) \
        == (2, 1, 1)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "haemorrhage": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["viola"]["cases"]["lab_b"] == {"scan_id": "lab.b", "kind": "labelled"}
    assert meta["viola"]["cases"]["unl_dicom"]["kind"] == "pseudo-label" and "unl_a" not in meta["viola"]["cases"]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "lab_a_0000.nii.gz", "lab_b_0000.nii.gz", "unl_dicom_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["tst_a_0000.nii.gz"]
    assert check_nnunet_dataset(folder) == []
    # the DICOM series as NIfTI on its own grid, its pseudo-label beside it, values and geometry kept
    image, info = read_image(root / "unlabelled" / "unl_dicom")
    out = nib.load(str(folder / "imagesTr" / "unl_dicom_0000.nii.gz"))
    assert np.allclose(out.get_fdata(), image) and np.allclose(out.affine, info.affine, atol=1e-4)
    label = np.asarray(nib.load(str(folder / "labelsTr" / "unl_dicom.nii.gz")).dataobj)
    assert label.dtype == np.uint8 and np.array_equal(label, (image > 60).astype(np.uint8))
    # a NIfTI image is the file itself
    assert file_sha256(folder / "imagesTr" / "lab_a_0000.nii.gz") == file_sha256(root / "train" / "data" /
                                                                                 "lab_a.nii.gz")
    assert _hashes(root) == before  # nothing of the data root was touched
    with pytest.raises(ValueError, match="exists already"):
        write_nnunet_dataset(root, tmp_path / "raw", 1, dataset_id=42, name="ICH")
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset042_ICH"]  # no half-written leftover


def test_round_zero_is_the_labelled_scans_alone_and_a_round_never_run_is_refused(root, tmp_path):
    done = write_nnunet_dataset(root, tmp_path / "raw", 0)
    assert done["folder"].name == "Dataset501_ViolaICH" and (done["labelled"], done["pseudo_labels"]) == (2, 0)
    with pytest.raises(ValueError, match="round 2 has no pseudo-labels"):
        write_nnunet_dataset(root, tmp_path / "raw2", 2)
    with pytest.raises(ValueError, match="use letters, digits"):
        write_nnunet_dataset(root, tmp_path / "raw3", 1, name="ICH data")


def test_the_check_finds_what_nnunet_would_refuse(root, tmp_path):
    folder = write_nnunet_dataset(root, tmp_path / "raw", 1)["folder"]
    (folder / "imagesTr" / "lab_a_0000.nii.gz").unlink()
    lab = nib.load(str(folder / "labelsTr" / "lab_b.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj) * 2, lab.affine), str(folder / "labelsTr" / "lab_b.nii.gz"))
    problems = check_nnunet_dataset(folder)
    assert "case lab_a: lab_a_0000.nii.gz missing in imagesTr" in problems
    assert any(p.startswith("case lab_b: label values [2]") for p in problems)


def test_viola_export_writes_the_dataset_and_refuses_in_one_line(root, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "raw"), "--round", "1"])
    assert res.exit_code == 0, res.output
    assert "1 pseudo-label(s) of round 1" in res.output and (tmp_path / "raw" / "Dataset501_ViolaICH").is_dir()
    again = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "raw"), "--round", "1"])
    assert again.exit_code != 0 and "exists already" in again.output and "Traceback" not in again.output
    other = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "x"), "--round", "1",
                                     "--format", "monai-bundle"])  # the round's ensemble: none in this root
    assert other.exit_code == 2 and other.output.startswith("error: round 1 has no finished ensemble in ")
