"""Training task: one ensemble member (architecture x fold), tracked as an MLflow child run.

A member may run in another process or on another machine (``tasks.compute``): it receives paths
and settings, never arrays or models, and resolves its device where it runs.
"""

from __future__ import annotations

import logging
import socket
from contextlib import ExitStack
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
                from viola_models.ensemble import initial_member

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


def _member_run(client, parent: tuple[str, str], out_dir: Path, name: str, tags: dict, digest: str) -> str:
    """The member's MLflow child run of ``parent`` (experiment id, the round's run id): the one a
    crashed attempt left when it trained on the same inputs (same digest), else a new one; a run for
    other inputs is ended as KILLED and marked superseded, so the round's children are exactly its
    members."""
    experiment_id, parent_run_id = parent
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
    round_ = ctx.round
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
    run_id = _member_run(client, (ctx.experiment_id, ctx.run_id), out_dir, spec["name"],
                         {"viola.kind": "member", "viola.round": round_, "viola.fold": spec["fold"],
                          "viola.architecture": settings.model}, digest)
    n_pseudo = len(train) - len(spec.get("labelled", train))
    tracking.log_params(client, run_id, {"member": spec["name"], "round": round_, "fold": spec["fold"],
                                         "n_train": len(train), "n_pseudo": n_pseudo, "n_val": len(val),
                                         "init_weights": str(init or ""), "train": settings.model_dump(),
                                         "labelled_only_steps": final_settings.max_steps if final_settings else 0})
    if spec.get("datasets"):
        tracking.log_datasets(client, run_id, spec["datasets"], source=spec.get("data_root", ""),
                              name_prefix=f"fold{spec['fold']}/")

    stack = ExitStack()
    total_steps = settings.max_steps + (final_settings.max_steps if final_settings else 0)
    bar = stack.enter_context(progress(f"train {spec['name']}", total_steps, unit="steps"))  # fit logs its own lines

    def callbacks(offset: int) -> TrainCallbacks:
        def on_log(step: int, metrics: dict) -> None:
            tracking.log_metrics(client, run_id, metrics, step + offset)
            bar.update(step + offset, f"loss {metrics['train/loss']:.4f}")

        return TrainCallbacks(
            on_log=on_log,
            on_validation=lambda step, dice, best: tracking.log_metrics(client, run_id, {"val/dice": dice},
                                                                        step + offset))

    meta = {"member": spec["name"], "fold": spec["fold"], "round": round_}
    with stack:
        result = fit(train, val, settings, out_dir, init_weights=init, callbacks=callbacks(0), device=device,
                     meta=meta, item_weights=weights, pseudo=pseudo)
        seconds = result.seconds
        if final_settings is not None:
            labelled = [Path(p) for p in spec["labelled"]]
            result = fit(labelled, val, final_settings, out_dir / "labelled_only",
                         init_weights=result.best_checkpoint, callbacks=callbacks(settings.max_steps), device=device,
                         meta=meta)
            seconds += result.seconds
    # a rerun of a finished member logs only what a crash may have kept from being logged
    if "val/best_dice" not in client.get_run(run_id).data.metrics:
        tracking.log_metrics(client, run_id, {"val/best_dice": result.best_dice, "train/seconds": seconds,
                                              "val/best_step": result.best_step}, result.steps)
    tracking.set_tags(client, run_id, {"viola.checkpoint_selection": result.selection})
    if not client.list_artifacts(run_id, "checkpoint"):
        client.log_artifact(run_id, str(result.best_checkpoint), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return {"name": spec["name"], "fold": spec["fold"], "architecture": settings.model,
            "checkpoint": str(result.best_checkpoint), "val_dice": result.best_dice, "best_step": result.best_step,
            "seconds": seconds, "run_id": run_id, "n_val": len(val), "selection": result.selection}
