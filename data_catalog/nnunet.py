"""The nnU-Net v2 raw dataset format: the one module that writes it (and checks it).

A data root's labelled scans and one round's selected pseudo-labels become the training cases of
``DatasetNNN_Name/`` (``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``), its test
scans ``imagesTs/``, with ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
``file_ending``) as nnU-Net v2's dataset format documents it, so that
``nnUNetv2_plan_and_preprocess -d NNN --verify_dataset_integrity`` can train on them. Images keep
their intensities and grid (DICOM series are written as NIfTI); labels are uint8 {0, 1} on their
image's grid (labels with other non-zero values are binarized, as the catalog reads them). Which
case is a pseudo-label, from which round and teacher, is kept in ``dataset.json`` under
``viola``. Original scans are never modified: files are copied, and the dataset folder is written
under a temporary name and renamed into place once complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from data_catalog.catalog import load_pseudo_labels, usable_scans
from data_catalog.scans import ScanError, read_image, read_label, save_nifti_like

__all__ = ["LABELS", "check_nnunet_dataset", "dataset_folder_name", "write_nnunet_dataset"]

LABELS = {"background": 0, "haemorrhage": 1}
FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset501_ViolaICH``: nnU-Net's three-digit id and a name of letters, digits, - and _."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset id {dataset_id}: expected 1 to 999")
    if not _NAME.match(name):
        raise ValueError(f"nnU-Net dataset name {name!r}: use letters, digits, '-' and '_' only")
    return f"Dataset{dataset_id:03d}_{name}"


def _case_id(scan_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", scan_id)


def _write_image(root: Path, rel: str, dst: Path) -> None:
    src = root / rel
    if src.is_file() and src.name.endswith(FILE_ENDING):
        shutil.copyfile(src, dst)  # the file as it is: intensities, header and grid
        return
    image, _ = read_image(src, check_hu=False)  # a DICOM series folder or a plain .nii
    save_nifti_like(image.astype(np.float32), src, dst)


def _write_label(root: Path, image_rel: str, label: Path, dst: Path) -> None:
    mask, _ = read_label(label, binarize=True, image=root / image_rel)
    save_nifti_like(mask.astype(np.uint8), root / image_rel, dst)


def write_nnunet_dataset(root: Path, out: Path, round_: int, dataset_id: int = 501, name: str = "ViolaICH") -> dict:
    """Write the nnU-Net v2 raw dataset of ``root``'s labelled scans plus round ``round_``'s selected
    pseudo-labels (round 0 has none: the labelled scans alone) into ``out``; returns its ``folder``
    and how many ``labelled``, ``pseudo_labels`` and ``test`` scans it holds. ValueError (one
    line) for a dataset that exists already, a round without pseudo-labels, an unreadable scan."""
    root, out = Path(root), Path(out)
    folder = out / dataset_folder_name(dataset_id, name)
    if folder.exists():
        raise ValueError(f"{folder} exists already: remove it or choose another --dataset-id")
    every = usable_scans(root)
    labelled, test = every[every["role"] == "labelled"], every[every["role"] == "test"]
    pseudo = load_pseudo_labels(root, round_)
    if round_ > 0 and pseudo.empty:
        raise ValueError(f"round {round_} has no pseudo-labels in {root}'s catalog: run that round first")
    images = dict(zip(every["scan_id"], every["image_path"]))
    chosen = pseudo[pseudo["selected"] & (pseudo["mask_path"] != "")]
    training = [(s, img, root / lab, "labelled") for s, img, lab in
                zip(labelled["scan_id"], labelled["image_path"], labelled["label_path"])]
    training += [(s, images[s], root / m, "pseudo-label") for s, m in zip(chosen["scan_id"], chosen["mask_path"])
                 if s in images]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        cases = {}
        for scan_id, image_rel, label, kind in training:
            case = _case_id(scan_id)
            if case in cases:
                raise ValueError(f"scans {cases[case]['scan_id']!r} and {scan_id!r} both become nnU-Net case {case!r}")
            _write_image(root, image_rel, tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
            _write_label(root, image_rel, label, tmp / "labelsTr" / f"{case}{FILE_ENDING}")
            cases[case] = {"scan_id": scan_id, "kind": kind}
        for scan_id, image_rel in zip(test["scan_id"], test["image_path"]):
            _write_image(root, image_rel, tmp / "imagesTs" / f"{_case_id(scan_id)}_0000{FILE_ENDING}")
        lineage = {row.scan_id: {"teacher_run_id": row.teacher_run_id, "predicted_dice": row.predicted_dice}
                   for row in chosen.itertuples()}
        meta = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(cases),
                "file_ending": FILE_ENDING, "name": name,
                "description": f"viola-ICH: {len(labelled)} labelled scans and the {len(chosen)} pseudo-labels "
                               f"selected in round {round_}",
                "viola": {"round": round_, "cases": cases, "pseudo_labels": lineage}}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1, default=str))
        problems = check_nnunet_dataset(tmp)
        if problems:
            raise ValueError(f"the nnU-Net dataset written from {root} fails its check: {problems[0]}")
        tmp.rename(folder)
    except (ScanError, OSError) as e:  # one line naming the root; the scan's own error names its file
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"nnU-Net export of {root}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kinds = [c["kind"] for c in cases.values()]
    return {"folder": folder, "labelled": kinds.count("labelled"), "pseudo_labels": kinds.count("pseudo-label"),
            "test": len(test)}


def _geometry(path: Path) -> tuple:
    img = nib.load(str(path))
    return img.shape[:3], np.round(img.affine, 4)


def check_nnunet_dataset(folder: Path) -> list[str]:
    """What nnU-Net v2's dataset integrity check would refuse, as one line each (empty: none):
    ``dataset.json``'s required keys, ``numTraining`` against the cases, every case's channel
    files and label, label values within ``labels``, and image and label on one grid."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{folder / 'dataset.json'}: unreadable ({type(e).__name__})"]
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in meta]
    if missing:
        return [f"{folder / 'dataset.json'} lacks {', '.join(missing)}"]
    ending, channels = meta["file_ending"], sorted(int(c) for c in meta["channel_names"])
    allowed = {int(v) for v in meta["labels"].values()}
    labels = sorted((folder / "labelsTr").glob(f"*{ending}"))
    problems = []
    if len(labels) != int(meta["numTraining"]):
        problems.append(f"numTraining is {meta['numTraining']} but labelsTr holds {len(labels)} label(s)")
    for label in labels:
        case = label.name[: -len(ending)]
        files = [folder / "imagesTr" / f"{case}_{c:04d}{ending}" for c in channels]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            problems.append(f"case {case}: {', '.join(absent)} missing in imagesTr")
            continue
        values = {int(v) for v in np.unique(np.asarray(nib.load(str(label)).dataobj))}
        if not values <= allowed:
            problems.append(f"case {case}: label values {sorted(values - allowed)} are not in dataset.json's labels")
        shape, affine = _geometry(label)
        for f in files:
            ishape, iaffine = _geometry(f)
            if ishape != shape or not np.allclose(iaffine, affine, atol=1e-3):
                problems.append(f"case {case}: {f.name} and its label are not on one grid")
    images = {p.name for p in (folder / "imagesTr").glob(f"*{ending}")}
    known = {f"{lab.name[: -len(ending)]}_{c:04d}{ending}" for lab in labels for c in channels}
    problems += [f"imagesTr/{n} has no label in labelsTr" for n in sorted(images - known)]
    return problems
