"""The phantom's anatomy: the head (scalp, skull and its base, brain, ventricles, cisterns) drawn from a seed,
its pose and image grid, and the distractors that look like blood but are never labelled (calcifications,
dense vessels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_catalog.phantoms.geometry import (
    _F32,
    _bump,
    _ellipsoid,
    _Geometry,
    _Points,
    _Pose,
    _rotation,
    _segment_distance,
    _step,
    _Waves,
)

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

    def signed_dist(self, p: _Points) -> np.ndarray:
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

    def shifted_x(self, p: _Points) -> np.ndarray:
        if self.shift_mm == 0:
            return p.x
        w = np.exp(-((p.y - _F32(self.shift_y)) * _F32(1 / 40)) ** 2 - ((p.z - 8) * _F32(1 / 26)) ** 2)
        return p.x - _F32(self.shift_mm) * w * np.clip(-p.s * _F32(1 / 20), 0, 1)

    def effacement(self, p: _Points) -> np.ndarray | None:
        """0..1: how much sulci and the CSF rim are squeezed shut near mass lesions."""
        out = None
        for centre, radius in self.effacers:
            e = np.exp(-_ellipsoid(p.x, p.y, p.z, centre, (radius, radius, radius)))
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

    def ventricle(self, p: _Points, sides: tuple[int, ...]) -> np.ndarray:
        xi = p.x_shifted
        m = np.zeros(np.broadcast_shapes(np.shape(xi), np.shape(p.y), np.shape(p.z)), bool)
        for side in sides:
            for c, ax in self.ventricle_parts(side):
                m |= _ellipsoid(xi, p.y, p.z, c, ax) < 1
        return m

    def brainstem_r2(self, p: _Points) -> np.ndarray:
        """Normalised squared radius of the midbrain-pons-medulla column (pons bulges forwards)."""
        pons = np.exp(-((p.z + 32) * _F32(1 / 9)) ** 2)
        cy = 6 - 2 * pons
        return (p.x / (11 + 4 * pons)) ** 2 + ((p.y - cy) / (9 + 4 * pons)) ** 2

    def cisterns(self, p: _Points) -> np.ndarray:
        """Basal cisterns: suprasellar cistern and the ambient/prepontine ring around the brainstem."""
        supra = _ellipsoid(p.x, p.y, p.z, (0, -14, self.floor_sella + 11), (11, 7, 4)) < 1
        r2 = self.brainstem_r2(p)
        ring = (r2 > 1) & (r2 < 1.5) & (p.z < -6) & (p.z > self.floor_post + 4)
        return supra | ring

    def sylvian(self, p: _Points) -> np.ndarray:
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

    def mask(self, p: _Points) -> np.ndarray:
        if self.p0 is not None:
            return _segment_distance(p.x, p.y, p.z, self.p0, self.p1) < self.radius
        return _ellipsoid(p.x_shifted if self.deformed else p.x, p.y, p.z, self.centre, self.semi) < 1


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


