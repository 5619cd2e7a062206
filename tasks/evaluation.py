"""Evaluation task: the round's ensemble on the held-out test scans, INSTANCE 2022 metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import task

from data_catalog.scans import atomic_write
from tasks import tracking
from viola_models.ensemble import load_ensemble
from viola_models.evaluation import evaluate_scans

log = logging.getLogger(__name__)


@task(name="evaluate")
def evaluate_round(
    ensemble_dir: Path,
    scans: dict[str, dict],
    cache: Path,
    out_csv: Path,
    tracking_uri: str,
    run_id: str,
    step: int,
    overlap: float = 0.5,
    tta: bool = False,
    nsd_tolerance_mm: float = 0.42,
    device: str = "cpu",
) -> dict[str, float]:
    """Score the ensemble on the test scans; logs the per-case table (``test/per_case.csv``) and the
    means (``test/dsc``, ``test/hd``, ``test/nsd``, ``test/rvd``) to ``run_id``; returns the means."""
    if not scans:
        log.warning("no test scans: nothing to evaluate")
        return {}
    t0 = time.perf_counter()
    table, means = evaluate_scans(load_ensemble(Path(ensemble_dir), device=device), scans, cache_dir=Path(cache),
                                  overlap=overlap, tta=tta, nsd_tolerance_mm=nsd_tolerance_mm)
    atomic_write(Path(out_csv), lambda tmp: table.to_csv(tmp, index=False))
    client = tracking.client_for(tracking_uri)
    tracking.log_table(client, run_id, table, "test/per_case.csv")
    report = {f"test/{k}": v for k, v in means.items()} | {"test/seconds": time.perf_counter() - t0}
    tracking.log_metrics(client, run_id, report, step)
    log.info("test: %s over %d case(s)", ", ".join(f"{k.upper()} {means[k]:.4f}" for k in ("dsc", "hd", "nsd", "rvd")
                                                  if k in means), means.get("n_cases", 0))
    return report
