"""Pseudo-labelling task: the previous round's ensemble labels the unlabelled scans, its calibrated
rule selects, and the decisions go to the catalog's lineage and to MLflow."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
from prefect import task

from data_catalog import catalog
from data_catalog.overlays import calibration_png, overlay_png
from data_catalog.scans import read_image
from data_catalog.selection import SelectionRule, select_pseudo_labels
from tasks import tracking
from tasks.compute import worker_device
from tasks.context import RoundContext
from tasks.progress import progress
from viola_models.inference.ensemble import load_ensemble
from viola_models.inference.pseudo_labels import label_scans, truth_report, with_true_dice

log = logging.getLogger(__name__)


@task(name="label-scans")
def label_chunk(ctx: RoundContext, scans: dict[str, dict], threads: int | None = None) -> int:
    """Segment a share of the unlabelled scans with the round's teacher on this worker (masks and
    records in the round's ``pseudo`` folder, which :func:`pseudo_label` reads back instead of
    predicting again). Nothing is tracked here; returns how many scans have a mask."""
    dev, p = worker_device(ctx.settings.device, threads), ctx.settings.pseudo
    teacher_dir = Path(ctx.plan.teacher_dir)
    with progress("pseudo-label", len(scans), log, unit="scans") as bar:
        table = label_scans(lambda: load_ensemble(teacher_dir, device=dev, inference=ctx.inference), scans,
                            ctx.dir / "pseudo", ctx.plan.teacher_run_id, cache_dir=ctx.cache, overlap=p.overlap,
                            tta=p.tta, on_scan=lambda i, n, row: bar.update(i, row.get("scan_id", "")),
                            ignore_band=p.ignore_band)
    return int((table.get("error", pd.Series(dtype=str)) == "").sum()) if len(table) else 0


def chunks(scans: dict[str, dict], n: int) -> list[dict[str, dict]]:
    """``scans`` in ``n`` shares of nearly equal size (by scan id), none empty."""
    ids = sorted(scans)
    n = max(1, min(n, len(ids)))
    return [{i: scans[i] for i in ids[k::n]} for k in range(n)] if ids else []


@task(name="pseudo-label")
def pseudo_label(ctx: RoundContext, scans: dict[str, dict]) -> list[dict]:
    """Label ``scans`` with the round's teacher (``ctx.plan.teacher_dir``), select by the profile's
    rule, record the decisions in the catalog's lineage and the round's run. Returns the selected
    pseudo-labels as training pairs: [{"scan_id", "image", "image_hash", "label", "label_hash",
    "weight"}]; ``weight`` is the predicted Dice when the student weighs by it (``[student]
    pseudo_weight``), else 1. With an ``ignore_band`` each pair also names the map of its uncertain
    voxels ("ignore", "ignore_hash"), left out of the student's loss."""
    p, round_, out_dir = ctx.settings.pseudo, ctx.round, ctx.dir / "pseudo"
    rule, ignore_band = p.rule, p.ignore_band
    teacher_dir = Path(ctx.plan.teacher_dir)
    t0 = time.perf_counter()
    teacher: list = []

    def load():
        teacher.append(load_ensemble(teacher_dir, device=ctx.device, inference=ctx.inference))
        return teacher[0]

    table = label_scans(load, scans, out_dir, ctx.plan.teacher_run_id, cache_dir=ctx.cache, overlap=p.overlap,
                        tta=p.tta, ignore_band=ignore_band)
    if not len(table):
        return []
    # the calibration travels with the teacher: refitted here for the rule's score and minimum
    manifest_teacher = teacher[0] if teacher else load_ensemble(teacher_dir, device="cpu")
    calibration = manifest_teacher.calibration_for(rule.score, rule.calibration_prior_weight)
    decided = select_pseudo_labels(table, rule, calibration)
    root = ctx.data_root
    truth = catalog.has_truth(root)
    if truth:
        decided = with_true_dice(decided, root / catalog.TRUTH_DIR)
    catalog.record_pseudo_labels(root, [_lineage_row(r, round_, root) for r in decided.to_dict("records")])

    client, run_id = tracking.client_for(ctx.tracking_uri), ctx.run_id
    shown = decided.drop(columns=[c for c in ("image", "image_hash") if c in decided])
    tracking.log_table(client, run_id, shown.assign(members=shown["members"].map(json.dumps)),
                       "pseudo/pseudo_labels.csv")
    selected = decided[decided.selected]
    metrics = {"pseudo/n_candidates": len(decided), "pseudo/n_selected": len(selected),
               "pseudo/n_errors": int((decided["error"] != "").sum()),
               "pseudo/n_empty_consensus": int((decided["consensus"] == "empty").sum()),
               "pseudo/mean_predicted_dice_selected": float(selected["predicted_dice"].mean()) if len(selected)
               else math.nan,
               "pseudo/calibration_points": calibration.n_points, "pseudo/seconds": time.perf_counter() - t0}
    if truth:
        metrics |= {f"pseudo/{k}": v for k, v in truth_report(decided).items()}
    if ignore_band is not None and len(selected):
        metrics["pseudo/uncertain_ml_selected"] = float(selected["uncertain_ml"].mean())
    tracking.log_metrics(client, run_id, metrics, round_)
    tracking.set_tags(client, run_id, {"viola.pseudo_rule": decided["rule"].iloc[0][:5000]})
    _log_figures(client, run_id, decided, out_dir, p.overlays, manifest_teacher, calibration, rule, truth)
    log.info("pseudo-labels of round %d: %d of %d selected (%s)%s", round_, len(selected), len(decided),
             decided["rule"].iloc[0], f"; true Dice of the selected {metrics['pseudo/true_dice_selected']:.3f}, "
             f"of the rejected {metrics['pseudo/true_dice_rejected']:.3f}" if truth else "")
    return [{"scan_id": r.scan_id, "image": r.image, "image_hash": r.image_hash, "label": r.mask_path,
             "label_hash": r.mask_hash,
             "weight": _weight(r.predicted_dice, rule) if ctx.settings.student.pseudo_weight == "predicted_dice"
             else 1.0,
             **({"ignore": r.uncertain_path, "ignore_hash": r.uncertain_hash} if ignore_band is not None else {})}
            for r in selected.itertuples()]


def _weight(predicted_dice: float, rule: SelectionRule) -> float:
    """Loss weight of a pseudo-label: its predicted Dice (an empty consensus has none: the target)."""
    return float(rule.min_predicted_dice if math.isnan(predicted_dice) else predicted_dice)


def _lineage_row(r: dict, round_: int, root: Path) -> dict:
    mask = Path(r["mask_path"]) if isinstance(r.get("mask_path"), str) and r["mask_path"] else None
    rel = "" if mask is None else (str(mask.relative_to(root)) if mask.is_relative_to(root) else str(mask))
    return {**{k: v for k, v in r.items() if k != "mask_path"}, "round": round_, "teacher_run_id": r["teacher_id"],
            "mask_path": rel}


def _log_figures(client, run_id: str, decided: pd.DataFrame, out_dir: Path, n: int, teacher, calibration,
                 rule: SelectionRule, truth: bool) -> None:
    """The calibration the selection used, and PNG overlays (the paper's Fig. 1 view) of the best
    selected and the worst rejected scans."""
    png = calibration_png(teacher.calibration_points if teacher.calibration_points is not None
                          else pd.DataFrame(columns=[rule.score, "true_dice"]), calibration,
                          out_dir / "calibration.png", unlabelled=decided if truth else None,
                          threshold=rule.min_predicted_dice)
    client.log_artifact(run_id, str(png), "pseudo")
    if n <= 0:
        return
    import nibabel as nib

    masked = decided[decided["error"] == ""].sort_values(["predicted_dice", "scan_id"], ascending=[False, True])
    picks = [("selected", r) for r in masked[masked.selected].head(n).itertuples()]
    picks += [("rejected", r) for r in masked[~masked.selected].tail(n).itertuples()]
    for kind, r in picks:
        image, info = read_image(Path(r.image))
        mask = nib.load(r.mask_path).get_fdata() > 0
        title = (f"{r.scan_id}: {kind} (predicted Dice {r.predicted_dice:.2f}, {r.volume_ml:.1f} ml)"
                 + (f", true Dice {r.true_dice:.2f}" if truth else "") + f" - {r.decision}")
        png = overlay_png(image, mask, info.affine, out_dir / "overlays" / f"{kind}_{r.scan_id}.png", title=title)
        client.log_artifact(run_id, str(png), f"pseudo/overlays/{kind}")
