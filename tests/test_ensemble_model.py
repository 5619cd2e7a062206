"""The registered ensemble as an MLflow pyfunc model: loaded by URI alone, it segments a path or an
array like `viola predict`, and each member checkpoint is stored once (on its member run)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.helpers import head_volume, round_context, store_client, write_nifti
from viola_models.inference.ensemble import load_ensemble, read_manifest, write_ensemble
from viola_models.inference.segment import segment_scan


@pytest.fixture()
def registered(ensemble_dir, tmp_path) -> str:
    """A round as the pipeline leaves it: member runs holding the checkpoints, a round run whose
    ensemble is registered as version 1 (champion) of model ``m``."""
    from tasks import tracking
    from tasks.registry import register_ensemble

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.experiment_id(client, "e")
    round_run = tracking.create_run(client, exp, "round 0", tags={})
    members = []
    for m, ck in zip(read_manifest(ensemble_dir)["members"], read_manifest(ensemble_dir)["checkpoints"]):
        run = tracking.create_run(client, exp, m["name"], parent_run_id=round_run, tags={})
        client.log_artifact(run, str(ck), "checkpoint")
        members.append({"name": m["name"], "checkpoint": ck, "run_id": run})
    folder = tmp_path / "round" / "ensemble"
    write_ensemble(folder, members, load_ensemble(ensemble_dir).preprocess)
    ctx = round_context(tmp_path, uri, round_run, overrides={"tracking": {"registered_model": "m"}})
    res = register_ensemble.fn(ctx, folder, 0.5, "set", {})
    assert res["champion"]
    return uri


@pytest.fixture()
def tracking_uri_set(registered):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered)
    yield registered
    mlflow.set_tracking_uri(before)


def test_the_champion_segments_paths_and_arrays(tracking_uri_set, ensemble_dir, tmp_path):
    uri = tracking_uri_set
    # stored once: the version's files hold the manifest, not the checkpoints
    raw = Path(mlflow.artifacts.download_artifacts("models:/m@champion", tracking_uri=uri,
                                                   dst_path=str(tmp_path / "raw")))
    assert (raw / "MLmodel").is_file() and not list(raw.rglob("*.pt"))

    model = mlflow.pyfunc.load_model("models:/m@champion")
    sig = model.metadata.signature
    assert [c.name for c in sig.inputs.inputs] == ["path", "image", "affine"]
    assert {p.name for p in sig.params.params} == {"overlap", "tta", "output_dir", "return_mask"}

    img, _, aff = head_volume(codes="LPS", seed=5, lesions=((6, 4, 0, 12.0),))
    scan = write_nifti(tmp_path / "in" / "head.nii.gz", img, aff, np.int16)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not gzip")
    expected = segment_scan(scan, load_ensemble(ensemble_dir), overlap=0.25)

    table = model.predict(pd.DataFrame({"path": [str(scan), str(tmp_path / "in" / "broken.nii.gz")]}),
                          params={"overlap": 0.25, "output_dir": str(tmp_path / "out")})
    ok, bad = table.iloc[0], table.iloc[1]
    assert ok.status == "ok" and np.array_equal(ok["mask"], expected.mask)
    assert ok.volume_ml == pytest.approx(expected.volume_ml) and ok.n_lesions == expected.n_lesions
    assert ok.agreement == pytest.approx(expected.scores["agreement"])
    written = nib.load(ok.mask_path)
    assert np.array_equal(np.asarray(written.dataobj), expected.mask) and np.allclose(written.affine, aff)
    assert bad.status == "rejected" and bad.reason and bad["mask"] is None

    # the same scan as an array with its affine gives the same mask
    arr = model.predict({"image": np.asarray(nib.load(scan).dataobj, dtype=np.float32), "affine": aff},
                        params={"overlap": 0.25, "return_mask": True}).iloc[0]
    assert arr.status == "ok" and np.array_equal(arr["mask"], expected.mask)
    # an array that is not in Hounsfield units is refused in one line, like a file
    wrong = model.predict({"image": np.full((20, 20, 8), 0.5, np.float32), "affine": np.eye(4)}).iloc[0]
    assert wrong.status == "rejected" and "all voxels are 0.5" in wrong.reason
    with pytest.raises(Exception, match="no scan given"):
        model.predict(pd.DataFrame({"path": [""]}))


def test_the_cli_loads_the_pyfunc_version(registered, tmp_path):
    """`viola predict --model models:/...` takes the ensemble out of the pyfunc model."""
    from typer.testing import CliRunner

    from flows.cli import app

    img, _, aff = head_volume(codes="RAS", seed=2)
    write_nifti(tmp_path / "in" / "a.nii.gz", img, aff, np.int16)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                   "models:/m@champion", "--tracking-uri", registered, "--device", "cpu",
                                   "--backend", "torch", "--overlap", "0.25"])
    assert res.exit_code == 0, res.output
    assert "2 member(s)" in res.output and (tmp_path / "out" / "a.nii.gz").is_file()


def test_registration_converts_the_cpu_networks_so_the_first_scan_does_not(ensemble_dir, tmp_path, monkeypatch):
    """The OpenVINO conversion (and the int8 quantization, with its check) is paid at registration,
    into the cache a user's prediction reads; the check's outcome travels with the model version."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import shutil

    from tasks import tracking
    from tasks.registry import register_ensemble
    from viola_models.inference.backends import InferenceSettings, OpenVINOForward

    shutil.copytree(ensemble_dir, tmp_path / "ens")  # registration writes the CPU record into the folder
    labelled = {p.stem: str(p) for p in sorted((ensemble_dir.parent / "cache").rglob("*.npz"))}
    ensemble_dir = tmp_path / "ens"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run = tracking.create_run(client, tracking.experiment_id(client, "e"), "round 0", tags={})
    cache = tmp_path / "openvino"
    ctx = round_context(tmp_path, uri, run, overrides={"tracking": {"registered_model": "m"},
                                                       "inference": {"backend": "openvino", "cache_dir": str(cache),
                                                                     "quantize": "auto", "calibration_windows": 4}})
    converted, convert = [], OpenVINOForward._convert

    def counted(self, shape):
        converted.append(shape)
        return convert(self, shape)

    monkeypatch.setattr(OpenVINOForward, "_convert", counted)
    quantized, quantize = [], OpenVINOForward._quantize

    def counted_int8(self, shape):
        quantized.append(shape)
        return quantize(self, shape)

    monkeypatch.setattr(OpenVINOForward, "_quantize", counted_int8)
    register_ensemble.fn(ctx, ensemble_dir, 0.5, "set", {}, labelled)
    assert converted == [(1, 3, 32, 32, 8)] * 2  # one window shape per member, as a CPU predicts
    assert quantized == [(1, 3, 32, 32, 8)] * 2  # and its int8 network, from the converted one
    metrics = client.get_run(run).data.metrics
    record = json.loads((ensemble_dir / "cpu_inference.json").read_text())
    assert metrics["model/cpu_networks_ready"] == record["ready"] in (2, 4)
    assert metrics["model/int8_passed"] == float(record["int8"]["passed"])
    tags = store_client(uri).get_model_version("m", "1").tags
    assert tags["cpu_int8"] == ("passed" if record["int8"]["passed"] else "not used")
    assert tags["cpu_int8_reason"] == record["int8"]["reason"] != ""
    logged = {a.path for a in client.list_artifacts(run, "ensemble/artifacts/ensemble")}
    assert "ensemble/artifacts/ensemble/cpu_inference.json" in logged  # travels with the version
    monkeypatch.setattr(OpenVINOForward, "_quantize", lambda self, shape: pytest.fail(f"quantized again {shape}"))

    def again(self, shape):
        raise AssertionError(f"converted again for {shape}")

    monkeypatch.setattr(OpenVINOForward, "_convert", again)
    img, _, aff = head_volume(seed=11)
    scan = write_nifti(tmp_path / "scan.nii.gz", img, aff, np.int16)
    ensemble = load_ensemble(ensemble_dir, device="cpu", inference=InferenceSettings(backend="openvino",
                                                                                      cache_dir=cache))
    assert segment_scan(scan, ensemble, overlap=0.25).mask.shape == img.shape
