"""Pseudo-labelling: a teacher ensemble segments the unlabelled scans; each mask is written beside a
record of who made it, and the proof against hidden truth when a data root has it.

The selection of which masks to trust is ``data_catalog.selection``; recording them in the
catalog's lineage and in MLflow is the pipeline's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from data_catalog.scans import ScanError, atomic_write, file_sha256, save_nifti_like
from viola_models.inference.ensemble import Ensemble
from viola_models.inference.quality import SCORE_NAMES, dice
from viola_models.inference.segment import segment_scan

__all__ = ["label_scans", "truth_report", "with_true_dice"]

log = logging.getLogger(__name__)


def _labelled_before(out_dir: Path, scan_id: str, scan: Mapping, teacher_id: str,
                     ignore_band: tuple[float, float] | None) -> dict | None:
    """The record of ``scan_id`` when the same teacher labelled the same content with the same band."""
    record, mask_path = out_dir / f"{scan_id}.json", out_dir / f"{scan_id}.nii.gz"
    if not (record.exists() and mask_path.exists()):
        return None
    row = json.loads(record.read_text())
    same_band = row.get("ignore_band") == (list(ignore_band) if ignore_band else None) and (
        ignore_band is None or Path(row.get("uncertain_path", "")).is_file())
    return row if row.get("teacher_id") == teacher_id and row.get("image_hash") == scan["image_hash"] and same_band \
        else None


def _write_label(out_dir: Path, scan_id: str, scan: Mapping, seg, teacher_id: str, members: list[str],
                 ignore_band: tuple[float, float] | None) -> dict:
    """The mask (and map of uncertain voxels) of one segmented scan on the source's header, and its
    record written last (atomically): a record names only files that exist."""
    mask_path = out_dir / f"{scan_id}.nii.gz"
    save_nifti_like(seg.mask, Path(scan["image"]), mask_path)
    row = {"scan_id": scan_id, "image": str(scan["image"]), "image_hash": scan["image_hash"],
           "mask_path": str(mask_path), "mask_hash": file_sha256(mask_path), "teacher_id": teacher_id,
           "members": members, **seg.scores, "volume_ml": seg.volume_ml, "seconds": seg.seconds, "error": ""}
    if seg.uncertain is not None:
        uncertain_path = out_dir / f"{scan_id}.uncertain.nii.gz"
        save_nifti_like(seg.uncertain, Path(scan["image"]), uncertain_path)
        row |= {"ignore_band": list(ignore_band), "uncertain_path": str(uncertain_path),
                "uncertain_hash": file_sha256(uncertain_path),
                "uncertain_ml": float(seg.uncertain.sum()) * float(np.prod(seg.info.spacing)) / 1000.0}
    text = json.dumps(row)
    atomic_write(out_dir / f"{scan_id}.json", lambda tmp: tmp.write_text(text))
    return row


def label_scans(
    ensemble: Ensemble | Callable[[], Ensemble],
    scans: Mapping[str, Mapping],
    out_dir: Path,
    teacher_id: str,
    cache_dir: Path | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    on_scan: Callable[[int, int, dict], None] | None = None,
    ignore_band: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Segment every scan with the teacher; one row per scan (errors included, with their reason).

    ``scans``: {scan_id: {"image", "image_hash"}}. Masks go to ``out_dir/<scan_id>.nii.gz`` with
    the source's header, each with a record ``<scan_id>.json``; a scan already labelled by the same
    teacher (``teacher_id``) from the same content is read back, not predicted again.
    ``ensemble`` may be a function that loads it, called only if some scan needs predicting.
    Row: scan_id, image, image_hash, mask_path, mask_hash, teacher_id, members, the confidence
    scores (``viola_models.inference.quality.confidence_scores``), volume_ml (native grid), seconds, error.
    ``ignore_band`` (low, high): also ``<scan_id>.uncertain.nii.gz``, the voxels whose ensemble
    probability is in [low, high), for a student to leave out of its loss (row: ignore_band,
    uncertain_path, uncertain_hash, uncertain_ml).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded: Ensemble | None = ensemble if isinstance(ensemble, Ensemble) else None
    rows = []
    for i, (scan_id, scan) in enumerate(sorted(scans.items()), 1):
        row = _labelled_before(out_dir, scan_id, scan, teacher_id, ignore_band)
        if row is not None:
            rows.append(row)
            continue
        if loaded is None:
            loaded = ensemble()
        try:
            seg = segment_scan(Path(scan["image"]), loaded, overlap=overlap, tta=tta, cache_dir=cache_dir,
                               image_hash=scan["image_hash"], uncertain_band=ignore_band)
        except ScanError as e:
            log.warning("pseudo-label: skipping %s: %s", scan_id, e)
            rows.append({"scan_id": scan_id, "image": str(scan["image"]), "image_hash": scan["image_hash"],
                         "teacher_id": teacher_id, "members": loaded.names, "error": str(e)})
            continue
        rows.append(_write_label(out_dir, scan_id, scan, seg, teacher_id, loaded.names, ignore_band))
        log.info("pseudo-label %d/%d %s: %.2f ml, %s, agreement %.3f (%.1f s)", i, len(scans), scan_id,
                 seg.volume_ml, seg.scores["consensus"], seg.scores["agreement"], seg.seconds)
        if on_scan:
            on_scan(i, len(scans), rows[-1])
    table = pd.DataFrame(rows)
    if len(table) and "error" in table:
        table["error"] = table["error"].fillna("")
    return table


def with_true_dice(table: pd.DataFrame, truth_dir: Path) -> pd.DataFrame:
    """Add ``true_dice``: each pseudo-label mask against ``truth_dir/<scan_id>.nii.gz`` on the
    scan's grid (NaN where there is no mask or no truth). For phantoms, whose truth is known."""
    out = table.copy()
    values = []
    for r in out.itertuples():
        truth = Path(truth_dir) / f"{r.scan_id}.nii.gz"
        mask = getattr(r, "mask_path", None)
        if not isinstance(mask, str) or not mask or not truth.exists():
            values.append(math.nan)
            continue
        pred = np.asarray(nib.load(mask).dataobj) > 0
        values.append(dice(pred, np.asarray(nib.load(str(truth)).dataobj) > 0))
    out["true_dice"] = values
    return out


def truth_report(decided: pd.DataFrame, scores: Sequence[str] = (*SCORE_NAMES, "predicted_dice")) -> dict[str, float]:
    """How good the selection was, from ``true_dice``: mean true Dice of the selected and the
    rejected pseudo-labels, and the rank correlation (Spearman) of each score with the true Dice
    over the scans where both are known."""
    known = decided[decided["true_dice"].notna()]
    report = {"true_dice_selected": float(known.loc[known.selected, "true_dice"].mean()),
              "true_dice_rejected": float(known.loc[~known.selected, "true_dice"].mean()),
              "true_dice_all": float(known["true_dice"].mean()),
              "n_with_truth": float(len(known))}
    for name in scores:
        if name not in known:
            continue
        pair = known[[name, "true_dice"]].apply(pd.to_numeric, errors="coerce").dropna()
        ok = len(pair) >= 3 and pair[name].nunique() > 1 and pair["true_dice"].nunique() > 1
        report[f"spearman_{name}"] = float(spearmanr(pair[name], pair["true_dice"]).statistic) if ok else math.nan
    return report
