"""Small synthetic scans for tests that must not depend on the phantom generator."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

AXCODE_SIGNS = {"L": -1.0, "R": 1.0, "P": -1.0, "A": 1.0, "I": -1.0, "S": 1.0}
AXIS_OF = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def oriented_affine(codes: str, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Affine whose voxel axes point along ``codes`` (e.g. 'LPS'), centred on the world origin."""
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for vox_axis, code in enumerate(codes):
        aff[AXIS_OF[code], vox_axis] = AXCODE_SIGNS[code] * spacing[vox_axis]
    centre = (np.asarray(shape) - 1) / 2.0
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def head_volume(shape=(48, 48, 12), spacing=(4.0, 4.0, 5.0), codes="LPS", seed=0, lesions=((8, 4, 0, 9.0),)):
    """A toy head: air, skull ring (1000 HU), brain (30 HU), spherical bleeds (70 HU) given in world mm
    as (x, y, z, radius). Returns (image float32 HU, label uint8, affine)."""
    rng = np.random.default_rng(seed)
    aff = oriented_affine(codes, spacing, shape)
    axes = [np.arange(n, dtype=np.float32).reshape([-1 if j == i else 1 for j in range(3)])
            for i, n in enumerate(shape)]
    # world coordinate k of every voxel, by broadcasting (no (N, 3) index array)
    world = [sum(np.float32(aff[k, j]) * axes[j] for j in range(3)) + np.float32(aff[k, 3]) for k in range(3)]
    extent = np.abs(aff[:3, :3] @ (np.asarray(shape) / 2.0))  # half field of view per world axis
    r = np.sqrt(sum((world[k] / np.float32(0.8 * extent[k])) ** 2 for k in range(3)))
    img = np.full(shape, -1000.0, np.float32)
    img[r < 1.0] = 1000.0
    img[r < 0.88] = 30.0
    lab = np.zeros(shape, np.uint8)
    for x, y, z, rad in lesions:
        d = np.sqrt((world[0] - x) ** 2 + (world[1] - y) ** 2 + (world[2] - z) ** 2)
        lab[(d < rad) & (r < 0.88)] = 1
    img[lab == 1] = 70.0
    img += rng.standard_normal(shape, dtype=np.float32) * 3
    return img, lab, aff


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    nib.save(img, str(path))
    return path


def write_case(root: Path, role: str, name: str, seed: int = 0, label: bool = True, **kw) -> None:
    """One scan in the INSTANCE layout: role 'labelled' -> train/, 'test' -> test/, 'unlabelled'."""
    img, lab, aff = head_volume(seed=seed, **kw)
    if role == "unlabelled":
        write_nifti(root / "unlabelled" / f"{name}.nii.gz", img, aff, np.int16)
        return
    top = "train" if role == "labelled" else "test"
    write_nifti(root / top / "data" / f"{name}.nii.gz", img, aff, np.int16)
    if label:
        write_nifti(root / top / "label" / f"{name}.nii.gz", lab, aff, np.uint8)


def store_client(uri: str):
    """An MLflow client of one store for both its runs and its registry. ``mlflow.set_registry_uri``
    is global to a process: a client made with the tracking URI alone would read the registry of
    whatever store an earlier test of the same session set."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def round_context(tmp_path: Path, tracking_uri: str = "sqlite:///unused", run_id: str = "", round_: int = 0,
                  overrides: dict | None = None, settings=None, **plan):
    """A ``tasks.context.RoundContext`` of ``settings`` (default: the ``tiny`` profile with
    ``overrides``) for one task called on its own: the arm's folder is ``tmp_path/round``, the data
    root ``tmp_path/data``; ``plan``: other fields of its ``RoundPlan`` (``teacher_dir``,
    ``init_ensemble_dir``, ...)."""
    from flows.profiles import load_profile
    from tasks.context import RoundContext
    from tasks.rounds import RoundPlan

    settings = settings or load_profile("tiny", tmp_path / "data", overrides)
    state = {"run_id": run_id, "experiment_id": plan.pop("experiment_id", "0")}
    arm = RoundPlan(round=round_, arm="self-training", dir=str(tmp_path / "round"), state=state, **plan)
    return RoundContext(settings, arm, tracking_uri, "cpu")
