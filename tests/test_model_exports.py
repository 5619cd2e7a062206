"""A round's ensemble for the tools users already run: a self-contained MLflow model that loads and
predicts with no tracking server, and a MONAI bundle that `python -m monai.bundle run` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.helpers import head_volume, write_nifti
from viola_models.inference.backends import InferenceSettings
from viola_models.inference.ensemble import load_ensemble


@pytest.fixture()
def scans(tmp_path) -> Path:
    folder = tmp_path / "in"
    for seed, codes in ((31, "LPS"), (32, "RAS")):
        img, _, aff = head_volume(seed=seed, codes=codes, lesions=((6, 4, 0, 12.0),))
        write_nifti(folder / f"case{seed}.nii.gz", img, aff, np.int16)
    (folder / "notes.txt").write_text("not a scan")
    return folder


@pytest.fixture()
def tracking_uri_kept():
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_a_self_contained_model_predicts_as_the_registered_one_without_its_server(ensemble_dir, scans, tmp_path,
                                                                                  monkeypatch, tracking_uri_kept):
    from typer.testing import CliRunner

    from flows.cli import app
    from viola_models.inference.backends import openvino_available
    from viola_models.inference.ensemble import BUNDLED_NETWORKS

    uri = _register(ensemble_dir, tmp_path)
    monkeypatch.setenv("VIOLA_CACHE_DIR", str(tmp_path / "server_cache"))
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", "--model", "m@champion", "--tracking-uri", uri, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "self-contained MLflow model" in res.output
    ens = out / "artifacts" / "ensemble"
    assert (out / "MLmodel").is_file() and len(list(ens.rglob("best.pt"))) == 2
    if openvino_available():
        assert len([p for p in (ens / BUNDLED_NETWORKS).iterdir() if (p / "model.xml").is_file()]) == 2

    mlflow.set_tracking_uri(uri)
    params = {"overlap": 0.25}
    table = pd.DataFrame({"path": sorted(str(p) for p in scans.glob("*.nii.gz"))})
    expected = mlflow.pyfunc.load_model("models:/m@champion").predict(table, params=params)
    # the site: no tracking server at all, its own empty cache; the bundled networks are used, not converted
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    monkeypatch.setenv("VIOLA_CACHE_DIR", str(tmp_path / "site_cache"))
    from viola_models.inference import backends

    converted = []
    monkeypatch.setattr(backends.OpenVINOForward, "_convert",
                        lambda self, shape: converted.append(shape) or pytest.fail("converted at the site"))
    alone = mlflow.pyfunc.load_model(str(out)).predict(table, params=params)
    assert not (tmp_path / "nowhere").exists() and converted == []
    assert list(alone.status) == ["ok", "ok"]
    for a, b in zip(alone["mask"], expected["mask"]):
        assert np.array_equal(a, b)
    assert json.loads(json.dumps(mlflow.models.Model.load(str(out / "MLmodel")).metadata))["viola.self_contained"]


def _register(ensemble_dir: Path, tmp_path: Path) -> str:
    """Version 1 (champion) of model ``m``, its checkpoints on member runs (as a round leaves it)."""
    from tasks import tracking
    from tasks.registry import register_ensemble
    from tests.helpers import round_context
    from viola_models.inference.ensemble import read_manifest, write_ensemble

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.experiment_id(client, "e")
    round_run = tracking.create_run(client, exp, "round 0", tags={})
    members = []
    manifest = read_manifest(ensemble_dir)
    for m, ck in zip(manifest["members"], manifest["checkpoints"]):
        run = tracking.create_run(client, exp, m["name"], parent_run_id=round_run, tags={})
        client.log_artifact(run, str(ck), "checkpoint")
        members.append({"name": m["name"], "checkpoint": ck, "run_id": run})
    folder = tmp_path / "round" / "ensemble"
    write_ensemble(folder, members, manifest["preprocess"])
    ctx = round_context(tmp_path, uri, round_run, overrides={"tracking": {"registered_model": "m"}})
    assert register_ensemble.fn(ctx, folder, 0.5, "set", {})["champion"]
    return uri


def test_a_monai_bundle_gives_the_masks_of_viola_predict(ensemble_dir, scans, tmp_path):
    pytest.importorskip("monai")
    from typer.testing import CliRunner

    from flows.cli import app
    from viola_models.inference.segment import predict_folder

    bundle = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["export", "--format", "monai-bundle", "--checkpoints", str(ensemble_dir), "--out",
                                   str(bundle)])
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(bundle).as_posix() for p in (bundle / "configs").iterdir()) == [
        "configs/inference.json", "configs/metadata.json"]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["preprocessing"]["windows"] == [list(w) for w in load_ensemble(ensemble_dir).preprocess.windows]
    threads = str(__import__("torch").get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--dataset_dir", str(scans), "--output_dir", str(tmp_path / "by_monai"), "--device", "cpu",
                          "--overlap", "0.25", "--inference#backend", "torch"],
                         cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ensemble = load_ensemble(ensemble_dir, device="cpu", inference=InferenceSettings(backend="torch"))
    table = predict_folder(scans, tmp_path / "by_viola", ensemble, overlap=0.25)
    assert list(table.status) == ["ok", "ok", "rejected"]
    for name in ("case31.nii.gz", "case32.nii.gz"):
        a, b = nib.load(tmp_path / "by_monai" / name), nib.load(tmp_path / "by_viola" / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    by_monai = pd.read_csv(tmp_path / "by_monai" / "predictions_info.csv")
    assert list(by_monai.status) == ["ok", "ok", "rejected"]


def test_export_refuses_unclear_requests_in_one_line(ensemble_dir, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = {
        ("--out", str(tmp_path / "x")): "error: --format nnunet needs DATA_ROOT and --round R",
        ("--format", "mlflow", "--out", str(tmp_path / "x")): (
            "error: --format mlflow exports one ensemble: give --model NAME@ALIAS, --checkpoints FOLDER or "
            "DATA_ROOT --round R"),
        ("--format", "monai-bundle", "--checkpoints", str(ensemble_dir), "--out", str(taken)): (
            f"error: {taken} exists and is not an empty folder: give a new folder for the bundle"),
        ("--format", "onnx", "--out", str(tmp_path / "x")): (
            "error: --format 'onnx': give nnunet, mlflow or monai-bundle"),
    }
    for args, message in cases.items():
        res = runner.invoke(app, ["export", *args])
        assert res.exit_code == 2 and res.output.strip() == message, res.output
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and not (tmp_path / "x").exists()
