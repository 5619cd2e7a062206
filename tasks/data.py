"""Data tasks: phantoms for the default dataset, catalog ingest and folds, cached preprocessing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import task

from data_catalog import catalog
from data_catalog.preprocessing import PreprocessSettings, cached_preprocess
from data_catalog.scans import ScanError
from tasks.progress import progress

log = logging.getLogger(__name__)


def _has_scans(root: Path) -> bool:
    """Whether the root holds scans already (NIfTI files or DICOM series folders): then no phantoms."""
    return any(any(p.name.endswith((".nii", ".nii.gz")) or p.is_dir() for p in root.glob(f"{folder}/*"))
               for folder in ("train/data", "imagesTr", "unlabelled"))


@task(name="prepare-data")
def prepare_data(root: Path, n_folds: int, fold_seed: int = 0, binarize_labels: bool = False,
                 synth: dict | None = None) -> dict:
    """Generate the phantom dataset (``synth``: arguments of ``write_phantom_dataset``; only for a
    profile's own demo root) if the root holds no scans, then ingest (incremental) and update the
    folds. Returns the catalog and test-set hashes, counts, new unlabelled scans and the fold of
    each labelled scan. A missing or empty root without ``synth`` is a FileNotFoundError."""
    root = Path(root)
    if synth is not None and not _has_scans(root):
        from data_catalog.phantoms import write_phantom_dataset

        t0 = time.perf_counter()
        log.info("generating phantoms in %s: %s", root, synth)
        write_phantom_dataset(root, **synth)
        log.info("phantoms written in %.1f s", time.perf_counter() - t0)
    report = catalog.ingest(root, binarize_labels=binarize_labels)
    for line in report.lines():
        log.info("ingest %s", line)
    folds = catalog.update_folds(root, n_folds, fold_seed)
    usable = catalog.usable_scans(root)
    counts = usable.groupby("role").size().to_dict()
    if counts.get("labelled", 0) < n_folds:
        raise ValueError(f"{root}: {counts.get('labelled', 0)} usable labelled scan(s) cannot fill {n_folds} folds")
    return {"catalog_hash": catalog.catalog_hash(root), "test_set_hash": catalog.catalog_hash(root, "test"),
            "has_truth": catalog.has_truth(root), "counts": counts, "n_rejected": len(report.rejected),
            "new_unlabelled": [s for s in report.new if s in set(usable.loc[usable.role == "unlabelled", "scan_id"])],
            "folds": dict(zip(folds.scan_id, folds.fold.astype(int), strict=True))}


@task(name="preprocess")
def preprocess_catalog(root: Path, cache: Path, settings: PreprocessSettings,
                       roles: tuple[str, ...] = ("labelled", "unlabelled", "test")) -> dict[str, dict]:
    """Preprocess every usable scan of the given roles through the content-addressed cache.

    Returns {scan_id: {"role", "image", "image_hash", "label", "label_hash", "cache"}}; paths are
    absolute strings.
    """
    root = Path(root)
    scans = catalog.usable_scans(root)
    scans = scans[scans.role.isin(roles)]
    out: dict[str, dict] = {}
    hits = 0
    with progress("preprocess", len(scans), log, unit="scans") as bar:
        for r in scans.itertuples():
            label = str(root / r.label_path) if r.label_path else None
            try:
                path, hit = cached_preprocess(cache, root / r.image_path, r.image_hash, settings,
                                              label, r.label_hash or None, r.label_transform == "binarize")
            except ScanError as e:  # the file changed since ingest; the next ingest will record it
                log.warning("skipping %s: %s", r.image_path, e)
                bar.advance()
                continue
            hits += hit
            out[r.scan_id] = {"role": r.role, "image": str(root / r.image_path), "image_hash": r.image_hash,
                              "label": label, "label_hash": r.label_hash or "", "cache": str(path)}
            bar.advance(note=f"{hits} from cache")
    return out


@task(name="preprocess-pseudo-labels")
def preprocess_pairs(items: list[dict], cache: Path, settings: PreprocessSettings,
                     label_source: str = "pseudo") -> list[dict]:
    """Preprocess (image, pseudo-label) pairs through the cache; returns {"cache", "weight", "scan_id",
    "image_hash", "label_hash", "label_source"} (``label_source``: where the labels come from)."""
    out = []
    for item in items:  # "ignore": the pseudo-label's uncertain voxels, which carry no loss
        path, _ = cached_preprocess(Path(cache), Path(item["image"]), item["image_hash"], settings,
                                    Path(item["label"]), item["label_hash"],
                                    ignore_path=Path(item["ignore"]) if item.get("ignore") else None,
                                    ignore_hash=item.get("ignore_hash"))
        out.append({"scan_id": item["scan_id"], "cache": str(path), "weight": float(item.get("weight", 1.0)),
                    "image_hash": item["image_hash"], "label_hash": item["label_hash"], "label_source": label_source})
    return out


@task(name="oracle-labels")
def oracle_pairs(root: Path) -> list[dict]:
    """The unlabelled scans with their hidden truth as labels (the oracle arm of a benchmark)."""
    return catalog.truth_pairs(Path(root))
