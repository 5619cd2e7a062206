"""Pseudo-labelling task: the previous round's ensemble labels the unlabelled scans, a rule selects."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
from prefect import task

from data_catalog import catalog
from data_catalog.overlays import overlay_png
from data_catalog.scans import ScanError, file_sha256, read_image, save_nifti_like
from data_catalog.selection import SelectionRule, select_pseudo_labels
from tasks import tracking
from viola_models.segment import load_ensemble, segment_scan

log = logging.getLogger(__name__)


@task(name="pseudo-label")
def pseudo_label(
    round_: int,
    teacher_dir: Path,
    teacher_run_id: str,
    scans: dict[str, dict],
    out_dir: Path,
    data_root: Path,
    cache: Path,
    rule: SelectionRule,
    tracking_uri: str,
    parent_run_id: str,
    overlap: float = 0.5,
    tta: bool = False,
    device: str = "cpu",
    n_overlays: int = 4,
) -> list[dict]:
    """Predict every unlabelled scan with the teacher ensemble, score, select, record the lineage.

    Masks go to ``out_dir/<scan_id>.nii.gz`` with the source's header; a scan already labelled by
    the same teacher (``out_dir/<scan_id>.json``) is not predicted again. Returns the selected
    pseudo-labels: [{"scan_id", "image", "image_hash", "label", "label_hash"}].
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensemble = None
    rows, t0 = [], time.perf_counter()
    for i, (scan_id, scan) in enumerate(sorted(scans.items()), 1):
        record = out_dir / f"{scan_id}.json"
        mask_path = out_dir / f"{scan_id}.nii.gz"
        if record.exists() and mask_path.exists():
            row = json.loads(record.read_text())
            if row.get("teacher_run_id") == teacher_run_id and row.get("image_hash") == scan["image_hash"]:
                rows.append(row)
                continue
        if ensemble is None:
            ensemble = load_ensemble(Path(teacher_dir), device=device)
        try:
            seg = segment_scan(Path(scan["image"]), ensemble, overlap=overlap, tta=tta, cache_dir=Path(cache),
                               image_hash=scan["image_hash"])
        except ScanError as e:
            log.warning("pseudo-label: skipping %s: %s", scan_id, e)
            continue
        save_nifti_like(seg.mask, Path(scan["image"]), mask_path)
        row = {"scan_id": scan_id, "round": round_, "image": scan["image"], "image_hash": scan["image_hash"],
               "mask_path": str(mask_path), "mask_hash": file_sha256(mask_path), "teacher_run_id": teacher_run_id,
               "members": ensemble.names, **seg.scores, "volume_ml": seg.volume_ml, "seconds": seg.seconds}
        record.write_text(json.dumps(row))
        rows.append(row)
        log.info("pseudo-label %d/%d %s: %.2f ml, agreement %.3f (%.1f s)", i, len(scans), scan_id, seg.volume_ml,
                 seg.scores["agreement"], seg.seconds)
    if not rows:
        return []
    decided = select_pseudo_labels(pd.DataFrame(rows), rule)
    root = Path(data_root)
    lineage = []
    for r in decided.to_dict("records"):
        mask = Path(r["mask_path"])
        lineage.append({**{k: r[k] for k in ("scan_id", "round", "mask_hash", "teacher_run_id", "members",
                                             "agreement", "mean_probability", "volume_cv", "volume_ml", "selected",
                                             "rule")},
                        "mask_path": str(mask.relative_to(root)) if mask.is_relative_to(root) else str(mask)})
    catalog.record_pseudo_labels(root, lineage)

    client = tracking.client_for(tracking_uri)
    table = decided.drop(columns=["image", "image_hash"]).assign(members=decided["members"].map(json.dumps))
    tracking.log_table(client, parent_run_id, table, "pseudo/pseudo_labels.csv")
    selected = decided[decided.selected]
    tracking.log_metrics(client, parent_run_id, {
        "pseudo/n_candidates": len(decided), "pseudo/n_selected": len(selected),
        "pseudo/mean_agreement": float(decided.agreement.mean()),
        "pseudo/mean_agreement_selected": float(selected.agreement.mean()) if len(selected) else float("nan"),
        "pseudo/seconds": time.perf_counter() - t0}, round_)
    _log_overlays(client, parent_run_id, decided, out_dir, n_overlays)
    log.info("pseudo-labels of round %d: %d of %d selected (%s)", round_, len(selected), len(decided), rule.describe())
    return [{"scan_id": r.scan_id, "image": r.image, "image_hash": r.image_hash, "label": r.mask_path,
             "label_hash": r.mask_hash} for r in selected.itertuples()]


def _log_overlays(client, run_id: str, decided: pd.DataFrame, out_dir: Path, n: int) -> None:
    """PNG overlays (the paper's Fig. 1 view) of the best selected and the worst rejected scans."""
    if n <= 0:
        return
    ranked = decided.sort_values("agreement", ascending=False)
    picks = [("selected", r) for r in ranked[ranked.selected].head(n).itertuples()]
    picks += [("rejected", r) for r in ranked[~ranked.selected].tail(n).itertuples()]
    import nibabel as nib

    for kind, r in picks:
        image, info = read_image(Path(r.image))
        mask = nib.load(r.mask_path).get_fdata() > 0
        png = out_dir / "overlays" / f"{kind}_{r.scan_id}.png"
        overlay_png(image, mask, info.affine, png,
                    title=f"{r.scan_id}: {kind} (agreement {r.agreement:.2f}, {r.volume_ml:.1f} ml) - {r.decision}")
        client.log_artifact(run_id, str(png), f"pseudo/overlays/{kind}")
