"""Segment one scan file with an ensemble: the one code path of pseudo-labelling, evaluation and
``viola predict``.

File -> validated HU volume -> preprocessing (the training settings, from the ensemble manifest) ->
sliding-window ensemble -> mean foreground probability inverted onto the scan's own grid ->
uint8 mask (probability >= FOREGROUND_THRESHOLD) with volumes and confidence scores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from data_catalog.preprocessing import (
    PreprocessedCase,
    cached_preprocess,
    invert_to_native,
    load_preprocessed,
    preprocess_arrays,
)
from data_catalog.scans import ScanInfo, read_image, scan_info
from viola_models.evaluation.metrics import abc2_volume_ml
from viola_models.inference.ensemble import Ensemble
from viola_models.inference.quality import confidence_scores
from viola_models.inference.sliding_window import FOREGROUND_THRESHOLD, predict_ensemble

__all__ = ["ScanSegmentation", "predict_folder", "segment_scan"]

log = logging.getLogger(__name__)


@dataclass
class ScanSegmentation:
    """The result for one scan, on its native grid."""

    mask: np.ndarray  # uint8 (X, Y, Z), the scan's shape
    info: ScanInfo
    scores: dict  # viola_models.inference.quality.confidence_scores (preprocessed grid) and predicted_dice
    volume_ml: float
    abc2_volume_ml: float
    n_lesions: int
    largest_lesion_ml: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    uncertain: np.ndarray | None = None  # uint8 (X, Y, Z): mean probability within ``uncertain_band``


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Number and voxel sizes of the 26-connected lesions, labelled on the mask's bounding box only."""
    if not mask.any():
        return 0, np.zeros(0, dtype=np.int64)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]  # the bounding box of the value 1
    labels, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3)))
    return int(n), np.bincount(labels.ravel())[1:]


def _case_of(image_path: Path | None, ensemble: Ensemble, cache_dir: Path | None, image_hash: str | None,
             cached_case: Path | None, image: tuple[np.ndarray, ScanInfo] | None
             ) -> tuple[PreprocessedCase, ScanInfo, float | None]:
    """The scan preprocessed for ``ensemble`` (see :func:`segment_scan`), its native geometry, and
    when reading the scan file ended (``time.perf_counter``; None: a cached case, no scan read)."""
    if cached_case is not None:  # already preprocessed (with its label) by the round, with these settings
        case = load_preprocessed(Path(cached_case))
        return case, scan_info(case.native_affine, case.native_shape), None
    if cache_dir is not None and image_hash:
        path, _ = cached_preprocess(Path(cache_dir), Path(image_path), image_hash, ensemble.preprocess)
        case = load_preprocessed(path)
        return case, scan_info(case.native_affine, case.native_shape), None
    image, info = image if image is not None else read_image(Path(image_path))
    t_read = time.perf_counter()
    return preprocess_arrays(image, info.affine, None, ensemble.preprocess), info, t_read


def segment_scan(
    image_path: Path | None,
    ensemble: Ensemble,
    overlap: float = 0.5,
    tta: bool = False,
    cache_dir: Path | None = None,
    image_hash: str | None = None,
    cached_case: Path | None = None,
    image: tuple[np.ndarray, ScanInfo] | None = None,
    uncertain_band: tuple[float, float] | None = None,
) -> ScanSegmentation:
    """Segment one scan, a NIfTI file or a DICOM series folder (ScanError with a reason if unusable).

    With ``cache_dir`` and ``image_hash`` (the catalog's, so the file was validated) the preprocessing
    comes from (or goes to) the cache, and on a hit the scan file is not read at all: its geometry is
    in the cached case. ``cached_case`` is such a case already at hand (it must have been made with
    the ensemble's preprocessing settings). ``image``: the scan already in memory, as validated by
    ``data_catalog.scans.read_image`` or ``array_image`` (``image_path`` is then not read).
    ``uncertain_band`` (low, high): also mark the voxels whose mean foreground probability is in
    [low, high) (``ScanSegmentation.uncertain``), the pseudo-label voxels a student may ignore.
    """
    t0 = time.perf_counter()
    case, info, t_read = _case_of(image_path, ensemble, cache_dir, image_hash, cached_case, image)
    t_read = t0 if t_read is None else t_read
    t_pre = time.perf_counter()
    out = predict_ensemble(ensemble.members, case.image, overlap=overlap, tta=tta, device=ensemble.device,
                           predictors=ensemble.predictors)
    t_net = time.perf_counter()
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    scores = confidence_scores(out.member_probs, voxel_ml)
    scores["predicted_dice"] = ensemble.predicted_dice(scores)
    prob = invert_to_native(out.mean_prob[None], case.affine, case.native_affine, case.native_shape)
    mask = (prob[0] >= FOREGROUND_THRESHOLD).to(torch.uint8).cpu().numpy()
    uncertain = None
    if uncertain_band is not None:
        low, high = uncertain_band
        uncertain = ((prob[0] >= low) & (prob[0] < high)).to(torch.uint8).cpu().numpy()
    t_inv = time.perf_counter()
    vox_native = float(np.prod(info.spacing)) / 1000.0
    n, sizes = _components(mask)
    seg = ScanSegmentation(
        mask=mask,
        info=info,
        scores=scores,
        volume_ml=float(mask.sum()) * vox_native,
        abc2_volume_ml=abc2_volume_ml(mask, info.spacing),
        n_lesions=n,
        largest_lesion_ml=float(sizes.max()) * vox_native if n else 0.0,
        seconds=0.0,
        uncertain=uncertain,
    )
    seg.seconds = time.perf_counter() - t0
    seg.timings = {"read": t_read - t0, "preprocess": t_pre - t_read, "networks": t_net - t_pre,
                   "invert": t_inv - t_net, "post": time.perf_counter() - t_inv}
    return seg


PREDICTION_COLUMNS = [
    "file_name", "mask_file", "status", "reason", "predicted_volume_ml", "abc2_volume_ml", "n_lesions",
    "largest_lesion_ml",
    "consensus", "predicted_dice", "agreement", "union_agreement", "mean_max_probability", "volume_cv",
    "inference_seconds",
]


def _inputs(folder: Path) -> list[tuple[Path, str, str]]:
    """Every input of the input folder (or the one input file, or the one DICOM series folder): its
    path, its mask's file name and why it cannot be a scan ("" if it can). A folder that directly
    holds DICOM files is one series; otherwise its NIfTI files and the series in its sub-folders
    (``data_catalog.catalog.scan_entries``: a folder of series, or an archive's tree of them) are
    the inputs. A NIfTI mask keeps its scan's file name; a series' is CASE.nii.gz."""
    from data_catalog.catalog import entry_problem, scan_entries
    from data_catalog.dicom import holds_dicom_files

    if not folder.is_dir() or holds_dicom_files(folder):
        return [(folder, _mask_name(folder, folder.name), entry_problem(folder))]
    found, others = scan_entries(folder)
    rows = [(p, _mask_name(p, case), "") for p, case in found]
    rows += [(p, _mask_name(p, p.name), why) for p, why in others]
    return sorted(rows, key=lambda r: str(r[0]))


def _mask_name(path: Path, case: str) -> str:
    """The mask's file name: the scan's own, or a series' case name + .nii.gz."""
    return f"{case}.nii.gz" if path.is_dir() else path.name


def _predict_one(path: Path, shown: str, name: str, problem: str, output_dir: Path, ensemble: Ensemble,
                 written: dict[str, str], **options) -> dict:
    """Segment one input of :func:`predict_folder` into ``output_dir`` (``options``: overlap, tta,
    overlays, dicom_seg); its row of ``predictions_info.csv``. ``written``: mask name -> the input it
    came from, updated here."""
    from data_catalog.dicom import make_seg, save_seg
    from data_catalog.overlays import overlay_png
    from data_catalog.scans import ScanError, save_nifti_like

    row = {c: "" for c in PREDICTION_COLUMNS} | {"file_name": shown}
    try:
        if problem:
            raise ScanError(problem)
        if name in written:
            raise ScanError(f"its mask {name} is already the mask of {written[name]}; rename one of them")
        seg = segment_scan(path, ensemble, overlap=options["overlap"], tta=options["tta"])
        seg_dataset = make_seg(seg.mask, path) if options["dicom_seg"] and path.is_dir() else None
    except ScanError as e:
        return row | {"status": "rejected", "reason": str(e)}
    save_nifti_like(seg.mask, path, output_dir / name)
    written[name] = shown
    if seg_dataset is not None:
        save_seg(seg_dataset, output_dir / f"{name.removesuffix('.nii.gz')}.seg.dcm")
    row.update(status="ok", mask_file=name, predicted_volume_ml=round(seg.volume_ml, 3),
               abc2_volume_ml=round(seg.abc2_volume_ml, 3), n_lesions=seg.n_lesions,
               largest_lesion_ml=round(seg.largest_lesion_ml, 3),
               consensus=seg.scores["consensus"], inference_seconds=round(seg.seconds, 3),
               **{k: round(seg.scores[k], 4) for k in ("predicted_dice", "agreement", "union_agreement",
                                                      "mean_max_probability", "volume_cv")})
    if options["overlays"]:
        image, info = read_image(path)
        stem = name.removesuffix(".gz").removesuffix(".nii")
        overlay_png(image, seg.mask, info.affine, output_dir / "overlays" / f"{stem}.png",
                    title=f"{shown}: {seg.volume_ml:.1f} ml in {seg.n_lesions} lesion(s)")
    return row


def predict_folder(
    input_dir: Path,
    output_dir: Path,
    ensemble: Ensemble,
    overlap: float = 0.5,
    tta: bool = False,
    overlays: bool = False,
    on_scan: Callable[[int, int, dict], None] | None = None,
    dicom_seg: bool = False,
) -> pd.DataFrame:
    """Segment every scan of ``input_dir`` into ``output_dir``: its NIfTI files and DICOM series
    folders, or ``input_dir`` itself when it is one file or one series folder.

    Writes, atomically, a uint8 mask per scan under the scan's own file name, header and affine (a
    series: ``FOLDER.nii.gz`` on the series' grid), with ``dicom_seg`` also a DICOM SEG per series
    (``FOLDER.seg.dcm``, referencing the series; needs highdicom), optional PNG overlays
    (``overlays/``), and ``predictions_info.csv`` (rewritten after each scan, so an interrupted run
    leaves a valid table). Unusable scans get a row with their reason and are skipped. Nothing in
    ``input_dir`` is written to. ``on_scan(i, n, row)`` reports progress.
    """
    from data_catalog.dicom import check_seg_writer
    from data_catalog.scans import atomic_write

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.exists():
        raise FileNotFoundError(f"input {input_dir} does not exist")
    src_root = input_dir if input_dir.is_dir() else input_dir.parent
    if output_dir.resolve() == src_root.resolve():
        raise ValueError(f"output folder {output_dir} is the input folder: masks would replace the scans")
    if dicom_seg:
        check_seg_writer()
    inputs = _inputs(input_dir)
    if not any(problem == "" for _, _, problem in inputs):
        raise FileNotFoundError(f"no .nii or .nii.gz files or DICOM series folders in {input_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    table = output_dir / "predictions_info.csv"
    written: dict[str, str] = {}  # mask name -> the input it came from
    for i, (path, name, problem) in enumerate(inputs, 1):
        shown = path.name if path == input_dir else str(path.relative_to(input_dir))
        row = _predict_one(path, shown, name, problem, output_dir, ensemble, written, overlap=overlap, tta=tta,
                           overlays=overlays, dicom_seg=dicom_seg)
        rows.append(row)
        df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
        atomic_write(table, lambda tmp, df=df: df.to_csv(tmp, index=False))
        if on_scan:
            on_scan(i, len(inputs), row)
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
