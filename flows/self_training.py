"""The self-training flow: one call runs the next round (round 0 if none exists).

A round: ingest -> cached preprocessing -> (round >= 1: pseudo-labels by the previous round's
ensemble, selected by the profile's rule) -> every member (architecture x fold) trained or
fine-tuned -> the ensemble evaluated on the test scans -> registered in MLflow. A round's state
lives in ``DATA_ROOT/viola_work/rounds/round_NNN/state.json``: a rerun after a crash resumes the
unfinished round (finished members, pseudo-labels and preprocessing are reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.profiles import PipelineSettings, load_profile
from tasks import tracking
from tasks.data import prepare_data, preprocess_catalog, preprocess_pairs
from tasks.evaluation import evaluate_round
from tasks.pseudo import pseudo_label
from tasks.registry import register_ensemble
from tasks.training import train_member
from viola_models.segment import write_manifest

__all__ = ["run_round", "self_training"]

log = logging.getLogger(__name__)


def _round_dir(settings: PipelineSettings, r: int) -> Path:
    return settings.work_dir / "rounds" / f"round_{r:03d}"


def _read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".state.json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _next_round(settings: PipelineSettings) -> tuple[int, dict]:
    """The first round that is not finished, and its state (empty if it never started)."""
    r = 0
    while (state := _read_state(_round_dir(settings, r) / "state.json")).get("status") == "finished":
        r += 1
    return r, state


def _device(settings: PipelineSettings) -> str:
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _summary_table(r: int, members: list[dict], n_sel: int, n_cand: int, test: dict, seconds: float) -> str:
    lines = [f"round {r} summary ({seconds / 60:.1f} min)", f"  {'member':<22}{'val Dice':>10}{'best step':>11}"]
    lines += [f"  {m['name']:<22}{m['val_dice']:>10.4f}{m['best_step']:>11d}" for m in members]
    if n_cand:
        lines.append(f"  pseudo-labels selected: {n_sel} of {n_cand}")
    if test:
        lines.append("  test: " + ", ".join(f"{k.split('/')[1].upper()} {v:.4f}" for k, v in test.items()
                                            if k in ("test/dsc", "test/hd", "test/nsd", "test/rvd")))
    return "\n".join(lines)


def run_round(settings: PipelineSettings, tracking_uri: str) -> dict:
    """Compose one round from the tasks; returns its summary (also logged to MLflow)."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    device = _device(settings)
    root, cache = settings.data.root, settings.work_dir / "cache"
    synth = settings.data.synth.model_dump() if settings.data.synth else None
    data = prepare_data(root, settings.data.n_folds, settings.data.fold_seed, settings.data.binarize_labels, synth)
    r, state = _next_round(settings)
    rdir = _round_dir(settings, r)
    prev = _read_state(_round_dir(settings, r - 1) / "state.json") if r > 0 else {}
    client = tracking.client_for(tracking_uri)
    exp_id = tracking.experiment_id(client, settings.tracking.experiment)
    run_id = state.get("run_id")
    resumed = tracking.run_exists(client, run_id)
    if not resumed:
        run_id = tracking.create_run(client, exp_id, f"round {r}", tags={
            "viola.kind": "round", "viola.round": r, "viola.profile": settings.name, "viola.data_root": str(root),
            "viola.previous_round_run_id": prev.get("run_id", ""), "viola.catalog_hash": data["catalog_hash"],
            "viola.code_version": tracking.code_version(), "viola.prefect_flow_run_id": flow_run.get_id() or "",
            "viola.device": device})
        tracking.log_params(client, run_id, settings.model_dump(mode="json"))
    else:
        tracking.set_tags(client, run_id, {"viola.resumed_by_flow_run_id": flow_run.get_id() or ""})
    state = {"round": r, "status": "running", "run_id": run_id, "started": state.get("started") or
             datetime.now(UTC).isoformat(timespec="seconds"), "catalog_hash": data["catalog_hash"]}
    _write_state(rdir / "state.json", state)
    logger.info("round %d %s (MLflow run %s, device %s)", r, "resumed" if resumed else "started", run_id, device)

    cases = preprocess_catalog(root, cache, settings.preprocess)
    by_role = {role: {s: c for s, c in cases.items() if c["role"] == role} for role in ("labelled", "unlabelled",
                                                                                         "test")}
    selected: list[dict] = []
    n_candidates = 0
    if r > 0 and by_role["unlabelled"]:
        selected = pseudo_label(r, _round_dir(settings, r - 1) / "ensemble", prev["run_id"], by_role["unlabelled"],
                                rdir / "pseudo", root, cache, settings.pseudo.rule, tracking_uri, run_id,
                                overlap=settings.pseudo.overlap, tta=settings.pseudo.tta, device=device,
                                n_overlays=settings.pseudo.overlays)
        n_candidates = len(by_role["unlabelled"])
    pseudo_paths = preprocess_pairs(selected, cache, settings.preprocess) if selected else []
    pseudo_hash = hashlib.sha256("".join(sorted(f"{s['scan_id']}:{s['label_hash']}\n" for s in selected)).encode())
    tracking.set_tags(client, run_id, {"viola.pseudo_label_set_hash": pseudo_hash.hexdigest()[:16],
                                       "viola.n_pseudo_labels": len(selected)})

    folds = data["folds"]
    fold_ids = settings.members.folds if settings.members.folds is not None else range(settings.data.n_folds)
    members = []
    for fold in fold_ids:
        val = [by_role["labelled"][s]["cache"] for s, f in sorted(folds.items()) if f == fold and s in by_role[
            "labelled"]]
        train = [by_role["labelled"][s]["cache"] for s, f in sorted(folds.items()) if f != fold and s in by_role[
            "labelled"]] + pseudo_paths  # pseudo-labels never enter validation
        for arch in settings.members.architectures:
            name = f"{arch}-fold{fold}"
            init = None
            if r > 0:  # fine-tune the same member of the previous round, if it exists
                teacher = _round_dir(settings, r - 1) / "members" / name / "best.pt"
                init = str(teacher) if teacher.exists() else None
                if init is None:
                    logger.warning("%s has no round-%d counterpart: trained from scratch", name, r - 1)
            members.append(train_member(name, settings.train_settings(r, arch, fold), train, val,
                                        rdir / "members" / name, tracking_uri, exp_id, run_id, r, fold,
                                        init_weights=init, device=device))

    ens_dir = rdir / "ensemble"
    for m in members:
        _link_or_copy(Path(m["checkpoint"]), ens_dir / m["name"] / "best.pt")
    write_manifest(ens_dir, [{"name": m["name"], "checkpoint": f"{m['name']}/best.pt", "val_dice": m["val_dice"],
                              "run_id": m["run_id"]} for m in members], settings.preprocess, round=r,
                   profile=settings.name, patch_size=list(settings.train.patch_size))
    test = evaluate_round(ens_dir, by_role["test"], cache, rdir / "test_metrics.csv", tracking_uri, run_id, r,
                          overlap=settings.evaluate.overlap, tta=settings.evaluate.tta,
                          nsd_tolerance_mm=settings.evaluate.nsd_tolerance_mm, device=device)
    reg = register_ensemble(ens_dir, settings.tracking.registered_model, tracking_uri, run_id, r,
                            test.get("test/dsc"))
    seconds = time.perf_counter() - t_start
    mean_val = sum(m["val_dice"] for m in members) / len(members)
    tracking.log_metrics(client, run_id, {"members/mean_val_dice": mean_val, "round/seconds": seconds,
                                          "round/n_members": len(members), "round/n_train_labelled":
                                          len(by_role["labelled"]), "pseudo/n_selected": len(selected)}, r)
    client.set_terminated(run_id, "FINISHED")
    table = _summary_table(r, members, len(selected), n_candidates, test, seconds)
    logger.info("%s", table)
    summary = {"round": r, "run_id": run_id, "members": members, "test": test, "n_pseudo_selected": len(selected),
               "registered": reg, "seconds": seconds, "summary": table}
    _write_state(rdir / "state.json", {**state, "status": "finished", "finished":
                                       datetime.now(UTC).isoformat(timespec="seconds"), "test": test,
                                       "model_version": reg["version"]})
    return summary


@flow(name="self-training", log_prints=True)
def self_training(profile: str = "demo", data_root: str | None = None, rounds: int = 1,
                  tracking_uri: str | None = None) -> list[dict]:
    """Run the next ``rounds`` self-training round(s) of the data root named by the profile."""
    settings = load_profile(profile, data_root)
    uri = tracking_uri or tracking.default_tracking_uri()
    return [run_round(settings, uri) for _ in range(rounds)]
