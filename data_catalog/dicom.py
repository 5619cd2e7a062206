"""DICOM CT series: a folder of slices read as one volume, checked like a NIfTI scan; its content
hash; the series of an exported tree (patient/study/series folders, a DICOMDIR) found and named;
a mask written back as a DICOM SEG that references the series, and a DICOM SEG read as a label.

The one module that reads or writes DICOM. A series folder holds the single-frame slices of one
CT series (file names do not matter; hidden files, a DICOMDIR and objects without an image, such
as reports, are skipped; localizer images are set aside). The volume is laid out so that a series
and a NIfTI file of the same data on the same grid read as the same array and affine:

* voxel axes: x = the image columns, y = the image rows, z = the slices in ascending position
  along the slice normal (ImageOrientationPatient's row direction x column direction), never in
  file-name or InstanceNumber order;
* intensities: stored values x RescaleSlope + RescaleIntercept (HU), per slice;
* affine: DICOM's LPS patient coordinates turned into the RAS+ convention of NIfTI/nibabel.

Every defect is a ``ScanError`` with a one-line reason naming the file and what is wrong. Headers
are read and checked first (without pixel data), so a series of absurd size is refused before any
pixel is decoded; pydicom only parses data, nothing in a file is ever executed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_catalog.files import MAX_VOXELS as _MAX_VOXELS
from data_catalog.files import ScanError, ScanInfo, atomic_write, scan_info

__all__ = [
    "DicomSeries",
    "SeriesIdentity",
    "check_seg_writer",
    "find_series",
    "holds_dicom_files",
    "is_dicom_file",
    "make_seg",
    "read_seg",
    "read_series",
    "read_series_geometry",
    "save_seg",
    "seg_reference",
    "series_files",
    "series_identity",
    "series_sha256",
    "series_signature",
]

log = logging.getLogger(__name__)

_DICM_OFFSET = 128  # the "DICM" marker follows the 128-byte preamble of a DICOM file (PS3.10 7.1)
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_MIN_SLICES = 3  # fewer cannot show that the slices are evenly spaced
_MAX_SIDE = 4096  # rows or columns: CT slices are 512 (at most 1024 or 2048)
_MAX_FILES = 8192
_MAX_FILE_BYTES = 64 << 20  # a single-frame CT slice is about 0.5 MB
_ORIENTATION_TOL = 1e-3  # direction cosines: DICOM's decimal strings are rounded
_POSITION_TOL_MM = 0.01  # and a relative 1% of the slice spacing, whichever is larger
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """A checked series, from its headers only: its slices in position order and its geometry."""

    folder: Path
    files: tuple[Path, ...]  # one per slice, ascending along the slice normal
    series_uid: str
    rows: int
    columns: int
    affine: np.ndarray  # (4, 4), RAS+ mm, voxel axes (columns, rows, slices)
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]
    transfer_syntax: str
    sop_uids: tuple[str, ...] = ()  # SOPInstanceUID of each slice, in ``files`` order

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, len(self.files))


# ---------------------------------------------------------------------------------------- files
def series_files(folder: Path) -> list[Path]:
    """The visible regular files directly in ``folder``, by name: what a series folder is made of
    (sub-folders are not searched)."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".") and p.is_file())


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_DICM_OFFSET + 4)
    except OSError:
        return False
    return len(head) == _DICM_OFFSET + 4 and head[_DICM_OFFSET:] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file by its "DICM" marker (a file, not a folder; nothing is parsed)."""
    return Path(path).is_file() and _has_dicm_marker(Path(path))


def holds_dicom_files(folder: Path) -> bool:
    """Whether ``folder`` directly holds a DICOM file (checked by its "DICM" marker; a DICOMDIR does
    not count), i.e. is a series folder rather than a folder of scans or of series folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(not p.name.lower().endswith((".nii", ".nii.gz")) and p.name.upper() != "DICOMDIR"
               and _has_dicm_marker(p) for p in series_files(folder))


def series_signature(folder: Path) -> tuple[int, int]:
    """(total bytes, latest modification in ns of the folder or any of its files): changes when a
    file is added, removed, renamed or rewritten, without reading any file."""
    folder = Path(folder)
    size, mtime = 0, folder.stat().st_mtime_ns
    for p in series_files(folder):
        st = p.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return size, mtime


def series_sha256(folder: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a series folder (hex): every visible file's name, size and bytes, in name order."""
    h = hashlib.sha256()
    for p in series_files(folder):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- trees
_MAX_TREE_DEPTH = 12  # patient/study/series is 3; DICOMDIR media add a few levels
_MAX_TREE_FOLDERS = 200_000


@dataclass(frozen=True)
class SeriesIdentity:
    """Who a series folder belongs to, from the header of its first DICOM file (by name): the UIDs
    and a stable scan id made from them (the same series exported twice, to any folder, gets the
    same id; no patient name or ID appears in it)."""

    scan_id: str
    series_uid: str
    study_uid: str


def series_identity(folder: Path) -> SeriesIdentity:
    """The identity of a series folder (one header read, no pixel data); a folder whose first
    DICOM file has no readable header (or that cannot be listed) is named by its path's hash
    instead, so that its defect is reported by the series checks rather than here."""
    folder = Path(folder)
    try:
        first = next((p for p in series_files(folder) if p.name.upper() != "DICOMDIR" and _has_dicm_marker(p)), None)
    except OSError:  # vanished or unreadable since it was listed: reported when it is read
        first = None
    ds = None
    if first is not None:
        pydicom, _ = _pydicom()
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True,
                                 specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID"])
        except Exception:  # reported with a reason by read_series
            ds = None
    series_uid = str(ds.get("SeriesInstanceUID", "") or "") if ds is not None else ""
    study_uid = str(ds.get("StudyInstanceUID", "") or "") if ds is not None else ""
    if series_uid:
        key = "\0".join([str(ds.get("PatientID", "") or ""), study_uid, series_uid])
    else:
        key = f"path\0{folder.resolve()}"
    return SeriesIdentity("dcm" + hashlib.sha256(key.encode()).hexdigest()[:12], series_uid, study_uid)


def find_series(tree: Path) -> tuple[list[Path], int]:
    """The folders at or below ``tree`` that directly hold DICOM files (by their "DICM" marker; a
    DICOMDIR does not count), each read as one series, in path order; and how many folders were
    searched. Hidden folders and symbolic links to folders are not entered; a tree deeper than
    any archive export or with more folders than any is refused (ScanError), before reading."""
    tree = Path(tree)
    found: list[Path] = []
    searched = 0
    for here, dirs, _ in os.walk(tree, followlinks=False):
        here_path = Path(here)
        searched += 1
        if searched > _MAX_TREE_FOLDERS:
            raise ScanError(f"more than {_MAX_TREE_FOLDERS} folders under {tree.name}: not one archive export")
        if len(here_path.relative_to(tree).parts) > _MAX_TREE_DEPTH:
            raise ScanError(f"{here_path.relative_to(tree)}: folders nested deeper than {_MAX_TREE_DEPTH} levels, "
                            "deeper than any archive export")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here_path / d).is_symlink())
        try:
            if holds_dicom_files(here_path):
                found.append(here_path)
        except OSError:  # unreadable folder: its series cannot be found, the others can
            continue
    return sorted(found), searched


# ---------------------------------------------------------------------------------------- headers
def _pydicom():
    import pydicom
    from pydicom.errors import InvalidDicomError

    return pydicom, InvalidDicomError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_header(path: Path):
    """The dataset of one file without its pixel data; ScanError naming the file if it is not DICOM."""
    pydicom, invalid = _pydicom()
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise ScanError(f"{path.name}: {size / 2**20:.0f} MB, larger than any single CT slice "
                        f"(limit {_MAX_FILE_BYTES >> 20} MB); multi-frame files are not supported")
    if not _has_dicm_marker(path):
        raise ScanError(f"{path.name}: not a DICOM file (no DICM marker at byte {_DICM_OFFSET}); "
                        "a series folder holds only the slices of one series")
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except invalid as e:
        raise ScanError(f"{path.name}: not a DICOM file ({_first_line(e)})") from None
    except Exception as e:  # pydicom raises many types for broken files
        raise ScanError(f"{path.name}: unreadable DICOM header ({_first_line(e)})") from None


def _floats(ds, keyword: str, n: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise ScanError(f"{name}: no {keyword}; the slice has no patient geometry")
    values = [value] if isinstance(value, str) or not isinstance(value, Sequence) else list(value)
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanError(f"{name}: {keyword} {value!r} is not a list of numbers") from None
    if out.size != n or not np.all(np.isfinite(out)):
        raise ScanError(f"{name}: {keyword} {value!r} should hold {n} finite numbers")
    return out


def _is_localizer(ds) -> bool:
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type)


def _describe(uid: str, datasets: list, names: list[str]) -> str:
    desc = str(datasets[0].get("SeriesDescription", "") or "").strip()
    return f"{uid or 'no SeriesInstanceUID'}{f' {desc!r}' if desc else ''} ({len(names)} file(s), e.g. {names[0]})"


def _headers(folder: Path) -> tuple[list, list[Path]]:
    """The image slices of the folder's one series (headers only), with their files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"{folder.name}: not a folder")
    try:
        files = series_files(folder)
    except OSError as e:
        raise ScanError(f"cannot list the folder: {e.strerror or e}") from None
    if not files:
        raise ScanError("no files in the folder (sub-folders are not searched): not a DICOM series")
    if len(files) > _MAX_FILES:
        raise ScanError(f"{len(files)} files, more than any CT series has slices (limit {_MAX_FILES})")
    groups: dict[str, tuple[list, list[str], list[Path]]] = {}
    localizers = skipped = 0
    for path in files:
        if path.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = _read_header(path)
        except OSError as e:
            raise ScanError(f"{path.name}: cannot read file ({e.strerror or e})") from None
        media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if media_class == _DICOMDIR_CLASS:
            skipped += 1
            continue
        if "Rows" not in ds or "Columns" not in ds:  # a report, a key-object selection, ...: no image
            log.debug("%s: %s holds no image, skipped", folder, path.name)
            skipped += 1
            continue
        if _is_localizer(ds):
            localizers += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        group = groups.setdefault(uid, ([], [], []))
        group[0].append(ds)
        group[1].append(path.name)
        group[2].append(path)
    if not groups:
        if localizers:
            raise ScanError(f"only localizer (scout) images ({localizers}): no CT volume in the folder")
        raise ScanError(f"no DICOM image in the folder ({skipped} file(s) without one: a DICOMDIR or "
                        "non-image objects; sub-folders are not searched)")
    if len(groups) > 1:
        shown = "; ".join(_describe(uid, ds, names) for uid, (ds, names, _) in list(groups.items())[:3])
        more = f"; and {len(groups) - 3} more" if len(groups) > 3 else ""
        raise ScanError(f"{len(groups)} series in one folder: {shown}{more}; put each series in its own folder")
    (datasets, _, paths), = groups.values()
    if localizers:
        log.info("%s: %d localizer image(s) set aside", folder, localizers)
    return datasets, paths


# ---------------------------------------------------------------------------------------- geometry
def _check_slices(datasets: list, paths: list[Path]) -> None:
    """Modality, image type and size of every slice: all CT, single-frame, greyscale, one size."""
    first, first_name = datasets[0], paths[0].name
    for ds, path in zip(datasets, paths):
        name = path.name
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality and modality != "CT":
            raise ScanError(f"{name}: modality {modality}, not CT")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ScanError(f"{name}: a multi-frame image ({frames} frames); only single-frame slices are supported")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if samples != 1 or not photometric.startswith("MONOCHROME"):
            raise ScanError(f"{name}: a colour image ({photometric}), not a CT slice")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if not (0 < rows <= _MAX_SIDE and 0 < cols <= _MAX_SIDE):
            raise ScanError(f"{name}: image size {rows}x{cols} outside 1..{_MAX_SIDE}")
        if (rows, cols) != (int(first.Rows), int(first.Columns)):
            raise ScanError(f"mismatched image sizes: {rows}x{cols} ({name}) and "
                            f"{int(first.Rows)}x{int(first.Columns)} ({first_name})")
    n = len(datasets)
    voxels = int(first.Rows) * int(first.Columns) * n
    if voxels > _MAX_VOXELS:
        raise ScanError(f"{int(first.Columns)}x{int(first.Rows)}x{n} = {voxels:.3g} voxels, more than any CT scan "
                        f"(limit {_MAX_VOXELS:.3g}): refused before reading")
    if n == 1:
        raise ScanError(f"{first_name}: a single slice, not a volume")
    if n < _MIN_SLICES:
        raise ScanError(f"too few slices ({n}); a volume needs at least {_MIN_SLICES}")


def _geometry(datasets: list, paths: list[Path]) -> tuple[list[int], np.ndarray]:
    """Slice order (ascending along the normal) and the LPS affine; refuses what is not one regular grid."""
    names = [p.name for p in paths]
    orients = [_floats(ds, "ImageOrientationPatient", 6, nm) for ds, nm in zip(datasets, names)]
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, nm) for ds, nm in zip(datasets, names)])
    spacings = [_floats(ds, "PixelSpacing", 2, nm) for ds, nm in zip(datasets, names)]
    for o, nm in zip(orients, names):
        if np.max(np.abs(o - orients[0])) > _ORIENTATION_TOL:
            raise ScanError(f"mixed orientations: {nm} has ImageOrientationPatient {np.round(o, 4).tolist()}, "
                            f"{names[0]} {np.round(orients[0], 4).tolist()}")
    for s, nm in zip(spacings, names):
        if np.max(np.abs(s - spacings[0])) > 1e-4 * max(1.0, float(np.max(spacings[0]))):
            raise ScanError(f"mixed pixel spacings: {s.tolist()} mm ({nm}) and {spacings[0].tolist()} mm ({names[0]})")
    row_dir, col_dir = orients[0][:3], orients[0][3:]
    if (abs(np.linalg.norm(row_dir) - 1) > _ORIENTATION_TOL or abs(np.linalg.norm(col_dir) - 1) > _ORIENTATION_TOL
            or abs(float(row_dir @ col_dir)) > _ORIENTATION_TOL):
        raise ScanError(f"{names[0]}: ImageOrientationPatient {orients[0].tolist()} is not two orthogonal unit vectors")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    row_spacing, col_spacing = (float(v) for v in spacings[0])  # between rows, between columns (mm)
    if min(row_spacing, col_spacing) <= 0:
        raise ScanError(f"{names[0]}: PixelSpacing {spacings[0].tolist()} is not positive")
    normal = np.cross(row_dir, col_dir)
    height = positions @ normal  # mm along the normal
    order = [int(i) for i in np.argsort(height, kind="stable")]
    height, positions = height[order], positions[order]
    steps = np.diff(height)
    at = int(np.argmin(steps))
    if steps[at] < _POSITION_TOL_MM:
        raise ScanError(f"two slices at the same position ({names[order[at]]} and {names[order[at + 1]]}): "
                        "a repeated or mixed acquisition")
    step = float(np.median(steps))
    tol = max(_POSITION_TOL_MM, 0.01 * step)
    sideways = np.linalg.norm(np.diff(positions, axis=0) - steps[:, None] * normal, axis=1)
    worst = int(np.argmax(sideways))
    if sideways[worst] > tol:
        angle = math.degrees(math.atan2(float(sideways[worst]), float(steps[worst])))
        raise ScanError(f"slices are not stacked along their normal ({sideways[worst]:.3g} mm sideways per "
                        f"{steps[worst]:.3g} mm slice, {angle:.1f}°: gantry tilt or oblique stacking, e.g. "
                        f"{names[order[worst]]} -> {names[order[worst + 1]]}); resample the series first")
    uneven = np.abs(steps - step) > tol
    if uneven.any():
        k = int(np.argmax(np.abs(steps - step)))
        ratio = steps[k] / step
        pair = f"{names[order[k]]} -> {names[order[k + 1]]}"
        if ratio > 1.5 and abs(ratio - round(ratio)) * step <= tol:
            raise ScanError(f"missing slice(s): a gap of {steps[k]:.4g} mm between {pair} where the slices are "
                            f"{step:.4g} mm apart ({round(ratio) - 1} slice(s) missing)")
        raise ScanError(f"uneven slice spacing: {steps.min():.4g} to {steps.max():.4g} mm (e.g. {steps[k]:.4g} mm "
                        f"between {pair}, {step:.4g} mm elsewhere)")
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # x: along a row, from column to column
    affine[:3, 1] = col_dir * row_spacing  # y: down the columns, from row to row
    affine[:3, 2] = normal * (height[-1] - height[0]) / (len(order) - 1)
    affine[:3, 3] = positions[0]
    return order, affine


def _number(ds, keyword: str, default: float, name: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ScanError(f"{name}: {keyword} {value!r} is not a number") from None


def _rescale(ds, name: str) -> tuple[float, float]:
    slope, intercept = _number(ds, "RescaleSlope", 1.0, name), _number(ds, "RescaleIntercept", 0.0, name)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ScanError(f"{name}: unusable rescale (slope {slope:g}, intercept {intercept:g})")
    return slope, intercept


def _series(folder: Path, datasets: list, paths: list[Path]) -> DicomSeries:
    _check_slices(datasets, paths)
    order, lps = _geometry(datasets, paths)
    rescale = [_rescale(datasets[i], paths[i].name) for i in order]
    first = datasets[order[0]]
    syntax = str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", "") or "")
    return DicomSeries(
        folder=Path(folder),
        files=tuple(paths[i] for i in order),
        series_uid=str(first.get("SeriesInstanceUID", "") or ""),
        rows=int(first.Rows),
        columns=int(first.Columns),
        affine=_LPS_TO_RAS @ lps,
        slopes=tuple(s for s, _ in rescale),
        intercepts=tuple(i for _, i in rescale),
        transfer_syntax=syntax,
        sop_uids=tuple(str(datasets[i].get("SOPInstanceUID", "") or "") for i in order),
    )


def read_series_geometry(folder: Path) -> DicomSeries:
    """Check a series folder from its headers alone (no pixel data is read); ScanError if unusable."""
    datasets, paths = _headers(folder)
    return _series(folder, datasets, paths)


# ---------------------------------------------------------------------------------------- pixels
def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else uid or "unknown"


def _decode(path: Path, series: DicomSeries) -> np.ndarray:
    """One slice's stored values, (rows, columns)."""
    pydicom, _ = _pydicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise ScanError(f"{path.name}: unreadable DICOM file ({_first_line(e)})") from None
    if "PixelData" not in ds:
        raise ScanError(f"{path.name}: no pixel data")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # a missing decoder, a short or corrupt pixel stream
        from pydicom.uid import UID

        if syntax and UID(syntax).is_compressed:
            raise ScanError(f"{path.name}: cannot decode the compressed transfer syntax {_syntax_name(syntax)} "
                            f"({_first_line(e)}); install a decoder (pylibjpeg with its plugins, or "
                            "python-gdcm) or decompress the series first") from None
        raise ScanError(f"{path.name}: unreadable pixel data ({_first_line(e)})") from None
    if pixels.shape != (series.rows, series.columns):
        raise ScanError(f"{path.name}: pixel data of shape {pixels.shape}, expected "
                        f"{series.rows}x{series.columns} from its header")
    return pixels


def read_series(folder: Path) -> tuple[np.ndarray, ScanInfo]:
    """A series folder as float32 HU (X = columns, Y = rows, Z = slices along the normal) with its
    geometry; ScanError with a one-line reason if unusable.

    Refuses: files that are not DICOM, several series, localizers only, non-CT modality, multi-frame
    or colour images, mismatched sizes or orientations, fewer than 3 slices, two slices at one
    position, a missing slice, uneven spacing, gantry tilt or oblique stacking, pixel data that
    cannot be decoded. The Hounsfield check of ``scans.read_image`` comes on top.
    """
    series = read_series_geometry(folder)
    volume = np.empty(series.shape, dtype=np.float32)  # (X, Y, Z)
    for k, path in enumerate(series.files):
        stored = _decode(path, series)  # (rows, columns) = (Y, X)
        hu = stored.astype(np.float64) * series.slopes[k] + series.intercepts[k]
        volume[:, :, k] = hu.T
    return volume, scan_info(series.affine, series.shape)


# ---------------------------------------------------------------------------------------- DICOM SEG
_HIGHDICOM_MISSING = "writing DICOM SEG needs highdicom, which is not installed: pip install 'viola-ich[dicom]'"


def check_seg_writer() -> None:
    """Raise RuntimeError with how to install it when highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise RuntimeError(_HIGHDICOM_MISSING) from None


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("viola-ich")
    except PackageNotFoundError:
        return "0"


def make_seg(mask: np.ndarray, folder: Path, series_description: str = "viola-ICH haemorrhage"):
    """``mask`` (uint8 (X, Y, Z) on the series' grid, as ``read_series`` gives it) as a binary DICOM
    SEG of the series in ``folder`` (a pydicom dataset, in memory): one frame per source slice,
    segment 1 "Haemorrhage" (SCT 50960005 Hemorrhage, category SCT 49755003 Morphologically
    abnormal structure, region SCT 12738006 Brain), referencing the source images, study and frame
    of reference. ScanError if the series' headers do not allow one; ``save_seg`` writes it."""
    check_seg_writer()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets, paths = _headers(folder)
    series = _series(folder, datasets, paths)
    by_path = dict(zip(paths, datasets))
    sources = [by_path[p] for p in series.files]
    mask = np.asarray(mask)
    if mask.shape != series.shape:
        raise ScanError(f"mask of shape {mask.shape} is not on the series' grid {series.shape}")
    frames = np.ascontiguousarray((mask > 0).astype(np.uint8).transpose(2, 1, 0))  # (slices, rows, columns)
    version = _software_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="viola-ICH", family=codes.cid7162.ArtificialIntelligence, version=version)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Haemorrhage",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain],
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="viola-ICH",
            manufacturer_model_name="viola-UNet ensemble",
            software_versions=version,
            device_serial_number="none",
            series_description=series_description,
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # source headers highdicom cannot use
        raise ScanError(f"cannot make a DICOM SEG of this series ({_first_line(e)})") from None
    return seg


def save_seg(seg, path: Path) -> None:
    """Write a dataset from ``make_seg`` atomically (a DICOM file with its preamble and file meta)."""
    atomic_write(Path(path), lambda tmp: seg.save_as(str(tmp)))


# ---------------------------------------------------------------------------------------- DICOM SEG in
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
# SNOMED CT codes of haemorrhage as segmented property types: Hemorrhage (the one make_seg writes),
# Cerebral hemorrhage, Subarachnoid hemorrhage, Subdural hemorrhage, Hematoma; and words in a
# segment's label or code meaning that say the same, for SEGs coded otherwise
_HAEMORRHAGE_CODES = {"50960005", "274100004", "21454007", "35486000", "385494008"}
_HAEMORRHAGE_STEMS = ("hemorrhag", "haemorrhag", "hematoma", "haematoma", "bleed")
_HAEMORRHAGE_ABBREVIATIONS = {"ich", "iph", "ivh", "sah", "sdh", "edh"}


def seg_reference(path: Path) -> str:
    """The SeriesInstanceUID a DICOM SEG file labels (its header only); ScanError naming the file
    when it is not a DICOM SEG or references no single series."""
    path = Path(path)
    ds = _read_header(path)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class != _SEG_CLASS and modality != "SEG":
        raise ScanError(f"{path.name}: a DICOM {modality or 'object'} file, not a DICOM SEG (labels are NIfTI "
                        "masks or DICOM SEG)")
    refs = {str(item.get("SeriesInstanceUID", "") or "") for item in ds.get("ReferencedSeriesSequence", [])}
    refs.discard("")
    if len(refs) != 1:
        raise ScanError(f"{path.name}: a DICOM SEG that references {len(refs)} series (ReferencedSeriesSequence); "
                        "a label references exactly one")
    return refs.pop()


def _is_haemorrhage(segment) -> bool:
    meanings = [str(segment.get("SegmentLabel", "") or "")]
    for code in segment.get("SegmentedPropertyTypeCodeSequence", []):
        if str(code.get("CodeValue", "") or "") in _HAEMORRHAGE_CODES:
            return True
        meanings.append(str(code.get("CodeMeaning", "") or ""))
    words = " ".join(meanings).lower().replace("-", " ").replace("_", " ").split()
    return any(w.startswith(_HAEMORRHAGE_STEMS) or w in _HAEMORRHAGE_ABBREVIATIONS for w in words)


def _segment_name(segment) -> str:
    label = str(segment.get("SegmentLabel", "") or "")
    types = segment.get("SegmentedPropertyTypeCodeSequence", [])
    meaning = str(types[0].get("CodeMeaning", "") or "") if len(types) else ""
    return f"{segment.get('SegmentNumber', '?')} {label or meaning or 'unnamed'!r}"


def read_seg(path: Path, folder: Path) -> tuple[np.ndarray, ScanInfo]:
    """A DICOM SEG as the label of the series in ``folder``: uint8 {0, 1} on the series' grid (as
    ``read_series`` lays it out), the union of its haemorrhage segments (other segments, e.g. a
    brain mask, are left out and logged; fractional segments count from 0.5). ScanError naming the
    file when highdicom is missing, the SEG references another series or none of its slices, or
    no segment is haemorrhage."""
    path = Path(path)
    try:
        import highdicom as hd
    except ImportError:
        raise ScanError(f"{path.name}: reading a DICOM SEG label needs highdicom, which is not installed: "
                        "pip install 'viola-ich[dicom]'") from None
    referenced = seg_reference(path)
    series = read_series_geometry(folder)
    if referenced != series.series_uid:
        raise ScanError(f"{path.name}: references series {referenced}, not this image's {series.series_uid}")
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # highdicom raises many types for files it cannot use
        raise ScanError(f"{path.name}: unreadable DICOM SEG ({_first_line(e)})") from None
    segments = list(seg.get("SegmentSequence", []))
    keep = [int(s.SegmentNumber) for s in segments if _is_haemorrhage(s)]
    if not keep:
        shown = ", ".join(_segment_name(s) for s in segments[:4]) or "none"
        raise ScanError(f"{path.name}: no haemorrhage segment (segments: {shown}); a label marks haemorrhage")
    left = [_segment_name(s) for s in segments if int(s.SegmentNumber) not in keep]
    if left:
        log.info("%s: segment(s) %s are not haemorrhage, left out of the label", path.name, ", ".join(left))
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_uids), segment_numbers=keep, combine_segments=False,
            assert_missing_frames_are_empty=True, skip_overlap_checks=True, dtype=np.float32)
    except Exception as e:  # frames that reference none of the series' slices, a broken pixel stream
        raise ScanError(f"{path.name}: its frames do not fit the series' slices ({_first_line(e)})") from None
    mask = np.any(pixels >= 0.5, axis=-1)  # (slices, rows, columns)
    if mask.shape != (len(series.files), series.rows, series.columns):
        raise ScanError(f"{path.name}: frames of {mask.shape[1]}x{mask.shape[2]}, not the series' "
                        f"{series.rows}x{series.columns}")
    return np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8), scan_info(series.affine, series.shape)
