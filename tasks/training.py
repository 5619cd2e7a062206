"""Training task: one ensemble member (architecture x fold), tracked as an MLflow child run."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from tasks import tracking
from viola_models.training import TrainCallbacks, TrainSettings, fit

log = logging.getLogger(__name__)


@task(name="train-member")
def train_member(
    name: str,
    settings: TrainSettings,
    train_items: list[str],
    val_items: list[str],
    out_dir: Path,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    round_: int,
    fold: int,
    init_weights: str | None = None,
    device: str = "cpu",
) -> dict:
    """Train (or resume, or reuse) one member in ``out_dir`` and mirror it in an MLflow child run.

    The child run's id is kept in ``out_dir/mlflow_run_id`` so that a rerun after a crash continues
    the same run instead of opening a second one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = tracking.client_for(tracking_uri)
    id_file = out_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not tracking.run_exists(client, run_id):
        run_id = tracking.create_run(client, experiment_id, name, parent_run_id=parent_run_id,
                                     tags={"viola.kind": "member", "viola.round": round_, "viola.fold": fold,
                                           "viola.architecture": settings.model})
        id_file.write_text(run_id)
    tracking.log_params(client, run_id, {"member": name, "round": round_, "fold": fold,
                                         "n_train": len(train_items), "n_val": len(val_items),
                                         "init_weights": init_weights or "", "train": settings.model_dump()})

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(client, run_id, metrics, step)

    def on_validation(step: int, dice: float, best: bool) -> None:
        tracking.log_metrics(client, run_id, {"val/dice": dice}, step)

    result = fit([Path(p) for p in train_items], [Path(p) for p in val_items], settings, out_dir,
                 init_weights=Path(init_weights) if init_weights else None,
                 callbacks=TrainCallbacks(on_log=on_log, on_validation=on_validation), device=device,
                 meta={"member": name, "fold": fold, "round": round_})
    # a rerun of a finished member logs only what a crash may have kept from being logged
    if "val/best_dice" not in client.get_run(run_id).data.metrics:
        tracking.log_metrics(client, run_id, {"val/best_dice": result.best_dice, "train/seconds": result.seconds,
                                              "val/best_step": result.best_step}, result.steps)
    if not client.list_artifacts(run_id, "checkpoint"):
        client.log_artifact(run_id, str(result.best_checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return {"name": name, "fold": fold, "architecture": settings.model, "checkpoint": str(result.best_checkpoint),
            "val_dice": result.best_dice, "best_step": result.best_step, "seconds": result.seconds,
            "run_id": run_id}
