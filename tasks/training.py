"""Training task: one ensemble member (architecture x fold), tracked as an MLflow child run."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from data_catalog.scans import atomic_write
from tasks import tracking
from viola_models.training import TrainCallbacks, TrainSettings, fit, fit_digest

log = logging.getLogger(__name__)


def _member_run(client, experiment_id: str, parent_run_id: str, out_dir: Path, name: str, tags: dict,
                digest: str) -> str:
    """The member's MLflow child run: the one a crashed attempt left when it trained on the same
    inputs (same digest), else a new one; a run for other inputs is ended as KILLED and marked
    superseded, so the round's children are exactly its members."""
    id_file = out_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if tracking.run_exists(client, run_id):
        if client.get_run(run_id).data.tags.get("viola.fit_digest") == digest:
            return run_id
        tracking.set_tags(client, run_id, {"viola.superseded": "inputs changed: trained again in a new run"})
        client.set_terminated(run_id, "KILLED")
        log.info("%s: inputs changed since MLflow run %s; training again", name, run_id)
    run_id = tracking.create_run(client, experiment_id, name, parent_run_id=parent_run_id,
                                 tags={**tags, "viola.fit_digest": digest})
    atomic_write(id_file, lambda tmp: tmp.write_text(run_id))
    return run_id


@task(name="train-member")
def train_member(
    spec: dict,
    settings: TrainSettings,
    out_dir: Path,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    round_: int,
    final_settings: TrainSettings | None = None,
    device: str = "cpu",
) -> dict:
    """Train (or resume, or reuse) one member in ``out_dir`` and mirror it in an MLflow child run.

    ``spec``: name, fold, train (cached cases), weights (their loss weights), val, labelled (the
    training cases that are not pseudo-labels), init (a member checkpoint to fine-tune, or None).
    ``final_settings``: a last fine-tune on ``labelled`` alone, in ``out_dir/labelled_only``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = [Path(p) for p in spec["train"]], [Path(p) for p in spec["val"]]
    weights = spec.get("weights")
    init = Path(spec["init"]) if spec.get("init") else None
    digest = fit_digest(train, val, settings, init, weights)
    if final_settings is not None:
        digest += f"+{final_settings.model_dump_json()}"
    client = tracking.client_for(tracking_uri)
    run_id = _member_run(client, experiment_id, parent_run_id, out_dir, spec["name"],
                         {"viola.kind": "member", "viola.round": round_, "viola.fold": spec["fold"],
                          "viola.architecture": settings.model}, digest)
    n_pseudo = len(train) - len(spec.get("labelled", train))
    tracking.log_params(client, run_id, {"member": spec["name"], "round": round_, "fold": spec["fold"],
                                         "n_train": len(train), "n_pseudo": n_pseudo, "n_val": len(val),
                                         "init_weights": str(init or ""), "train": settings.model_dump(),
                                         "labelled_only_steps": final_settings.max_steps if final_settings else 0})

    def callbacks(offset: int) -> TrainCallbacks:
        return TrainCallbacks(
            on_log=lambda step, metrics: tracking.log_metrics(client, run_id, metrics, step + offset),
            on_validation=lambda step, dice, best: tracking.log_metrics(client, run_id, {"val/dice": dice},
                                                                        step + offset))

    meta = {"member": spec["name"], "fold": spec["fold"], "round": round_}
    result = fit(train, val, settings, out_dir, init_weights=init, callbacks=callbacks(0), device=device, meta=meta,
                 item_weights=weights)
    seconds = result.seconds
    if final_settings is not None:
        labelled = [Path(p) for p in spec["labelled"]]
        result = fit(labelled, val, final_settings, out_dir / "labelled_only", init_weights=result.best_checkpoint,
                     callbacks=callbacks(settings.max_steps), device=device, meta=meta)
        seconds += result.seconds
    # a rerun of a finished member logs only what a crash may have kept from being logged
    if "val/best_dice" not in client.get_run(run_id).data.metrics:
        tracking.log_metrics(client, run_id, {"val/best_dice": result.best_dice, "train/seconds": seconds,
                                              "val/best_step": result.best_step}, result.steps)
    if not client.list_artifacts(run_id, "checkpoint"):
        client.log_artifact(run_id, str(result.best_checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return {"name": spec["name"], "fold": spec["fold"], "architecture": settings.model,
            "checkpoint": str(result.best_checkpoint), "val_dice": result.best_dice, "best_step": result.best_step,
            "seconds": seconds, "run_id": run_id}
