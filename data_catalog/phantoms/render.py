"""Rendering: the head, its distractors and its bleeds sampled on 1 mm sub-slices in chunks, averaged to
5 mm slices, blurred by the scanner's point-spread function, offset and given correlated noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from data_catalog.phantoms.anatomy import _Distractor, _Head, _outer_surface
from data_catalog.phantoms.geometry import (
    _AIR,
    _CHUNK_VOXELS,
    _F32,
    _NOISE_SIGMA_PX,
    _PAD_VALUES,
    _PSF_MIN_PX,
    _PSF_MM,
    _SUB,
    _Chunk,
    _ellipsoid,
    _Geometry,
    _Points,
    _Pose,
    _rotation,
    _segment_distance,
)
from data_catalog.phantoms.lesions import _IPH, _ExtraAxial, _Lesion, _surface_distance, _unit

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
    dep = p.depth
    csf, grey, deep_sulcus = _F32(h.csf_mm), _F32(h.grey_mm), _F32(h.csf_mm + h.sulcus_depth_mm)
    half_w = _F32(h.sulcus_width_mm / 2)
    sulc = p.sulcus_distance
    eff = h.effacement(p)
    if eff is not None:  # squeeze sulci and the CSF rim shut near mass lesions
        sulc = sulc + eff * (half_w + 1)
        csf = csf * (1 - _F32(0.85) * eff)
    band = dep < deep_sulcus + grey
    hu[cav] = h.hu["wm"]
    hu[cav & ((dep < csf + grey) | (band & (sulc < half_w + grey)))] = h.hu["gm"]
    csf_m = cav & ((dep < csf) | ((dep < deep_sulcus) & (sulc < half_w)))
    hu[csf_m] = h.hu["csf"]
    pfossa = cav & p.posterior_fossa
    if pfossa.any():
        pf = pfossa & ~csf_m
        folia = ck.field(h.cells, (slice(None),) * 3)  # fine texture standing in for the cerebellar folia
        hu[pf] = (_F32(h.hu["cereb"]) + 2 * folia)[pf]
        hu[pfossa] += _F32(h.hu["pf_boost"])
    dura = p.fissure & (np.abs(p.x) < 0.9)
    if isinstance(p.tentorium_z, np.ndarray):
        dura |= h.tentorium_exists(p.x, p.y) & (np.abs(p.z - p.tentorium_z) < 0.7)
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
            hu[win][(_ellipsoid(q.x_shifted if deformed else q.x, q.y, q.z, centre, semi) < 1) & q.cavity] = value

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


def _region(ck: _Chunk, centre: tuple[float, ...], semi: tuple[float, ...]) -> tuple[Any, _Points | None]:
    """The chunk's window around ``centre`` (half-sizes ``semi``, mm) and its points (None: outside)."""
    win = ck.window(np.subtract(centre, semi), np.add(centre, semi))
    return win, None if win is None else ck.sub(win)


def _paint_base(ck: _Chunk, hu: np.ndarray) -> None:
    """Skull base details in the lowest slices: petrous bones, mastoid air cells, orbits, sinuses,
    the foramen magnum and the pharynx (painted in this order: later ones overwrite)."""
    _paint_temporal(ck, hu)
    _paint_orbits(ck, hu)
    _paint_midline(ck, hu)


def _paint_temporal(ck: _Chunk, hu: np.ndarray) -> None:
    """Petrous bones and mastoid air cells, both sides."""
    h = ck.pts.head
    for side in (1, -1):
        yaw = _rotation(math.radians(side * 40), 0, 0).T
        c, ax = (side * 30.0, 12.0, h.floor_mid + 1), (20.0, 6.0, 7.0)
        win, q = _region(ck, c, (20, 20, 7))
        if q is not None:
            hu[win][_ellipsoid(q.x, q.y, q.z, c, ax, yaw) < 1] = h.hu["petrous"]
        c, ax = (side * 0.8 * h.a, 18.0, h.floor_mid - 12), (9.0, 12.0, 10.0)
        win, q = _region(ck, c, ax)
        if q is not None:
            m = (_ellipsoid(q.x, q.y, q.z, c, ax) < 1) & ~q.cavity
            hu[win][m] = h.hu["base"]
            hu[win][m & (ck.field(h.cells, win) > 0.3)] = _AIR


def _paint_orbits(ck: _Chunk, hu: np.ndarray) -> None:
    """Orbits (fat cone, globe, thin bony wall) under the orbital roofs."""
    h = ck.pts.head
    for side in (1, -1):
        d = _unit(np.array([side * 0.47 * h.a, -h.b, h.floor_ant - 17]))
        reach = _surface_distance(h, d)
        c, ax = tuple(d * (reach - 12)), (15.0, 19.0, 13.0)
        win, q = _region(ck, c, np.add(ax, 2))
        if q is not None:
            inside = ~q.cavity & (q.s < h.skull_mm + h.scalp_mm - 2)
            hu[win][(_ellipsoid(q.x, q.y, q.z, c, np.add(ax, 2)) < 1) & inside] = h.hu["base"]
            hu[win][(_ellipsoid(q.x, q.y, q.z, c, ax) < 1) & inside] = h.hu["fat"]
            g = tuple(d * (reach - 3))
            hu[win][(_ellipsoid(q.x, q.y, q.z, g, (11.5, 11.5, 11.5)) < 1) & inside] = h.hu["csf"] + 5


def _paint_midline(ck: _Chunk, hu: np.ndarray) -> None:
    """Ethmoid air cells, frontal sinus, foramen magnum, sphenoid sinus and pharynx."""
    h = ck.pts.head
    c, ax = (0.0, -(0.8 * h.b - 18), h.floor_ant - 13), (10.0, 19.0, 11.0)
    win, q = _region(ck, c, ax)
    if q is not None:
        m = (_ellipsoid(q.x, q.y, q.z, c, ax) < 1) & ~q.cavity
        hu[win][m] = h.hu["diploe"]
        hu[win][m & (ck.field(h.cells, win) > -0.2)] = _AIR
    if h.frontal_sinus is not None:  # air between the tables of the frontal bone, above the orbits
        d = _unit(np.array([0.0, -h.b, h.floor_ant + 14]))
        c = tuple(d * (_surface_distance(h, d) + h.skull_mm / 2 + 1))
        win, q = _region(ck, c, np.add(h.frontal_sinus, 2))
        if q is not None:
            hu[win][(_ellipsoid(q.x, q.y, q.z, c, np.add(h.frontal_sinus, 1.5)) < 1) & (q.s > 0)] = h.hu["table"]
            hu[win][(_ellipsoid(q.x, q.y, q.z, c, h.frontal_sinus) < 1) & (q.s > h.inner_table_mm)] = _AIR
    win = ck.window(np.array([-15.0, 1.0, -200.0]), np.array([15.0, 35.0, h.floor_post + 12]))
    if win is not None:  # the medulla leaves through the foramen magnum: CSF and cord instead of bone
        q = ck.sub(win)
        canal = h.foramen_magnum(q.x, q.y) & (q.z <= q.floor) & (q.s < h.skull_mm)
        hu[win][canal] = h.hu["csf"]
        hu[win][canal & (h.brainstem_r2(q) < 0.45)] = h.hu["wm"] + 3
    c, ax = (0.0, -16.0, h.floor_sella - 13), (13.0, 10.0, 9.0)
    win, q = _region(ck, c, np.add(ax, 2))
    if q is not None:
        outside = ~q.cavity
        hu[win][(_ellipsoid(q.x, q.y, q.z, c, np.add(ax, 1.5)) < 1) & outside] = h.hu["base"]
        hu[win][(_ellipsoid(q.x, q.y, q.z, c, ax) < 1) & outside] = _AIR
    c, ax = (0.0, -30.0, h.floor_sella - 42), (14.0, 9.0, 14.0)
    win, q = _region(ck, c, ax)
    if q is not None:
        hu[win][_ellipsoid(q.x, q.y, q.z, c, ax) < 1] = _AIR


def _paint_sinuses(ck: _Chunk, hu: np.ndarray) -> None:
    """Dural venous sinuses (superior sagittal, transverse, straight): not blood in the label sense, 45..72 HU."""
    h = ck.pts.head
    win = ck.window(np.array([-8, -60, h.floor_post]), np.array([8, h.b + 10, h.c_up + 10]))
    if win is not None:
        q = ck.sub(win)
        depth = -q.s
        sss = (depth > 0) & (depth < 6.5) & (np.abs(q.x) < 3.8 * (1 - depth / 6.5) + 0.3) & (q.y > -55)
        hu[win][sss & (q.z > q.tentorium_z + 1)] = h.hu["sinus"]
    win = ck.window(np.array([-h.a - 10, 15, -45]), np.array([h.a + 10, h.b + 10, 0]))
    if win is not None:
        q = ck.sub(win)
        depth = -q.s
        ts = (depth > 0) & (depth < 6) & (np.abs(q.z - q.tentorium_z) < 3.5 * (1 - depth / 6)) & (q.y > 15)
        st = _segment_distance(q.x, q.y, q.z, np.array([0.0, 18.0, h.tent_z0 + 3]),
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
