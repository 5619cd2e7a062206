"""Phantoms as users meet them: one phantom from a seed, and a data root of phantoms written to disk.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_catalog.phantoms.anatomy import _draw_distractors, _draw_geometry, _draw_head, _draw_pose
from data_catalog.phantoms.geometry import PHANTOM_SIZES
from data_catalog.phantoms.lesions import _plan_lesions
from data_catalog.phantoms.render import _finish, _render
from data_catalog.scans import atomic_write

logger = logging.getLogger(__name__)


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


