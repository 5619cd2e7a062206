"""The student's view of pseudo-labels: uncertain voxels marked by the teacher travel from its masks
through the preprocessing cache into the loss, and a profile's student options reach the training
settings of the pseudo-labelled rounds only."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_catalog.preprocessing import IGNORE_LABEL, load_preprocessed
from data_catalog.scans import file_sha256
from flows.profiles import ProfileError, load_profile
from tasks.data import preprocess_pairs
from tests.conftest import PRE
from tests.helpers import head_volume, write_nifti
from viola_models.inference.ensemble import load_ensemble
from viola_models.inference.pseudo_labels import label_scans


def test_uncertain_voxels_become_the_ignore_label_of_the_students_cases(ensemble_dir, tmp_path):
    img, _, aff = head_volume(seed=31, lesions=((8, 4, 0, 10.0),))
    path = write_nifti(tmp_path / "u0.nii.gz", img, aff, np.int16)
    scans = {"u0": {"image": str(path), "image_hash": file_sha256(path)}}
    teacher = load_ensemble(ensemble_dir)
    plain = label_scans(teacher, scans, tmp_path / "plain", "t", overlap=0.25)
    band = label_scans(teacher, scans, tmp_path / "band", "t", overlap=0.25, ignore_band=(0.0, 0.7))
    row = band.iloc[0]
    assert "uncertain_path" not in plain or plain["uncertain_path"].isna().all()
    uncertain = np.asarray(nib.load(row.uncertain_path).dataobj)
    mask = np.asarray(nib.load(row.mask_path).dataobj)
    # [0, 0.7) holds all background and the weak foreground: every voxel but the confident lesion
    assert uncertain.shape == mask.shape and uncertain.sum() > 0.5 * uncertain.size
    assert np.array_equal(mask, np.asarray(nib.load(plain.iloc[0].mask_path).dataobj))  # the mask is unchanged
    assert row.uncertain_hash == file_sha256(row.uncertain_path) and row.ignore_band == [0.0, 0.7]
    # read back, not predicted again, only when the band is the same
    again = label_scans(lambda: pytest.fail("predicted again"), scans, tmp_path / "band", "t", ignore_band=(0.0, 0.7))
    assert again.iloc[0].uncertain_hash == row.uncertain_hash
    record = json.loads((tmp_path / "band" / "u0.json").read_text())
    assert record["ignore_band"] == [0.0, 0.7]
    def predicted_again():
        raise LookupError("predicted again")

    with pytest.raises(LookupError):  # another band: labelled again
        label_scans(predicted_again, scans, tmp_path / "band", "t", ignore_band=(0.3, 0.7))
    pair = {"scan_id": "u0", "image": str(path), "image_hash": scans["u0"]["image_hash"], "label": row.mask_path,
            "label_hash": row.mask_hash}
    without, = preprocess_pairs.fn([pair], tmp_path / "cache", PRE)  # the task's function: no Prefect API
    marked, = preprocess_pairs.fn([{**pair, "ignore": row.uncertain_path, "ignore_hash": row.uncertain_hash}],
                               tmp_path / "cache", PRE)
    assert without["cache"] != marked["cache"]  # the ignore map is part of the content address
    a, b = load_preprocessed(without["cache"]).label, load_preprocessed(marked["cache"]).label
    assert not (a == IGNORE_LABEL).any() and (b == IGNORE_LABEL).any()
    assert np.array_equal(a[b != IGNORE_LABEL], b[b != IGNORE_LABEL])


def test_student_options_reach_the_pseudo_labelled_rounds_only():
    s = load_profile("bench")
    zero, one = s.train_settings(0, "viola_small", 0), s.train_settings(1, "viola_small", 0)
    assert zero.pseudo_fraction == 0 and zero.pseudo_augment is None
    assert one.pseudo_fraction == 0.5 and one.pseudo_augment is not None and one.pseudo_rampup_steps == 50
    assert one.pseudo_augment.cutout_prob > 0 and one.pseudo_augment.noise_std > one.augment.noise_std
    same = load_profile("bench", overrides={"student": {"pseudo_augment": "same"}}).train_settings(1, "viola_small", 0)
    assert same.pseudo_augment is None
    with pytest.raises(ProfileError, match="ignore_band"):
        load_profile("bench", overrides={"pseudo": {"ignore_band": [0.7, 0.3]}})


def test_a_calls_summary_puts_each_round_beside_the_round_before_and_its_control():
    from flows.self_training import compare_arms

    def arm(r, name, dsc, val):
        return {"round": r, "arm": name, "test": {"test/dsc": dsc}, "members": [{"val_dice": val}, {"val_dice": val}]}

    text = compare_arms([arm(0, "self-training", 0.50, 0.60), arm(1, "self-training", 0.55, 0.64),
                         arm(1, "control", 0.52, 0.62), {"round": 2, "arm": "self-training", "skipped": "idle"}])
    lines = text.splitlines()
    assert lines[0] == "does the round help?" and len(lines) == 3
    assert "round 1 vs round 0" in lines[1] and "(+0.0500)" in lines[1] and "0.6400 vs 0.6000" in lines[1]
    assert "round 1 vs round 1 (control)" in lines[2] and "(+0.0300)" in lines[2]
    assert compare_arms([arm(0, "self-training", 0.5, 0.6)]) == ""
