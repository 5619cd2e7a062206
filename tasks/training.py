"""Training task: one ensemble member (architecture x fold), tracked as an MLflow child run.

A member may run in another process or on another machine (``tasks.compute``): it receives paths
and settings, never arrays or models, and resolves its device where it runs.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from prefect import task

from data_catalog.scans import atomic_write
from tasks import tracking
from tasks.compute import worker_device
from tasks.context import RoundContext
from tasks.progress import progress
from viola_models.training import TrainCallbacks, fit, fit_digest

log = logging.getLogger(__name__)

__all__ = ["WorkerCannotSeeData", "fold_groups", "plan_members", "train_member", "worth_retrying"]


class WorkerCannotSeeData(FileNotFoundError):
    """A worker that cannot read a member's inputs: the data root is not shared with it."""


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition of a member: everything but inputs the worker cannot see (running
    it again on the same worker changes nothing)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result itself is gone: a crash, worth another try
        return True
    return not isinstance(error, WorkerCannotSeeData)


def member_datasets(scans: dict[str, dict], labelled: dict[str, str], folds: dict, fold: int,
                    pseudo: list[dict]) -> dict[str, list[dict]]:
    """The scan sets one fold's members learn from, as rows of scan id and content hashes:
    ``train`` (labelled scans of the other folds), ``pseudo`` (with their loss weights and where the
    labels come from) and ``validation`` (the fold's own labelled scans)."""
    def row(s: str) -> dict:
        return {"scan_id": s, "image_hash": scans[s].get("image_hash", ""),
                "label_hash": scans[s].get("label_hash", ""), "label_source": "annotation", "weight": 1.0}

    ids = sorted(s for s in labelled if s in folds and s in scans)
    return {"train": [row(s) for s in ids if folds[s] != fold],
            "pseudo": [{k: p.get(k, "") for k in ("scan_id", "image_hash", "label_hash", "label_source")}
                       | {"weight": float(p.get("weight", 1.0))} for p in pseudo],
            "validation": [row(s) for s in ids if folds[s] == fold]}


def plan_members(ctx: RoundContext, labelled: dict[str, str], folds: dict, pseudo: list[dict],
                 scans: dict[str, dict] | None = None) -> list[dict]:
    """Every member of the round (architecture x fold of the profile) as the job :func:`train_member`
    runs: spec, train settings, folder and final labelled-only settings. The fold's items come from
    ``data_catalog.catalog.fold_items`` (labelled scans of the other folds + ``pseudo``); students
    start from the members of ``ctx.plan.init_ensemble_dir``. ``scans`` ({scan_id: {"image_hash",
    "label_hash"}} of the labelled scans) adds each member's scan sets for its run's dataset inputs
    (``spec["datasets"]``)."""
    from data_catalog.catalog import fold_items

    settings, round_, init_ensemble_dir = ctx.settings, ctx.round, ctx.plan.init_ensemble_dir
    fold_ids = settings.members.folds if settings.members.folds is not None else range(settings.data.n_folds)
    jobs = []
    for fold in fold_ids:
        items = fold_items(labelled, folds, fold, pseudo)
        for arch in settings.members.architectures:
            name = f"{arch}-fold{fold}"
            init = None
            if round_ == 0 and settings.members.init is not None:
                from viola_models.inference.ensemble import initial_member

                init = str(initial_member(settings.members.init, arch, fold))
            if round_ > 0 and settings.student.init == "teacher":
                teacher = Path(init_ensemble_dir) / name / "best.pt"
                init = str(teacher) if teacher.exists() else None
                if init is None:
                    log.warning("%s has no counterpart in %s: trained from scratch", name, init_ensemble_dir)
            n_own = len(items["labelled"])
            spec = {"name": name, "fold": fold, "train": items["train"], "val": items["val"],
                    "labelled": items["labelled"], "init": init,
                    "weights": None if all(w == 1.0 for w in items["weights"]) else items["weights"],
                    "pseudo": [i >= n_own for i in range(len(items["train"]))] if len(items["train"]) > n_own
                    else None}
            if scans is not None:
                spec["datasets"] = member_datasets(scans, labelled, folds, fold, pseudo)
                spec["data_root"] = str(Path(settings.data.root).resolve())
            jobs.append({"spec": spec, "settings": settings.train_settings(round_, arch, fold),
                         "out_dir": ctx.dir / "members" / name,
                         "final_settings": settings.labelled_only_settings(round_, arch, fold)})
    return jobs


def fold_groups(jobs: list[dict], members: list[dict]) -> list[tuple[str, list[str], list[str]]]:
    """(fold name, its members' checkpoints, its validation items) per fold, in the order of ``jobs``:
    what the calibration needs to score each fold's members on their own out-of-fold scans."""
    folds = dict.fromkeys(job["spec"]["fold"] for job in jobs)
    return [(f"fold{fold}", [m["checkpoint"] for m in members if m["fold"] == fold],
             next(job["spec"]["val"] for job in jobs if job["spec"]["fold"] == fold)) for fold in folds]


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


def _open_member_run(ctx: RoundContext, client, job: dict, digest: str, init: Path | None) -> str:
    """The member's child run of the round's run (:func:`_member_run`), its parameters and its
    dataset inputs logged."""
    spec, settings, final_settings = job["spec"], job["settings"], job.get("final_settings")
    run_id = _member_run(client, ctx.experiment_id, ctx.run_id, Path(job["out_dir"]), spec["name"],
                         {"viola.kind": "member", "viola.round": ctx.round, "viola.fold": spec["fold"],
                          "viola.architecture": settings.model}, digest)
    n_train = len(spec["train"])
    tracking.log_params(client, run_id, {"member": spec["name"], "round": ctx.round, "fold": spec["fold"],
                                         "n_train": n_train, "n_pseudo": n_train - len(spec.get("labelled",
                                                                                            spec["train"])),
                                         "n_val": len(spec["val"]), "init_weights": str(init or ""),
                                         "train": settings.model_dump(),
                                         "labelled_only_steps": final_settings.max_steps if final_settings else 0})
    if spec.get("datasets"):
        tracking.log_datasets(client, run_id, spec["datasets"], source=spec.get("data_root", ""),
                              name_prefix=f"fold{spec['fold']}/")
    return run_id


class _MemberLog:
    """``fit``'s callbacks of a member: metrics to its run, steps and loss to its progress bar."""

    def __init__(self, client, run_id: str, bar) -> None:
        self.client, self.run_id, self.bar = client, run_id, bar

    def callbacks(self, offset: int) -> TrainCallbacks:
        """Steps counted from ``offset`` (the labelled-only fine-tune continues the first fit's steps)."""
        def on_log(step: int, metrics: dict) -> None:
            tracking.log_metrics(self.client, self.run_id, metrics, step + offset)
            self.bar.update(step + offset, f"loss {metrics['train/loss']:.4f}")

        def on_validation(step: int, dice: float, best: bool) -> None:
            tracking.log_metrics(self.client, self.run_id, {"val/dice": dice}, step + offset)

        return TrainCallbacks(on_log=on_log, on_validation=on_validation)


def _close_member_run(client, run_id: str, result, seconds: float) -> None:
    """The member's final metrics, checkpoint and selection on its run, then FINISHED; a rerun of a
    finished member logs only what a crash may have kept from being logged."""
    if "val/best_dice" not in client.get_run(run_id).data.metrics:
        tracking.log_metrics(client, run_id, {"val/best_dice": result.best_dice, "train/seconds": seconds,
                                              "val/best_step": result.best_step}, result.steps)
    tracking.set_tags(client, run_id, {"viola.checkpoint_selection": result.selection})
    if not client.list_artifacts(run_id, "checkpoint"):
        client.log_artifact(run_id, str(result.best_checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")


@task(name="train-member")
def train_member(ctx: RoundContext, job: dict, threads: int | None = None) -> dict:
    """Train (or resume, or reuse) one member in ``job["out_dir"]`` and mirror it in an MLflow child
    run of the round's run.

    ``job`` (one of :func:`plan_members`): ``spec`` (name, fold, train (cached cases), weights (their
    loss weights), val, labelled (the training cases that are not pseudo-labels), init (a member
    checkpoint to fine-tune, or None)), ``settings`` (its ``TrainSettings``), ``out_dir`` and
    ``final_settings`` (a last fine-tune on ``labelled`` alone, in ``out_dir/labelled_only``, or
    None). The device (``[device]``; ``auto``: the GPU Ray gave this worker, if any) is resolved
    here; ``threads``: torch's intra-op threads in this process.
    """
    spec, settings, out_dir, final_settings = job["spec"], job["settings"], Path(job["out_dir"]), job.get(
        "final_settings")
    train, val = [Path(p) for p in spec["train"]], [Path(p) for p in spec["val"]]
    weights, pseudo = spec.get("weights"), spec.get("pseudo")
    init = Path(spec["init"]) if spec.get("init") else None
    for path in [*train, *val, *([init] if init else [])]:
        if not path.exists():
            raise WorkerCannotSeeData(f"{spec['name']} on {socket.gethostname()}: cannot read {path}; every worker "
                                      "must see the data root and its work folder by the same path (a shared "
                                      "filesystem)")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = worker_device(ctx.settings.device, threads)
    digest = fit_digest(train, val, settings, init, weights, pseudo)
    if final_settings is not None:
        digest += f"+{final_settings.model_dump_json()}"
    client = tracking.client_for(ctx.tracking_uri)
    run_id = _open_member_run(ctx, client, job, digest, init)
    total_steps = settings.max_steps + (final_settings.max_steps if final_settings else 0)
    meta = {"member": spec["name"], "fold": spec["fold"], "round": ctx.round}
    with progress(f"train {spec['name']}", total_steps, unit="steps") as bar:  # fit logs its own lines
        log_to = _MemberLog(client, run_id, bar)
        result = fit(train, val, settings, out_dir, init_weights=init, callbacks=log_to.callbacks(0), device=device,
                     meta=meta, item_weights=weights, pseudo=pseudo)
        seconds = result.seconds
        if final_settings is not None:
            labelled = [Path(p) for p in spec["labelled"]]
            result = fit(labelled, val, final_settings, out_dir / "labelled_only",
                         init_weights=result.best_checkpoint, callbacks=log_to.callbacks(settings.max_steps),
                         device=device, meta=meta)
            seconds += result.seconds
    _close_member_run(client, run_id, result, seconds)
    return {"name": spec["name"], "fold": spec["fold"], "architecture": settings.model,
            "checkpoint": str(result.best_checkpoint), "val_dice": result.best_dice, "best_step": result.best_step,
            "seconds": seconds, "run_id": run_id, "n_val": len(val), "selection": result.selection}
