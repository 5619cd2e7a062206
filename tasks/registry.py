"""Registry task: each round's ensemble becomes a version of one registered model; the alias
``champion`` moves to it only when it scores at least as well as the champion on the same test set.

Every version carries ``test_dsc`` and ``test_set_hash`` (the content hash of the test scans it was
scored on). When the champion was scored on another test set (scans added, relabelled, removed),
it is scored again on the current one before the comparison, and its tags are updated. The
decision and its reason are tags of the candidate version (``champion_decision``,
``champion_reason``).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from prefect import task

from tasks import tracking
from tasks.context import RoundContext
from viola_models.evaluation.scoring import evaluate_scans
from viola_models.inference.ensemble import load_ensemble, prepare_cpu_networks, read_cpu_record

log = logging.getLogger(__name__)


def _dsc(tags: dict) -> float:
    try:
        return float(tags.get("test_dsc", "nan"))
    except ValueError:
        return math.nan


def _rescore(ctx: RoundContext, client, champion, scans: dict, test_set_hash: str) -> float:
    """Score the champion's ensemble on the current test set and record it on its version."""
    model_name = ctx.settings.tracking.registered_model
    folder = tracking.download_ensemble(f"models:/{model_name}/{champion.version}", client.tracking_uri)
    # the champion may preprocess otherwise than this round: its cases are looked up by its own settings
    plain = {k: {f: v for f, v in scan.items() if f != "cache"} for k, scan in scans.items()}
    ensemble = load_ensemble(folder, device=ctx.device, inference=ctx.inference)
    _, means = evaluate_scans(ensemble, plain, cache_dir=ctx.cache, **ctx.evaluate)
    dsc = float(means.get("dsc", math.nan))
    for key, value in {"test_dsc": f"{dsc:.6f}", "test_set_hash": test_set_hash,
                       "rescored_at": datetime.now(UTC).isoformat(timespec="seconds")}.items():
        client.set_model_version_tag(model_name, champion.version, key, value)
    log.info("champion version %s re-scored on test set %s: DSC %.4f", champion.version, test_set_hash, dsc)
    return dsc


def _prepare_cpu(ctx: RoundContext, client, ensemble_dir: Path, labelled: dict[str, str]) -> dict:
    """The members' CPU networks made once, now, into the cache ``viola predict`` and the pyfunc
    model read (the profile's [inference] as given: by default the user's cache, not the round's
    work folder); int8 ones too where NNCF is installed, calibrated on and checked against fp32 on
    the round's labelled scans. Tracked as ``model/*`` metrics."""
    t0 = time.perf_counter()
    record = prepare_cpu_networks(Path(ensemble_dir), ctx.settings.inference,
                                  [Path(p) for _, p in sorted(labelled.items())])
    int8 = record["int8"]
    metrics = {"model/cpu_networks_ready": record["ready"], "model/cpu_prepare_seconds": time.perf_counter() - t0,
               "model/int8_passed": float(bool(int8.get("passed")))}
    metrics |= {f"model/int8_{k}": int8[k] for k in ("min_dice", "max_volume_error", "checked", "quantize_seconds")
                if isinstance(int8.get(k), (int, float))}
    tracking.log_metrics(client, ctx.run_id, metrics, ctx.round)
    return record


@task(name="register-ensemble")
def register_ensemble(ctx: RoundContext, ensemble_dir: Path, test_dsc: float | None, test_set_hash: str,
                      test_scans: dict, labelled: dict[str, str] | None = None) -> dict:
    """Log the ensemble folder as the round run's ``ensemble`` artifact (its manifest and
    calibration: each member's checkpoint is stored once, on the member's run), register it as a
    version of ``[tracking] registered_model``, and decide the champion; the champion is scored
    again on ``test_scans`` when its score is of another test set. With the OpenVINO CPU backend the
    members' CPU networks are converted into their cache first (int8 ones too, calibrated on the
    ``labelled`` scans' preprocessed cases, and checked: ``viola_models.inference.ensemble.
    prepare_cpu_networks``), so that ``viola predict --model`` and the pyfunc model on this machine
    start without converting; the check's outcome travels in the folder and the version's tags."""
    model_name, run_id, round_ = ctx.settings.tracking.registered_model, ctx.run_id, ctx.round
    client = tracking.client_for(ctx.tracking_uri)
    if not client.list_artifacts(run_id, "ensemble"):
        cpu = _prepare_cpu(ctx, client, Path(ensemble_dir), labelled or {})
        tracking.log_ensemble(client, run_id, Path(ensemble_dir))
    else:  # a rerun: the folder was logged with its record
        cpu = read_cpu_record(Path(ensemble_dir))
    source = f"{client.get_run(run_id).info.artifact_uri}/ensemble"
    tracking.ensure_registered_model(client, model_name, "viola-ICH self-training ensembles, one per round")
    existing = [v for v in client.search_model_versions(f"name='{model_name}'") if v.run_id == run_id]
    dsc = math.nan if test_dsc is None else float(test_dsc)
    int8 = cpu.get("int8", {})
    version = existing[0] if existing else client.create_model_version(
        model_name, source=source, run_id=run_id,
        tags={"round": str(round_), "test_dsc": f"{dsc:.6f}", "test_set_hash": test_set_hash,
              "cpu_int8": "passed" if int8.get("passed") else "not used",
              "cpu_int8_reason": str(int8.get("reason", "not prepared"))[:500]})
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version.version):
        promote, reason = True, "already the champion"
    elif champion is None:
        promote, reason = True, "first version"
    elif math.isnan(dsc):
        promote, reason = False, "no test score"
    else:
        champ_dsc = _dsc(champion.tags)
        rescored = champion.tags.get("test_set_hash") != test_set_hash
        if rescored:
            champ_dsc = _rescore(ctx, client, champion, test_scans, test_set_hash)
        where = f"on test set {test_set_hash}" + (" (champion re-scored)" if rescored else "")
        promote = math.isnan(champ_dsc) or dsc >= champ_dsc
        reason = (f"DSC {dsc:.4f} {'>=' if promote else '<'} champion v{champion.version}'s {champ_dsc:.4f} "
                  f"{where}")
    if promote:
        client.set_registered_model_alias(model_name, "champion", version.version)
    for key, value in {"champion_decision": "promoted" if promote else "kept", "champion_reason": reason}.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    log.info("%s version %s (round %d, test DSC %.4f): %s (%s)", model_name, version.version, round_, dsc,
             "champion" if promote else "not the champion", reason)
    tracking.set_tags(client, run_id, {"viola.model_version": version.version, "viola.champion": promote})
    return {"version": str(version.version), "champion": promote, "reason": reason,
            "model_uri": f"models:/{model_name}/{version.version}"}
