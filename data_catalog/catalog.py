"""The scan catalog of a data root: which scans exist, their role, geometry and validity; the
cross-validation folds; the pseudo-label lineage.

Tables are CSV files in ``DATA_ROOT/viola_catalog/`` (open them in any spreadsheet or with
``pandas.read_csv``):

* ``scans.csv``: one row per image file or DICOM series folder: scan_id, role (labelled / unlabelled / test), status
  (ok / rejected) and reason, image and label paths (relative to the root; a label is a NIfTI mask
  or a DICOM SEG), content hashes, shape, spacing (mm), orientation code, time added and updated,
  the file stats used to skip files that did not change, and a series' Series and Study Instance UIDs.
* ``folds_k{K}_seed{S}.csv``: the K-fold split of the labelled scans, seeded; scans labelled later
  join the smallest folds, existing assignments never move.
* ``pseudo_labels.csv``: per (scan, round): the mask file and its hash (none for a scan that could
  not be predicted), the teacher run, the ensemble members, the consensus and confidence scores,
  the calibrated predicted Dice, whether it was selected and why (``decision``), the rule that
  decided, and when.

Every write goes to a temporary file that is renamed into place, under a lock file, so two
processes never interleave their writes and a crash never leaves a half-written table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import filelock
import numpy as np
import pandas as pd

from data_catalog.dicom import (
    find_series,
    is_dicom_file,
    seg_reference,
    series_files,
    series_identity,
    series_signature,
)
from data_catalog.scans import (
    ScanError,
    atomic_write,
    check_label_matches,
    file_sha256,
    read_image,
    read_label,
    voxel_hash,
)

__all__ = [
    "CATALOG_DIR",
    "ROLES",
    "CatalogBusyError",
    "IngestReport",
    "catalog_dir",
    "catalog_hash",
    "describe",
    "fold_items",
    "has_truth",
    "ingest",
    "load_folds",
    "load_pseudo_labels",
    "load_scans",
    "record_pseudo_labels",
    "scan_entries",
    "truth_pairs",
    "update_folds",
    "usable_scans",
]

log = logging.getLogger(__name__)

CATALOG_DIR = "viola_catalog"
ROLES = ("labelled", "unlabelled", "test")
SCAN_COLUMNS = [
    "scan_id", "role", "status", "reason", "image_path", "label_path", "image_hash", "label_hash",
    "shape", "spacing", "orientation", "label_transform", "added_at", "updated_at",
    "image_size", "image_mtime_ns", "label_size", "label_mtime_ns", "voxel_hash", "series_uid", "study_uid",
]
PSEUDO_COLUMNS = [
    "scan_id", "round", "mask_path", "mask_hash", "teacher_run_id", "members", "consensus", "agreement",
    "union_agreement", "mean_max_probability", "predicted_dice", "volume_cv", "volume_ml", "selected", "decision",
    "rule", "created_at",
]
_PSEUDO_NUMBERS = ("agreement", "union_agreement", "mean_max_probability", "predicted_dice", "volume_cv", "volume_ml")
_NII = (".nii.gz", ".nii")
_DUPLICATE_REASONS = ("same content as ", "scan id ")  # rejected for a clash only: re-decided on every ingest


class CatalogBusyError(RuntimeError):
    """Another process holds the catalog's lock."""


@dataclass
class IngestReport:
    """What one ``ingest`` call found; ids or relative paths."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason), all currently rejected
    layout: str = ""

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"layout: {self.layout}",
            f"new: {len(self.new)}" + (f" ({_preview(self.new)})" if self.new else ""),
            f"changed: {len(self.changed)}" + (f" ({_preview(self.changed)})" if self.changed else ""),
            f"unchanged: {self.unchanged}",
            f"removed: {len(self.removed)}" + (f" ({_preview(self.removed)})" if self.removed else ""),
            f"rejected: {len(self.rejected)}",
        ]
        out += [f"  {path}: {reason}" for path, reason in self.rejected]
        return out


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def catalog_dir(root: Path) -> Path:
    return Path(root) / CATALOG_DIR


@contextmanager
def _locked(root: Path, timeout_s: float = 120.0) -> Iterator[None]:
    cdir = catalog_dir(root)
    cdir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(cdir / ".lock"))
    try:
        lock.acquire(timeout=timeout_s)
    except filelock.Timeout:
        raise CatalogBusyError(
            f"another process is writing the catalog in {cdir} (lock {cdir / '.lock'} held over {timeout_s:.0f} s)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for c in columns:
        if c not in df:
            df[c] = ""
    return df[columns]


# ---------------------------------------------------------------------------------------- layout
@dataclass
class _Candidate:
    scan_id: str
    role: str
    image: str  # path relative to root
    label: str = ""
    error: str = ""


def _strip_nii(name: str) -> str | None:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def entry_problem(path: Path, series: bool = True) -> str:
    """Why a folder entry cannot be a scan ("" when it can: a regular, visible .nii/.nii.gz file or,
    with ``series``, a visible folder with files or folders in it, read as one DICOM series or as a
    tree of them; without ``series`` (labels), a .nii/.nii.gz file or a DICOM SEG file)."""
    name = path.name
    if name.startswith("."):
        return "hidden file (name starts with '.'): not read"
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        if _strip_nii(name):
            return "a folder named like a scan, not a file"
        if not series:
            return "a folder, not a label file (a NIfTI mask or a DICOM SEG)"
        try:
            has_entries = any(not p.name.startswith(".") for p in path.iterdir())
        except OSError as e:
            return f"cannot list the folder: {e.strerror or e}"
        return "" if has_entries else "an empty folder, not a NIfTI file or a DICOM series"
    if not path.is_file():
        return "not a regular file"
    if not _strip_nii(name) and not (not series and is_dicom_file(path)):
        return "not a NIfTI file name (.nii or .nii.gz)" + ("" if series else " nor a DICOM SEG file")
    return ""


def _case_name(path: Path) -> str:
    """CASE of CASE.nii.gz, or of a series folder CASE/."""
    return _strip_nii(path.name) or path.name


def scan_entries(folder: Path, series: bool = True) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """A folder's scans with their case names, and every other entry with the reason it is not one.

    Scans: its NIfTI files (CASE.nii.gz: CASE) and, with ``series``, its DICOM series. A folder
    that directly holds files is one series named by the folder (as before); below it, and in a
    folder that holds only folders and a DICOMDIR (an archive's patient/study/series tree), every
    folder that directly holds DICOM files is one series, named by its UIDs
    (``data_catalog.dicom.series_identity``: the same id wherever the tree is copied). A tree with
    no DICOM file in it is listed with its reason."""
    if not folder.is_dir():
        return [], []
    found, others = [], []
    for p in sorted(folder.iterdir()):
        if series and p.name.upper() == "DICOMDIR" and p.is_file():  # an export's index: its series are found anyway
            continue
        problem = entry_problem(p, series)
        if problem:
            others.append((p, problem))
        elif p.is_dir():
            found += _series_of(p, others)
        else:
            found.append((p, _case_name(p)))
    return found, others


def _series_of(entry: Path, others: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """The series of one folder entry of a role folder (see :func:`scan_entries`); a problem of the
    whole entry goes to ``others``."""
    try:
        files = [p for p in series_files(entry) if p.name.upper() != "DICOMDIR"]
        tree, searched = find_series(entry)
    except ScanError as e:
        others.append((entry, str(e)))
        return []
    except OSError as e:
        others.append((entry, f"cannot list the folder: {e.strerror or e}"))
        return []
    below = [f for f in tree if f != entry]
    if not files and not below:
        others.append((entry, f"no DICOM file in {searched} folder(s) below it (and no NIfTI file): "
                              "not a DICOM series or tree of series"))
        return []
    itself = [(entry, entry.name)] if files else []  # files directly in it: checked as one series
    return itself + [(f, series_identity(f).scan_id) for f in below]


def _pair(root: Path, images: Path, labels: Path | None, role: str, strip_channel: bool) -> list[_Candidate]:
    """Images of one folder with their labels: a NIfTI label by case name, a DICOM SEG by the series
    it references. Labels without image are reported."""
    out: list[_Candidate] = []
    images_ok, image_others = scan_entries(images)
    labels_ok, label_others = scan_entries(labels, series=False) if labels else ([], [])
    seg_files = {p for p, _ in labels_ok if is_dicom_file(p)}
    label_files = {case: p for p, case in labels_ok if p not in seg_files}
    segs = _seg_labels(root, images_ok, sorted(seg_files), label_others)
    used: set[Path] = set()
    for img, case in images_ok:
        cand = _Candidate(scan_id=case, role=role, image=str(img.relative_to(root)))
        if strip_channel:  # nnU-Net: CASE_0000 is the (only) CT channel
            if case.endswith("_0000"):
                case = case[:-5]
                cand.scan_id = case
            else:
                cand.error = "nnU-Net image names end in _0000 (single-channel CT); other channels are not supported"
        if labels is not None and not cand.error:
            found = [lab for lab in (label_files.get(case), segs.get(img)) if lab is not None]
            if not found:
                seg = " or a DICOM SEG of the series" if img.is_dir() else ""
                cand.error = f"no label found (expected {labels.relative_to(root)}/{case}.nii.gz{seg})"
            elif len(found) > 1:
                cand.error = (f"two labels: {found[0].relative_to(root)} and {found[1].relative_to(root)}; "
                              "keep one of them")
            else:
                cand.label = str(found[0].relative_to(root))
            used.update(found)
        out.append(cand)
    for lab in [*label_files.values(), *segs.values()]:
        if lab not in used:
            out.append(_Candidate(scan_id=_case_name(lab), role=role, image=str(lab.relative_to(root)),
                                  error="label without image"))
    for entry, problem in image_others + label_others:
        out.append(_Candidate(scan_id=entry.name, role=role, image=str(entry.relative_to(root)), error=problem))
    return out


def _seg_labels(root: Path, images: list[tuple[Path, str]], segs: list[Path],
                others: list[tuple[Path, str]]) -> dict[Path, Path]:
    """{image series folder: its DICOM SEG} by each SEG's referenced series; a SEG that is not one,
    or that references no series of the folder, or a series another SEG labels, goes to ``others``
    with its reason. Headers only; read only when there are SEG files."""
    if not segs:
        return {}
    by_uid = {series_identity(p).series_uid: p for p, _ in images if p.is_dir()}
    out: dict[Path, Path] = {}
    for seg in segs:
        try:
            uid = seg_reference(seg)
        except ScanError as e:
            others.append((seg, str(e)))
            continue
        image = by_uid.get(uid)
        if image is None:
            others.append((seg, f"a DICOM SEG of series {uid}, which is not among the image series beside it"))
        elif image in out:
            others.append((seg, f"a second DICOM SEG of {image.relative_to(root)} (the first: "
                                f"{out[image].relative_to(root)}); keep one of them"))
        else:
            out[image] = seg
    return out


def discover(root: Path) -> tuple[str, list[_Candidate]]:
    """Find the scans of a data root in the INSTANCE 2022 layout (``train/data``, ``train/label``,
    ``unlabelled/``, ``test/data``, ``test/label``) or the nnU-Net layout (``imagesTr/CASE_0000``,
    ``labelsTr/CASE``, ``imagesTs/``, ``labelsTs/``, plus ``unlabelled/``). An image is a NIfTI file
    (``CASE.nii.gz``) or a folder holding one DICOM series (``CASE/``); labels are NIfTI files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        layout = "nnU-Net"
        cands = _pair(root, root / "imagesTr", root / "labelsTr", "labelled", True)
        cands += _pair(root, root / "imagesTs", root / "labelsTs", "test", True)
    else:
        layout = "INSTANCE 2022"
        cands = _pair(root, root / "train" / "data", root / "train" / "label", "labelled", False)
        cands += _pair(root, root / "test" / "data", root / "test" / "label", "test", False)
    cands += _pair(root, root / "unlabelled", None, "unlabelled", False)
    if not cands:
        raise FileNotFoundError(
            f"no scans under {root}: expected train/data + train/label, unlabelled/, test/data + test/label "
            "(INSTANCE 2022 layout) or imagesTr/ + labelsTr/, imagesTs/ (nnU-Net layout)"
        )
    return layout, cands


# ---------------------------------------------------------------------------------------- ingest
def _stat(root: Path, rel: str) -> tuple[str, str]:
    """(size, mtime in ns) of a file; of a series folder, its files' total size and latest mtime."""
    if not rel:
        return "", ""
    path = Path(root) / rel
    if path.is_dir():
        size, mtime = series_signature(path)
        return str(size), str(mtime)
    st = path.stat()
    return str(st.st_size), str(st.st_mtime_ns)


def _uids(image: Path) -> dict[str, str]:
    """The DICOM UIDs of a series folder (one header), none for a NIfTI file."""
    if not image.is_dir():
        return {"series_uid": "", "study_uid": ""}
    ident = series_identity(image)
    return {"series_uid": ident.series_uid, "study_uid": ident.study_uid}


def _validate(root: Path, cand: _Candidate, binarize: bool) -> dict[str, str]:
    """Read and check one candidate; returns the row fields that depend on the files' content."""
    fields = {"status": "ok", "reason": "", "shape": "", "spacing": "", "orientation": "", "voxel_hash": ""}
    fields.update(_uids(root / cand.image))
    try:
        image, info = read_image(root / cand.image)
        fields.update(
            shape="x".join(str(s) for s in info.shape),
            spacing="x".join(f"{s:.6g}" for s in info.spacing),
            orientation=info.orientation,
            voxel_hash=voxel_hash(image, info),
        )
        if cand.label:
            try:
                _, linfo = read_label(root / cand.label, binarize=binarize, image=root / cand.image)
            except ScanError as e:
                raise ScanError(f"label {cand.label}: {e}") from None
            check_label_matches(info, linfo)
    except ScanError as e:
        fields.update(status="rejected", reason=str(e))
    except OSError as e:
        fields.update(status="rejected", reason=f"cannot read file: {e}")
    return fields


_STAT_KEYS = ("role", "label_path", "label_transform", "image_size", "image_mtime_ns", "label_size", "label_mtime_ns")
_CONTENT_KEYS = ("image_hash", "label_hash", "label_path", "label_transform", "role")


def _known(prev: dict[str, str] | None) -> bool:
    """Whether a catalog row was read to the end before (validated, or rejected for a reason)."""
    return prev is not None and bool(prev["voxel_hash"] or prev["status"] != "ok")


def _scan_row(root: Path, cand: _Candidate, prev: dict[str, str] | None, transform: str) -> tuple[dict[str, str], str]:
    """The catalog row of one listed file from what can be known without reading it (its name, role
    and stat), and what is left to do: "read" its content, or nothing ("rejected": listed as
    unusable or vanished; "unchanged": same size and modification time as the catalog saw)."""
    row = {c: "" for c in SCAN_COLUMNS}
    row.update(scan_id=cand.scan_id, role=cand.role, image_path=cand.image, label_path=cand.label,
               label_transform=transform if cand.label else "")
    if cand.error:
        same = prev is not None and prev["reason"] == cand.error
        row.update(status="rejected", reason=cand.error, added_at=(prev or {}).get("added_at") or _now(),
                   updated_at=prev["updated_at"] if same else _now())
        return row, "rejected"
    try:
        row["image_size"], row["image_mtime_ns"] = _stat(root, cand.image)
        row["label_size"], row["label_mtime_ns"] = _stat(root, cand.label)
    except OSError as e:  # vanished since it was listed
        row.update(status="rejected", reason=f"cannot read file: {e.strerror or e}", added_at=_now(),
                   updated_at=_now())
        return row, "rejected"
    if _known(prev) and all(prev[k] == row[k] for k in _STAT_KEYS):
        kept = {**prev, "scan_id": cand.scan_id}
        if not kept["series_uid"] and kept["status"] == "ok":  # a catalog from before the UIDs were kept
            kept.update(_uids(root / cand.image))
        if kept["reason"].startswith(_DUPLICATE_REASONS):  # valid content: decided again with the others
            kept.update(status="ok", reason="")
        return kept, "unchanged"
    return row, "read"


def _check_file(root: Path, row: dict[str, str], cand: _Candidate, prev: dict[str, str] | None,
                binarize_labels: bool) -> str:
    """Hash one new or touched file and validate it unless its content is what the catalog knew;
    fills ``row`` in place and returns "new", "changed" or "unchanged"."""
    kind = "new" if prev is None else "changed"
    try:
        row["image_hash"] = file_sha256(root / cand.image)
        row["label_hash"] = file_sha256(root / cand.label) if cand.label else ""
    except OSError as e:  # vanished or locked since it was listed: rejected, the others go on
        row.update(status="rejected", reason=f"cannot read file: {e.strerror or e}",
                   added_at=(prev or {}).get("added_at") or _now(), updated_at=_now())
        return kind
    if _known(prev) and all(prev[k] == row[k] for k in _CONTENT_KEYS):
        for k in ("status", "reason", "shape", "spacing", "orientation", "added_at", "updated_at", "voxel_hash",
                  "series_uid", "study_uid"):
            row[k] = prev[k]
        if row["reason"].startswith(_DUPLICATE_REASONS):
            row.update(status="ok", reason="")
        return "unchanged"
    row.update(_validate(root, cand, binarize_labels))
    row["added_at"] = (prev or {}).get("added_at") or _now()
    row["updated_at"] = _now()
    return kind


def _check_files(root: Path, to_check: list[tuple[dict[str, str], _Candidate]], old_by_path: dict,
                 binarize_labels: bool, workers: int | None, on_progress) -> list[str]:
    """:func:`_check_file` on every item, on a few threads; the kinds in the order of ``to_check``."""
    n_workers = workers or min(4, os.cpu_count() or 1)
    done, done_lock = [0], threading.Lock()

    def read_one(item: tuple[dict[str, str], _Candidate]) -> str:
        row, cand = item
        kind = _check_file(root, row, cand, old_by_path.get(cand.image), binarize_labels)
        if on_progress is not None:
            with done_lock:
                done[0] += 1
                on_progress(done[0], len(to_check), cand.image)
        return kind

    if not to_check:
        return []
    log.info("reading %d new or changed file(s) with %d worker(s)", len(to_check), n_workers)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        return list(pool.map(read_one, to_check))


def ingest(
    root: Path, binarize_labels: bool = False, workers: int | None = None, lock_timeout_s: float = 120.0,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> IngestReport:
    """Register or refresh the catalog of ``root``; only new or changed files are read.

    A file whose size and modification time match the catalog is not opened; others are hashed,
    and only those whose content hash changed are validated again. Invalid files are recorded as
    rejected with a one-line reason; they never stop the others. Returns what changed.
    ``on_progress(done, total, image_path)`` is called after each file read (from worker threads,
    one call at a time).
    """
    root = Path(root).resolve()
    layout, cands = discover(root)
    report = IngestReport(layout=layout)
    transform = "binarize" if binarize_labels else ""
    with _locked(root, lock_timeout_s):
        old = _read_csv(catalog_dir(root) / "scans.csv", SCAN_COLUMNS)
        old_by_path = {r["image_path"]: r for r in old.to_dict("records")}
        rows: list[dict[str, str]] = []
        to_check: list[tuple[dict[str, str], _Candidate]] = []
        for cand in cands:
            prev = old_by_path.get(cand.image)
            row, action = _scan_row(root, cand, prev, transform)
            rows.append(row)
            if action == "read":
                to_check.append((row, cand))
            report.unchanged += action == "unchanged"
        for (_, cand), kind in zip(to_check, _check_files(root, to_check, old_by_path, binarize_labels, workers,
                                                          on_progress)):
            if kind == "unchanged":
                report.unchanged += 1
            else:
                (report.new if kind == "new" else report.changed).append(cand.scan_id)
        _write_catalog(root, rows, old, report)
    return report


def _write_catalog(root: Path, rows: list[dict[str, str]], old: pd.DataFrame, report: IngestReport) -> None:
    """Duplicates rejected, removed files noted, ``scans.csv`` written (atomically), rejections reported."""
    _reject_duplicates(rows)
    seen_paths = {r["image_path"] for r in rows}
    report.removed = sorted(r["scan_id"] for r in old.to_dict("records") if r["image_path"] not in seen_paths)
    table = pd.DataFrame(rows, columns=SCAN_COLUMNS).sort_values(["role", "scan_id", "image_path"])
    _write_csv(table, catalog_dir(root) / "scans.csv")
    report.rejected = [(r["image_path"], r["reason"]) for r in table.to_dict("records") if r["status"] == "rejected"]


def _reject_duplicates(rows: list[dict[str, str]]) -> None:
    """Same scan under two names (same decoded voxels and geometry, however the files are compressed
    or stored), or one scan id twice: keep the earliest-added, reject the rest. A test scan copied
    into ``unlabelled/`` is thus never pseudo-labelled and trained on."""
    def order(r: dict[str, str]) -> tuple[str, str]:
        return (r["added_at"] or "9999", r["image_path"])

    by_hash: dict[str, dict[str, str]] = {}
    by_id: dict[str, dict[str, str]] = {}
    for r in sorted(rows, key=order):
        if r["status"] != "ok":
            continue
        first = by_hash.get(r["voxel_hash"] or r["image_hash"])
        if first is not None:
            r.update(status="rejected", reason=f"same content as {first['image_path']} (the same voxels and geometry)")
            continue
        clash = by_id.get(r["scan_id"])
        if clash is not None:
            r.update(status="rejected",
                     reason=f"scan id {r['scan_id']} is already used by {clash['image_path']}; rename one of them")
            continue
        by_hash[r["voxel_hash"] or r["image_hash"]] = r
        by_id[r["scan_id"]] = r


# ---------------------------------------------------------------------------------------- queries
def load_scans(root: Path) -> pd.DataFrame:
    """The scan table (all rows, rejected included); empty if the root was never ingested."""
    return _read_csv(catalog_dir(root) / "scans.csv", SCAN_COLUMNS)


def usable_scans(root: Path, role: str | None = None) -> pd.DataFrame:
    """Rows with status ok, optionally of one role, with ``shape`` and ``spacing`` parsed to tuples."""
    df = load_scans(root)
    df = df[df["status"] == "ok"]
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
        df = df[df["role"] == role]
    df = df.copy()
    df["shape"] = df["shape"].map(lambda s: tuple(int(v) for v in s.split("x")))
    df["spacing"] = df["spacing"].map(lambda s: tuple(float(v) for v in s.split("x")))
    return df.reset_index(drop=True)


def catalog_hash(root: Path, role: str | None = None) -> str:
    """A hash of what training sees: the usable scans' ids, roles and content hashes (of one role
    only with ``role``: ``catalog_hash(root, "test")`` names the test set a model was scored on)."""
    df = load_scans(root)
    df = df[df["status"] == "ok"].sort_values("scan_id")
    if role is not None:
        df = df[df["role"] == role]
    h = hashlib.sha256()
    for r in df[["scan_id", "role", "image_hash", "label_hash", "label_transform"]].itertuples(index=False):
        h.update("|".join(r).encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- folds
def _folds_path(root: Path, n_folds: int, seed: int) -> Path:
    return catalog_dir(root) / f"folds_k{n_folds}_seed{seed}.csv"


def _seeded_key(seed: int, scan_id: str) -> str:
    return hashlib.sha256(f"{seed}:{scan_id}".encode()).hexdigest()


def update_folds(root: Path, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Assign every usable labelled scan to one of ``n_folds`` folds and persist the split.

    Existing assignments never change; new scans join the currently smallest folds, in an order
    and with tie-breaks drawn from ``seed``; scans no longer usable leave the split.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    labelled = usable_scans(root, "labelled")["scan_id"].tolist()
    with _locked(root):
        path = _folds_path(root, n_folds, seed)
        stored = _read_csv(path, ["scan_id", "fold", "assigned_at"])
        folds = stored[stored["scan_id"].isin(labelled)]
        counts = np.bincount(folds["fold"].astype(int), minlength=n_folds) if len(folds) else np.zeros(n_folds, int)
        fold_order = sorted(range(n_folds), key=lambda f: _seeded_key(seed, f"fold{f}"))
        new_ids = sorted(set(labelled) - set(folds["scan_id"]), key=lambda s: _seeded_key(seed, s))
        added = []
        for scan_id in new_ids:
            fold = min(fold_order, key=lambda f: counts[f])
            counts[fold] += 1
            added.append({"scan_id": scan_id, "fold": str(fold), "assigned_at": _now()})
        if added or len(folds) != len(stored) or not path.exists():
            folds = pd.concat([folds, pd.DataFrame(added)], ignore_index=True).sort_values("scan_id")
            _write_csv(folds, path)
    return _typed_folds(folds)


def _typed_folds(folds: pd.DataFrame) -> pd.DataFrame:
    out = folds[["scan_id", "fold", "assigned_at"]].astype({"scan_id": str, "fold": int, "assigned_at": str})
    return out.sort_values("scan_id").reset_index(drop=True)


def load_folds(root: Path, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """The persisted split (scan_id, fold), without updating it."""
    return _typed_folds(_read_csv(_folds_path(root, n_folds, seed), ["scan_id", "fold", "assigned_at"]))


def fold_items(labelled: dict[str, str], folds: dict[str, int], fold: int, extra: Iterable[dict] = ()) -> dict:
    """The training and validation items of one fold's members.

    ``labelled``: {scan_id: item} of the usable labelled scans (items are paths, e.g. cached
    cases); ``folds``: {scan_id: fold}; ``extra``: more training items ({"cache", "weight"}, e.g.
    pseudo-labels), which never enter validation. Returns {"train", "weights", "val", "labelled"}
    in scan-id order, labelled items first.
    """
    ids = sorted(s for s in labelled if s in folds)
    val = [labelled[s] for s in ids if folds[s] == fold]
    own = [labelled[s] for s in ids if folds[s] != fold]
    extra = list(extra)
    return {"train": own + [e["cache"] for e in extra],
            "weights": [1.0] * len(own) + [float(e["weight"]) for e in extra], "val": val, "labelled": own}


# ---------------------------------------------------------------------------------------- lineage
def record_pseudo_labels(root: Path, rows: Iterable[dict]) -> pd.DataFrame:
    """Add (or replace, per scan and round) pseudo-label lineage rows; returns the whole table.

    Unknown keys are ignored; ``created_at`` is filled with the current time when not given.
    """
    now = _now()
    new = pd.DataFrame([{**{c: "" for c in PSEUDO_COLUMNS}, "created_at": now,
                         **{k: v for k, v in _stringify(r).items() if k in PSEUDO_COLUMNS and v != ""}}
                        for r in rows], columns=PSEUDO_COLUMNS)
    with _locked(root):
        path = catalog_dir(root) / "pseudo_labels.csv"
        table = _read_csv(path, PSEUDO_COLUMNS)
        if len(new):
            keys = set(zip(new["scan_id"], new["round"]))
            keep = [(s, r) not in keys for s, r in zip(table["scan_id"], table["round"])]
            table = pd.concat([table[keep], new], ignore_index=True)
            table = table.sort_values(["round", "scan_id"], key=_natural_round)
            _write_csv(table, path)
    return load_pseudo_labels(root)


def _natural_round(col: pd.Series) -> pd.Series:
    return col.astype(int) if col.name == "round" else col


def _stringify(row: dict) -> dict[str, str]:
    out = {}
    for k, v in row.items():
        if isinstance(v, (list, tuple, dict)):
            out[k] = json.dumps(v)
        elif isinstance(v, (bool, np.bool_)):
            out[k] = "true" if v else "false"
        elif isinstance(v, float):
            out[k] = repr(v)
        else:
            out[k] = "" if v is None else str(v)
    return out


def load_pseudo_labels(root: Path, round_: int | None = None) -> pd.DataFrame:
    """The lineage table with typed columns; optionally one round's rows."""
    df = _read_csv(catalog_dir(root) / "pseudo_labels.csv", PSEUDO_COLUMNS)
    if len(df):
        df["round"] = df["round"].astype(int)
        for c in _PSEUDO_NUMBERS:
            df[c] = pd.to_numeric(df[c], errors="coerce")
        df["selected"] = df["selected"].str.lower() == "true"
    else:
        df["round"] = df["round"].astype(int)
        df["selected"] = df["selected"].astype(bool)
    if round_ is not None:
        df = df[df["round"] == round_]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------- hidden truth
TRUTH_DIR = "unlabelled_truth"


def has_truth(root: Path) -> bool:
    """Whether the root keeps the hidden truth of its unlabelled scans (phantoms do)."""
    return (Path(root) / TRUTH_DIR).is_dir()


def truth_pairs(root: Path) -> list[dict]:
    """(image, true label) of every usable unlabelled scan, from ``unlabelled_truth/<scan_id>.nii.gz``.

    Only benchmarks use this (the oracle arm); a scan without its truth file is an error, since an
    oracle with holes would not be one.
    """
    root = Path(root).resolve()
    truth_dir = root / TRUTH_DIR
    pairs, missing = [], []
    for r in usable_scans(root, "unlabelled").itertuples():
        truth = truth_dir / f"{r.scan_id}.nii.gz"
        if not truth.is_file():
            missing.append(r.scan_id)
            continue
        pairs.append({"scan_id": r.scan_id, "image": str(root / r.image_path), "image_hash": r.image_hash,
                      "label": str(truth), "label_hash": file_sha256(truth), "weight": 1.0})
    if missing:
        raise FileNotFoundError(f"{truth_dir} lacks the truth of {len(missing)} unlabelled scan(s) "
                                f"({_preview(missing)}): the oracle needs all of them")
    return pairs


# ---------------------------------------------------------------------------------------- display
def describe(root: Path) -> str:
    """Counts per role and status, pseudo-label rounds, and the rejected files with reasons."""
    df = load_scans(root)
    if not len(df):
        return f"{root}: no catalog yet (run `viola ingest {root}`)"
    lines = [f"catalog of {Path(root).resolve()}  (hash {catalog_hash(root)})", "", "scans:"]
    lines.append(f"  {'role':<12}{'ok':>6}{'rejected':>10}")
    for role in ROLES:
        sub = df[df["role"] == role]
        lines.append(f"  {role:<12}{(sub['status'] == 'ok').sum():>6}{(sub['status'] == 'rejected').sum():>10}")
    pl = load_pseudo_labels(root)
    lines += ["", "pseudo-label rounds:" if len(pl) else "pseudo-label rounds: none"]
    for rnd, sub in pl.groupby("round"):
        lines.append(
            f"  round {rnd}: {len(sub)} scans, {int(sub['selected'].sum())} selected, "
            f"mean predicted Dice of the selected {sub.loc[sub['selected'], 'predicted_dice'].mean():.3f}, "
            f"rule: {sub['rule'].iloc[0]}"
        )
    rejected = df[df["status"] == "rejected"]
    lines += ["", f"rejected files: {len(rejected)}"]
    lines += [f"  {r.image_path}: {r.reason}" for r in rejected.itertuples()]
    return "\n".join(lines)
