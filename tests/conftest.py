"""Shared test set-up: GPU tests skip without CUDA; no test reaches the network or writes outside tmp;
a tiny trained ensemble for the tests that need one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_catalog.preprocessing import PreprocessSettings

PRE = PreprocessSettings(target_spacing=(4.0, 4.0, 5.0))

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _caches_in_tmp(tmp_path_factory):
    """Converted OpenVINO networks go to a session folder, not the user's cache (subprocesses inherit it)."""
    os.environ["VIOLA_CACHE_DIR"] = str(tmp_path_factory.mktemp("viola_cache"))


@pytest.fixture(scope="session")
def ensemble_dir(tmp_path_factory) -> Path:
    """Two tiny members trained for a few steps on toy heads, assembled into an ensemble folder."""
    from data_catalog.preprocessing import cached_preprocess
    from data_catalog.scans import file_sha256
    from tests.helpers import head_volume, write_nifti
    from viola_models.inference.ensemble import write_ensemble
    from viola_models.training import TrainSettings, fit

    tmp = tmp_path_factory.mktemp("ens")
    items = []
    for i in range(3):
        img, lab, aff = head_volume(seed=i, lesions=((10 - 6 * i, 6, 0, 12.0),))
        ip = write_nifti(tmp / f"i{i}.nii.gz", img, aff, np.int16)
        lp = write_nifti(tmp / f"l{i}.nii.gz", lab, aff, np.uint8)
        items.append(cached_preprocess(tmp / "cache", ip, file_sha256(ip), PRE, lp, file_sha256(lp))[0])
    members = []
    for arch in ("viola_tiny", "nnunet_tiny"):
        s = TrainSettings(model=arch, patch_size=(32, 32, 8), max_steps=4, val_every=4, warmup_steps=1, log_every=4)
        res = fit(items[:2], items[2:], s, tmp / "members" / arch, meta={"member": arch})
        members.append({"name": arch, "checkpoint": res.best_checkpoint, "val_dice": res.best_dice})
    write_ensemble(tmp / "ens", members, PRE)
    return tmp / "ens"
