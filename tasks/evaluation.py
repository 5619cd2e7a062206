"""Evaluation task: the round's ensemble on the held-out test scans, INSTANCE 2022 metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from prefect import task

from data_catalog.scans import ScanError, read_label
from tasks import tracking
from viola_models.metrics import evaluate_case, summarize
from viola_models.segment import load_ensemble, segment_scan

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
    """Segment each test scan on its native grid and score it against its label.

    Logs the per-case table (``test/per_case.csv``) and the means (``test/dsc``, ``test/hd``,
    ``test/nsd``, ``test/rvd``) to ``run_id``; returns the means.
    """
    if not scans:
        log.warning("no test scans: nothing to evaluate")
        return {}
    ensemble = load_ensemble(Path(ensemble_dir), device=device)
    rows, cases, t0 = [], [], time.perf_counter()
    for scan_id, scan in sorted(scans.items()):
        try:
            seg = segment_scan(Path(scan["image"]), ensemble, overlap=overlap, tta=tta, cache_dir=Path(cache),
                               image_hash=scan["image_hash"])
            gt, _ = read_label(Path(scan["label"]), binarize=True)
        except ScanError as e:
            log.warning("evaluate: skipping %s: %s", scan_id, e)
            continue
        metrics = evaluate_case(seg.mask, gt, seg.info.spacing, nsd_tolerance_mm=nsd_tolerance_mm)
        cases.append(metrics)
        rows.append({"scan_id": scan_id, **metrics, "agreement": seg.scores["agreement"], "seconds": seg.seconds})
    table = pd.DataFrame(rows)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    means = summarize(cases)
    client = tracking.client_for(tracking_uri)
    tracking.log_table(client, run_id, table, "test/per_case.csv")
    report = {f"test/{k}": means[k] for k in ("dsc", "hd", "nsd", "rvd") if k in means}
    report["test/n_cases"] = len(rows)
    report["test/seconds"] = time.perf_counter() - t0
    tracking.log_metrics(client, run_id, report, step)
    log.info("test: DSC %.4f, HD %.2f mm, NSD %.4f, RVD %.4f over %d case(s)", means.get("dsc", float("nan")),
             means.get("hd", float("nan")), means.get("nsd", float("nan")), means.get("rvd", float("nan")), len(rows))
    return report
