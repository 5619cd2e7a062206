"""Registry task: each round's ensemble becomes a version of one registered model; the alias
``champion`` moves to it only if its test DSC is not worse than the champion's."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import mlflow
from prefect import task

from tasks import tracking

log = logging.getLogger(__name__)


@task(name="register-ensemble")
def register_ensemble(ensemble_dir: Path, model_name: str, tracking_uri: str, run_id: str, round_: int,
                      test_dsc: float | None) -> dict:
    """Log the ensemble folder as the round run's ``ensemble`` artifact and register it."""
    client = tracking.client_for(tracking_uri)
    if not client.list_artifacts(run_id, "ensemble"):
        client.log_artifacts(run_id, str(ensemble_dir), "ensemble")
    source = f"{client.get_run(run_id).info.artifact_uri}/ensemble"
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name, description="viola-ICH self-training ensembles, one per round")
    existing = [v for v in client.search_model_versions(f"name='{model_name}'") if v.run_id == run_id]
    dsc = float("nan") if test_dsc is None else float(test_dsc)
    version = existing[0] if existing else client.create_model_version(
        model_name, source=source, run_id=run_id, tags={"round": str(round_), "test_dsc": f"{dsc:.6f}"})
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
        champ_dsc = float(champion.tags.get("test_dsc", "nan"))
    except mlflow.exceptions.MlflowException:
        champion, champ_dsc = None, float("nan")
    promote = champion is None or math.isnan(champ_dsc) or (not math.isnan(dsc) and dsc >= champ_dsc)
    if promote:
        client.set_registered_model_alias(model_name, "champion", version.version)
        log.info("%s version %s (round %d, test DSC %.4f) is the champion", model_name, version.version, round_, dsc)
    else:
        log.info("%s version %s (test DSC %.4f) stays behind champion version %s (%.4f)", model_name,
                 version.version, dsc, champion.version, champ_dsc)
    tracking.set_tags(client, run_id, {"viola.model_version": version.version, "viola.champion": promote})
    return {"version": str(version.version), "champion": promote,
            "model_uri": f"models:/{model_name}/{version.version}"}
