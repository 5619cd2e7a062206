"""An ensemble on held-out labelled scans: INSTANCE 2022 metrics per scan and their means.

The one scoring path of a round's test evaluation and of the champion's re-scoring; and the
comparison of two arms scored on the same scans over several seeds (:func:`two_level_bootstrap`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_catalog.scans import ScanError, read_label
from viola_models.evaluation.metrics import evaluate_case, summarize
from viola_models.inference.ensemble import Ensemble
from viola_models.inference.segment import segment_scan

__all__ = ["CASE_METRICS", "BootstrapResult", "evaluate_scans", "means_of", "paired_difference", "two_level_bootstrap"]

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
            gt, _ = read_label(Path(scan["label"]), binarize=True, image=Path(scan["image"]))
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


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic of per-case tables over seeds: its value on the data, its percentile interval
    (``level``, e.g. 0.95) and the replicates' count."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    n_seeds: int
    n_cases: int

    def describe(self, digits: int = 4) -> str:
        return (f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({self.level:.0%} CI; {self.n_seeds} seed(s), {self.n_cases} case(s))")


def two_level_bootstrap(per_seed: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float],
                        n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> BootstrapResult:
    """A statistic of arm means with a two-level (hierarchical) bootstrap interval.

    ``per_seed``: one array per seed, (n_cases, k): each row a test case, each column an arm scored
    on that case (the same cases for every arm of a seed; seeds may differ in cases). The arms' means
    are the mean over seeds of each seed's case mean, (k,); ``statistic`` maps them to a number
    (e.g. ``lambda m: m[0] - m[1]``, a paired difference). Each replicate draws the seeds with
    replacement, then within each drawn seed its cases with replacement (the same rows for all arms,
    so the pairing is kept); the interval is the replicates' percentiles. A replicate whose
    statistic is NaN (a ratio over 0) is dropped.
    """
    tables = [np.asarray(t, dtype=np.float64) for t in per_seed]
    tables = [t[~np.isnan(t).any(axis=1)] for t in tables]
    tables = [t for t in tables if len(t)]
    if not tables:
        raise ValueError("no seed has a case scored in every arm")
    if len({t.shape[1] for t in tables}) != 1:
        raise ValueError("every seed needs the same arms (columns)")
    estimate = float(statistic(np.mean([t.mean(axis=0) for t in tables], axis=0)))
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    n = len(tables)
    for b in range(n_boot):
        means = [tables[i][rng.integers(0, len(tables[i]), len(tables[i]))].mean(axis=0)
                 for i in rng.integers(0, n, n)]
        values[b] = statistic(np.mean(means, axis=0))
    values = values[~np.isnan(values)]
    tail = (1.0 - level) / 2.0
    low, high = (np.quantile(values, [tail, 1.0 - tail]) if len(values) else (np.nan, np.nan))
    return BootstrapResult(estimate=estimate, low=float(low), high=float(high), level=level, n_boot=len(values),
                           n_seeds=n, n_cases=sum(len(t) for t in tables))


def paired_difference(per_seed: Sequence[tuple[np.ndarray, np.ndarray]], **kwargs) -> BootstrapResult:
    """Mean paired difference a - b (per case, the same cases in both arms of a seed) over seeds,
    with its two-level bootstrap interval (:func:`two_level_bootstrap`)."""
    return two_level_bootstrap([np.column_stack([a, b]) for a, b in per_seed], lambda m: m[0] - m[1], **kwargs)
