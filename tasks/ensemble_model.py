"""A round's ensemble as an MLflow pyfunc model: what the registry's versions (``champion``) hold.

    model = mlflow.pyfunc.load_model("models:/viola-ich-ensemble@champion")
    table = model.predict({"path": "scan.nii.gz"})                     # a NIfTI file or a DICOM series folder
    table = model.predict(pd.DataFrame({"path": [a, b]}), params={"output_dir": "masks"})
    table = model.predict({"image": hu_volume, "affine": affine})     # (X, Y, Z) HU array, 4 x 4 RAS affine

One row per scan: ``mask`` (uint8 (X, Y, Z) on the scan's own grid, None when ``return_mask`` is
off), ``affine``, volumes (ml), lesion count, the ensemble's confidence scores and predicted Dice,
``mask_path`` (with ``output_dir``), and ``status``/``reason`` for scans that cannot be used.

The model folder holds the ensemble folder (``viola_models.inference.ensemble``) with its preprocessing
settings, calibration and manifest. Member checkpoints that live on their member runs (a round's)
are not copied into it: loading the model fetches them from those runs, so each is stored once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

__all__ = ["CHECKPOINT_ARTIFACT", "ENSEMBLE_ARTIFACT", "EnsembleModel", "export_self_contained",
           "fetch_member_checkpoints", "model_ensemble_dir", "save_ensemble_model", "signature"]

ENSEMBLE_ARTIFACT = "ensemble"  # the key (and folder) of the ensemble inside the pyfunc model
CHECKPOINT_ARTIFACT = "checkpoint/best.pt"  # where a member run keeps its checkpoint
_SCORES = ("predicted_dice", "agreement", "union_agreement", "mean_max_probability", "volume_cv")
_REQUIREMENTS = ("torch", "monai", "nibabel", "numpy", "pandas", "scipy", "pydantic", "mlflow", "pydicom")


def signature() -> ModelSignature:
    """Inputs: ``path`` (a NIfTI file or a DICOM series folder) or ``image`` (HU, (X, Y, Z)) with
    its ``affine`` (4 x 4, mm, RAS); params of the sliding window and where masks go."""
    inputs = Schema([
        ColSpec("string", "path", required=False),
        ColSpec(Array(Array(Array("float"))), "image", required=False),
        ColSpec(Array(Array("double")), "affine", required=False),
    ])
    outputs = Schema([
        ColSpec("string", "path"), ColSpec("string", "status"), ColSpec("string", "reason"),
        ColSpec("double", "volume_ml"), ColSpec("double", "abc2_volume_ml"), ColSpec("long", "n_lesions"),
        ColSpec("double", "largest_lesion_ml"), ColSpec("string", "consensus"),
        *(ColSpec("double", k) for k in _SCORES), ColSpec("string", "mask_path"), ColSpec("double", "seconds"),
    ])
    params = ParamSchema([ParamSpec("overlap", "double", 0.5), ParamSpec("tta", "boolean", False),
                          ParamSpec("output_dir", "string", ""), ParamSpec("return_mask", "boolean", True)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _requirements() -> list[str]:
    out = []
    for name in ("viola-ich", *_REQUIREMENTS):
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _rows(model_input) -> list[dict]:
    """The scans asked for, as dicts with ``path`` or ``image`` (+ ``affine``)."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = [r if isinstance(r, dict) else {"path": r} for r in model_input]
    else:
        raise ValueError(f"cannot segment a {type(model_input).__name__}: give {{'path': ...}} or "
                         "{'image': ..., 'affine': ...}, or a DataFrame with those columns")
    if not rows or not any(_given(r.get("path")) or _given(r.get("image")) for r in rows):
        raise ValueError("no scan given: each row needs a 'path' (NIfTI file or DICOM series folder) or an 'image' "
                         "(with its 'affine')")
    return rows


def _given(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float):  # pandas' missing value
        return not np.isnan(value)
    return not (isinstance(value, str) and value == "")


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of ``viola_models.inference.segment.segment_scan`` (see the module's docstring)."""

    def load_context(self, context) -> None:
        from viola_models.inference.backends import InferenceSettings, seed_cache
        from viola_models.inference.ensemble import BUNDLED_NETWORKS, load_ensemble
        from viola_models.inference.predictors import resolve_device

        folder = Path(context.artifacts[ENSEMBLE_ARTIFACT])
        fetch_member_checkpoints(folder, mlflow.get_tracking_uri())  # none to fetch in a self-contained export
        inference = InferenceSettings()
        if (folder / BUNDLED_NETWORKS).is_dir():
            seed_cache(folder / BUNDLED_NETWORKS, inference.cache_dir)
        self.ensemble = load_ensemble(folder, device=resolve_device("auto"), inference=inference)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from data_catalog.scans import ScanError, array_image, save_nifti_like
        from viola_models.inference.segment import segment_scan

        params = {"overlap": 0.5, "tta": False, "output_dir": "", "return_mask": True} | (params or {})
        out_dir = Path(params["output_dir"]) if params["output_dir"] else None
        table = []
        for i, row in enumerate(_rows(model_input)):
            path = str(row["path"]) if _given(row.get("path")) else ""
            res = {"path": path, "status": "ok", "reason": "", "mask": None, "affine": None, "mask_path": ""}
            try:
                if path:
                    seg = segment_scan(Path(path), self.ensemble, overlap=params["overlap"], tta=params["tta"])
                elif _given(row.get("image")):
                    if not _given(row.get("affine")):
                        raise ScanError("an 'image' needs its 'affine' (4 x 4, mm)")
                    image = array_image(np.asarray(row["image"], dtype=np.float32), np.asarray(row["affine"]))
                    seg = segment_scan(None, self.ensemble, overlap=params["overlap"], tta=params["tta"],
                                       image=image)
                else:
                    raise ScanError("neither 'path' nor 'image' given")
            except (ScanError, FileNotFoundError) as e:
                res.update(status="rejected", reason=str(e))
                table.append(res)
                continue
            if out_dir is not None:
                name = Path(path).name if path else f"image_{i:04d}.nii.gz"
                name = name if name.endswith((".nii", ".nii.gz")) else f"{name}.nii.gz"
                target = out_dir / name
                out_dir.mkdir(parents=True, exist_ok=True)
                if path:
                    save_nifti_like(seg.mask, Path(path), target)
                else:
                    import nibabel as nib

                    save_nifti_like(seg.mask, nib.Nifti1Image(seg.mask, seg.info.affine), target)
                res["mask_path"] = str(target)
            res.update(mask=seg.mask if params["return_mask"] else None, affine=seg.info.affine.tolist(),
                       volume_ml=seg.volume_ml, abc2_volume_ml=seg.abc2_volume_ml, n_lesions=seg.n_lesions,
                       largest_lesion_ml=seg.largest_lesion_ml, consensus=seg.scores["consensus"],
                       seconds=seg.seconds, **{k: float(seg.scores[k]) for k in _SCORES})
            table.append(res)
        return pd.DataFrame(table)


def save_ensemble_model(folder: Path, dst: Path, self_contained: bool = False) -> Path:
    """Write ``folder`` (an ensemble folder) as a pyfunc model in the new folder ``dst``: the
    ensemble without the member checkpoints that its manifest ties to member runs (they are
    fetched from those runs when the model is loaded). ``self_contained``: with every member
    checkpoint (``folder`` must hold them all) and the members' converted OpenVINO networks, so
    that the model loads, serves and builds into an image without any tracking server."""
    from viola_models.inference.ensemble import bundle_cpu_networks, read_manifest, require_checkpoints

    manifest = read_manifest(folder)
    if self_contained:
        require_checkpoints(folder, manifest, "a self-contained model")
    on_runs = set() if self_contained else {m["checkpoint"] for m in manifest["members"] if m.get("run_id")}
    with tempfile.TemporaryDirectory(prefix="viola-model-") as tmp:
        staged = Path(tmp) / ENSEMBLE_ARTIFACT
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            rel = path.relative_to(folder)
            if rel.as_posix() not in on_runs and not rel.parts[0].startswith("."):
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, staged / rel)
        bundled = bundle_cpu_networks(staged) if self_contained else 0
        with warnings.catch_warnings():  # the model is this module's class, pickled by reference
            warnings.simplefilter("ignore")
            level = logging.getLogger("mlflow.pyfunc").level
            logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
            try:
                mlflow.pyfunc.save_model(str(dst), python_model=EnsembleModel(),
                                         artifacts={ENSEMBLE_ARTIFACT: str(staged)}, signature=signature(),
                                         pip_requirements=_requirements(),
                                         metadata={"viola.members": len(manifest["members"]),
                                                   "viola.self_contained": self_contained,
                                                   "viola.bundled_cpu_networks": bundled})
            finally:
                logging.getLogger("mlflow.pyfunc").setLevel(level)
    return Path(dst)


def export_self_contained(folder: Path, out: Path) -> Path:
    """``folder`` (an ensemble folder with every member checkpoint) as a self-contained pyfunc model
    in the new folder ``out`` (:func:`save_ensemble_model`), never left half-written
    (``data_catalog.files.atomic_folder``: FileExistsError when ``out`` holds anything)."""
    from data_catalog.files import atomic_folder

    with atomic_folder(out, "the model") as tmp:
        save_ensemble_model(folder, tmp, self_contained=True)
    return Path(out)


def model_ensemble_dir(model_dir: Path) -> Path | None:
    """The ensemble folder inside a downloaded pyfunc model folder (None when it is not one)."""
    from mlflow.models import Model

    if not (Path(model_dir) / "MLmodel").is_file():
        return None
    flavor = Model.load(str(Path(model_dir) / "MLmodel")).flavors.get("python_function", {})
    rel = flavor.get("artifacts", {}).get(ENSEMBLE_ARTIFACT, {}).get("path")
    return Path(model_dir) / rel if rel else None


def fetch_member_checkpoints(folder: Path, tracking_uri: str) -> None:
    """Download into ``folder`` the member checkpoints that its manifest keeps on member runs."""
    from viola_models.inference.ensemble import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    for member in manifest.get("members", []) if isinstance(manifest, dict) else []:
        rel, run_id = member.get("checkpoint"), member.get("run_id")
        if not (isinstance(rel, str) and run_id) or (folder / rel).exists() or ".." in Path(rel).parts:
            continue  # stored with the manifest (older versions, imported ensembles); bad entries fail at load
        with tempfile_dir(folder) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                                           tracking_uri=tracking_uri, dst_path=str(tmp)))
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, folder / rel)


@contextlib.contextmanager
def tempfile_dir(beside: Path) -> Iterator[Path]:
    """A temporary folder inside ``beside`` (same filesystem: its files move in with a rename)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=beside))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
