"""The bleeds: intraparenchymal (IPH), intraventricular (IVH), subdural and epidural (SDH, EDH) and
subarachnoid (SAH) haemorrhage, planned with the volumes and co-occurrences of real cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data_catalog.phantoms.anatomy import _Head
from data_catalog.phantoms.geometry import (
    _F32,
    _IPH_MAX_ML,
    _MAX_COMPONENTS,
    _P_SINGLE_COMPONENT,
    _VOL_LOG_MEDIAN,
    _VOL_LOG_SIGMA,
    _VOL_RANGE_ML,
    _ellipsoid,
    _Points,
    _Pose,
    _Waves,
)

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

    def blood(self, p: _Points) -> np.ndarray:
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

    def _r(self, p: _Points) -> np.ndarray:
        """Normalised radius (1 on the lesion surface)."""
        semi = self.semi * self.scale
        r2 = _ellipsoid(p.x, p.y, p.z, self.centre, semi, self.rot)
        for off, lsemi in self.lobes:
            c = self.centre + self.rot.T @ (off * semi)
            r2 = np.minimum(r2, _ellipsoid(p.x, p.y, p.z, c, lsemi * self.scale, self.rot))
        r = np.sqrt(r2)
        if self.rough is not None:  # bumpy margin: the field's 20..40 mm waves squeezed to the lesion's size
            m = _F32(15 / self.scale)
            c = self.centre
            r = r / (1 + _F32(0.12) * self.rough.at((p.x - _F32(c[0])) * m, (p.y - _F32(c[1])) * m,
                                                    (p.z - _F32(c[2])) * m))
        return r

    def blood(self, p: _Points) -> np.ndarray:
        return (self._r(p) < 1) & p.cavity

    def oedema(self, p: _Points) -> np.ndarray:
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

    def thickness(self, p: _Points) -> np.ndarray:
        d = self.direction.astype(_F32)
        rr = np.sqrt(p.x * p.x + p.y * p.y + p.z * p.z) + _F32(1e-3)
        cosang = np.clip((p.x * d[0] + p.y * d[1] + p.z * d[2]) / rr, -1, 1)
        lateral = _F32(self.surface_mm) * np.arccos(cosang)
        t = _F32(self.thick) * np.clip(1 - (lateral * _F32(1 / self.radius)) ** 2, 0, 1) ** _F32(self.power)
        # supratentorial, on its own side of the falx
        keep = (p.x * _F32(self.side) > 1.0) & ((p.z > p.tentorium_z + 2) | (p.y < 0))
        return np.where(keep, t, _F32(0))

    def blood(self, p: _Points) -> np.ndarray:
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

    def blood(self, p: _Points) -> np.ndarray:
        h = p.head
        if self.mode == "convexity":
            near = _ellipsoid(p.x, p.y, p.z, self.centre, (self.extent,) * 3) < 1
            sulcal = (p.sulcus_distance < self.width / 2) & (p.depth < h.csf_mm + h.sulcus_depth_mm)
            # the blood-filled subarachnoid space over the gyri joins the sulcal ribbons into few pieces
            surface = p.depth < max(h.csf_mm, self.width)
            return near & p.cavity & (sulcal | surface) & (p.depth > -0.5)
        front_fissure = (np.abs(p.x) < max(h.csf_mm, 1.0)) & (p.y < -15) & (p.z < 12)
        near = _ellipsoid(p.x, p.y, p.z, self.centre, (self.extent,) * 3) < 1
        return near & (h.cisterns(p) | h.sylvian(p) | front_fissure) & p.cavity

    def bbox(self, head: _Head) -> tuple[np.ndarray, np.ndarray]:
        return self.centre - self.extent - 1, self.centre + self.extent + 1


@dataclass
class _IVH(_Lesion):
    """Intraventricular: blood layering in the dependent (posterior) horns below a flat fluid level."""

    sides: tuple[int, ...] = (1, -1)
    level: float = 0.0  # world y (mm) of the fluid level; blood lies posterior to it (patient supine)

    def blood(self, p: _Points) -> np.ndarray:
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

    def points(self, lo: np.ndarray, hi: np.ndarray) -> tuple[_Points, float]:
        p = (lo + self.unit * (hi - lo)).astype(_F32)
        yw = (self.pose.to_world(p.astype(np.float64))[:, 1]).astype(_F32)
        return _Points(self.head, p[:, 0], p[:, 1], p[:, 2], yw), float(np.prod(hi - lo))

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


def _draw_kinds(rng: np.random.Generator) -> tuple[list[str], list[float]]:
    """The bleeds' types and volumes (ml), the main bleed first (see :func:`_plan_lesions`)."""
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
    return kinds, volumes


def _place(rng: np.random.Generator, head: _Head, mc: _MonteCarlo, kinds: list[str], volumes: list[float]
           ) -> tuple[list[_Lesion], float | None]:
    """Each bleed placed in the head, satellites near the main one; an IVH's volume is returned
    (it is made last, once the mass effect has moved the ventricles)."""
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
    return lesions, ivh_ml


def _mass_effect(rng: np.random.Generator, head: _Head, lesions: list[_Lesion]) -> None:
    """Midline shift, compression and effaced sulci of the head from its space-occupying bleeds."""
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


def _plan_lesions(rng: np.random.Generator, head: _Head, pose: _Pose) -> list[_Lesion]:
    """Draw the case's bleeds from the real statistics; sets the head's mass effect.

    Total volume is log-normal (median 10.7 ml, quartiles 3.8 / 29.2, clipped to 0.12..150 ml). The number of
    separate bleeds is 1 with p = ``_P_SINGLE_COMPONENT``, else 1 + ceil(log-normal, median 1.6), at most 34.
    The main bleed takes 45..90% of the volume and the rest is split unevenly (Dirichlet 0.7) among satellites
    placed near it (contusions, SAH, small SDH, IVH), so many are tiny. The main type is drawn from
    ``_TYPE_WEIGHTS`` among those that fit the volume (EDH >= 4 ml, IVH <= 25 ml, SAH <= 60 ml); an IPH above
    80 ml passes the excess to the ventricles.
    """
    kinds, volumes = _draw_kinds(rng)
    mc = _MonteCarlo(rng, head, pose)
    lesions, ivh_ml = _place(rng, head, mc, kinds, volumes)
    _mass_effect(rng, head, lesions)
    if ivh_ml is not None:
        lesions.append(_make_ivh(rng, head, mc, ivh_ml))
    return lesions


