"""An ensemble on held-out labelled scans: INSTANCE 2022 metrics per scan and their means.

The one scoring path of a round's test evaluation and of the champion's re-scoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from data_catalog.scans import ScanError, read_label
from viola_models.ensemble import Ensemble
from viola_models.metrics import evaluate_case, summarize
from viola_models.segment import segment_scan

__all__ = ["CASE_METRICS", "evaluate_scans", "means_of"]

CASE_METRICS = ("dsc", "hd", "nsd", "rvd", "pred_volume_ml", "gt_volume_ml", "abc2_volume_ml")  # evaluate_case

log = logging.getLogger(__name__)


def evaluate_scans(
    ensemble: Ensemble,
    scans: Mapping[str, Mapping],
    cache_dir: Path | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    nsd_tolerance_mm: float = 0.42,
    on_scan: Callable[[int, int, str], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Segment each scan on its native grid and score it against its label.

    ``scans``: {scan_id: {"image", "label", "image_hash", "cache"}} (paths; the hash lets
    segmentation use the preprocessing cache, and ``cache``, when given, is the scan's preprocessed
    case made with the ensemble's settings). Returns the per-scan table (scan_id, status, reason, dsc, hd, nsd,
    rvd, volumes, the confidence scores, seconds) and the means over the scans that were scored
    (``dsc``, ``hd``, ``nsd``, ``rvd``, ``n_cases``). A scan that cannot be read gets a row with
    its reason and is left out of the means.
    """
    rows = []
    for i, (scan_id, scan) in enumerate(sorted(scans.items()), 1):
        t0 = time.perf_counter()
        try:
            # the round preprocessed the scan with its label already: the image part is the same
            seg = segment_scan(Path(scan["image"]), ensemble, cache_dir=cache_dir, overlap=overlap, tta=tta,
                               image_hash=scan.get("image_hash"), cached_case=scan.get("cache"))
            gt, _ = read_label(Path(scan["label"]), binarize=True)
        except ScanError as e:
            log.warning("evaluate: skipping %s: %s", scan_id, e)
            rows.append({"scan_id": scan_id, "status": "rejected", "reason": str(e)})
            continue
        metrics = evaluate_case(seg.mask, gt, seg.info.spacing, nsd_tolerance_mm=nsd_tolerance_mm)
        rows.append({"scan_id": scan_id, "status": "ok", "reason": "", **metrics,
                     **{k: seg.scores[k] for k in ("consensus", "agreement", "predicted_dice")},
                     "seconds": time.perf_counter() - t0})
        if on_scan:
            on_scan(i, len(scans), scan_id)
    table = pd.DataFrame(rows)
    return table, means_of(table)


def means_of(table: pd.DataFrame) -> dict[str, float]:
    """The means over the scans of a per-scan table (:func:`evaluate_scans`; tables of shares of the
    scans concatenated give the same) that were scored: ``dsc``, ``hd``, ``nsd``, ``rvd``, ``n_cases``."""
    ok = table[table["status"] == "ok"] if len(table) else table
    cases = [{k: float(v) for k, v in row.items() if k in CASE_METRICS} for row in ok.to_dict("records")]
    means = summarize(cases) if cases else {}
    report = {k: means[k] for k in ("dsc", "hd", "nsd", "rvd") if k in means}
    report["n_cases"] = len(cases)
    return report
