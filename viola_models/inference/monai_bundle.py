"""An ensemble folder as a MONAI bundle: the one module that writes that format.

Layout::

    configs/metadata.json    what the bundle is: task, versions, input and output formats
    configs/inference.json   the project's preprocessing, the ensemble as the network, the run
    models/ensemble/         the ensemble folder (manifest, member checkpoints, calibration)
    docs/README.md           how to run it

Run from the bundle folder (MONAI resolves ``bundle_root`` as "."), or pass ``--bundle_root``::

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

``IN`` is what ``viola predict`` takes (NIfTI files, DICOM series, archive trees); ``OUT`` gets the
same masks and ``predictions_info.csv``. The config's ``preprocessing`` is the one the members
were trained with and is the one that runs (change it and the run changes); ``inference`` is how
members run on a CPU (``--inference#backend torch``). The bundle needs this package installed
(``pip install viola-ich``): its network is the ensemble of viola-UNet and nnU-Net members with
their sliding window, consensus and inversion to the scan's grid, which MONAI's own components do
not express.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from data_catalog.files import atomic_folder
from data_catalog.preprocessing import PreprocessSettings
from viola_models.inference.backends import InferenceSettings
from viola_models.inference.ensemble import Ensemble, load_ensemble, read_manifest, require_checkpoints

__all__ = ["load_bundle_ensemble", "segment_folder", "write_monai_bundle"]

_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def load_bundle_ensemble(folder: str, device: str, preprocessing: PreprocessSettings,
                         inference: InferenceSettings) -> Ensemble:
    """The bundle's network: the ensemble of ``folder`` on ``device``, run with the config's
    ``preprocessing`` and CPU ``inference`` settings."""
    ensemble = load_ensemble(Path(folder), device=device, inference=inference)
    return dataclasses.replace(ensemble, preprocess=preprocessing)


def segment_folder(dataset_dir: str, output_dir: str, network: Ensemble, overlap: float = 0.5,
                   tta: bool = False) -> int:
    """The bundle's run: ``viola predict`` of ``dataset_dir`` into ``output_dir``; how many scans
    were segmented (refused inputs get their row and reason in ``predictions_info.csv``)."""
    from viola_models.inference.segment import predict_folder

    table: pd.DataFrame = predict_folder(Path(dataset_dir), Path(output_dir), network, overlap=overlap, tta=tta)
    return int((table["status"] == "ok").sum())


def _version(name: str) -> str:
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return "unknown"


def _metadata(manifest: dict) -> dict:
    members = [m["name"] for m in manifest["members"]]
    channels = len(manifest["preprocess"].windows)
    return {
        "schema": _SCHEMA,
        "version": _version("viola-ich"),
        "changelog": {_version("viola-ich"): "exported by viola export --format monai-bundle"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": {"viola-ich": _version("viola-ich"), "nibabel": _version("nibabel")},
        "name": "viola-ICH haemorrhage segmentation",
        "task": "Intracranial haemorrhage segmentation on non-contrast head CT",
        "description": (f"An ensemble of {len(members)} member(s) ({', '.join(members)}): viola-UNet and nnU-Net "
                        "(DynUNet) networks, trained with semi-supervised self-training; sliding-window "
                        "inference, consensus of the members, masks on each scan's own grid."),
        "authors": "viola-ICH",
        "copyright": "viola-ICH code: Apache-2.0; the weights belong to whoever trained them (see 'viola')",
        "license": "Apache-2.0 (code)",
        "intended_use": "Research use only; not a medical device.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [-1024, 3071],
                                 "is_patch_data": False, "channel_def": {"0": "CT"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "uint8", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "background or haemorrhage"}}},
            "network_input_channels": channels,
        },
        "viola": {k: v for k, v in manifest.items() if k not in ("members", "preprocess", "calibration",
                                                                 "checkpoints")},
    }


def _inference_config(manifest: dict) -> dict:
    return {
        "imports": ["$import torch", "$import viola_models.inference.monai_bundle as monai_bundle"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "overlap": 0.5,
        "tta": False,
        "preprocessing": {"_target_": "data_catalog.preprocessing.PreprocessSettings",
                          **manifest["preprocess"].model_dump(mode="json")},
        "inference": {"_target_": "viola_models.inference.backends.InferenceSettings", "backend": "auto",
                      "precision": "auto"},
        "network": {"_target_": "viola_models.inference.monai_bundle.load_bundle_ensemble",
                    "folder": "$@bundle_root + '/models/ensemble'", "device": "@device",
                    "preprocessing": "@preprocessing", "inference": "@inference"},
        "run": ["$monai_bundle.segment_folder(@dataset_dir, @output_dir, @network, @overlap, @tta)"],
        "save_execute_config": False,
    }


_README = """# viola-ICH haemorrhage segmentation (MONAI bundle)

Segments intracranial haemorrhage on non-contrast head CT with an ensemble of viola-UNet and
nnU-Net members. Needs the `viola-ich` package (`pip install viola-ich`) beside MONAI.

    cd THIS_FOLDER
    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

IN: NIfTI scans (.nii/.nii.gz), DICOM series folders or an archive's DICOM tree. OUT: one uint8
mask per scan on the scan's own grid, and predictions_info.csv (volumes, lesions, the ensemble's
confidence and predicted Dice per scan, refused inputs with their reason).
Options: `--device cpu`, `--overlap 0.25`, `--tta True`, `--inference#backend torch`.
Research use only; not a medical device.
"""


def write_monai_bundle(ensemble_dir: Path, out: Path) -> Path:
    """Write the ensemble folder ``ensemble_dir`` (with every member checkpoint) as a MONAI bundle
    in the new folder ``out``, never left half-written (``data_catalog.files.atomic_folder``);
    EnsembleError naming what is missing, FileExistsError when ``out`` holds anything."""
    ensemble_dir, out = Path(ensemble_dir), Path(out)
    manifest = read_manifest(ensemble_dir)
    require_checkpoints(ensemble_dir, manifest, "a bundle")
    with atomic_folder(out, "the bundle") as tmp:
        (tmp / "configs").mkdir()
        (tmp / "docs").mkdir()
        shutil.copytree(ensemble_dir, tmp / "models" / "ensemble", ignore=shutil.ignore_patterns(".*", "openvino"))
        (tmp / "configs" / "metadata.json").write_text(json.dumps(_metadata(manifest), indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(_inference_config(manifest), indent=2) + "\n")
        (tmp / "docs" / "README.md").write_text(_README)
    return out
