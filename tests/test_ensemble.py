"""viola_models.inference.ensemble: the folder's manifest is validated with one-line reasons naming the file;
the registry's champion guard compares candidates only on the same test set."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_catalog.selection import Calibration
from tests.helpers import head_volume, round_context, store_client, write_nifti
from viola_models.inference.ensemble import EnsembleError, load_ensemble, read_manifest, write_ensemble


@pytest.fixture()
def copy(ensemble_dir, tmp_path) -> Path:
    return Path(shutil.copytree(ensemble_dir, tmp_path / "ens"))


def test_a_written_ensemble_reads_back_with_its_calibration(ensemble_dir, tmp_path):
    import pandas as pd

    data = read_manifest(ensemble_dir)
    members = [{"name": m["name"], "checkpoint": str(ensemble_dir / m["checkpoint"])} for m in data["members"]]
    points = pd.DataFrame({"agreement": [0.2, 0.4, 0.6, 0.8, 0.9], "true_dice": [0.1, 0.3, 0.5, 0.7, 0.8]})
    cal = Calibration(score="agreement", kind="isotonic", x=[0.2, 0.9], y=[0.1, 0.8], n_points=5)
    write_ensemble(tmp_path / "e2", members, data["preprocess"], calibration=cal, calibration_points=points, round=3)
    ens = load_ensemble(tmp_path / "e2")
    assert ens.names == ["viola_tiny", "nnunet_tiny"] and ens.meta["round"] == 3
    assert ens.predicted_dice({"agreement": 0.55}) == pytest.approx(0.45)
    refit = ens.calibration_for("agreement", prior_weight=0)
    assert refit.kind == "isotonic" and refit.predict([0.6])[0] == pytest.approx(0.5)
    assert ens.calibration_for("union_agreement", 5).kind == "identity"  # no points for that score
    # the manifest is the last file written: no temporary file is left beside it
    assert sorted(p.name for p in (tmp_path / "e2").iterdir()) == ["calibration.csv", "ensemble.json", "nnunet_tiny",
                                                                   "viola_tiny"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: (d / "ensemble.json").unlink(), r"ensemble\.json is missing"),
    (lambda d: (d / "ensemble.json").write_text("{\n"), r"ensemble\.json is not valid JSON"),
    (lambda d: (d / "ensemble.json").write_text('{"members": []}'), r"ensemble\.json lists no members"),
    (lambda d: (d / "viola_tiny" / "best.pt").unlink(), r"lists viola_tiny/best\.pt, which does not exist"),
    (lambda d: (d / "ensemble.json").write_text(json.dumps(
        {**json.loads((d / "ensemble.json").read_text()), "members": [{"name": "x", "checkpoint": "../../etc/pt"}]})),
     "needs a checkpoint path inside the folder"),
    (lambda d: (d / "viola_tiny" / "best.pt").write_bytes(b"garbage"), r"viola_tiny/best\.pt is unreadable"),
])
def test_a_bad_ensemble_folder_gives_one_line_naming_the_file(copy, change, message):
    change(copy)
    with pytest.raises((EnsembleError, ValueError), match=message) as err:
        load_ensemble(copy)
    assert "\n" not in str(err.value) and str(copy) in str(err.value)


def _scans(tmp_path: Path, name: str, seeds: list[int]) -> dict:
    out = {}
    for s in seeds:
        img, lab, aff = head_volume(seed=s, lesions=((8, 4, 0, 10.0),))
        out[f"{name}{s}"] = {"image": str(write_nifti(tmp_path / name / f"i{s}.nii.gz", img, aff, np.int16)),
                             "label": str(write_nifti(tmp_path / name / f"l{s}.nii.gz", lab, aff, np.uint8))}
    return out


def test_the_champion_moves_only_on_the_same_test_set(ensemble_dir, tmp_path):
    from tasks import tracking
    from tasks.registry import register_ensemble

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.experiment_id(client, "e")
    runs = [tracking.create_run(client, exp, f"round {i}", tags={}) for i in range(3)]
    old_set = _scans(tmp_path, "old", [1])
    new_set = _scans(tmp_path, "new", [2, 3])
    ctx = round_context(tmp_path, uri, overrides={"tracking": {"registered_model": "m"}, "evaluate": {"overlap": 0.25}})

    def register(round_: int, dsc: float, test_set: str, scans: dict) -> dict:
        return register_ensemble.fn(replace(ctx, plan=replace(ctx.plan, round=round_, state={"run_id": runs[round_]})),
                                    ensemble_dir, dsc, test_set, scans)

    first = register(0, 0.90, "setA", old_set)
    assert first["champion"] and first["reason"] == "first version"
    # same test set, lower DSC: the champion stays, and the version says why
    second = register(1, 0.80, "setA", old_set)
    assert not second["champion"]
    v2 = client.get_model_version("m", second["version"])
    assert v2.tags["champion_decision"] == "kept" and "< champion v1's 0.9000 on test set setA" in v2.tags[
        "champion_reason"]
    # another test set: the champion's 0.90 on set A is not comparable; it is scored on set B first
    third = register(2, 0.50, "setB", new_set)
    v1 = client.get_model_version("m", "1")
    assert v1.tags["test_set_hash"] == "setB" and "rescored_at" in v1.tags
    rescored = float(v1.tags["test_dsc"])
    assert rescored < 0.5  # a 4-step network scores far below the candidate's claimed 0.50
    assert third["champion"] and "(champion re-scored)" in third["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == third["version"]
    v3 = store_client(uri).get_model_version("m", third["version"])
    assert v3.tags["test_set_hash"] == "setB" and v3.tags["champion_decision"] == "promoted"
    assert (tracking.download_ensemble("models:/m@champion", uri, tmp_path / "champion") / "ensemble.json").exists()
