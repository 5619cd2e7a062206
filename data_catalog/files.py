"""What every reader and writer of scan files shares: the one-line ``ScanError``, a scan's
geometry (``ScanInfo``, ``scan_info``), the size limit of a volume, and atomic writes. NIfTI files
are read in ``data_catalog.scans``, DICOM series in ``data_catalog.dicom``, both on top of this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["MAX_VOXELS", "ScanError", "ScanInfo", "atomic_folder", "atomic_write", "scan_info"]

MAX_VOXELS = 1 << 30  # 1.07e9 voxels: several times the largest head CT (512 x 512 x 1000)


class ScanError(ValueError):
    """A file that cannot be used, with a one-line reason meant for people."""


@dataclass(frozen=True)
class ScanInfo:
    """What the catalog records of a readable image."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm, pixdim[1:4]
    orientation: str  # axis codes, e.g. "LPS"
    affine: np.ndarray


def scan_info(affine: np.ndarray, shape: tuple[int, ...]) -> ScanInfo:
    """A scan's geometry from its affine: the one source of its voxel spacing (mm) and orientation,
    whether the scan was just read or comes from the preprocessing cache."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ScanError("invalid affine (not finite or singular)")
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(affine))
    codes = "".join(nib.aff2axcodes(affine))
    return ScanInfo(shape=tuple(int(s) for s in shape[:3]), spacing=spacing, orientation=codes, affine=affine)


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read-and-restore
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Readers never see a half-written file, and a crash or a full disk leaves no partial file
    (the temporary one is removed on any error). The file gets the permissions a plain ``open()``
    would give it (0o644 under the usual umask), not the private mode of a temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e})") from None
    try:
        os.fchmod(fd, _new_file_mode())
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: name the file, not the temporary one
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: Path, what: str) -> Iterator[Path]:
    """A new folder written whole or not at all: yields an empty temporary folder beside ``path``,
    renamed to ``path`` when the block ends without error, removed otherwise. FileExistsError
    (naming ``what`` the folder is for) when ``path`` exists and is not an empty folder."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder: give a new folder for {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
