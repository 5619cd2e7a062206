"""Synthetic non-contrast head CT with intracranial haemorrhage (ICH): the project's embedded default dataset.

A phantom is modelled with analytic shapes in a head-centred frame
(mm; x -> patient left, y -> posterior, z -> superior, origin near the lateral ventricles), sampled on a grid of
1 mm sub-slices at the size's in-plane spacing, averaged to 5 mm slices (partial volume), blurred by the scanner
point-spread function, shifted by a per-scan HU offset (+-5) and given correlated noise (white noise blurred
with sigma 0.7 px, 3..6 HU). Outside the circular reconstruction field the image is padded (-2000, -2048 or
-3024). Only blood is labelled. Everything follows from one integer seed: the same seed gives the same arrays
(and the same file bytes from :func:`write_phantom_dataset`); ``small`` and ``full`` of one seed show the same
head and lesions, and ``with_lesion=False`` the same head without them.

Anatomy (HU at the 1 mm build): scalp (skin/muscle 30..55, fat -100..-60, temporalis), skull 5..8 mm (tables
1200..1700, diploe 350..650 with texture), skull base (700..1100; petrous 1300..1800; orbits, ethmoid, frontal,
sphenoid and mastoid air), CSF rim and sulci (2..10), cortical grey ribbon (37..44) over white matter (22..29),
deep grey nuclei, lateral/third/fourth ventricles, falx and tentorium (42..52), brainstem, a denser posterior
fossa (+2..6), basal cisterns and Sylvian fissures, a head rest behind the occiput.

Bleeds (``_plan_lesions``): IPH (lobulated, rough ellipsoid at basal ganglia, thalamus, lobe, cerebellum or pons,
oedema rim 15..24 HU), IVH (dependent layering behind a flat fluid level), SDH (crescent, 3..20 mm, stops at the
falx), EDH (biconvex lens, 10..30 mm), SAH (sulcal ribbons 1.5..3 mm and surface, or basal cisterns). Blood is
52..75 HU (acute), 62..80 (clotted) or 36..46 (hyperacute) with texture; SAH 52..72 before averaging. Mass
effect: midline shift ~1 mm per 10 ml (at most 15 mm), ipsilateral ventricle compression, effaced sulci.
Distractors, never labelled: pineal (70%), choroid plexus (65%) and falx (7%) calcifications, dural sinuses
45..72 HU, a dense artery 62..82 HU in half the cases, and the partial-volume rim at the inner table.

Units: lengths in mm, densities in HU, volumes in ml.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_catalog.scans import atomic_write

__all__ = ["PHANTOM_SIZES", "Phantom", "generate_phantom", "threshold_baseline", "write_phantom_dataset"]

logger = logging.getLogger(__name__)

# Both sizes share the field of view (matrix x spacing = 220..256 mm) and the physics; "small" has 4x coarser
# in-plane sampling. One per-case draw picks the spacing inside the range, the same draw for both sizes.
PHANTOM_SIZES: dict[str, dict[str, Any]] = {
    "full": {"matrix": 512, "spacing_mm": (0.43, 0.50), "slice_mm": 5.0, "sub_slice_mm": 1.0},
    "small": {"matrix": 128, "spacing_mm": (1.72, 2.00), "slice_mm": 5.0, "sub_slice_mm": 1.0},
}

_SUB = 5  # 1 mm sub-slices per 5 mm slice
_AIR = -1000.0
_PAD_VALUES = (-2000.0, -2048.0, -3024.0)  # what scanners write outside the reconstruction circle
_PSF_MM = 0.35  # sigma of the in-plane scanner blur
# At coarse spacing the shapes are point-sampled; a half-pixel blur stands in for the pixel's partial volume and
# gives the 60..200 HU rim next to the inner table that real 5 mm scans show.
_PSF_MIN_PX = 0.5
_NOISE_SIGMA_PX = 0.7  # correlation length of the noise, in voxels (spec)
_CHUNK_VOXELS = 700_000  # sub-voxels evaluated at once: small enough for the CPU caches, bounds memory
_F32 = np.float32
_INF = _F32(1e6)

# Real-data statistics (INSTANCE 2022, spec): per-case volume quartiles 3.8 / 10.7 / 29.2 ml -> log-normal.
_VOL_LOG_MEDIAN = math.log(10.7)
_VOL_LOG_SIGMA = (math.log(29.2) - math.log(3.8)) / 1.349
_VOL_RANGE_ML = (0.12, 150.0)
# 54 of 100 real cases have more than one component; ~10% of single bleeds (SAH ribbons, bilateral IVH) render
# as several, so single bleeds are drawn a little more often than 46%.
_P_SINGLE_COMPONENT = 0.58
_MAX_COMPONENTS = 34
_IPH_MAX_ML = 80.0


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare arrays ambiguously
class Phantom:
    """One synthetic scan: int16 HU image and uint8 blood mask on voxel axes (L, P, S), with its NIfTI affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict


def generate_phantom(seed: int, size: str = "small", with_lesion: bool = True) -> Phantom:
    """Generate one synthetic head CT from ``seed`` (>= 0) at ``size`` ('small' or 'full').

    The volume is built on 1 mm sub-slices and averaged in blocks of 5 to 5 mm slices. Label rule: a 5 mm voxel
    is blood when at least half of its sub-voxels (3 of 5) are blood. ``with_lesion=False`` gives the same head
    and distractors without haemorrhage (label all zero). ``info`` records lesion types, planned and rendered
    per-lesion volumes (ml), total labelled volume (ml), connected components (26-connectivity), distractors,
    HU offset, noise sigma (HU), spacing (mm) and the seed.
    """
    if size not in PHANTOM_SIZES:
        raise ValueError(f"unknown phantom size {size!r}; expected one of {sorted(PHANTOM_SIZES)}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    plan_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(plan_seq)
    spec = PHANTOM_SIZES[size]

    # All draws that shape the anatomy happen in the same order for every size and lesion setting.
    spacing_u = rng.random()
    head = _draw_head(rng)
    pose = _draw_pose(rng)
    distractors = _draw_distractors(rng, head)
    lo, hi = spec["spacing_mm"]
    spacing = float(lo + spacing_u * (hi - lo))
    geo = _draw_geometry(rng, head, pose, int(spec["matrix"]), spacing)
    lesions = _plan_lesions(rng, head, pose) if with_lesion else []

    volume, label, counts = _render(head, pose, geo, distractors, lesions)
    image, noise_sigma, offset, pad = _finish(volume, geo, np.random.default_rng(noise_seq))

    voxel_ml = geo.spacing * geo.spacing * geo.slice_mm / 1000.0
    sub_ml = geo.spacing * geo.spacing * 1.0 / 1000.0
    n_comp = int(ndimage.label(label, structure=np.ones((3, 3, 3), bool))[1]) if label.any() else 0
    info = {
        "seed": int(seed),
        "size": size,
        "with_lesion": bool(with_lesion),
        "shape": [int(s) for s in image.shape],
        "spacing_mm": [geo.spacing, geo.spacing, geo.slice_mm],
        "lesion_types": sorted({les.kind for les in lesions}),
        "lesions": [les.describe() | {"volume_ml": round(float(counts[i + 1]) * sub_ml, 3)}
                    for i, les in enumerate(lesions)],
        "total_volume_ml": round(float(label.sum()) * voxel_ml, 3),
        "n_components": n_comp,
        "midline_shift_mm": round(head.shift_mm, 2),
        "distractors": [d.describe() for d in distractors],
        "hu_offset": round(offset, 2),
        "noise_sigma_hu": round(noise_sigma, 2),
        "pad_value": int(pad),
    }
    logger.debug("phantom seed=%d size=%s: %s", seed, size, info["lesion_types"])
    return Phantom(image=image, label=label, affine=geo.affine(), info=info)


def threshold_baseline(image: np.ndarray, lo: float = 50, hi: float = 90) -> np.ndarray:
    """Naive ICH segmentation: voxels with ``lo <= HU <= hi`` inside the brain (uint8 mask, image's shape).

    "Inside the brain", per axial slice: bone is HU > 200; the region it encloses (holes of the bone mask after a
    2-voxel closing, so small gaps in the skull do not open it) minus the bone and its 2-voxel in-plane
    neighbourhood (which removes most of the partial-volume rim at the inner table).
    """
    img = np.asarray(image)
    plane = np.zeros((3, 3, 3), bool)  # in-plane 4-connectivity: every operation stays inside its slice
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    bone = img > 200
    closed = ndimage.binary_closing(bone, structure=plane, iterations=2, border_value=0)
    # one empty slice above and below, so the end slices are not "border" for the hole filling
    filled = ndimage.binary_fill_holes(np.pad(closed, ((0, 0), (0, 0), (1, 1))), structure=plane)[:, :, 1:-1]
    inside = filled & ~ndimage.binary_dilation(bone, structure=plane, iterations=2)
    return (inside & (img >= lo) & (img <= hi)).astype(np.uint8)


def write_phantom_dataset(out: Path, labelled: int, unlabelled: int, test: int, seed: int,
                          size: str = "small") -> dict:
    """Write a data root of phantoms and return a summary (root, seed, size, split folders, counts, and per case:
    id, split, scan seed, image/label/truth paths relative to the root, info).

    Layout: ``train/data/<id>.nii.gz`` + ``train/label/<id>.nii.gz`` (labelled), ``unlabelled/<id>.nii.gz``
    (images only), ``test/data/<id>.nii.gz`` + ``test/label/<id>.nii.gz``; the hidden truth of the
    unlabelled scans goes to ``unlabelled_truth/<id>.nii.gz``, which the catalog never reads: it lets a
    round measure how good its pseudo-labels really are, and a benchmark train an oracle. Ids are
    ``ph_s<seed>_<nnn>`` (train), ``ph_s<seed>_u<nnn>`` (unlabelled) and ``ph_s<seed>_t<nnn>`` (test), unique
    across the root. A case's scan seed derives from (seed, split, index within split), so adding cases leaves
    earlier ones unchanged. Every case has a haemorrhage, as in the real training data. Files are written
    atomically and are byte-reproducible (gzip mtime 0, no file name in the gzip header, fixed NIfTI header fields).
    """
    out = Path(out)
    if min(labelled, unlabelled, test) < 0:
        raise ValueError("case counts must be >= 0")
    if size not in PHANTOM_SIZES or seed < 0:
        raise ValueError(f"need size in {sorted(PHANTOM_SIZES)} and seed >= 0, got {size!r}, {seed}")
    splits = (("train", labelled, "", 0), ("unlabelled", unlabelled, "u", 1), ("test", test, "t", 2))
    cases = []
    for split, count, tag, code in splits:
        for index in range(count):
            case_seed = int(np.random.SeedSequence([seed, code, index]).generate_state(1)[0])
            case_id = f"ph_s{seed:04d}_{tag}{index + 1:03d}"
            ph = generate_phantom(case_seed, size=size)
            if split == "unlabelled":
                image_rel, label_rel = Path(split) / f"{case_id}.nii.gz", Path("unlabelled_truth") / f"{case_id}.nii.gz"
            else:
                image_rel = Path(split) / "data" / f"{case_id}.nii.gz"
                label_rel = Path(split) / "label" / f"{case_id}.nii.gz"
            _write_nifti(out / image_rel, ph.image, ph.affine)
            if label_rel is not None:
                _write_nifti(out / label_rel, ph.label, ph.affine)
            hidden = split == "unlabelled"  # the truth of an unlabelled scan is not its label
            cases.append({"id": case_id, "split": split, "seed": case_seed, "image": image_rel.as_posix(),
                          "label": None if hidden else label_rel.as_posix(),
                          "truth": label_rel.as_posix() if hidden else None, "info": ph.info})
            logger.info("wrote phantom %s (%s, %.1f ml)", case_id, split, ph.info["total_volume_ml"])
    paths = {"train_data": "train/data", "train_label": "train/label", "unlabelled": "unlabelled",
             "unlabelled_truth": "unlabelled_truth",
             "test_data": "test/data", "test_label": "test/label"}
    return {"root": str(out), "seed": int(seed), "size": size, "paths": paths,
            "counts": {"labelled": labelled, "unlabelled": unlabelled, "test": test}, "cases": cases}


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as .nii.gz atomically, with deterministic bytes (true values stored: slope 1, inter 0)."""
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)  # 1 = scanner anatomical
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    # nibabel stores NaN scaling when none is needed; the project wants explicit slope 1 / intercept 0, so the
    # 348-byte header block is rewritten with them (the data block is left as nibabel wrote it).
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    raw = hdr.binaryblock + raw[len(hdr.binaryblock):]
    # gzip.compress writes no file name; mtime=0 removes the only time-dependent byte range.
    blob = gzip.compress(raw, compresslevel=6, mtime=0)
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))


# ----------------------------------------------------------------------------------------------------------------
# random fields, geometry, coordinates
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waves:
    """A smooth random field: a sum of plane cosines in the head frame, scaled to unit variance."""

    k: np.ndarray  # (n, 3) wave vectors, rad/mm
    phase: np.ndarray  # (n,)

    @staticmethod
    def draw(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> _Waves:
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength_mm, size=n)
        return _Waves(dirs * (2 * np.pi / lam)[:, None], rng.uniform(0, 2 * np.pi, size=n))

    @property
    def k_rms(self) -> float:
        """RMS gradient of the field (1/mm): |field| / k_rms approximates the distance to its zero level."""
        return float(np.sqrt(np.mean(np.sum(self.k**2, axis=1))))

    def at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), _F32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(_F32(kx) * x + _F32(ky) * y + _F32(kz) * z + _F32(ph))
        return out * _F32(math.sqrt(2.0 / len(self.phase)))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (radians) about z (yaw), then y (roll), then x (pitch): head frame -> scanner frame."""
    cz, sz, cy, sy, cx, sx = (math.cos(yaw), math.sin(yaw), math.cos(roll), math.sin(roll),
                              math.cos(pitch), math.sin(pitch))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Pose:
    """Head position in the scanner (LPS world, mm): world = rot @ head + centre."""

    rot: np.ndarray
    centre: np.ndarray

    def to_world(self, p: np.ndarray) -> np.ndarray:
        return p @ self.rot.T + self.centre


@dataclass(frozen=True)
class _Geometry:
    """Voxel grid: ``matrix`` x ``matrix`` at ``spacing`` mm, centred on the scanner axis; 5 mm slices."""

    matrix: int
    spacing: float
    n_slices: int
    z_bottom: float  # world z (mm) of the lower face of slice 0
    slice_mm: float = 5.0

    @cached_property
    def xy(self) -> np.ndarray:
        """World LPS x (= y) of the voxel centres along an in-plane axis (mm)."""
        return ((np.arange(self.matrix) - (self.matrix - 1) / 2) * self.spacing).astype(_F32)

    @cached_property
    def z_sub(self) -> np.ndarray:
        """World z of the 1 mm sub-slice centres (mm)."""
        return (self.z_bottom + 0.5 + np.arange(self.n_slices * _SUB)).astype(_F32)

    def affine(self) -> np.ndarray:
        """NIfTI RAS+ affine for voxel axes (L, P, S): RAS x = -LPS x, RAS y = -LPS y."""
        half = (self.matrix - 1) / 2 * self.spacing
        return np.array([[-self.spacing, 0, 0, half], [0, -self.spacing, 0, half],
                         [0, 0, self.slice_mm, self.z_bottom + self.slice_mm / 2], [0, 0, 0, 1]], np.float64)


class _Pts:
    """Points in the head frame with lazily derived quantities (distances to anatomy, fields).

    Used both for chunks of the voxel grid (3D arrays, fields by a fast separable product) and for Monte-Carlo
    samples when fitting lesion sizes (1D arrays, fields evaluated directly), so both see the same geometry.
    """

    def __init__(self, head: _Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, yw: np.ndarray,
                 field_fn: Callable[[_Waves], np.ndarray] | None = None, **known: np.ndarray) -> None:
        self.head, self.x, self.y, self.z, self.yw = head, x, y, z, yw
        self._field_fn = field_fn
        self.ea = _F32(0)  # thickness of extra-axial blood pushing the brain inwards (mm), set while rendering
        self.__dict__.update(known)

    def field(self, waves: _Waves) -> np.ndarray:
        return self._field_fn(waves) if self._field_fn is not None else waves.at(self.x, self.y, self.z)

    @cached_property
    def s(self) -> np.ndarray:
        return self.head.signed_dist(self)

    @cached_property
    def zmin(self) -> float:
        return float(np.min(self.z))

    def _low(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], top: float) -> np.ndarray:
        """``fn(x, y)`` for a surface lying below height ``top``: a far-away constant for points more than
        25 mm above it (it cannot matter there), computed only on the low sub-slices of a chunk."""
        if self.zmin > top + 25:
            return _F32(-1e4)
        if np.ndim(self.z) != 3:
            return fn(self.x, self.y)
        low = np.nonzero(np.min(self.z, axis=(0, 1)) <= top + 25)[0]
        k = int(low[-1]) + 1  # z rises with the sub-slice index, so the low ones come first
        if k == self.z.shape[2]:
            return fn(self.x, self.y)
        out = np.full(np.broadcast_shapes(self.x.shape, self.y.shape), _F32(-1e4), _F32)
        out[:, :, :k] = fn(self.x[:, :, :k], self.y[:, :, :k])
        return out

    @cached_property
    def floor(self) -> np.ndarray:
        """Height of the cranial floor (mm)."""
        return self._low(self.head.floor, self.head.floor_top)

    @cached_property
    def tent(self) -> np.ndarray:
        """Height of the tentorium (mm)."""
        return self._low(self.head.tentorium, self.head.tent_z0)

    @cached_property
    def cavity(self) -> np.ndarray:
        return (self.s < 0) & (self.z > self.floor)

    @cached_property
    def pfossa(self) -> np.ndarray:
        """Posterior fossa: below the tentorium, behind the clivus."""
        return (self.z < self.tent) & (self.y > -2)

    @cached_property
    def fissure(self) -> np.ndarray:
        """Where the interhemispheric fissure exists (above the corpus callosum, in front of / behind it)."""
        return self.head.fissure_exists(self.y, self.z) & ~self.pfossa

    @cached_property
    def dep(self) -> np.ndarray:
        """Depth below the brain surface (mm): convexity, skull base, falx and tentorium surfaces."""
        h = self.head
        d = -self.s - self.ea
        if isinstance(self.floor, np.ndarray):
            d = np.minimum(d, self.z - self.floor)
        d = np.minimum(d, np.where(self.fissure, np.abs(self.x), _INF))
        if isinstance(self.tent, np.ndarray):
            d = np.minimum(d, np.where(h.tentorium_exists(self.x, self.y),
                                       np.abs(self.z - self.tent) + _F32(h.csf_mm - 0.8), _INF))
        return d

    @cached_property
    def sulc(self) -> np.ndarray:
        """Approximate distance (mm) to the mid-plane of the nearest sulcus."""
        return np.abs(self.field(self.head.sulci)) * _F32(1.0 / self.head.sulci.k_rms)

    @cached_property
    def xi(self) -> np.ndarray:
        """x after midline shift (subfalcine): deep structures are displaced, the inner table is not."""
        return self.head.shifted_x(self)

    def sub(self, win: tuple[slice, slice, slice], field_fn: Callable[[_Waves], np.ndarray]) -> _Pts:
        """The same points restricted to a window of the chunk (arrays broadcast along size-1 axes)."""
        known = {k: _take(v, win) for k, v in self.__dict__.items()
                 if isinstance(v, np.ndarray) and v.ndim == 3 and k not in ("x", "y", "z", "yw")}
        p = _Pts(self.head, _take(self.x, win), _take(self.y, win), _take(self.z, win), _take(self.yw, win),
                 field_fn, **known)
        if isinstance(self.ea, np.ndarray):
            p.ea = _take(self.ea, win)
        return p


def _take(arr: np.ndarray, win: tuple[slice, slice, slice]) -> np.ndarray:
    return arr[tuple(slice(None) if arr.shape[d] == 1 else win[d] for d in range(3))]


class _Chunk:
    """A block of 1 mm sub-slices cropped in-plane to the head: world and head-frame coordinates."""

    def __init__(self, head: _Head, pose: _Pose, geo: _Geometry, i: slice, j: slice, k: slice,
                 cache: dict | None = None) -> None:
        self.pose, self.geo = pose, geo
        self.i0, self.j0 = i.start, j.start
        self.cache = {} if cache is None else cache  # in-plane factors of fields, shared by the chunks of a scan
        self.xs, self.ys, self.zs = geo.xy[i], geo.xy[j], geo.z_sub[k]
        c = pose.centre.astype(_F32)
        dx = (self.xs - c[0])[:, None, None]
        dy = (self.ys - c[1])[None, :, None]
        dz = (self.zs - c[2])[None, None, :]
        r = pose.rot.astype(_F32)  # head = rot.T @ (world - centre)
        x = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
        y = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
        z = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        full = (slice(None),) * 3
        self.pts = _Pts(head, x, y, z, self.ys[None, :, None], lambda w: self.field(w, full))
        self.shape = x.shape

    def window(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index window of the chunk covering the head-frame box [lo, hi] (mm), or None if outside."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        w = self.pose.to_world(corners)
        out = []
        for axis, coords in enumerate((self.xs, self.ys, self.zs)):
            step = float(coords[1] - coords[0]) if len(coords) > 1 else 1.0
            a = math.floor((w[:, axis].min() - coords[0]) / step) - 1
            b = math.ceil((w[:, axis].max() - coords[0]) / step) + 2
            a, b = max(a, 0), min(b, len(coords))
            if a >= b:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def sub(self, win: tuple[slice, slice, slice]) -> _Pts:
        return self.pts.sub(win, lambda w: self.field(w, win))

    def field(self, waves: _Waves, win: tuple[slice, slice, slice]) -> np.ndarray:
        """Evaluate a cosine field on a window as a matrix product: each cosine of a phase that is linear in
        world coordinates splits into an (x, y) plane times a z column, which is much cheaper than cos()."""
        xs, ys, zs = self.xs[win[0]], self.ys[win[1]], self.zs[win[2]]
        kw = waves.k @ self.pose.rot.T  # k . head = (rot k) . (world - centre)
        n = len(kw)
        wi, wj = win[0].indices(len(self.xs)), win[1].indices(len(self.ys))
        key = (id(waves), self.i0 + wi[0], self.i0 + wi[1], self.j0 + wj[0], self.j0 + wj[1])
        a = self.cache.get(key)
        if a is None:  # cos(p + q) = cos p cos q - sin p sin q, with p from (x, y) and q from z
            ph = waves.phase - kw @ self.pose.centre
            k32 = kw.astype(_F32)
            p = k32[:, 0, None, None] * xs[None, :, None] + k32[:, 1, None, None] * ys[None, None, :]
            p += ph.astype(_F32)[:, None, None]
            a = np.empty((len(xs) * len(ys), 2 * n), _F32)
            a[:, :n] = np.cos(p).reshape(n, -1).T
            a[:, n:] = np.sin(p).reshape(n, -1).T
            self.cache[key] = a
        q = kw[:, 2, None] * zs[None, :].astype(np.float64)
        b = (np.concatenate([np.cos(q), -np.sin(q)]) * math.sqrt(2.0 / n)).astype(_F32)
        return (a @ b).reshape(len(xs), len(ys), len(zs))


def _ell(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Any, semi: Any,
         rot: np.ndarray | None = None) -> np.ndarray:
    """Normalised squared radius of an ellipsoid (< 1 inside); ``rot`` maps head offsets to its axes."""
    dx, dy, dz = x - _F32(centre[0]), y - _F32(centre[1]), z - _F32(centre[2])
    if rot is not None:
        r = rot.astype(_F32)
        dx, dy, dz = (r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz, r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz,
                      r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz)
    return (dx * _F32(1 / semi[0])) ** 2 + (dy * _F32(1 / semi[1])) ** 2 + (dz * _F32(1 / semi[2])) ** 2


def _bump(u: np.ndarray) -> np.ndarray:
    """Smooth compact bump: 1 at 0, 0 beyond |u| = 1 (cheaper than a Gaussian)."""
    v = np.maximum(1 - u * u, 0)
    return v * v


def _step(u: np.ndarray) -> np.ndarray:
    """Smooth step from 0 (u <= 0) to 1 (u >= 1) (cheaper than a logistic)."""
    v = np.clip(u, 0, 1)
    return v * v * (3 - 2 * v)


def _seg_dist(x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance (mm) from points to the segment p0-p1 (a vessel's centre line)."""
    d = (p1 - p0).astype(np.float64)
    length2 = float(d @ d)
    px, py, pz = x - _F32(p0[0]), y - _F32(p0[1]), z - _F32(p0[2])
    t = np.clip((px * _F32(d[0]) + py * _F32(d[1]) + pz * _F32(d[2])) * _F32(1 / length2), 0, 1)
    return np.sqrt((px - t * _F32(d[0])) ** 2 + (py - t * _F32(d[1])) ** 2 + (pz - t * _F32(d[2])) ** 2)


# ----------------------------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Head:
    """Per-case anatomy parameters (mm, HU) and the shape functions built from them."""

    a: float  # inner-table semi-axes: left-right, anterior-posterior, up, down
    b: float
    c_up: float
    c_low: float
    egg: float  # relative widening towards the occiput
    skull_mm: float
    inner_table_mm: float
    outer_table_mm: float
    scalp_mm: float
    temporalis_mm: float
    csf_mm: float
    grey_mm: float
    sulcus_depth_mm: float
    sulcus_width_mm: float
    vent_scale: float
    floor_ant: float
    floor_mid: float
    floor_post: float
    floor_sella: float
    base_mm: float  # skull base thickness under the middle/posterior fossae (thin orbital roofs in front)
    frontal_sinus: tuple[float, float, float] | None  # semi-axes (mm), or None (not developed)
    tent_z0: float
    hu: dict[str, float]
    sulci: _Waves
    ripple: _Waves
    cells: _Waves
    texture: _Waves
    ripple_mm: float
    # mass effect, set when lesions are planned
    shift_mm: float = 0.0
    shift_y: float = 0.0
    compress_side: int = 0
    compress: float = 0.0
    effacers: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (centre, radius mm) of mass lesions

    # --- surfaces -------------------------------------------------------------------------------------------
    @property
    def neck_z(self) -> float:
        """Depth (mm below the origin) under which the head's cross-section stays constant."""
        return 0.6 * self.c_low

    @property
    def floor_top(self) -> float:
        """Highest point of the cranial floor (mm)."""
        return max(self.floor_ant + 5, self.floor_sella + 8, self.floor_post + 12) + 10

    def signed_dist(self, p: _Pts) -> np.ndarray:
        """Approximate signed distance (mm) to the inner table, positive outside: (r - 1) r / |grad r| of a
        slightly egg-shaped ellipsoid with a gentle random ripple."""
        x, y, z = p.x, p.y, p.z
        # written with in-place operations: this runs on every sub-voxel of the head's box
        ia = _F32(self.a * self.egg / self.b) * y
        ia += _F32(self.a)
        np.reciprocal(ia, out=ia)
        ib = _F32(1 / self.b)
        ic = np.where(z > 0, _F32(1 / self.c_up), _F32(1 / self.c_low))
        # below the skull base the head continues straight down (face and neck) instead of closing like an egg
        u, v, w = x * ia, y * ib, np.maximum(z, _F32(-self.neck_z)) * ic
        r = u * u
        r += v * v
        r += w * w
        np.sqrt(r, out=r)
        u *= ia
        v *= ib
        w *= ic
        g = u * u
        g += v * v
        g += w * w
        np.sqrt(g, out=g)
        g += _F32(1e-6)
        s = r - 1
        s *= r
        s /= g
        s += _F32(self.ripple_mm) * p.field(self.ripple)
        return s

    def floor(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the cranial floor: anterior, middle (raised at the sella) and posterior fossae."""
        # Curved floors: a flat plate would fill whole 5 mm slices with bone.
        adx = np.abs(x)
        ax = adx * _F32(1 / self.a)
        ant = (_F32(self.floor_ant) + 5 * _bump((adx - 28) * _F32(1 / 24))  # orbital roofs dome up
               - 4 * _bump(x * _F32(1 / 10)) - _F32(0.12) * np.minimum(y + 20, 0))  # cribriform plate, frontal
        mid = _F32(self.floor_mid) + _F32(0.02) * (adx - 38) ** 2 + _F32(0.03) * (y + 2) ** 2  # temporal fossae
        mid = np.minimum(mid, _F32(self.floor_sella) + _F32(0.02) * (adx * adx))
        post = _F32(self.floor_post) + 12 * ax * ax + _F32(0.006) * (y - 40) ** 2  # a bowl
        w1 = _step((y + 26) * _F32(1 / 16))
        w2 = _step((y - 6) * _F32(1 / 16))
        return ant + w1 * (mid - ant) + w2 * w1 * (post - mid)

    def base_thickness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Skull base thickness (mm): thin orbital roofs and middle-fossa floors, ``base_mm`` under the posterior
        fossa, and a thick sphenoid body and clivus in the midline."""
        post = _step((y - 6) * _F32(1 / 16))
        body = _bump(x * _F32(1 / 20)) * _bump((y + 5) * _F32(1 / 32))
        return _F32(3.5) + _F32(self.base_mm - 3.5) * post + 12 * body

    def foramen_magnum(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x * _F32(1 / 14)) ** 2 + ((y - 18) * _F32(1 / 16)) ** 2 < 1

    def tentorium(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the tentorium: highest at the incisura, sloping down laterally and posteriorly."""
        return _F32(self.tent_z0) - _F32(0.3) * np.abs(x) - _F32(0.18) * np.maximum(y - 4, 0)

    def temporalis(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Extra thickness (mm) of the temporalis muscle under the scalp, largest at the temples."""
        lateral = np.clip((np.abs(x) * _F32(1 / self.a) - _F32(0.55)) * _F32(1 / 0.3), 0, 1)
        return _F32(self.temporalis_mm) * lateral * _bump((z + 8) * _F32(1 / 45)) * _bump((y + 8) * _F32(1 / 65))

    def tentorium_exists(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Behind the clivus, except the incisura through which the midbrain passes."""
        return (y > 4) & ~((np.abs(x) < 16) & (y < 24))

    def fissure_exists(self, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        top_cc = 14 + 11 * np.sqrt(np.clip(1 - (y * _F32(1 / 36)) ** 2, 0, 1))  # top of the corpus callosum
        return (z > top_cc) | (np.abs(y) > 36)

    def shifted_x(self, p: _Pts) -> np.ndarray:
        if self.shift_mm == 0:
            return p.x
        w = np.exp(-((p.y - _F32(self.shift_y)) * _F32(1 / 40)) ** 2 - ((p.z - 8) * _F32(1 / 26)) ** 2)
        return p.x - _F32(self.shift_mm) * w * np.clip(-p.s * _F32(1 / 20), 0, 1)

    def effacement(self, p: _Pts) -> np.ndarray | None:
        """0..1: how much sulci and the CSF rim are squeezed shut near mass lesions."""
        out = None
        for centre, radius in self.effacers:
            e = np.exp(-_ell(p.x, p.y, p.z, centre, (radius, radius, radius)))
            out = e if out is None else np.maximum(out, e)
        return out

    # --- deep structures (ellipsoids: centre, semi-axes) ----------------------------------------------------
    def ventricle_parts(self, side: int) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """Lateral ventricle of one side (+1 left, -1 right): frontal horn, body, atrium, occipital and
        temporal horns. The side that holds a mass lesion is compressed."""
        v = self.vent_scale
        sq = 1 - self.compress if side == self.compress_side else 1.0
        s = self.b / 83.0
        parts = [((0.7 + 5.0 * v * sq, -20 * s, 8), (5.0 * v * sq, 13 * s, 7.5 * v * sq)),
                 ((0.7 + 5.5 * v * sq + 3.0, -2 * s, 14), (5.5 * v * sq, 18 * s, 5.5 * v * sq)),
                 ((14, 18 * s, 9), (6.0 * v * sq, 10 * s, 8.0 * v * sq)),
                 ((16.5, 31 * s, 5), (3.5 * v * sq, 11 * s, 4.5 * v * sq)),
                 ((27, -3 * s, -16), (3.0 * v * sq, 14 * s, 3.5 * v * sq))]
        return [((side * c[0], c[1], c[2]), ax) for c, ax in parts]

    def third_ventricle(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (0.0, -2.0, -2.0), (1.0 + 1.6 * (self.vent_scale - 0.7), 11.0, 8.0)

    def nuclei(self) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """Caudate heads, lentiform nuclei, thalami (both sides)."""
        v, s = self.vent_scale, self.b / 83.0
        out = []
        for side in (1, -1):
            out += [((side * (0.7 + 10 * v + 4.0), -17 * s, 8), (4.0, 7.5, 6.0)),
                    ((side * 21, -3 * s, -1), (5.5, 12.5, 8.5)),
                    ((side * 9.5, 7 * s, 3), (6.5, 10.0, 7.0))]
        return out

    def ventricle(self, p: _Pts, sides: tuple[int, ...]) -> np.ndarray:
        xi = p.xi
        m = np.zeros(np.broadcast_shapes(np.shape(xi), np.shape(p.y), np.shape(p.z)), bool)
        for side in sides:
            for c, ax in self.ventricle_parts(side):
                m |= _ell(xi, p.y, p.z, c, ax) < 1
        return m

    def brainstem_r2(self, p: _Pts) -> np.ndarray:
        """Normalised squared radius of the midbrain-pons-medulla column (pons bulges forwards)."""
        pons = np.exp(-((p.z + 32) * _F32(1 / 9)) ** 2)
        cy = 6 - 2 * pons
        return (p.x / (11 + 4 * pons)) ** 2 + ((p.y - cy) / (9 + 4 * pons)) ** 2

    def cisterns(self, p: _Pts) -> np.ndarray:
        """Basal cisterns: suprasellar cistern and the ambient/prepontine ring around the brainstem."""
        supra = _ell(p.x, p.y, p.z, (0, -14, self.floor_sella + 11), (11, 7, 4)) < 1
        r2 = self.brainstem_r2(p)
        ring = (r2 > 1) & (r2 < 1.5) & (p.z < -6) & (p.z > self.floor_post + 4)
        return supra | ring

    def sylvian(self, p: _Pts) -> np.ndarray:
        """Sylvian fissures: thin CSF slabs between frontal and temporal lobes."""
        ax = np.abs(p.x)
        # runs laterally, bending backwards, from the cistern to the surface between frontal and temporal lobes
        yc = -10 + _F32(0.25) * (ax - 18) + 3 * np.sin((ax - 18) * _F32(1 / 7))
        half = _F32(0.8 + 0.6 * self.sulcus_width_mm)
        return (np.abs(p.y - yc) < half) & (ax > 18) & (p.z > self.floor_mid + 8) & (p.z < -2)


def _draw_head(rng: np.random.Generator) -> _Head:
    """Per-case anatomy: sizes, layer thicknesses (mm), atrophy, tissue HU within the spec's ranges."""
    atrophy = float(rng.beta(1.3, 2.5))  # 0 young .. 1 old: wider CSF spaces, bigger ventricles
    skull = float(rng.uniform(5.0, 8.0))
    inner = float(rng.uniform(1.2, 2.0))
    outer = float(rng.uniform(1.5, 2.3))
    wm = float(rng.uniform(22, 29))
    gm = float(max(rng.uniform(37, 44), wm + 9))
    hu = {
        "wm": wm, "gm": gm, "deep": float((wm + gm) / 2 + rng.uniform(0, 3)),
        "csf": float(rng.uniform(2, 10)), "cereb": float(gm - rng.uniform(1, 4)),
        "pf_boost": float(rng.uniform(2, 6)),  # beam hardening makes the posterior fossa denser
        "table": float(rng.uniform(1200, 1700)), "diploe": float(rng.uniform(350, 650)),
        "base": float(rng.uniform(700, 1100)), "petrous": float(rng.uniform(1300, 1800)),
        "fat": float(rng.uniform(-100, -60)), "soft": float(rng.uniform(30, 55)),
        "dura": float(rng.uniform(42, 52)), "sinus": float(rng.uniform(45, 72)),
        "oedema": float(rng.uniform(15, 24)),
    }
    return _Head(
        a=float(rng.uniform(62, 70)), b=float(rng.uniform(78, 87)), c_up=float(rng.uniform(58, 67)),
        c_low=float(rng.uniform(88, 100)), egg=float(rng.uniform(0.03, 0.09)),
        skull_mm=skull, inner_table_mm=inner, outer_table_mm=outer,
        scalp_mm=float(rng.uniform(4, 7)), temporalis_mm=float(rng.uniform(3, 8)),
        csf_mm=0.8 + 1.8 * atrophy, grey_mm=float(rng.uniform(2.3, 3.2)),
        sulcus_depth_mm=float(rng.uniform(10, 16)), sulcus_width_mm=0.8 + 1.8 * atrophy,
        vent_scale=0.8 + 0.55 * atrophy + float(rng.uniform(-0.05, 0.05)),
        floor_ant=float(rng.uniform(-31, -25)), floor_mid=float(rng.uniform(-48, -42)),
        floor_post=float(rng.uniform(-62, -55)), floor_sella=float(rng.uniform(-36, -31)),
        base_mm=float(rng.uniform(4, 7)), tent_z0=float(rng.uniform(-14, -8)),
        frontal_sinus=(float(rng.uniform(8, 16)), float(rng.uniform(3, 6)), float(rng.uniform(6, 12)))
        if rng.random() < 0.85 else None,
        hu=hu,
        sulci=_Waves.draw(rng, 8, (20, 34)), ripple=_Waves.draw(rng, 3, (90, 160)),
        cells=_Waves.draw(rng, 6, (5, 9)), texture=_Waves.draw(rng, 5, (6, 14)),
        ripple_mm=float(rng.uniform(0.8, 2.0)),
    )


def _draw_pose(rng: np.random.Generator) -> _Pose:
    """Small head rotation (yaw/roll up to a few degrees, pitch up to 10) and off-centre position (mm)."""
    rot = _rotation(math.radians(rng.uniform(-6, 6)), math.radians(rng.uniform(-10, 10)),
                    math.radians(rng.uniform(-4, 4)))
    return _Pose(rot=rot, centre=np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), 0.0]))


def _outer_surface(head: _Head, n: int = 800) -> np.ndarray:
    """Points (head frame, mm) on the outer scalp surface, for bounding boxes and the scan range."""
    i = np.arange(n) + 0.5
    polar, azim = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    d = np.stack([np.sin(polar) * np.cos(azim), np.sin(polar) * np.sin(azim), np.cos(polar)], 1)
    radius = np.full(n, 80.0)
    for _ in range(4):  # fixed-point solve of r(radius * d) = 1 (the egg factor depends on y)
        a = head.a * (1 + head.egg * radius * d[:, 1] / head.b)
        c = np.where(d[:, 2] > 0, head.c_up, head.c_low)
        radius = 1 / np.sqrt((d[:, 0] / a) ** 2 + (d[:, 1] / head.b) ** 2 + (d[:, 2] / c) ** 2)
    inner = (d * radius[:, None]).astype(_F32)
    x, y, z = inner[:, 0], inner[:, 1], inner[:, 2]
    out = head.skull_mm + head.scalp_mm + head.temporalis(x, y, z) - head.ripple_mm * head.ripple.at(x, y, z)
    pts = d * (radius + out + 1)[:, None]
    # the column below the skull base (see _Head.signed_dist): the ring at neck_z, repeated downwards
    ring = pts[np.abs(pts[:, 2] + head.neck_z) < 4]
    column = [ring + np.array([0.0, 0.0, -dz]) for dz in np.arange(0.0, 160.0, 5.0)]
    return np.concatenate([pts[pts[:, 2] > -head.neck_z], *column])


def _draw_geometry(rng: np.random.Generator, head: _Head, pose: _Pose, matrix: int, spacing: float) -> _Geometry:
    """Scan range: from a few mm above the vertex down past the posterior-fossa floor (24..40 slices)."""
    world = pose.to_world(_outer_surface(head))
    top = float(world[:, 2].max()) + rng.uniform(0, 8)
    base = pose.to_world(np.array([[0.0, 30.0, head.floor_post - head.base_mm]]))[0, 2]
    n_min = int(np.clip(math.ceil((top - base) / 5.0), 24, 40))
    n = int(rng.integers(n_min, 41)) if n_min < 40 else 40
    return _Geometry(matrix=matrix, spacing=spacing, n_slices=n, z_bottom=top - 5.0 * n)


# ----------------------------------------------------------------------------------------------------------------
# distractors: normal calcifications and dense vessels (never labelled)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Distractor:
    name: str
    hu: float
    centre: np.ndarray | None = None  # ellipsoid (calcifications)
    semi: tuple[float, float, float] | None = None
    deformed: bool = False  # moves with the midline shift
    p0: np.ndarray | None = None  # tube (vessels)
    p1: np.ndarray | None = None
    radius: float = 0.0

    def describe(self) -> dict:
        size = self.radius * 2 if self.p0 is not None else 2 * max(self.semi or (0,))
        return {"kind": self.name, "hu": round(self.hu, 1), "size_mm": round(float(size), 1)}

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        if self.p0 is not None:
            return np.minimum(self.p0, self.p1) - self.radius - 1, np.maximum(self.p0, self.p1) + self.radius + 1
        pad = np.array(self.semi) + 1 + np.array([abs(head.shift_mm) if self.deformed else 0, 0, 0])
        return self.centre - pad, self.centre + pad

    def mask(self, p: _Pts) -> np.ndarray:
        if self.p0 is not None:
            return _seg_dist(p.x, p.y, p.z, self.p0, self.p1) < self.radius
        return _ell(p.xi if self.deformed else p.x, p.y, p.z, self.centre, self.semi) < 1


def _draw_distractors(rng: np.random.Generator, head: _Head) -> list[_Distractor]:
    """Pineal (~70%), choroid plexus (~65%) and falx (~7%) calcifications; a dense vessel in half the cases.

    Calcifications are 80..500 HU at 1 mm; after 5 mm averaging and blur most fall to 60..150, overlapping blood.
    """
    out: list[_Distractor] = []
    s = head.b / 83.0
    if rng.random() < 0.70:
        r = rng.uniform(1.2, 3.0)
        out.append(_Distractor("pineal_calcification", float(rng.uniform(120, 500)),
                               np.array([rng.uniform(-0.5, 0.5), 20 * s, rng.uniform(0, 4)]),
                               (r, r * rng.uniform(0.8, 1.3), r), deformed=True))
    if rng.random() < 0.65:
        both = rng.random() < 0.8
        for side in (1, -1) if both else (int(rng.choice([1, -1])),):
            r = rng.uniform(1.2, 3.2)
            out.append(_Distractor(f"choroid_plexus_calcification_{'left' if side > 0 else 'right'}",
                                   float(rng.uniform(80, 400)),
                                   np.array([side * rng.uniform(12, 15), 19 * s + rng.uniform(-2, 2), 9.0]),
                                   (r, r * rng.uniform(1.0, 1.6), r), deformed=True))
    if rng.random() < 0.07:
        out.append(_Distractor("falx_calcification", float(rng.uniform(200, 800)),
                               np.array([0.0, rng.uniform(-40, 40), rng.uniform(30, 52)]),
                               (rng.uniform(0.8, 1.3), rng.uniform(3, 8), rng.uniform(2, 5))))
    if rng.random() < 0.5:
        hu, radius = float(rng.uniform(62, 82)), float(rng.uniform(1.2, 2.2))
        if rng.random() < 0.6:
            side = int(rng.choice([1, -1]))
            p0 = np.array([side * 7.0, -9.0, head.floor_sella + 16])
            p1 = np.array([side * rng.uniform(38, 48), -7.0, head.floor_sella + 21])
            name = f"dense_mca_{'left' if side > 0 else 'right'}"
        else:
            p0, p1 = np.array([0.0, -5.0, head.floor_post + 8]), np.array([0.0, -6.0, head.floor_sella + 10])
            name = "dense_basilar_artery"
        out.append(_Distractor(name, hu, p0=p0, p1=p1, radius=radius))
    return out


# ----------------------------------------------------------------------------------------------------------------
# lesions
# ----------------------------------------------------------------------------------------------------------------


def _blood_hu(rng: np.random.Generator) -> tuple[float, float]:
    """Mean HU and texture amplitude of one bleed: acute, clotted (denser) or hyperacute (swirled, 35..45)."""
    u = rng.random()
    if u < 0.10:
        return float(rng.uniform(36, 46)), 6.0
    if u < 0.30:
        return float(rng.uniform(62, 80)), 3.0
    return float(rng.uniform(52, 75)), 4.0


@dataclass
class _Lesion:
    """Base class: a haemorrhage of one type with its HU, size parameter and bounding box (head frame)."""

    kind: str
    hu: float
    texture: float
    planned_ml: float
    where: str
    side: int

    def describe(self) -> dict:
        return {"type": self.kind, "planned_ml": round(float(self.planned_ml), 3), "hu": round(float(self.hu), 1),
                "location": self.where, "side": {1: "left", -1: "right", 0: "midline"}[self.side]}

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def blood(self, p: _Pts) -> np.ndarray:
        raise NotImplementedError


@dataclass
class _IPH(_Lesion):
    """Intraparenchymal: lobulated, rough ellipsoid with an oedema rim."""

    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    semi: np.ndarray = field(default_factory=lambda: np.ones(3))  # unit shape, times ``scale``
    lobes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (offset, semi) in unit shape
    rough: _Waves | None = None
    scale: float = 1.0
    rim_mm: float = 0.0

    def _r(self, p: _Pts) -> np.ndarray:
        """Normalised radius (1 on the lesion surface)."""
        semi = self.semi * self.scale
        r2 = _ell(p.x, p.y, p.z, self.centre, semi, self.rot)
        for off, lsemi in self.lobes:
            c = self.centre + self.rot.T @ (off * semi)
            r2 = np.minimum(r2, _ell(p.x, p.y, p.z, c, lsemi * self.scale, self.rot))
        r = np.sqrt(r2)
        if self.rough is not None:  # bumpy margin: the field's 20..40 mm waves squeezed to the lesion's size
            m = _F32(15 / self.scale)
            c = self.centre
            r = r / (1 + _F32(0.12) * self.rough.at((p.x - _F32(c[0])) * m, (p.y - _F32(c[1])) * m,
                                                    (p.z - _F32(c[2])) * m))
        return r

    def blood(self, p: _Pts) -> np.ndarray:
        return (self._r(p) < 1) & p.cavity

    def oedema(self, p: _Pts) -> np.ndarray:
        return (self._r(p) < 1 + self.rim_mm / (self.scale * float(np.mean(self.semi)))) & p.cavity

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        ext = 1.9 * self.scale * float(self.semi.max()) + self.rim_mm + 2
        return self.centre - ext, self.centre + ext


@dataclass
class _ExtraAxial(_Lesion):
    """SDH (crescent: wide, flat profile, stops at the midline) or EDH (biconvex lens, profile exponent 1)."""

    direction: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0]))
    surface_mm: float = 70.0  # distance from the head origin to the inner table along ``direction``
    radius: float = 10.0  # lateral extent along the inner table (mm)
    thick: float = 5.0  # maximum thickness (mm)
    power: float = 0.5

    def thickness(self, p: _Pts) -> np.ndarray:
        d = self.direction.astype(_F32)
        rr = np.sqrt(p.x * p.x + p.y * p.y + p.z * p.z) + _F32(1e-3)
        cosang = np.clip((p.x * d[0] + p.y * d[1] + p.z * d[2]) / rr, -1, 1)
        lateral = _F32(self.surface_mm) * np.arccos(cosang)
        t = _F32(self.thick) * np.clip(1 - (lateral * _F32(1 / self.radius)) ** 2, 0, 1) ** _F32(self.power)
        # supratentorial, on its own side of the falx
        keep = (p.x * _F32(self.side) > 1.0) & ((p.z > p.tent + 2) | (p.y < 0))
        return np.where(keep, t, _F32(0))

    def blood(self, p: _Pts) -> np.ndarray:
        return (p.s < 0) & (-p.s < self.thickness(p)) & (p.z > p.floor + 1)

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        c = self.direction * self.surface_mm
        ext = self.radius + self.thick + 6
        return c - ext, c + ext


@dataclass
class _SAH(_Lesion):
    """Subarachnoid: blood-filled sulci and surface CSF within ``extent`` mm of a point near the convexity, or
    basal cisterns, Sylvian fissures and the anterior interhemispheric fissure within ``extent`` mm of the
    suprasellar cistern (basal)."""

    mode: str = "convexity"
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    extent: float = 10.0  # radius (mm) of the sphere holding the blood
    width: float = 2.0  # ribbon width (mm): sulci holding blood are distended

    def blood(self, p: _Pts) -> np.ndarray:
        h = p.head
        if self.mode == "convexity":
            near = _ell(p.x, p.y, p.z, self.centre, (self.extent,) * 3) < 1
            sulcal = (p.sulc < self.width / 2) & (p.dep < h.csf_mm + h.sulcus_depth_mm)
            # the blood-filled subarachnoid space over the gyri joins the sulcal ribbons into few pieces
            surface = p.dep < max(h.csf_mm, self.width)
            return near & p.cavity & (sulcal | surface) & (p.dep > -0.5)
        front_fissure = (np.abs(p.x) < max(h.csf_mm, 1.0)) & (p.y < -15) & (p.z < 12)
        near = _ell(p.x, p.y, p.z, self.centre, (self.extent,) * 3) < 1
        return near & (h.cisterns(p) | h.sylvian(p) | front_fissure) & p.cavity

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        return self.centre - self.extent - 1, self.centre + self.extent + 1


@dataclass
class _IVH(_Lesion):
    """Intraventricular: blood layering in the dependent (posterior) horns below a flat fluid level."""

    sides: tuple[int, ...] = (1, -1)
    level: float = 0.0  # world y (mm) of the fluid level; blood lies posterior to it (patient supine)

    def blood(self, p: _Pts) -> np.ndarray:
        return p.head.ventricle(p, self.sides) & (p.yw > self.level)

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.full(3, 1e9), np.full(3, -1e9)
        for side in self.sides:
            for c, ax in head.ventricle_parts(side):
                lo, hi = np.minimum(lo, np.subtract(c, ax)), np.maximum(hi, np.add(c, ax))
        pad = np.array([abs(head.shift_mm) + 1, 1, 1])
        return lo - pad, hi + pad


class _MonteCarlo:
    """Volume (ml) of a lesion estimated from fixed uniform samples in its bounding box (deterministic)."""

    def __init__(self, rng: np.random.Generator, head: _Head, pose: _Pose, n: int = 6000) -> None:
        self.unit, self.head, self.pose = rng.random((n, 3)), head, pose

    def points(self, lo: np.ndarray, hi: np.ndarray) -> tuple[_Pts, float]:
        p = (lo + self.unit * (hi - lo)).astype(_F32)
        yw = (self.pose.to_world(p.astype(np.float64))[:, 1]).astype(_F32)
        return _Pts(self.head, p[:, 0], p[:, 1], p[:, 2], yw), float(np.prod(hi - lo))

    def volume_ml(self, lesion: _Lesion) -> float:
        pts, box = self.points(*lesion.bbox(self.head))
        return float(lesion.blood(pts).mean()) * box / 1000.0

    def fit(self, lesion: _Lesion, attr: str, target_ml: float, power: float, bounds: tuple[float, float]) -> float:
        """Adjust ``lesion.<attr>`` (volume ~ attr**power) until the volume is near the target; returns it."""
        vol = 0.0
        for _ in range(5):
            vol = self.volume_ml(lesion)
            if vol <= 0:
                setattr(lesion, attr, min(getattr(lesion, attr) * 1.6, bounds[1]))
                continue
            ratio = target_ml / vol
            if abs(ratio - 1) < 0.06:
                break
            setattr(lesion, attr, float(np.clip(getattr(lesion, attr) * ratio ** (1 / power), *bounds)))
        return vol


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _surface_distance(head: _Head, d: np.ndarray) -> float:
    """Distance (mm) from the head origin to the inner table along unit vector ``d``."""
    radius = 70.0
    for _ in range(4):
        a = head.a * (1 + head.egg * radius * d[1] / head.b)
        c = head.c_up if d[2] > 0 else head.c_low
        radius = float(1 / math.sqrt((d[0] / a) ** 2 + (d[1] / head.b) ** 2 + (d[2] / c) ** 2))
    return radius


def _near(rng: np.random.Generator, draw: Callable[[], np.ndarray], z_hint: float | None,
          ok: Callable[[np.ndarray], bool] = lambda c: True, tries: int = 20) -> np.ndarray:
    """Draw candidate points until one passes ``ok`` within 20 mm of height ``z_hint`` (satellite bleeds stay
    near the main one, as in real multi-focal cases); otherwise the passing candidate closest in height."""
    best, best_gap = None, math.inf
    for _ in range(tries):
        c = draw()
        if not ok(c):
            continue
        gap = 0.0 if z_hint is None else abs(float(c[2]) - z_hint)
        if gap < 20:
            return c
        if gap < best_gap:
            best, best_gap = c, gap
    return best if best is not None else draw()


def _make_iph(rng: np.random.Generator, head: _Head, mc: _MonteCarlo, ml: float, where: str,
              taken: list[tuple[np.ndarray, float]], z_hint: float | None = None) -> _IPH:
    """IPH at a typical site ('basal_ganglia', 'thalamus', 'lobar', 'cerebellum', 'pons', 'contusion')."""
    side = int(rng.choice([1, -1]))
    radius_est = (ml * 1000 * 3 / (4 * math.pi)) ** (1 / 3)

    def draw() -> np.ndarray:
        if where == "basal_ganglia":
            return np.array([side * rng.uniform(18, 25), rng.uniform(-8, 4), rng.uniform(-6, 6)])
        if where == "thalamus":
            return np.array([side * rng.uniform(7, 12), rng.uniform(4, 11), rng.uniform(0, 8)])
        if where == "cerebellum":
            return np.array([side * rng.uniform(15, 28), rng.uniform(35, 50), head.floor_post + rng.uniform(14, 20)])
        if where == "pons":
            return np.array([rng.uniform(-3, 3), rng.uniform(2, 6), rng.uniform(-36, -28)])
        # lobar / contusion: under the cortex; contusions superficial, mostly frontal and temporal
        if where == "contusion":
            d = _unit(np.array([side * rng.uniform(0.3, 1), rng.uniform(-1, 0.2), rng.uniform(-0.5, 0.6)]))
            depth = rng.uniform(4, 10) + 0.5 * radius_est
        else:
            d = _unit(np.array([side * rng.uniform(0.2, 1), rng.uniform(-1, 1), rng.uniform(-0.2, 0.9)]))
            depth = rng.uniform(10, 22) + 0.8 * radius_est
        c = d * max(_surface_distance(head, d) - depth, 10.0)
        floor = float(head.floor(np.array([c[0]], _F32), np.array([c[1]], _F32))[0])
        c[2] = max(c[2], floor + 0.8 * radius_est + 6)
        return c

    # keep separate bleeds apart so that they stay separate components
    centre = _near(rng, draw, z_hint, lambda c: all(np.linalg.norm(c - o) > radius_est + r + 3 for o, r in taken))
    semi = rng.uniform(0.7, 1.35, 3)
    lobes = [(_unit(rng.normal(size=3)) * rng.uniform(0.5, 0.9), semi * rng.uniform(0.35, 0.65, 3))
             for _ in range(int(rng.integers(0, 4)))]
    hu, tex = _blood_hu(rng)
    les = _IPH("IPH", hu, tex, ml, where, side if where != "pons" else 0, centre=centre, rot=_random_rotation(rng),
               semi=semi, lobes=lobes, rough=_Waves.draw(rng, 4, (20, 40)), scale=radius_est,
               rim_mm=float(rng.uniform(0.8, 2.0) + rng.uniform(0.05, 0.3) * radius_est))
    mc.fit(les, "scale", ml, 3.0, (0.3, 60.0))
    taken.append((centre, les.scale * float(les.semi.max())))
    return les


def _make_extra_axial(rng: np.random.Generator, head: _Head, mc: _MonteCarlo, ml: float, kind: str,
                      z_hint: float | None = None) -> _ExtraAxial:
    """SDH along the convexity (3..20 mm thick) or temporo-parietal EDH (10..30 mm thick lens)."""
    side = int(rng.choice([1, -1]))
    cube = (ml * 1000) ** (1 / 3)
    if kind == "SDH":
        angles, elevs = (-55, 55), (-5, 45)
        thick, power, where = float(np.clip(rng.uniform(0.2, 0.35) * cube, 3, 20)), 0.35, "convexity"
    else:
        angles, elevs = (-25, 35), (-12, 30)
        thick, power, where = float(np.clip(rng.uniform(0.45, 0.6) * cube, 10, 30)), 1.0, "temporoparietal"

    def draw() -> np.ndarray:
        azim, elev = math.radians(rng.uniform(*angles)), math.radians(rng.uniform(*elevs))
        v = _unit(np.array([side * math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)]))
        return v * _surface_distance(head, v)

    d = _unit(_near(rng, draw, z_hint))
    radius = math.sqrt(ml * 1000 * (power + 1) / (math.pi * thick))
    hu, tex = _blood_hu(rng)
    les = _ExtraAxial(kind, hu, tex, ml, where, side, direction=d, surface_mm=_surface_distance(head, d),
                      radius=max(radius, 1.2 * thick if kind == "EDH" else thick), thick=thick, power=power)
    mc.fit(les, "radius", ml, 2.0, (2.0, 140.0))
    return les


def _make_sah(rng: np.random.Generator, head: _Head, mc: _MonteCarlo, ml: float, basal: bool,
              z_hint: float | None = None) -> _SAH:
    hu, tex = rng.uniform(52, 72), 3.0  # thin ribbons: averaging with CSF brings them to ~40..60 HU
    width = float(rng.uniform(1.5, 3.0))
    if basal:
        centre = np.array([0.0, -14.0, head.floor_sella + 11])  # suprasellar cistern, near the circle of Willis
        les = _SAH("SAH", float(hu), tex, ml, "basal_cisterns", 0, mode="basal", centre=centre, extent=25.0,
                   width=width)
        mc.fit(les, "extent", ml, 2.5, (4.0, 90.0))
        return les
    side = int(rng.choice([1, -1]))

    def draw() -> np.ndarray:
        v = _unit(np.array([side * rng.uniform(0.3, 1), rng.uniform(-0.8, 0.8), rng.uniform(-0.2, 1.0)]))
        return v * (_surface_distance(head, v) - 6)

    centre = _near(rng, draw, z_hint)
    les = _SAH("SAH", float(hu), tex, ml, "convexity", side, mode="convexity", centre=centre,
               extent=float((ml * 1000 * 10) ** (1 / 3)), width=width)
    mc.fit(les, "extent", ml, 3.0, (3.0, 70.0))
    return les


def _make_ivh(rng: np.random.Generator, head: _Head, mc: _MonteCarlo, ml: float) -> _IVH:
    """Place the fluid level so that the blood behind it has the target volume; a cast if it cannot."""
    sides = (1, -1) if rng.random() < 0.7 else (int(rng.choice([1, -1])),)
    hu, tex = _blood_hu(rng)
    les = _IVH("IVH", hu, tex, ml, "occipital_horns", 0 if len(sides) == 2 else sides[0], sides=sides)
    for _ in range(2):  # a bleed filling most of the ventricles comes with hydrocephalus: enlarge them
        pts, box = mc.points(*les.bbox(head))
        inside = head.ventricle(pts, sides)
        cell_ml = box / len(inside) / 1000.0
        room = inside.sum() * cell_ml
        if ml < 0.7 * room or head.vent_scale >= 1.8:
            break
        head.vent_scale = min(head.vent_scale * (ml / (0.7 * room)) ** (1 / 3), 1.8)
    yws = np.sort(pts.yw[inside])[::-1]
    n = max(round(ml / cell_ml), 1)
    les.level = float(yws[n]) if 0 < n < len(yws) else (-1e9 if n >= len(yws) else 1e9)
    return les


_TYPE_WEIGHTS = {"IPH": 0.40, "SDH": 0.22, "SAH": 0.16, "IVH": 0.10, "EDH": 0.12}
_SATELLITES = {  # what else bleeds in a case, given the main bleed
    "IPH": {"IPH": 0.5, "SAH": 0.2, "IVH": 0.15, "SDH": 0.15},
    "SDH": {"SAH": 0.4, "IPH": 0.4, "SDH": 0.2},
    "SAH": {"SAH": 0.5, "IPH": 0.3, "IVH": 0.2},
    "IVH": {"IPH": 0.6, "SAH": 0.4},
    "EDH": {"IPH": 0.5, "SDH": 0.25, "SAH": 0.25},
}


def _lesion_centre(les: _Lesion, head: _Head) -> np.ndarray:
    """A representative point of a bleed (head frame, mm)."""
    if isinstance(les, _IPH | _SAH):
        return les.centre
    if isinstance(les, _ExtraAxial):
        return les.direction * les.surface_mm
    return np.array([0.0, 10.0, 8.0])


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in keys])
    return str(keys[int(rng.choice(len(keys), p=p / p.sum()))])


def _plan_lesions(rng: np.random.Generator, head: _Head, pose: _Pose) -> list[_Lesion]:
    """Draw the case's bleeds from the real statistics; sets the head's mass effect.

    Total volume is log-normal (median 10.7 ml, quartiles 3.8 / 29.2, clipped to 0.12..150 ml). The number of
    separate bleeds is 1 with p = ``_P_SINGLE_COMPONENT``, else 1 + ceil(log-normal, median 1.6), at most 34.
    The main bleed takes 45..90% of the volume and the rest is split unevenly (Dirichlet 0.7) among satellites
    placed near it (contusions, SAH, small SDH, IVH), so many are tiny. The main type is drawn from
    ``_TYPE_WEIGHTS`` among those that fit the volume (EDH >= 4 ml, IVH <= 25 ml, SAH <= 60 ml); an IPH above
    80 ml passes the excess to the ventricles.
    """
    total = float(np.clip(math.exp(rng.normal(_VOL_LOG_MEDIAN, _VOL_LOG_SIGMA)), *_VOL_RANGE_ML))
    n = 1 if rng.random() < _P_SINGLE_COMPONENT else min(_MAX_COMPONENTS,
                                                           1 + math.ceil(math.exp(rng.normal(math.log(1.6), 1.0))))
    weights = dict(_TYPE_WEIGHTS)
    if total < 4:
        weights["EDH"] = 0.0
    if total > 25:
        weights["IVH"] = 0.0
    if total > 60:
        weights["SAH"] = 0.0
    main = _choice(rng, weights)
    if n == 1:
        volumes = [total]
    else:
        f = rng.uniform(0.45, 0.9)
        volumes = [f * total, *(rng.dirichlet(np.full(n - 1, 0.7)) * (1 - f) * total)]
    volumes = [max(v, 0.02) for v in volumes]
    kinds = [main]
    for _ in volumes[1:]:
        options = dict(_SATELLITES[main])
        if "IVH" in kinds:
            options["IVH"] = 0.0
        kinds.append(_choice(rng, options))
    if main == "IPH" and volumes[0] > _IPH_MAX_ML:  # larger haematomas rupture into the ventricles
        excess, volumes[0] = volumes[0] - _IPH_MAX_ML, _IPH_MAX_ML
        if "IVH" in kinds:
            volumes[kinds.index("IVH")] += excess
        else:
            kinds.append("IVH")
            volumes.append(excess)

    mc = _MonteCarlo(rng, head, pose)
    lesions: list[_Lesion] = []
    taken: list[tuple[np.ndarray, float]] = []
    ivh_ml = None
    z_main = 8.0  # height (mm) of the main bleed; the ventricles' if that is an IVH
    for i, (kind, ml) in enumerate(zip(kinds, volumes, strict=True)):
        hint = None if i == 0 else z_main
        if kind == "IPH":
            if i == 0:
                sites = {"basal_ganglia": 0.35, "thalamus": 0.15 if ml < 30 else 0, "lobar": 0.4,
                         "cerebellum": 0.07 if ml < 30 else 0, "pons": 0.03 if ml < 8 else 0}
                where = _choice(rng, sites)
            else:
                where = "contusion" if rng.random() < 0.7 else "lobar"
            lesions.append(_make_iph(rng, head, mc, ml, where, taken, hint))
        elif kind in ("SDH", "EDH"):
            lesions.append(_make_extra_axial(rng, head, mc, ml, kind, hint))
        elif kind == "SAH":
            lesions.append(_make_sah(rng, head, mc, ml, (i == 0 and ml > 2 and rng.random() < 0.5), hint))
        else:
            ivh_ml = ml
        if i == 0 and lesions:
            z_main = float(_lesion_centre(lesions[0], head)[2])

    # Mass effect grows with the volume of space-occupying supratentorial bleeds: ~1 mm shift per 10 ml.
    mass = [les for les in lesions if isinstance(les, _IPH | _ExtraAxial) and les.where not in ("cerebellum", "pons")]
    mass_ml = sum(les.planned_ml for les in mass)
    if mass and mass_ml > 5:
        big = max(mass, key=lambda les: les.planned_ml)
        head.shift_mm = -big.side * float(np.clip((0.1 * mass_ml - 0.5) * rng.uniform(0.7, 1.3), 0, 15))
        centre = _lesion_centre(big, head)
        head.shift_y = float(np.clip(centre[1], -30, 30))
        head.compress_side, head.compress = big.side, float(np.clip(mass_ml / 120, 0, 0.6))
    for les in mass:
        if les.planned_ml > 8:  # sulci near a sizeable bleed are effaced
            centre = les.centre if isinstance(les, _IPH) else les.direction * (les.surface_mm - les.thick)
            head.effacers.append((centre, 12 + 1.2 * les.planned_ml ** (1 / 3) * 3))
    if ivh_ml is not None:
        lesions.append(_make_ivh(rng, head, mc, ivh_ml))
    return lesions


# ----------------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------------


def _chunk_box(surface: np.ndarray, geo: _Geometry, z0: float, z1: float) -> tuple[slice, slice] | None:
    """In-plane index ranges holding the head between world heights z0 and z1 (mm), from points on its outer
    surface (world, mm); None when the head does not reach these heights. Everything else is air."""
    near = surface[(surface[:, 2] > z0 - 6) & (surface[:, 2] < z1 + 6)]
    if len(near) == 0:
        return None
    lo, hi = near[:, :2].min(0) - 3, near[:, :2].max(0) + 3  # the points lie ~5 mm apart on the surface
    idx = [(max(int((lo[a] - geo.xy[0]) / geo.spacing), 0),
            min(math.ceil((hi[a] - geo.xy[0]) / geo.spacing) + 1, geo.matrix)) for a in range(2)]
    return slice(*idx[0]), slice(*idx[1])


def _render(head: _Head, pose: _Pose, geo: _Geometry, distractors: list[_Distractor],
            lesions: list[_Lesion]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build 1 mm sub-slices chunk by chunk, each cropped to the head, and average them to 5 mm slices.

    Returns the 5 mm HU volume (before blur and noise), its uint8 label (>= 3 of 5 sub-slices blood) and the
    per-lesion sub-voxel counts (index 0 = background).
    """
    surface = pose.to_world(_outer_surface(head, 4000))
    volume = np.full((geo.matrix, geo.matrix, geo.n_slices), _AIR, _F32)
    label = np.zeros(volume.shape, np.uint8)
    counts = np.zeros(len(lesions) + 1, np.int64)
    widest = _chunk_box(surface, geo, -1e9, 1e9)
    assert widest is not None
    area = (widest[0].stop - widest[0].start) * (widest[1].stop - widest[1].start)
    per_chunk = max(1, _CHUNK_VOXELS // (area * _SUB))
    cache: dict = {}
    for s0 in range(0, geo.n_slices, per_chunk):
        s1 = min(s0 + per_chunk, geo.n_slices)
        box = _chunk_box(surface, geo, geo.z_bottom + s0 * geo.slice_mm, geo.z_bottom + s1 * geo.slice_mm)
        if box is None:
            continue
        bi, bj = box
        ni, nj = bi.stop - bi.start, bj.stop - bj.start
        ck = _Chunk(head, pose, geo, bi, bj, slice(s0 * _SUB, s1 * _SUB), cache)
        hu, lid = _render_chunk(ck, head, distractors, lesions)
        volume[bi, bj, s0:s1] = hu.reshape(ni, nj, s1 - s0, _SUB).mean(axis=3)
        blood = (lid > 0).reshape(ni, nj, s1 - s0, _SUB).sum(axis=3)
        label[bi, bj, s0:s1] = blood >= 3
        counts += np.bincount(lid.ravel(), minlength=len(lesions) + 1)
    _paint_headrest(volume, head, pose, geo)
    return volume, label, counts


def _render_chunk(ck: _Chunk, head: _Head, distractors: list[_Distractor],
                  lesions: list[_Lesion]) -> tuple[np.ndarray, np.ndarray]:
    p = ck.pts
    hu = np.full(ck.shape, _AIR, _F32)
    extra = [les for les in lesions if isinstance(les, _ExtraAxial)]
    if extra:  # extra-axial blood displaces the brain surface inwards
        ea = np.zeros(ck.shape, _F32)
        for les in extra:
            win = ck.window(*les.bbox(head))
            if win is not None:
                ea[win] += les.thickness(ck.sub(win))
        p.ea = ea
    _paint_scalp_skull(ck, hu)
    _paint_brain(ck, hu)
    _paint_deep(ck, hu)
    _paint_base(ck, hu)
    for d in distractors:
        win = ck.window(*d.bbox(head))
        if win is not None:
            hu[win][d.mask(ck.sub(win)) & ck.sub(win).cavity] = d.hu
    _paint_sinuses(ck, hu)
    lid = np.zeros(ck.shape, np.uint8)
    windows = [ck.window(*les.bbox(head)) for les in lesions]
    for les, win in zip(lesions, windows, strict=True):
        if isinstance(les, _IPH) and win is not None:
            hu[win][les.oedema(ck.sub(win))] = head.hu["oedema"]
    for i, (les, win) in enumerate(zip(lesions, windows, strict=True)):
        if win is None:
            continue
        q = ck.sub(win)
        m = les.blood(q)
        if m.any():
            value = _F32(les.hu) + _F32(les.texture) * ck.field(head.texture, win)
            hu[win][m] = value[m]
            lid[win][m] = i + 1
    return hu, lid


def _paint_scalp_skull(ck: _Chunk, hu: np.ndarray) -> None:
    """Skin, fat and muscle (temporalis thickest at the temples), skull tables and diploe, skull base."""
    p, h = ck.pts, ck.pts.head
    s, z, floor = p.s, p.z, p.floor
    temporalis = h.temporalis(p.x, p.y, z)
    outer = _F32(h.skull_mm + h.scalp_mm) + temporalis
    hu[s < outer] = h.hu["soft"]  # skin
    hu[s < outer - 1.5] = h.hu["fat"]
    hu[s < _F32(h.skull_mm + 1.0) + temporalis] = h.hu["soft"]  # galea and temporalis muscle
    base_low = floor - h.base_thickness(p.x, p.y) if isinstance(floor, np.ndarray) else floor
    in_skull = s < h.skull_mm
    hu[in_skull & (z <= base_low)] = h.hu["soft"]  # below the skull base: deep face and neck soft tissue
    bone = in_skull & (z > base_low)
    hu[bone] = h.hu["table"]
    diploe = bone & (s > h.inner_table_mm) & (s < h.skull_mm - h.outer_table_mm)
    hu[diploe] = (_F32(h.hu["diploe"]) * (1 + _F32(0.25) * ck.field(h.texture, (slice(None),) * 3)))[diploe]
    hu[bone & (s < 0)] = h.hu["base"]  # floor of the cranial cavity


def _paint_brain(ck: _Chunk, hu: np.ndarray) -> None:
    """CSF rim, cortical grey ribbon with sulci, white matter, fissure with falx, tentorium, cerebellum."""
    p, h = ck.pts, ck.pts.head
    cav = p.cavity
    dep = p.dep
    csf, grey, deep_sulcus = _F32(h.csf_mm), _F32(h.grey_mm), _F32(h.csf_mm + h.sulcus_depth_mm)
    half_w = _F32(h.sulcus_width_mm / 2)
    sulc = p.sulc
    eff = h.effacement(p)
    if eff is not None:  # squeeze sulci and the CSF rim shut near mass lesions
        sulc = sulc + eff * (half_w + 1)
        csf = csf * (1 - _F32(0.85) * eff)
    band = dep < deep_sulcus + grey
    hu[cav] = h.hu["wm"]
    hu[cav & ((dep < csf + grey) | (band & (sulc < half_w + grey)))] = h.hu["gm"]
    csf_m = cav & ((dep < csf) | ((dep < deep_sulcus) & (sulc < half_w)))
    hu[csf_m] = h.hu["csf"]
    pfossa = cav & p.pfossa
    if pfossa.any():
        pf = pfossa & ~csf_m
        folia = ck.field(h.cells, (slice(None),) * 3)  # fine texture standing in for the cerebellar folia
        hu[pf] = (_F32(h.hu["cereb"]) + 2 * folia)[pf]
        hu[pfossa] += _F32(h.hu["pf_boost"])
    dura = p.fissure & (np.abs(p.x) < 0.9)
    if isinstance(p.tent, np.ndarray):
        dura |= h.tentorium_exists(p.x, p.y) & (np.abs(p.z - p.tent) < 0.7)
    hu[cav & dura] = h.hu["dura"]


def _paint_deep(ck: _Chunk, hu: np.ndarray) -> None:
    """Deep grey nuclei, lateral/third/fourth ventricles, brainstem, cisterns, Sylvian fissures."""
    h = ck.pts.head
    sh = abs(h.shift_mm) + 1

    def blob(centre: tuple[float, ...], semi: tuple[float, ...], value: float, deformed: bool = True) -> None:
        pad = np.array([sh if deformed else 0.0, 0.0, 0.0])
        lo, hi = np.subtract(centre, semi) - pad, np.add(centre, semi) + pad
        win = ck.window(lo, hi)
        if win is not None:
            q = ck.sub(win)
            hu[win][(_ell(q.xi if deformed else q.x, q.y, q.z, centre, semi) < 1) & q.cavity] = value

    for c, ax in h.nuclei():
        blob(c, ax, h.hu["deep"])
    win = ck.window(np.array([-20, -8, h.floor_post]), np.array([20, 22, -2]))
    if win is not None:  # brainstem with the ambient/prepontine CSF ring
        q = ck.sub(win)
        r2 = h.brainstem_r2(q)
        stem = (r2 < 1) & q.cavity & (q.z < -4)
        hu[win][stem] = h.hu["wm"] + 3 + h.hu["pf_boost"]
    win = ck.window(np.array([-60, -h.b, h.floor_post]), np.array([60, 12, 0]))
    if win is not None:
        q = ck.sub(win)
        hu[win][(h.cisterns(q) | h.sylvian(q)) & q.cavity] = h.hu["csf"]
    for side in (1, -1):
        for c, ax in h.ventricle_parts(side):
            blob(c, ax, h.hu["csf"])
    c, ax = h.third_ventricle()
    blob(c, ax, h.hu["csf"])
    blob((0.0, 24.0 * h.b / 83, -37.0), (5.0, 3.5, 6.0), h.hu["csf"], deformed=False)  # fourth ventricle


def _paint_base(ck: _Chunk, hu: np.ndarray) -> None:
    """Skull base details in the lowest slices: petrous bones, mastoid air cells, sphenoid sinus, pharynx."""
    h = ck.pts.head

    def region(centre: tuple[float, ...], semi: tuple[float, ...]) -> tuple[Any, _Pts | None]:
        win = ck.window(np.subtract(centre, semi), np.add(centre, semi))
        return win, None if win is None else ck.sub(win)

    for side in (1, -1):
        yaw = _rotation(math.radians(side * 40), 0, 0).T
        c, ax = (side * 30.0, 12.0, h.floor_mid + 1), (20.0, 6.0, 7.0)
        win, q = region(c, (20, 20, 7))
        if q is not None:
            hu[win][_ell(q.x, q.y, q.z, c, ax, yaw) < 1] = h.hu["petrous"]
        c, ax = (side * 0.8 * h.a, 18.0, h.floor_mid - 12), (9.0, 12.0, 10.0)
        win, q = region(c, ax)
        if q is not None:
            m = (_ell(q.x, q.y, q.z, c, ax) < 1) & ~q.cavity
            hu[win][m] = h.hu["base"]
            hu[win][m & (ck.field(h.cells, win) > 0.3)] = _AIR
    # orbits (fat cone, globe, thin bony wall) under the orbital roofs, ethmoid air cells between them
    for side in (1, -1):
        d = _unit(np.array([side * 0.47 * h.a, -h.b, h.floor_ant - 17]))
        reach = _surface_distance(h, d)
        c, ax = tuple(d * (reach - 12)), (15.0, 19.0, 13.0)
        win, q = region(c, np.add(ax, 2))
        if q is not None:
            inside = ~q.cavity & (q.s < h.skull_mm + h.scalp_mm - 2)
            hu[win][(_ell(q.x, q.y, q.z, c, np.add(ax, 2)) < 1) & inside] = h.hu["base"]
            hu[win][(_ell(q.x, q.y, q.z, c, ax) < 1) & inside] = h.hu["fat"]
            g = tuple(d * (reach - 3))
            hu[win][(_ell(q.x, q.y, q.z, g, (11.5, 11.5, 11.5)) < 1) & inside] = h.hu["csf"] + 5
    c, ax = (0.0, -(0.8 * h.b - 18), h.floor_ant - 13), (10.0, 19.0, 11.0)
    win, q = region(c, ax)
    if q is not None:
        m = (_ell(q.x, q.y, q.z, c, ax) < 1) & ~q.cavity
        hu[win][m] = h.hu["diploe"]
        hu[win][m & (ck.field(h.cells, win) > -0.2)] = _AIR
    if h.frontal_sinus is not None:  # air between the tables of the frontal bone, above the orbits
        d = _unit(np.array([0.0, -h.b, h.floor_ant + 14]))
        c = tuple(d * (_surface_distance(h, d) + h.skull_mm / 2 + 1))
        win, q = region(c, np.add(h.frontal_sinus, 2))
        if q is not None:
            hu[win][(_ell(q.x, q.y, q.z, c, np.add(h.frontal_sinus, 1.5)) < 1) & (q.s > 0)] = h.hu["table"]
            hu[win][(_ell(q.x, q.y, q.z, c, h.frontal_sinus) < 1) & (q.s > h.inner_table_mm)] = _AIR
    win = ck.window(np.array([-15.0, 1.0, -200.0]), np.array([15.0, 35.0, h.floor_post + 12]))
    if win is not None:  # the medulla leaves through the foramen magnum: CSF and cord instead of bone
        q = ck.sub(win)
        canal = h.foramen_magnum(q.x, q.y) & (q.z <= q.floor) & (q.s < h.skull_mm)
        hu[win][canal] = h.hu["csf"]
        hu[win][canal & (h.brainstem_r2(q) < 0.45)] = h.hu["wm"] + 3
    c, ax = (0.0, -16.0, h.floor_sella - 13), (13.0, 10.0, 9.0)
    win, q = region(c, np.add(ax, 2))
    if q is not None:
        outside = ~q.cavity
        hu[win][(_ell(q.x, q.y, q.z, c, np.add(ax, 1.5)) < 1) & outside] = h.hu["base"]
        hu[win][(_ell(q.x, q.y, q.z, c, ax) < 1) & outside] = _AIR
    c, ax = (0.0, -30.0, h.floor_sella - 42), (14.0, 9.0, 14.0)
    win, q = region(c, ax)
    if q is not None:
        hu[win][_ell(q.x, q.y, q.z, c, ax) < 1] = _AIR


def _paint_sinuses(ck: _Chunk, hu: np.ndarray) -> None:
    """Dural venous sinuses (superior sagittal, transverse, straight): not blood in the label sense, 45..72 HU."""
    h = ck.pts.head
    win = ck.window(np.array([-8, -60, h.floor_post]), np.array([8, h.b + 10, h.c_up + 10]))
    if win is not None:
        q = ck.sub(win)
        depth = -q.s
        sss = (depth > 0) & (depth < 6.5) & (np.abs(q.x) < 3.8 * (1 - depth / 6.5) + 0.3) & (q.y > -55)
        hu[win][sss & (q.z > q.tent + 1)] = h.hu["sinus"]
    win = ck.window(np.array([-h.a - 10, 15, -45]), np.array([h.a + 10, h.b + 10, 0]))
    if win is not None:
        q = ck.sub(win)
        depth = -q.s
        ts = (depth > 0) & (depth < 6) & (np.abs(q.z - q.tent) < 3.5 * (1 - depth / 6)) & (q.y > 15)
        st = _seg_dist(q.x, q.y, q.z, np.array([0.0, 18.0, h.tent_z0 + 3]),
                       np.array([0.0, 0.85 * h.b, h.tent_z0 - 0.18 * (0.85 * h.b - 4)])) < 2.3
        hu[win][(ts | st) & q.cavity] = h.hu["sinus"]


def _paint_headrest(volume: np.ndarray, head: _Head, pose: _Pose, geo: _Geometry) -> None:
    """Foam cushion and plastic shell of the head holder under the occiput: fixed to the scanner, the same in
    every slice, painted only where there is air."""
    ys, xs = geo.xy[None, :], geo.xy[:, None]
    back = float(pose.to_world(np.array([[0.0, 0.0, 0.0]]))[0, 1]) + head.b + 14
    r = np.sqrt(xs**2 + (ys - (back - 95)) ** 2)
    under = (ys > back - 40) & (np.abs(xs) < 70)
    free = volume == _AIR  # never cover the head
    volume[free & ((r > 95) & (r < 102) & under)[:, :, None]] = -900.0
    volume[free & ((r >= 102) & (r < 105) & under)[:, :, None]] = 150.0


def _finish(volume: np.ndarray, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, float, float, float]:
    """Blur (scanner PSF), add HU offset and correlated noise, pad outside the reconstruction circle, round to
    int16. Returns image, noise sigma (HU), offset (HU), pad value (HU)."""
    # in-place where possible: full-size volumes are 40 MB each
    psf = max(_PSF_MIN_PX, _PSF_MM / geo.spacing)
    img = ndimage.gaussian_filter(volume, sigma=(psf, psf, 0), mode="nearest", truncate=3.0)
    sigma = float(rng.uniform(3.0, 6.0))
    offset = float(rng.uniform(-5.0, 5.0))
    pad = float(rng.choice(_PAD_VALUES))
    noise = rng.standard_normal(img.shape, dtype=_F32)
    ndimage.gaussian_filter(noise, sigma=(_NOISE_SIGMA_PX, _NOISE_SIGMA_PX, 0), output=noise, mode="wrap",
                            truncate=3.0)
    noise *= _F32(sigma / _noise_gain())
    noise += _F32(offset)
    img += noise
    r2 = geo.xy[:, None] ** 2 + geo.xy[None, :] ** 2
    img[r2 > (geo.matrix * geo.spacing / 2) ** 2] = pad
    np.rint(img, out=img)
    np.clip(img, -3024, 3071, out=img)
    return img.astype(np.int16), sigma, offset, pad


def _noise_gain() -> float:
    """Standard deviation of unit white noise after the in-plane noise blur (to rescale it to sigma)."""
    delta = np.zeros((31, 31))
    delta[15, 15] = 1
    return float(np.sqrt((ndimage.gaussian_filter(delta, _NOISE_SIGMA_PX, truncate=3.0) ** 2).sum()))
