"""Calibration task: the round's members predict their own out-of-fold validation scans, where the
truth is known; the score -> true Dice curve is fitted there and travels with the ensemble."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from prefect import task

from data_catalog.overlays import calibration_png
from data_catalog.scans import atomic_write
from data_catalog.selection import fit_calibration
from tasks import tracking
from tasks.context import RoundContext
from viola_models.inference.quality import SCORE_NAMES, out_of_fold_scores

log = logging.getLogger(__name__)


@task(name="calibrate")
def calibrate(ctx: RoundContext, groups: list[tuple[str, list[str], list[str]]]) -> dict:
    """Score the out-of-fold ensembles (``groups``: fold name, its members' checkpoints, its
    validation cases), fit the calibration of the rule's score (``[pseudo.rule]``), log points (CSV),
    curve (PNG) and rank correlations to the round's run. Returns {"calibration": dict, "points": CSV path}."""
    rule, out_dir = ctx.settings.pseudo.rule, ctx.dir
    points = out_of_fold_scores([(f, [Path(p) for p in c], [Path(p) for p in v]) for f, c, v in groups],
                                device=ctx.device, overlap=ctx.settings.pseudo.calibration.overlap,
                                inference=ctx.inference)
    csv = out_dir / "calibration.csv"
    if not len(points):
        log.warning("no out-of-fold validation scans: the selection score stays uncalibrated")
        return {"calibration": None, "points": ""}
    atomic_write(csv, lambda tmp: points.to_csv(tmp, index=False))
    cal = fit_calibration(points[rule.score], points["true_dice"], rule.score, rule.calibration_prior_weight)
    png = calibration_png(points, cal, out_dir / "calibration.png", threshold=rule.min_predicted_dice)
    client, run_id = tracking.client_for(ctx.tracking_uri), ctx.run_id
    client.log_artifact(run_id, str(csv), "calibration")
    client.log_artifact(run_id, str(png), "calibration")
    metrics = {"calibration/n_points": cal.n_points}
    for name in SCORE_NAMES:
        other = fit_calibration(points[name], points["true_dice"], name, rule.calibration_prior_weight)
        if not math.isnan(other.spearman):
            metrics[f"calibration/spearman_{name}"] = other.spearman
    tracking.log_metrics(client, run_id, metrics, ctx.round)
    log.info("calibration of round %d: %s", ctx.round, cal.describe())
    return {"calibration": cal.to_dict(), "points": str(csv)}
