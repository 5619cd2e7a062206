"""Reading and validating NIfTI scans and labels, and content hashes; DICOM series
folders are read by ``data_catalog.dicom`` and pass through the same checks here. The error, the
geometry and atomic writes they share come from ``data_catalog.files`` (and are importable from here).

Every check turns a defect of real data into a ``ScanError`` with a one-line reason, so that the
catalog can record it, show it and go on with the other files. Original files are only read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from data_catalog.files import MAX_VOXELS as _MAX_VOXELS
from data_catalog.files import ScanError, ScanInfo, atomic_write, scan_info

__all__ = [
    "ScanError",
    "ScanInfo",
    "array_image",
    "atomic_write",
    "check_label_matches",
    "file_sha256",
    "read_image",
    "read_label",
    "save_nifti_like",
    "scan_info",
    "voxel_hash",
]

log = logging.getLogger(__name__)

_NIFTI1_SIZE, _NIFTI2_SIZE = 348, 540
# HU sanity: a head CT has air (about -1000 HU, or padding below it) and bone (hundreds of HU)
_AIR_HU, _BONE_HU = -500.0, 200.0


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file's bytes (hex); of a DICOM series folder, its files' names and bytes
    (``data_catalog.dicom.series_sha256``)."""
    if Path(path).is_dir():
        from data_catalog.dicom import series_sha256

        return series_sha256(Path(path), chunk)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header_size_limit(head: bytes) -> int:
    """Bytes the file can need (header, extensions, voxels), from its header alone; a header whose
    voxel count no CT scan reaches is refused here, before any voxel is read."""
    sizeof_hdr = int.from_bytes(head[:4], "little")
    if sizeof_hdr not in (_NIFTI1_SIZE, _NIFTI2_SIZE):
        sizeof_hdr = int.from_bytes(head[:4], "big")
    if sizeof_hdr not in (_NIFTI1_SIZE, _NIFTI2_SIZE):
        raise ScanError("not a NIfTI file (bad header size field)")
    if len(head) < sizeof_hdr:
        raise ScanError(f"not a NIfTI file (only {len(head)} bytes after decompression)")
    klass = nib.Nifti2Header if sizeof_hdr == _NIFTI2_SIZE else nib.Nifti1Header
    try:
        hdr = klass.from_fileobj(io.BytesIO(head[:sizeof_hdr]), check=False)
        shape = tuple(int(v) for v in hdr.get_data_shape())
        itemsize = int(hdr.get_data_dtype().itemsize)
        offset = int(hdr.get_data_offset())
    except Exception as e:  # nibabel raises many types for nonsense headers
        raise ScanError(f"unreadable NIfTI header ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    n_voxels = math.prod(shape) if shape else 0
    if n_voxels > _MAX_VOXELS:
        raise ScanError(f"header claims {'x'.join(map(str, shape))} = {n_voxels:.3g} voxels, more than any CT "
                        f"scan (limit {_MAX_VOXELS:.3g}): refused before reading")
    return max(offset, sizeof_hdr) + n_voxels * itemsize


def _read_bounded(path: Path) -> bytes:
    """The file's (decompressed) bytes, never more than its header says it needs, so that a
    decompression bomb or an absurd header cannot exhaust memory."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if path.name.endswith(".gz") and not gz:
        raise ScanError("named .nii.gz but not gzip-compressed")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            head = f.read(_NIFTI2_SIZE)
            if not head:
                raise ScanError("empty file")
            if len(head) < _NIFTI1_SIZE:
                raise ScanError(f"not a NIfTI file (only {len(head)} bytes after decompression)")
            need = _header_size_limit(head)
            rest = f.read(max(0, need - len(head)))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ScanError(f"truncated or corrupt gzip stream ({e})") from None
    return head + rest


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a .nii / .nii.gz fully into memory, turning every low-level failure into a ScanError."""
    path = Path(path)
    try:
        raw = _read_bounded(path)
    except ScanError:
        raise
    except OSError as e:
        raise ScanError(f"cannot read file: {e.strerror or e}") from None
    sizeof_hdr = int.from_bytes(raw[:4], "little")
    try:
        img = nib.Nifti1Image.from_stream(io.BytesIO(raw)) if sizeof_hdr != _NIFTI2_SIZE else (
            nib.Nifti2Image.from_stream(io.BytesIO(raw))
        )
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken headers and short data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "bytes" in msg or "buffer" in msg or "size" in msg:
            raise ScanError(f"truncated file: the header promises more voxels than the file holds ({msg})") from None
        raise ScanError(f"unreadable NIfTI: {msg}") from None
    return img, data


def _squeeze_to_3d(data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes (a 3-D volume saved as X x Y x Z x 1); refuse anything else."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ScanError(f"expected a 3-D volume, got {data.ndim}-D with shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise ScanError(f"empty volume with shape {tuple(data.shape)}")
    return data


def _info(img: nib.Nifti1Image, shape: tuple[int, ...]) -> ScanInfo:
    zooms = tuple(float(s) for s in img.header.get_zooms()[:3])
    if min(zooms) <= 0:
        raise ScanError(f"invalid voxel spacing {zooms} in the header")
    return scan_info(img.affine, shape)


def read_image(path: Path, check_hu: bool = True) -> tuple[np.ndarray, ScanInfo]:
    """Load a CT image as float32 HU (X, Y, Z) with its geometry; ScanError with a reason if unusable.

    ``path`` is a NIfTI file or a folder holding one DICOM series (``data_catalog.dicom.read_series``,
    which checks the series itself). Checks: NIfTI (gzip or not), complete, 3-D, finite, and
    (``check_hu``) intensities that look like Hounsfield units: some air below -500 HU and some
    bone above 200 HU.
    """
    if Path(path).is_dir():
        from data_catalog.dicom import read_series

        image, info = read_series(Path(path))
    else:
        img, data = _load(path)
        data = _squeeze_to_3d(data)
        info = _info(img, data.shape)
        if not np.issubdtype(data.dtype, np.number):
            raise ScanError(f"non-numeric voxel type {data.dtype}")
        image = np.asarray(data, dtype=np.float32)
    return _check_values(image, check_hu), info


def _check_values(image: np.ndarray, check_hu: bool) -> np.ndarray:
    """The checks every image gets, whatever it came from: finite, and (``check_hu``) in HU."""
    finite = np.isfinite(image)
    if not finite.all():
        raise ScanError(f"{int(image.size - finite.sum())} NaN or infinite voxel(s)")
    if check_hu:
        _check_hounsfield(image)
    return image


def array_image(array: np.ndarray, affine: np.ndarray, check_hu: bool = True) -> tuple[np.ndarray, ScanInfo]:
    """A CT volume handed over in memory, checked as :func:`read_image` checks a file: 3-D, finite,
    a valid affine (4 x 4, mm), and (``check_hu``) intensities in Hounsfield units."""
    data = np.asarray(array)
    if not np.issubdtype(data.dtype, np.number):
        raise ScanError(f"non-numeric voxel type {data.dtype}")
    data = _squeeze_to_3d(data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ScanError(f"affine must be 4 x 4, got shape {affine.shape}")
    info = scan_info(affine, data.shape)
    return _check_values(np.asarray(data, dtype=np.float32), check_hu), info


def voxel_hash(image: np.ndarray, info: ScanInfo) -> str:
    """Content hash of what a scan *is*: its decoded voxel values (as float32 HU) and its grid
    (shape and affine, to 1e-4 mm), whatever its file's compression, data type or header padding."""
    h = hashlib.sha256()
    h.update(repr((tuple(info.shape), np.round(info.affine, 4).tolist())).encode())
    h.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    return h.hexdigest()


def _check_hounsfield(image: np.ndarray) -> None:
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise ScanError(f"all voxels are {lo:g}: an empty or blank image")
    if lo >= 0 and hi <= 255:
        raise ScanError(f"intensities {lo:g}..{hi:g} look like an 8-bit export, not Hounsfield units")
    if lo >= 0 and hi <= 1.0 + 1e-6:
        raise ScanError(f"intensities {lo:g}..{hi:g} look normalised to [0, 1], not Hounsfield units")
    if lo >= 0:
        raise ScanError(
            f"intensities {lo:g}..{hi:g} have no air (< {_AIR_HU:g} HU): raw CT numbers without the "
            "rescale intercept (e.g. -1024), not Hounsfield units"
        )
    p_air = float(np.mean(image < _AIR_HU))
    if p_air < 1e-3:
        raise ScanError(f"no air below {_AIR_HU:g} HU (min {lo:g}): intensities do not look like Hounsfield units")
    if hi < _BONE_HU:
        raise ScanError(f"no bone above {_BONE_HU:g} HU (max {hi:g}): intensities do not look like Hounsfield units")


def read_label(path: Path, binarize: bool = False, image: Path | None = None) -> tuple[np.ndarray, ScanInfo]:
    """Load a label as uint8 {0, 1}; ScanError with a reason for anything else.

    A NIfTI mask: 0/255 masks and multi-class labels are refused with a reason naming their
    values, unless ``binarize`` is set, which maps every non-zero value to 1 (in memory; files are
    never changed). A DICOM SEG (``data_catalog.dicom.read_seg``) labels the DICOM series folder
    ``image`` and is read on its grid.
    """
    from data_catalog.dicom import is_dicom_file, read_seg

    if is_dicom_file(Path(path)):
        if image is None or not Path(image).is_dir():
            raise ScanError(f"{Path(path).name}: a DICOM SEG labels a DICOM series; "
                            f"{'no image was given' if image is None else Path(image).name + ' is not one'}")
        return read_seg(Path(path), Path(image))
    img, data = _load(path)
    data = _squeeze_to_3d(data)
    info = _info(img, data.shape)
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.number):
        raise ScanError(f"non-numeric label type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ScanError("label has NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise ScanError("label has non-integer values (a probability map?); expected a binary mask {0, 1}")
    values = np.unique(arr)
    if values.size > 64:
        raise ScanError(f"label has {values.size} distinct values; expected a binary mask {{0, 1}}")
    vals = [int(v) for v in values]
    if set(vals) <= {0, 1}:
        return arr.astype(np.uint8, copy=False), info
    if binarize:
        return (arr != 0).astype(np.uint8), info
    shown = ", ".join(str(v) for v in vals[:8]) + (", ..." if len(vals) > 8 else "")
    if set(vals) <= {0, 255}:
        hint = "a 0/255 mask"
    elif any(v < 0 for v in vals):
        hint = "negative values"
    else:
        hint = "a multi-class label"
    raise ScanError(
        f"label values {{{shown}}} ({hint}); expected {{0, 1}}: ingest with --binarize-labels to map non-zero to 1"
    )


def check_label_matches(image: ScanInfo, label: ScanInfo, tol_mm: float = 1e-3) -> None:
    """Refuse a label whose grid differs from its image's (shape or affine)."""
    if image.shape != label.shape:
        raise ScanError(f"label shape {label.shape} differs from the image's {image.shape}")
    diff = float(np.max(np.abs(image.affine - label.affine)))
    if diff > tol_mm:
        raise ScanError(f"label affine differs from the image's (max difference {diff:.4g} mm)")


def save_nifti_like(array: np.ndarray, reference: Path | nib.Nifti1Image, path: Path) -> None:
    """Write ``array`` atomically as NIfTI with the header and affine of ``reference``.

    The data type comes from ``array`` (e.g. uint8 masks); scaling is reset so values are stored
    as they are. A DICOM series folder as ``reference`` gives its grid (``read_image``'s affine),
    as scanner coordinates in both the qform and the sform.
    """
    if isinstance(reference, (str, Path)) and Path(reference).is_dir():
        from data_catalog.dicom import read_series_geometry

        affine = read_series_geometry(Path(reference)).affine
        out = nib.Nifti1Image(np.asarray(array), affine)
        out.header.set_data_dtype(array.dtype)
        out.header.set_xyzt_units("mm")
        out.header.set_slope_inter(1, 0)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    else:
        ref = nib.load(str(reference)) if isinstance(reference, (str, Path)) else reference
        header = ref.header.copy()
        header.set_data_dtype(array.dtype)
        out = nib.Nifti1Image(np.asarray(array), ref.affine, header)
        out.header.set_slope_inter(1, 0)
        out.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
        out.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))

    def write(tmp: Path) -> None:
        nib.save(out, str(tmp))

    atomic_write(Path(path), write)
