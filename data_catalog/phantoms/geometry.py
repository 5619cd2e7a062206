"""Phantom building blocks: sizes and physical constants, smooth random fields, the head pose and the
image grid, sample points in the head frame, and shape primitives (ellipsoids, smooth steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

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


class _Head(Protocol):
    """What sample points ask of the head they lie in (``data_catalog.phantoms.anatomy._Head``
    is one; it is drawn there, on top of this module)."""

    sulci: _Waves
    tent_z0: float

    @property
    def floor_top(self) -> float: ...

    def signed_dist(self, p: _Points) -> np.ndarray: ...

    def floor(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...

    def tentorium(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...

    def fissure_exists(self, y: np.ndarray, z: np.ndarray) -> np.ndarray: ...

    def shifted_x(self, p: _Points) -> np.ndarray: ...


class _Points:
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
    def tentorium_z(self) -> np.ndarray:
        """Height of the tentorium (mm)."""
        return self._low(self.head.tentorium, self.head.tent_z0)

    @cached_property
    def cavity(self) -> np.ndarray:
        return (self.s < 0) & (self.z > self.floor)

    @cached_property
    def posterior_fossa(self) -> np.ndarray:
        """Posterior fossa: below the tentorium, behind the clivus."""
        return (self.z < self.tentorium_z) & (self.y > -2)

    @cached_property
    def fissure(self) -> np.ndarray:
        """Where the interhemispheric fissure exists (above the corpus callosum, in front of / behind it)."""
        return self.head.fissure_exists(self.y, self.z) & ~self.posterior_fossa

    @cached_property
    def depth(self) -> np.ndarray:
        """Depth below the brain surface (mm): convexity, skull base, falx and tentorium surfaces."""
        h = self.head
        d = -self.s - self.ea
        if isinstance(self.floor, np.ndarray):
            d = np.minimum(d, self.z - self.floor)
        d = np.minimum(d, np.where(self.fissure, np.abs(self.x), _INF))
        if isinstance(self.tentorium_z, np.ndarray):
            d = np.minimum(d, np.where(h.tentorium_exists(self.x, self.y),
                                       np.abs(self.z - self.tentorium_z) + _F32(h.csf_mm - 0.8), _INF))
        return d

    @cached_property
    def sulcus_distance(self) -> np.ndarray:
        """Approximate distance (mm) to the mid-plane of the nearest sulcus."""
        return np.abs(self.field(self.head.sulci)) * _F32(1.0 / self.head.sulci.k_rms)

    @cached_property
    def x_shifted(self) -> np.ndarray:
        """x after midline shift (subfalcine): deep structures are displaced, the inner table is not."""
        return self.head.shifted_x(self)

    def sub(self, win: tuple[slice, slice, slice], field_fn: Callable[[_Waves], np.ndarray]) -> _Points:
        """The same points restricted to a window of the chunk (arrays broadcast along size-1 axes)."""
        known = {k: _window_view(v, win) for k, v in self.__dict__.items()
                 if isinstance(v, np.ndarray) and v.ndim == 3 and k not in ("x", "y", "z", "yw")}
        x, y, z, yw = (_window_view(v, win) for v in (self.x, self.y, self.z, self.yw))
        p = _Points(self.head, x, y, z, yw, field_fn, **known)
        if isinstance(self.ea, np.ndarray):
            p.ea = _window_view(self.ea, win)
        return p


def _window_view(arr: np.ndarray, win: tuple[slice, slice, slice]) -> np.ndarray:
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
        self.pts = _Points(head, x, y, z, self.ys[None, :, None], lambda w: self.field(w, full))
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

    def sub(self, win: tuple[slice, slice, slice]) -> _Points:
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


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Any, semi: Any,
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


def _segment_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance (mm) from points to the segment p0-p1 (a vessel's centre line)."""
    d = (p1 - p0).astype(np.float64)
    length2 = float(d @ d)
    px, py, pz = x - _F32(p0[0]), y - _F32(p0[1]), z - _F32(p0[2])
    t = np.clip((px * _F32(d[0]) + py * _F32(d[1]) + pz * _F32(d[2])) * _F32(1 / length2), 0, 1)
    return np.sqrt((px - t * _F32(d[0])) ** 2 + (py - t * _F32(d[1])) ** 2 + (pz - t * _F32(d[2])) ** 2)


