"""viola predict: masks on the scans' own grids, the predictions table, bad inputs, the CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from data_catalog.preprocessing import preprocess_arrays
from data_catalog.scans import file_sha256
from tests.conftest import PRE
from tests.helpers import head_volume, round_context, write_nifti
from viola_models.inference import segment
from viola_models.inference.ensemble import load_ensemble
from viola_models.inference.sliding_window import EnsembleOutput


@pytest.fixture()
def scans(tmp_path) -> Path:
    folder = tmp_path / "in"
    for name, codes in (("lps.nii.gz", "LPS"), ("prs.nii.gz", "PRS"), ("ras.nii", "RAS")):
        img, _, aff = head_volume(codes=codes, seed=len(name))
        write_nifti(folder / name, img, aff, np.int16)
    (folder / "notes.txt").write_text("not a scan")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in folder.iterdir()}


def test_masks_keep_each_scans_geometry_and_header(ensemble_dir, scans, tmp_path):
    before = _snapshot(scans)
    ens = load_ensemble(ensemble_dir)
    table = segment.predict_folder(scans, tmp_path / "out", ens, overlays=True)
    assert _snapshot(scans) == before  # inputs untouched
    assert list(table.file_name) == ["lps.nii.gz", "notes.txt", "prs.nii.gz", "ras.nii"]
    assert list(table.status) == ["ok", "rejected", "ok", "ok"]  # every input gets a row, with its reason
    assert table.set_index("file_name").loc["notes.txt"].reason == "not a NIfTI file name (.nii or .nii.gz)"
    table = table[table.status == "ok"]
    for name in table.file_name:
        src, out = nib.load(scans / name), nib.load(tmp_path / "out" / name)
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert out.get_data_dtype() == np.uint8
        assert np.allclose(out.header.get_zooms(), src.header.get_zooms())
        assert int(out.header["qform_code"]) == int(src.header["qform_code"])
        assert int(out.header["sform_code"]) == int(src.header["sform_code"])
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["lps.png", "prs.png", "ras.png"]
    on_disk = pd.read_csv(tmp_path / "out" / "predictions_info.csv")
    assert list(on_disk.columns) == segment.PREDICTION_COLUMNS and len(on_disk) == 4
    # the table's volume is the written mask's voxel count times the voxel volume
    for r in on_disk[on_disk.status == "ok"].itertuples():
        m = nib.load(tmp_path / "out" / r.file_name)
        ml = float(np.asarray(m.dataobj).sum()) * float(np.prod(m.header.get_zooms()[:3])) / 1000
        assert r.predicted_volume_ml == pytest.approx(ml, abs=1e-3)
        assert r.consensus in ("lesion", "empty", "disputed")
        assert np.isnan(r.predicted_dice)  # this ensemble carries no calibration


def test_volumes_of_a_known_mask(ensemble_dir, tmp_path, monkeypatch):
    """The ensemble replaced by the true lesion: the table reports its volume (ml) and lesion count."""
    lesions = ((20.0, 10.0, 0.0, 14.0), (-30.0, -20.0, 5.0, 9.0))
    img, lab, aff = head_volume(shape=(96, 96, 16), spacing=(2.0, 2.0, 5.0), codes="LPS", lesions=lesions)
    write_nifti(tmp_path / "in" / "known.nii.gz", img, aff, np.int16)
    case = preprocess_arrays(img, aff, lab, PRE)
    truth = torch.as_tensor(case.label[0], dtype=torch.float32)

    def oracle(members, image, **kw):
        probs = truth[None].repeat(len(members), 1, 1, 1)
        return EnsembleOutput(member_probs=probs, mean_prob=truth, member_names=["a", "b"])

    monkeypatch.setattr(segment, "predict_ensemble", oracle)
    ens = load_ensemble(ensemble_dir)
    row = segment.predict_folder(tmp_path / "in", tmp_path / "out", ens).iloc[0]
    true_ml = lab.sum() * 2.0 * 2.0 * 5.0 / 1000
    assert row.predicted_volume_ml == pytest.approx(true_ml, rel=0.08)
    assert row.n_lesions == 2 and row.agreement == 1.0 and row.union_agreement == 1.0
    assert row.consensus == "lesion" and row.mean_max_probability == 1.0
    assert 0 < row.largest_lesion_ml < row.predicted_volume_ml
    assert row.abc2_volume_ml == pytest.approx(true_ml, rel=0.5)


def test_bad_inputs_are_reported_and_skipped(ensemble_dir, scans, tmp_path):
    img, _, aff = head_volume(seed=9)
    (scans / "broken.nii.gz").write_bytes((scans / "lps.nii.gz").read_bytes()[:500])
    write_nifti(scans / "slice.nii.gz", img[:, :, 0], aff, np.int16)
    write_nifti(scans / "png_export.nii.gz", np.clip((img + 1000) / 8, 0, 255), aff, np.uint8)
    before = _snapshot(scans)
    table = segment.predict_folder(scans, tmp_path / "out", load_ensemble(ensemble_dir)).set_index(
        "file_name")
    assert _snapshot(scans) == before
    assert table.loc["broken.nii.gz"].status == "rejected" and "truncated" in table.loc["broken.nii.gz"].reason
    assert "3-D" in table.loc["slice.nii.gz"].reason
    assert "8-bit" in table.loc["png_export.nii.gz"].reason
    assert (table.status == "ok").sum() == 3
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    with pytest.raises(ValueError, match="is the input folder"):
        segment.predict_folder(scans, scans, load_ensemble(ensemble_dir))


def test_cli_predict(ensemble_dir, scans, tmp_path):
    from flows.cli import app

    runner = CliRunner()
    out = tmp_path / "cli_out"
    res = runner.invoke(app, ["predict", str(scans), str(out), "--checkpoints", str(ensemble_dir),
                              "--device", "cpu"])
    # notes.txt is rejected: listed, and the exit code says so (1) unless --allow-rejected
    assert res.exit_code == 1, res.output
    assert "[4/4]" in res.output and "segmented 3 of 4 input(s) (1 rejected)" in res.output
    assert "notes.txt: rejected: not a NIfTI file name" in res.output
    assert (out / "predictions_info.csv").exists()
    res = runner.invoke(app, ["predict", str(scans), str(out), "--checkpoints", str(ensemble_dir),
                              "--device", "cpu", "--allow-rejected"])
    assert res.exit_code == 0, res.output
    # no trained model anywhere: one line, exit code 2
    res = runner.invoke(app, ["predict", str(scans), str(out), "--tracking-uri",
                              f"sqlite:///{tmp_path / 'empty.db'}"])
    assert res.exit_code == 2 and res.output.strip().startswith("error: cannot load models:/")
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["predict", str(scans), str(out), "--round", "0", "--checkpoints", str(ensemble_dir)])
    assert res.exit_code == 2 and "at most one" in res.output


def test_cli_predict_uses_the_registry_champion_by_default(ensemble_dir, scans, tmp_path, monkeypatch):
    from flows.cli import app
    from tasks import tracking
    from tasks.registry import register_ensemble

    monkeypatch.chdir(tmp_path)  # no stray MLflow files may appear in the working directory
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = tracking.client_for(uri)
    run_id = tracking.create_run(client, tracking.experiment_id(client, "e"), "round 0", tags={})
    ctx = round_context(tmp_path, uri, run_id, overrides={"tracking": {"registered_model": "viola-ich-demo"}})
    register_ensemble.fn(ctx, ensemble_dir, 0.5, "t0", {})
    mlflow_default = tmp_path / "mlflow.db"
    res = CliRunner().invoke(app, ["predict", str(scans), str(tmp_path / "out"), "--tracking-uri", uri,
                                   "--device", "cpu", "--allow-rejected"])
    assert res.exit_code == 0, res.output
    assert "segmented 3 of 4" in res.output and not mlflow_default.exists()
    # no store where the default points: one line, and nothing created in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # a new process has none (client_for sets it)
    res = CliRunner().invoke(app, ["predict", str(scans), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "there is no MLflow store at" in res.output
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out2").exists()


def test_a_full_disk_leaves_no_partial_mask_and_one_line(ensemble_dir, scans, tmp_path, monkeypatch):
    import errno

    import nibabel

    from flows.cli import app

    real_save = nibabel.save

    def full(img, path):
        real_save(img, path)  # the bytes go to the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nibabel, "save", full)
    before = _snapshot(scans)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(scans), str(out), "--checkpoints", str(ensemble_dir),
                                   "--device", "cpu"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cannot write" in line and "lps.nii.gz" in line and "No space" in line
    assert sorted(p.name for p in out.iterdir()) == []  # no mask, no temporary file, no table yet
    assert _snapshot(scans) == before


def test_scores_of_shares_of_the_test_scans_add_up_to_the_whole(ensemble_dir, tmp_path):
    """Evaluation fanned out over workers: the rows of each share, put together, give the same means
    as one pass over every scan (a rejected scan stays out of the means)."""
    from viola_models.evaluation.scoring import evaluate_scans, means_of

    scans = {}
    for i in range(3):
        img, lab, aff = head_volume(seed=30 + i, lesions=((8 - 6 * i, 4, 0, 10.0),))
        scans[f"s{i}"] = {"image": str(write_nifti(tmp_path / f"s{i}.nii.gz", img, aff, np.int16)),
                          "label": str(write_nifti(tmp_path / f"l{i}.nii.gz", lab, aff, np.uint8))}
    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    scans["bad"] = {"image": str(tmp_path / "bad.nii.gz"), "label": str(tmp_path / "l0.nii.gz")}
    ensemble = load_ensemble(ensemble_dir)
    whole, means = evaluate_scans(ensemble, scans, overlap=0.25)
    shares = [{k: scans[k] for k in ids} for ids in (["s0", "bad"], ["s1", "s2"])]
    rows = pd.concat([evaluate_scans(ensemble, share, overlap=0.25)[0] for share in shares])
    assert means_of(rows) == means and means["n_cases"] == 3
    assert set(whole.status) == {"ok", "rejected"} and 0 < means["dsc"] < 1
