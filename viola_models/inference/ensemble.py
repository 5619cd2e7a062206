"""The ensemble folder and its member checkpoints: the one place that writes, reads and validates them.

Layout::

    ensemble.json           members (name, checkpoint relative to the folder, validation Dice, ...),
                            the preprocessing they were trained with, the calibration of the
                            selection score, and free metadata (round, profile, ...)
    calibration.csv         the out-of-fold points the calibration was fitted on (optional)
    cpu_inference.json      the CPU networks made at registration and the int8 check's outcome
                            (optional: :func:`prepare_cpu_networks`)
    openvino/               the members' converted OpenVINO networks, in a self-contained export
                            (optional: :func:`bundle_cpu_networks`)
    <member>/best.pt        one member checkpoint each (:func:`load_member`)

A round writes it once its members are trained; ``viola predict``, pseudo-labelling and
evaluation read it; the MLflow registry stores it as a model version.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from pydantic import ValidationError

from data_catalog.preprocessing import PreprocessSettings, load_preprocessed
from data_catalog.scans import atomic_write
from data_catalog.selection import Calibration, fit_calibration
from viola_models.inference.backends import (
    InferenceSettings,
    OpenVINOForward,
    nncf_available,
    openvino_available,
    resolve_backend,
)
from viola_models.inference.members import MemberCheckpoint, load_member
from viola_models.inference.predictors import as_predictor, fold_batch_norm
from viola_models.inference.quantization import calibration_windows, check_int8
from viola_models.inference.sliding_window import make_predictors

__all__ = ["BUNDLED_NETWORKS", "MANIFEST", "Ensemble", "EnsembleError", "MemberCheckpoint", "bundle_cpu_networks",
           "initial_member", "load_ensemble",
           "load_member", "prepare_cpu_networks", "quantize_members", "read_cpu_record", "read_manifest",
           "require_checkpoints", "write_ensemble"]

log = logging.getLogger(__name__)

MANIFEST = "ensemble.json"
POINTS = "calibration.csv"
CPU_RECORD = "cpu_inference.json"
BUNDLED_NETWORKS = "openvino"


class EnsembleError(ValueError):
    """An ensemble folder that cannot be used, with a one-line reason naming the file."""


@dataclass
class Ensemble:
    """Loaded members with their prepared predictors, the preprocessing they were trained with, and
    the calibration of the confidence score (None when the folder carries none)."""

    members: list[tuple[torch.nn.Module, MemberCheckpoint]]
    preprocess: PreprocessSettings
    device: torch.device
    predictors: list[Callable] = field(default_factory=list)
    source: str = ""
    calibration: Calibration | None = None
    calibration_points: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m.name for _, m in self.members]

    def predicted_dice(self, scores: dict) -> float:
        """The calibrated quality estimate of one segmentation's scores (NaN without calibration)."""
        if self.calibration is None:
            return float("nan")
        return float(self.calibration.predict(scores.get(self.calibration.score, float("nan"))))

    def calibration_for(self, score: str, prior_weight: float = 2.0) -> Calibration:
        """The score -> Dice calibration for ``score``, refitted from the stored points (identity
        fallback when the folder has no points for it)."""
        pts = self.calibration_points
        if pts is None or score not in pts or "true_dice" not in pts:
            return Calibration(score=score, kind="identity")
        if "view" in pts:  # folders written with perturbed copies of the scans: the scans alone count
            pts = pts[pts["view"] == 0]
        return fit_calibration(pts[score], pts["true_dice"], score, prior_weight=prior_weight)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    tmp.replace(dst)


def write_ensemble(folder: Path, members: Sequence[dict], preprocess: PreprocessSettings,
                   calibration: Calibration | None = None, calibration_points: pd.DataFrame | None = None,
                   **meta) -> Path:
    """Assemble an ensemble folder from trained members; returns the manifest's path.

    ``members``: dicts with ``name`` and ``checkpoint`` (a member checkpoint anywhere: linked, or
    copied across file systems, to ``<name>/best.pt``) plus anything to record (validation Dice,
    run id). The manifest is written last and atomically: a folder with a manifest is complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for m in members:
        rel = f"{m['name']}/best.pt"
        _link_or_copy(Path(m["checkpoint"]), folder / rel)
        listed.append({**m, "checkpoint": rel})
    if calibration_points is not None:
        buf = io.StringIO()
        calibration_points.to_csv(buf, index=False)
        atomic_write(folder / POINTS, lambda tmp: tmp.write_text(buf.getvalue()))
    data = {"members": listed, "preprocess": preprocess.model_dump(mode="json"),
            "calibration": calibration.to_dict() if calibration else None, **meta}
    text = json.dumps(data, indent=1, default=str)
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text))
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict:
    """The validated manifest of an ensemble folder, with ``checkpoints`` (absolute paths) added."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EnsembleError(f"ensemble folder {folder} does not exist")
    if not path.is_file():
        raise EnsembleError(f"{path} is missing: not an ensemble folder (a round writes one; see `viola run`)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EnsembleError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
        raise EnsembleError(f"{path} lists no members")
    try:
        data["preprocess"] = PreprocessSettings.model_validate(data.get("preprocess"))
    except ValidationError as e:
        raise EnsembleError(f"{path}: invalid preprocessing settings ({e.errors()[0]['msg']})") from None
    checkpoints = []
    for m in data["members"]:
        rel = m.get("checkpoint") if isinstance(m, dict) else None
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise EnsembleError(f"{path}: member entry {m!r} needs a checkpoint path inside the folder")
        if not (folder / rel).is_file():
            raise EnsembleError(f"{path} lists {rel}, which does not exist")
        checkpoints.append(folder / rel)
    data["checkpoints"] = checkpoints
    if data.get("calibration"):
        try:
            data["calibration"] = Calibration.from_dict(data["calibration"])
        except TypeError as e:
            raise EnsembleError(f"{path}: invalid calibration ({e})") from None
    return data


def initial_member(folder: Path, architecture: str, fold: int) -> Path:
    """The checkpoint of ``folder``'s ensemble that a new member (``architecture``, ``fold``) starts
    from: the member of the same name (``<architecture>-fold<fold>``), else the members of that
    architecture taken in turn (``fold`` modulo their number). EnsembleError when it has none."""
    data = read_manifest(folder)
    by_name = {m.get("name"): ck for m, ck in zip(data["members"], data["checkpoints"])}
    if f"{architecture}-fold{fold}" in by_name:
        return by_name[f"{architecture}-fold{fold}"]
    same = [ck for m, ck in zip(data["members"], data["checkpoints"])
            if architecture in (m.get("architecture"), str(m.get("name", "")).split("-fold")[0])]
    if not same:
        kinds = sorted({str(m.get("architecture") or m.get("name")) for m in data["members"]})
        raise EnsembleError(f"{folder / MANIFEST} has no {architecture} member to start from (it has "
                            f"{', '.join(kinds)})")
    return same[fold % len(same)]


def load_ensemble(folder: Path, device: torch.device | str = "cpu", amp: bool = True,
                  inference: InferenceSettings | None = None) -> Ensemble:
    """Load an ensemble folder: every member network, ready to predict on ``device`` (on a CPU
    with the backend and precision of ``inference``; default: detected)."""
    folder = Path(folder)
    data = read_manifest(folder)
    device = torch.device(device)
    members = [load_member(p) for p in data["checkpoints"]]
    points = pd.read_csv(folder / POINTS) if (folder / POINTS).is_file() else None
    sizes = {tuple(m.patch_size) for _, m in members}
    log.info("ensemble of %d member(s) on %s, patch size(s) %s", len(members), device, sorted(sizes))
    meta = {k: v for k, v in data.items() if k not in ("members", "preprocess", "calibration", "checkpoints")}
    int8 = read_cpu_record(folder).get("int8", {}).get("passed") is True
    predictors = make_predictors(members, device, amp, inference, int8_checked=int8,
                                 channels=len(data["preprocess"].windows))
    return Ensemble(members=members, preprocess=data["preprocess"], device=device, predictors=predictors,
                    source=str(folder), calibration=data.get("calibration"), calibration_points=points, meta=meta)


def read_cpu_record(folder: Path) -> dict:
    """``cpu_inference.json`` of an ensemble folder ({} when it has none or it is unreadable: the
    members then run at the CPU's float precision)."""
    path = Path(folder) / CPU_RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s): int8 is not used", path, type(e).__name__)
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("int8", {}), dict) else {}


def prepare_cpu_networks(folder: Path, inference: InferenceSettings | None = None,
                         scans: Sequence[Path] = (), seed: int = 0) -> dict:
    """Make every member's CPU network ready for its prediction window, as the first scan of
    ``viola predict`` or of the pyfunc model would: with the OpenVINO backend each network is
    converted once into its content-keyed cache (``inference.cache_dir``), so no user's first scan
    pays for it. With ``inference.quantize`` "auto", NNCF installed and ``scans`` (preprocessed
    cases of the members' labelled scans) the int8 networks are made too, calibrated on
    ``inference.calibration_windows`` windows of the scans, and checked against fp32 on the first
    ``inference.guard_scans`` of them (:func:`viola_models.inference.quantization.check_int8`).

    Writes the outcome to ``cpu_inference.json`` in the folder (read by :func:`load_ensemble`:
    ``auto`` runs int8 only when the check passed) and returns it, with ``ready``: how many
    networks are in the cache (0 when the CPU runs PyTorch itself: nothing to convert)."""
    inference = inference or InferenceSettings()
    backend, _ = resolve_backend(inference, torch.device("cpu"))
    if backend != "openvino":
        return {"ready": 0, "backend": backend, "int8": {"passed": False, "reason": "the CPU runs PyTorch"}}
    # the float networks (int8 is calibrated from them), at the precision `auto` takes without int8
    floating = inference.model_copy(update={"precision": "auto"}) if inference.precision == "int8" else inference
    floating = floating.model_copy(update={"precision": resolve_backend(floating, torch.device("cpu"))[1]})
    ensemble = load_ensemble(folder, device="cpu", inference=floating)
    ready = _compile_openvino(ensemble)
    record = {"ready": ready, "backend": backend, "int8": _prepare_int8(ensemble, inference, scans, seed)}
    if record["int8"]["passed"]:
        record["ready"] += len(ensemble.members)
    text = json.dumps(record, indent=1)
    atomic_write(Path(folder) / CPU_RECORD, lambda tmp: tmp.write_text(text))
    return record


def bundle_cpu_networks(folder: Path) -> int:
    """Convert every member's float OpenVINO network for its prediction window into
    ``folder/openvino/`` (a cache folder: :func:`viola_models.inference.backends.seed_cache` moves
    it into a user's cache when a model made of the folder is loaded), so that a site that receives
    the folder does not convert them; returns how many (0 without OpenVINO). int8 networks are not
    bundled: they need the labelled scans to be calibrated on, so a site runs the float ones."""
    if not openvino_available():
        return 0
    folder = Path(folder)
    inference = InferenceSettings(backend="openvino", precision="fp32", cache_dir=folder / BUNDLED_NETWORKS)
    return _compile_openvino(load_ensemble(folder, device="cpu", inference=inference))


def _compile_openvino(ensemble: Ensemble) -> int:
    """Every member's OpenVINO network compiled for its window (a CPU takes one window per call,
    ``predict_ensemble``), converted into its cache first where it is not there; how many are in
    the cache now."""
    channels = len(ensemble.preprocess.windows)
    ready = 0
    for (_, meta), predictor in zip(ensemble.members, ensemble.predictors):
        if isinstance(predictor, OpenVINOForward):
            predictor.compiled((1, channels, *meta.patch_size))
            ready += predictor.cached((1, channels, *meta.patch_size))
    return ready


def require_checkpoints(folder: Path, manifest: dict, what: str) -> None:
    """EnsembleError naming the member checkpoints of ``manifest`` that are not in ``folder``
    (``what`` needs them all: an export that must not depend on the member runs)."""
    missing = [m["checkpoint"] for m in manifest["members"] if not (Path(folder) / m["checkpoint"]).is_file()]
    if missing:
        raise EnsembleError(f"{folder}: member checkpoint(s) {', '.join(missing)} are not in the folder; {what} "
                            "needs them all")


def quantize_members(ensemble: Ensemble, inference: InferenceSettings, images: Sequence, seed: int = 0
                     ) -> list[OpenVINOForward]:
    """Every member's int8 network for its window, quantized into ``inference.cache_dir`` now (or
    read from it), calibrated on ``inference.calibration_windows`` seeded windows of ``images``
    (preprocessed, (C, X, Y, Z)). The members' folded networks are reused where the ensemble runs
    on OpenVINO already."""
    channels = len(ensemble.preprocess.windows)
    lows = []
    for (model, meta), predictor in zip(ensemble.members, ensemble.predictors):
        folded = predictor.model if isinstance(predictor, OpenVINOForward) else fold_batch_norm(model)
        windows = calibration_windows(images, meta.patch_size, inference.calibration_windows, seed)
        low = OpenVINOForward(folded, "int8", inference.cache_dir, calibration=windows)
        low.compiled((1, channels, *meta.patch_size))
        lows.append(low)
    return lows


def _prepare_int8(ensemble: Ensemble, inference: InferenceSettings, scans: Sequence[Path], seed: int) -> dict:
    """The int8 networks of ``ensemble`` made and checked (see :func:`prepare_cpu_networks`)."""
    if inference.quantize == "off":
        return {"passed": False, "reason": "[inference] quantize is off"}
    if not nncf_available():
        return {"passed": False, "reason": "NNCF is not installed (pip install 'viola-ich[openvino]')"}
    if not scans:
        return {"passed": False, "reason": "no labelled scans to calibrate on"}
    t0 = time.perf_counter()
    images = [load_preprocessed(Path(p)).image for p in scans]
    lows = quantize_members(ensemble, inference, images, seed)
    made = time.perf_counter() - t0
    refs = [as_predictor(model, torch.device("cpu"), None) for model, _ in ensemble.members]
    check = check_int8(refs, lows, ensemble.names, [m.patch_size for _, m in ensemble.members],
                       images[:inference.guard_scans])
    log.info("int8 networks of %d member(s) %s the check against fp32: %s", len(lows),
             "pass" if check.passed else "fail", check.reason)
    return {**check.to_json(), "calibration_windows": inference.calibration_windows, "scans": len(images),
            "guard_scans": min(len(images), inference.guard_scans), "quantize_seconds": round(made, 2),
            "check_seconds": round(time.perf_counter() - t0 - made, 2)}
