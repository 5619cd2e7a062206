"""The self-training flow end to end (tiny profile) under Prefect's test harness, with a temporary
MLflow store: runs, tags, artifacts, lineage, the registered model, and resume after a crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from data_catalog import catalog
from tasks import tracking
from tests import ui_check
from tests.helpers import store_client
from viola_models.inference.ensemble import load_ensemble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _phantoms(root: Path) -> Path:
    """The tiny profile's phantoms (the pipeline writes phantoms only into a profile's own demo root)."""
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(root, labelled=4, unlabelled=3, test=2, seed=7, size="small")
    return root


def _uri(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"


def _runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status, "kind": r.data.tags.get("viola.kind"),
                          "round": r.data.tags.get("viola.round"), "parent": r.data.tags.get("mlflow.parentRunId"),
                          "tags": r.data.tags, "metrics": r.data.metrics, "params": r.data.params} for r in runs])


@pytest.fixture(scope="module")
def two_rounds(prefect_api, tmp_path_factory) -> tuple[Path, str, list[dict]]:
    """Rounds 0 and 1 of the tiny profile and round 1's control in a temporary store: (data root,
    tracking URI, the flow's summaries). Built once for the tests that read it."""
    from flows.self_training import self_training

    tmp = tmp_path_factory.mktemp("two_rounds")
    (tmp / "mlruns").mkdir()
    root = _phantoms(tmp / "data")
    uri = _uri(tmp)
    return root, uri, self_training(profile="tiny", data_root=str(root), rounds=2, tracking_uri=uri, control=True)


def test_two_rounds_end_to_end(two_rounds, tmp_path):
    from flows.self_training import self_training

    root, uri, summaries = two_rounds
    assert [(s["round"], s["arm"]) for s in summaries] == [(0, "self-training"), (0, "control"), (1, "self-training"),
                                                          (1, "control")]
    assert summaries[1]["skipped"].startswith("round 0 has no control")

    client = store_client(uri)
    runs = _runs(client, "self-training-tiny")
    rounds = runs[runs.kind == "round"]
    parents = rounds[[t["viola.arm"] == "self-training" for t in rounds.tags]].set_index("round")
    members = runs[runs.kind == "member"]
    assert sorted(parents.index) == ["0", "1"] and (rounds.status == "FINISHED").all()
    r0, r1 = parents.loc["0"], parents.loc["1"]
    # the control is a sibling of round 1, tagged as such, scored on the same test set with the same compute
    control = rounds[[t["viola.arm"] == "control" for t in rounds.tags]]
    assert len(control) == 1 and len(rounds) == 3
    c1 = control.iloc[0]
    assert c1.tags["mlflow.runName"] == "round 1 (control)" and c1.tags["viola.round"] == "1"
    assert c1.tags["viola.self_training_run_id"] == r1.run_id and "mlflow.parentRunId" not in c1.tags
    assert c1.tags["viola.test_set_hash"] == r1.tags["viola.test_set_hash"] == catalog.catalog_hash(root, "test")
    assert c1.metrics["round/n_pseudo_labels"] == 0 and "test/dsc" in c1.metrics
    c_members = members[members.parent == c1.run_id]
    assert len(c_members) == 2 and all(p["n_pseudo"] == "0" for p in c_members.params)
    assert {p["train.max_steps"] for p in c_members.params} == {p["train.max_steps"] for p in members[
        members.parent == r1.run_id].params}
    members = members[members.parent != c1.run_id]
    assert r1.tags["viola.previous_round_run_id"] == r0.run_id and r0.tags["viola.previous_round_run_id"] == ""
    for tag in ("viola.catalog_hash", "viola.code_version", "viola.prefect_flow_run_id",
                "viola.pseudo_label_set_hash"):
        assert r0.tags[tag] and r1.tags[tag], tag
    assert r0.tags["viola.catalog_hash"] == catalog.catalog_hash(root)
    # a child run per fold and architecture, nested under its round, with the training curve
    assert len(members) == 4 and set(members.parent) == {r0.run_id, r1.run_id}
    for m in members.itertuples():
        assert m.params["train.model"] in ("viola_tiny", "nnunet_tiny") and m.params["fold"] == "0"
        assert {"val/best_dice", "train/loss", "train/lr", "val/dice"} <= set(m.metrics)
        assert [a.path for a in client.list_artifacts(m.run_id, "checkpoint")] == ["checkpoint/best.pt"]
        history = client.get_metric_history(m.run_id, "train/loss")
        assert len(history) >= 2 and len({h.step for h in history}) == len(history)
    # datasets in the lineage: each member run names the exact scans (content hashes) it trained and
    # validated on, and round 1's members the pseudo-label set; the round run names its test set
    scans = catalog.usable_scans(root).set_index("scan_id")
    folds = catalog.load_folds(root, 2, 0)
    fold_of = dict(zip(folds.scan_id, folds.fold))
    for m in members.itertuples():
        inputs = client.get_run(m.run_id).inputs.dataset_inputs
        sets = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs}
        assert set(sets) == ({"train", "validation", "pseudo"} if m.parent == r1.run_id else {"train", "validation"})
        for context, ds in sets.items():
            columns = [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]]
            assert columns == tracking.DATASET_COLUMNS and ds.name == f"fold0/{context}"
            table = pd.read_csv(mlflow.artifacts.download_artifacts(
                run_id=m.run_id, artifact_path=f"datasets/{context}.csv", tracking_uri=uri), dtype=str,
                keep_default_na=False)
            assert json.loads(ds.profile)["num_rows"] == len(table) >= 1
            assert ds.digest == tracking.dataset_digest(table.to_dict("records"))
        train_ids = {s for s, f in fold_of.items() if f != 0 and scans.loc[s, "role"] == "labelled"}
        expected = [{"scan_id": s, "image_hash": scans.loc[s, "image_hash"], "label_hash": scans.loc[s, "label_hash"],
                     "weight": 1.0} for s in train_ids]
        assert sets["train"].digest == tracking.dataset_digest(expected) and sets["train"].name == "fold0/train"
    test_inputs = client.get_run(r0.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in test_inputs] == ["test"]
    test_ids = scans[scans.role == "test"]
    assert test_inputs[0].dataset.digest == tracking.dataset_digest([
        {"scan_id": s, "image_hash": r.image_hash, "label_hash": r.label_hash} for s, r in test_ids.iterrows()])

    # fine-tuning members start from round 0's weights and never validate on pseudo-labels
    tuned = members[members.parent == r1.run_id]
    assert all(p["init_weights"].endswith("best.pt") for p in tuned.params)
    n_fold0 = sum(1 for f in catalog.load_folds(root, 2, 0).fold if f == 0)
    assert {p["n_val"] for p in members.params} == {str(n_fold0)}
    assert {int(p["n_train"]) for p in tuned.params} == {4 - n_fold0 + summaries[2]["n_pseudo_selected"]}

    # round metrics line up in the compare view
    for key in ("test/dsc", "test/hd", "test/nsd", "test/rvd", "members/mean_val_dice", "round/seconds"):
        assert key in r0.metrics and key in r1.metrics, key
    assert {"pseudo/n_selected", "pseudo/n_candidates", "pseudo/true_dice_selected", "pseudo/true_dice_rejected",
            "pseudo/n_with_truth"} <= set(r1.metrics)  # phantoms keep their unlabelled truth
    assert r1.metrics["pseudo/n_with_truth"] == r1.metrics["pseudo/n_candidates"] == 3
    # the selection score was calibrated on the members' out-of-fold predictions, logged as CSV and PNG
    for run in (r0, r1):
        assert {a.path for a in client.list_artifacts(run.run_id, "calibration")} == {
            "calibration/calibration.csv", "calibration/calibration.png"}
        assert run.metrics["calibration/n_points"] >= 2
    arts0 = {a.path for a in client.list_artifacts(r0.run_id, "test")}
    assert arts0 == {"test/per_case.csv"}
    per_case = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r0.run_id, artifact_path="test/per_case.csv",
                                                               tracking_uri=uri))
    assert len(per_case) == 2 and {"scan_id", "dsc", "hd", "nsd", "rvd", "gt_volume_ml"} <= set(per_case.columns)
    pseudo_arts = {a.path for a in client.list_artifacts(r1.run_id, "pseudo")}
    assert "pseudo/pseudo_labels.csv" in pseudo_arts and "pseudo/overlays" in pseudo_arts
    overlays = [a.path for a in client.list_artifacts(r1.run_id, "pseudo/overlays/selected")]
    assert overlays and all(p.endswith(".png") for p in overlays)

    # lineage: every unlabelled scan has a row for round 1, made by round 0's ensemble
    lineage = catalog.load_pseudo_labels(root, 1)
    unlabelled = set(catalog.usable_scans(root, "unlabelled").scan_id)
    assert set(lineage.scan_id) == unlabelled
    assert set(lineage.teacher_run_id) == {r0.run_id}
    assert lineage.selected.sum() == summaries[2]["n_pseudo_selected"] >= 1
    assert all(json.loads(m) == ["viola_tiny-fold0", "nnunet_tiny-fold0"] for m in lineage.members)
    assert all((root / p).exists() for p in lineage.mask_path)
    assert lineage.rule.nunique() == 1 and "predicted Dice>=" in lineage.rule.iloc[0]
    assert (lineage.created_at != "").all() and set(lineage.decision[lineage.selected]) == {"selected"}
    assert all(d for d in lineage.decision[~lineage.selected])  # every rejection says why

    # the registered model: one version per round, champion on the better (or equal) test DSC
    versions = sorted(client.search_model_versions("name='viola-ich-tiny'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == [r0.run_id, r1.run_id]
    champion = client.get_model_version_by_alias("viola-ich-tiny", "champion")
    dsc = {str(v.version): float(v.tags["test_dsc"]) for v in versions}
    assert str(champion.version) == ("2" if dsc["2"] >= dsc["1"] else "1")
    # each member checkpoint is stored once, on its member run; the version holds the manifest
    stored = mlflow.artifacts.download_artifacts("models:/viola-ich-tiny@champion", tracking_uri=uri,
                                                 dst_path=str(tmp_path / "raw"))
    assert not list(Path(stored).rglob("*.pt"))
    ens = tracking.download_ensemble("models:/viola-ich-tiny@champion", uri, tmp_path / "champion")
    manifest = json.loads((ens / "ensemble.json").read_text())
    assert len(manifest["members"]) == 2
    for m in manifest["members"]:
        on_run = mlflow.artifacts.download_artifacts(run_id=m["run_id"], artifact_path="checkpoint/best.pt",
                                                     tracking_uri=uri, dst_path=str(tmp_path / m["name"]))
        assert (ens / m["checkpoint"]).read_bytes() == Path(on_run).read_bytes()
    assert len(load_ensemble(ens).members) == 2
    assert manifest["preprocess"]["target_spacing"] == [3.6, 3.6, 10.0]
    assert manifest["calibration"]["score"] == "mean_max_probability"
    assert all(v.tags["test_set_hash"] == r0.tags["viola.test_set_hash"] for v in versions)
    assert {v.tags["champion_decision"] for v in versions} <= {"promoted", "kept"}

    # nothing new since round 1's pseudo-labels: the next call skips, completed, with its reason
    again = self_training(profile="tiny", data_root=str(root), rounds=1, tracking_uri=uri)
    assert again[0]["skipped"].startswith("round 2 skipped: nothing new since round 1")
    assert len(_runs(client, "self-training-tiny")) == len(runs)


@pytest.mark.skipif(ui_check.find_chromium() is None, reason="no Chromium browser on the PATH (Debian: "
                    "apt-get install chromium)")
def test_mlflow_ui_shows_the_rounds(two_rounds, tmp_path):
    """What a person sees: ``mlflow ui`` over the store, driven in headless Chromium, lists the round
    runs with their test DSC and compares them side by side."""
    shot = tmp_path / "compare.png"
    runs = ui_check.check_rounds_in_ui(two_rounds[1], "self-training-tiny", shot)
    assert [(r.round, r.arm) for r in runs] == [(0, "self-training"), (1, "self-training"), (1, "control")]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == ui_check.VIEWPORT


def test_a_crashed_round_resumes_without_redoing_finished_members(tmp_path, monkeypatch):
    import tasks.training
    from flows.self_training import self_training

    (tmp_path / "mlruns").mkdir()
    root, uri = _phantoms(tmp_path / "data"), _uri(tmp_path)
    real_fit = tasks.training.fit
    calls: list[str] = []

    def crashing_fit(train, val, settings, out_dir, **kw):
        calls.append(Path(out_dir).name)
        if Path(out_dir).name == "nnunet_tiny-fold0" and calls.count("nnunet_tiny-fold0") <= 2:
            raise RuntimeError("simulated crash in the second member")
        return real_fit(train, val, settings, out_dir, **kw)

    monkeypatch.setattr(tasks.training, "fit", crashing_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):  # no retries: the crash ends the call
        self_training(profile="tiny", data_root=str(root), rounds=1, tracking_uri=uri,
                      overrides={"compute": {"retries": 0}})
    state = json.loads((root / "viola_work" / "rounds" / "round_000" / "state.json").read_text())
    assert state["status"] == "running"
    done_viola = root / "viola_work" / "rounds" / "round_000" / "members" / "viola_tiny-fold0" / "result.json"
    stamp = done_viola.stat().st_mtime_ns

    # the same command (the profile's retries): the member fails once more, is retried, and the round ends
    summary = self_training(profile="tiny", data_root=str(root), rounds=1, tracking_uri=uri)[0]
    assert summary["round"] == 0 and summary["run_id"] == state["run_id"]
    assert calls.count("nnunet_tiny-fold0") == 3
    assert done_viola.stat().st_mtime_ns == stamp  # the finished member was reused, not retrained
    runs = _runs(store_client(uri), "self-training-tiny")
    assert (runs.kind == "round").sum() == 1 and (runs.kind == "member").sum() == 2
    assert set(runs.status) == {"FINISHED"}


def test_unlabelled_dicom_series_become_pseudo_labels(tmp_path):
    """Unlabelled scans arriving as DICOM series folders go through a whole round like NIfTI files:
    cataloged, preprocessed, labelled by the teacher on the series' own grid, learnt from."""
    import nibabel as nib
    import numpy as np

    from data_catalog.scans import read_image
    from flows.self_training import self_training
    from tests.test_dicom import write_series

    root = _phantoms(tmp_path / "data")
    for f in sorted((root / "unlabelled").glob("*.nii.gz")):
        img = nib.load(f)
        write_series(root / "unlabelled" / f.name.removesuffix(".nii.gz"), np.asarray(img.dataobj, np.float32),
                     img.affine)
        f.unlink()
    (tmp_path / "mlruns").mkdir()
    summaries = self_training(profile="tiny", data_root=str(root), rounds=2, tracking_uri=_uri(tmp_path))
    assert [s["round"] for s in summaries] == [0, 1]

    scans = catalog.load_scans(root)
    series = scans[scans.role == "unlabelled"]
    assert len(series) == 3 and set(series.status) == {"ok"}
    assert all((root / p).is_dir() for p in series.image_path)
    pseudo = catalog.load_pseudo_labels(root, 1)
    assert sorted(pseudo.scan_id) == sorted(series.scan_id) and pseudo.selected.any()
    for r in pseudo.itertuples():  # each mask lies on its series' grid
        _, info = read_image(root / "unlabelled" / r.scan_id)
        mask = nib.load(root / r.mask_path)  # an absolute path stays itself
        assert mask.shape == info.shape and np.allclose(mask.affine, info.affine, atol=1e-4)
