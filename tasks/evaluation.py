"""Evaluation task: the round's ensemble on the held-out test scans, INSTANCE 2022 metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from prefect import task

from data_catalog.scans import atomic_write
from tasks import tracking
from tasks.compute import worker_device
from tasks.context import RoundContext
from tasks.progress import progress
from viola_models.evaluation.scoring import evaluate_scans, means_of
from viola_models.inference.ensemble import load_ensemble

log = logging.getLogger(__name__)


@task(name="score-scans")
def score_chunk(ctx: RoundContext, ensemble_dir: Path, scans: dict[str, dict], threads: int | None = None
                ) -> list[dict]:
    """Score the ensemble on a share of the test scans on this worker; the per-scan rows, untracked."""
    ensemble = load_ensemble(Path(ensemble_dir), device=worker_device(ctx.settings.device, threads),
                             inference=ctx.inference)
    table, _ = _score(ensemble, scans, ctx.cache, **ctx.evaluate)
    return table.to_dict("records")


def _score(ensemble, scans: dict[str, dict], cache: Path, overlap: float, tta: bool,
           nsd_tolerance_mm: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """``evaluate_scans`` with a progress line (or bar) per scan."""
    with progress("score", len(scans), log, unit="scans") as bar:
        return evaluate_scans(ensemble, scans, cache_dir=Path(cache), overlap=overlap, tta=tta,
                              nsd_tolerance_mm=nsd_tolerance_mm, on_scan=lambda i, n, scan_id: bar.update(i, scan_id))


@task(name="evaluate")
def evaluate_round(ctx: RoundContext, ensemble_dir: Path, scans: dict[str, dict], rows: list[dict] | None = None
                   ) -> dict[str, float]:
    """Score the ensemble on the test scans; writes the per-case table to the round's folder
    (``test_metrics.csv``), logs it (``test/per_case.csv``) and the means (``test/dsc``, ``test/hd``,
    ``test/nsd``, ``test/rvd``) to the round's run; returns the means. ``rows``: the per-scan rows
    already scored elsewhere (:func:`score_chunk`), only tracked here."""
    if not scans:
        log.warning("no test scans: nothing to evaluate")
        return {}
    t0 = time.perf_counter()
    if rows is None:
        table, means = _score(load_ensemble(Path(ensemble_dir), device=ctx.device, inference=ctx.inference), scans,
                              ctx.cache, **ctx.evaluate)
    else:  # scored side by side (score_chunk): the same table, in the same order
        table = pd.DataFrame(rows).sort_values("scan_id", kind="stable").reset_index(drop=True)
        means = means_of(table)
    atomic_write(ctx.dir / "test_metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
    client, run_id = tracking.client_for(ctx.tracking_uri), ctx.run_id
    tracking.log_table(client, run_id, table, "test/per_case.csv")
    test_set = [{"scan_id": s, "image_hash": c.get("image_hash", ""), "label_hash": c.get("label_hash", ""),
                 "label_source": "annotation"} for s, c in scans.items()]
    tracking.log_datasets(client, run_id, {"test": test_set}, source=str(ctx.data_root.resolve()))
    report = {f"test/{k}": v for k, v in means.items()} | {"test/seconds": time.perf_counter() - t0}
    tracking.log_metrics(client, run_id, report, ctx.round)
    log.info("test: %s over %d case(s)", ", ".join(f"{k.upper()} {means[k]:.4f}" for k in ("dsc", "hd", "nsd", "rvd")
                                                  if k in means), means.get("n_cases", 0))
    return report
