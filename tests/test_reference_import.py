"""`viola import-reference`: the authors' checkpoints as an ensemble folder that predicts and that a
round 0 starts from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.profiles import ProfileError, load_profile
from tests.helpers import head_volume, round_context, write_nifti
from viola_models.inference.ensemble import EnsembleError, initial_member, load_member, read_manifest
from viola_models.nets.configs import build_model
from viola_models.nets.reference import (
    REFERENCE_PATCH_SIZE,
    identify_reference_checkpoint,
    import_reference_checkpoints,
    to_reference_state_dict,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference_viola" / "tiny_viola.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Files shaped like the authors' releases: a viola_l state_dict in their key names, a viola_s one
    under {"model": ...}, and an nnunet_r one wrapped in {"state_dict": ...} with DataParallel's
    ``module.`` prefix."""
    tmp = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    files = {"viola_l": tmp / "viola_l_fold0.pth", "nnunet_r": tmp / "nnunet_r_fold0.pth",
             "viola_s": tmp / "viola_s_fold0.pth"}
    torch.save(to_reference_state_dict(build_model("viola_l").state_dict()), files["viola_l"])
    torch.save({"model": to_reference_state_dict(build_model("viola_s").state_dict())}, files["viola_s"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in build_model("nnunet_r").state_dict().items()},
                "epoch": 300}, files["nnunet_r"])
    return files


def test_configurations_are_recognised_from_the_weights(published, reference):
    for name, path in published.items():
        found = identify_reference_checkpoint(torch.load(path, weights_only=True))
        assert found["name"] == name
    # the fixture carries its constructor arguments: they name the configuration
    assert identify_reference_checkpoint(reference)["name"] == "viola_tiny"
    with pytest.raises(ValueError, match="do not fit configuration 'viola_s'"):
        identify_reference_checkpoint(torch.load(published["viola_l"], weights_only=True), "viola_s")
    with pytest.raises(ValueError, match="unknown configuration 'viola_xl'"):
        identify_reference_checkpoint(torch.load(published["viola_l"], weights_only=True), "viola_xl")


def test_imported_members_reproduce_the_authors_output(reference, published, tmp_path):
    files = [published["viola_l"], published["nnunet_r"], FIXTURE]
    manifest = import_reference_checkpoints(files, tmp_path / "ens")
    data = read_manifest(manifest.parent)
    assert [m["name"] for m in data["members"]] == ["viola_l-fold0", "nnunet_r-fold0", "viola_tiny-fold0"]
    for m, path in zip(data["members"], files):  # lineage: the source file and its content
        assert m["source"] == path.name
        assert m["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["preprocess"].target_spacing == (0.902, 0.902, 4.997)
    assert not (tmp_path / "ens" / ".import").exists()

    model, meta = load_member(tmp_path / "ens" / "viola_tiny-fold0" / "best.pt")
    assert meta.patch_size == REFERENCE_PATCH_SIZE
    with torch.no_grad():
        out = model(reference["input"])
    assert (out - reference["output"]).abs().max().item() < 1e-4
    # the published-size members hold exactly the weights they were given
    original = torch.load(published["nnunet_r"], weights_only=True)["state_dict"]
    model, _ = load_member(tmp_path / "ens" / "nnunet_r-fold0" / "best.pt")
    assert all(torch.equal(v, original[f"module.{k}"]) for k, v in model.state_dict().items())


def test_unusable_files_are_refused_in_one_line(published, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole pickled module: loading it runs code
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(published["viola_l"].read_bytes()[:5000])
    cases = {"pickled.pt": "pickled Python object", "notes.pt": "not a PyTorch checkpoint",
             "cut.pt": "not a PyTorch checkpoint"}
    for name, reason in cases.items():
        with pytest.raises(ValueError, match=reason):
            import_reference_checkpoints([tmp_path / name], tmp_path / f"out-{name}")
    with pytest.raises(ValueError, match="same content"):
        import_reference_checkpoints([published["nnunet_r"], published["nnunet_r"]], tmp_path / "twice")
    with pytest.raises(ValueError, match="not divisible"):
        import_reference_checkpoints([published["viola_l"]], tmp_path / "odd", patch_size=(160, 160, 30))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        import_reference_checkpoints([FIXTURE], tmp_path / "full")


def test_import_command_then_predict(tmp_path):
    """The command line end to end: import the authors' network, segment a scan with it."""
    runner = CliRunner()
    ens = tmp_path / "authors"
    res = runner.invoke(app, ["import-reference", str(FIXTURE), "--out", str(ens), "--patch-size", "32", "32", "8",
                              "--profile", "tiny"])
    assert res.exit_code == 0, res.output
    assert "tiny_viola.pt -> viola_tiny-fold0 (viola_tiny)" in res.output
    assert read_manifest(ens)["preprocess"] == load_profile("tiny").preprocess
    img, _, aff = head_volume(codes="LPS", seed=3)
    write_nifti(tmp_path / "in" / "head.nii.gz", img, aff, np.int16)
    res = runner.invoke(app, ["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoints", str(ens),
                              "--device", "cpu", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    assert "1 member(s)" in res.output
    mask = nib.load(tmp_path / "out" / "head.nii.gz")
    assert mask.shape == img.shape and np.allclose(mask.affine, aff)

    res = runner.invoke(app, ["import-reference", str(tmp_path / "in" / "head.nii.gz"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not a PyTorch checkpoint" in res.output


def test_round_zero_starts_from_the_imported_members(published, tmp_path):
    ens = tmp_path / "authors"
    import_reference_checkpoints([published["viola_l"], published["nnunet_r"], FIXTURE], ens)
    # same name first, else the members of the architecture in turn
    assert initial_member(ens, "viola_l", 0) == ens / "viola_l-fold0" / "best.pt"
    assert initial_member(ens, "viola_l", 3) == ens / "viola_l-fold0" / "best.pt"
    with pytest.raises(EnsembleError, match="no viola_s member"):
        initial_member(ens, "viola_s", 0)

    profile = tmp_path / "from_authors.toml"
    profile.write_text(f'[members]\narchitectures = ["viola_l", "nnunet_r"]\ninit = {json.dumps(str(ens))}\n')
    settings = load_profile(profile, tmp_path / "data")
    from tasks.training import plan_members

    labelled = {f"s{i}": str(tmp_path / f"s{i}.pt") for i in range(4)}
    folds = {s: i % 2 for i, s in enumerate(labelled)}
    jobs = plan_members(round_context(tmp_path, settings=settings), labelled, folds, [])
    assert {j["spec"]["name"]: Path(j["spec"]["init"]).parent.name for j in jobs if j["spec"]["fold"] == 1} == {
        "viola_l-fold1": "viola_l-fold0", "nnunet_r-fold1": "nnunet_r-fold0"}
    # round 1 starts from round 0's members, as before
    round1 = round_context(tmp_path, round_=1, settings=settings, init_ensemble_dir=str(tmp_path / "no"))
    assert all(j["spec"]["init"] is None for j in plan_members(round1, labelled, folds, []))

    profile.write_text(f'[members]\narchitectures = ["viola_l", "viola_s"]\ninit = {json.dumps(str(ens))}\n')
    with pytest.raises(ProfileError, match=r"members.init: .* no viola_s member"):
        load_profile(profile)


def test_fine_tuning_starts_from_the_imported_weights(tmp_path):
    """A member whose learning rate is 0 keeps exactly the weights it was given: fit loads them."""
    from data_catalog.preprocessing import cached_preprocess
    from data_catalog.scans import file_sha256
    from tests.conftest import PRE
    from viola_models.training import TrainSettings, fit

    ens = tmp_path / "authors"
    import_reference_checkpoints([FIXTURE], ens, patch_size=(32, 32, 8), preprocess=PRE)
    items = []
    for i in range(2):
        img, lab, aff = head_volume(seed=i, lesions=((6, 6, 0, 12.0),))
        ip = write_nifti(tmp_path / f"i{i}.nii.gz", img, aff, np.int16)
        lp = write_nifti(tmp_path / f"l{i}.nii.gz", lab, aff, np.uint8)
        items.append(cached_preprocess(tmp_path / "cache", ip, file_sha256(ip), PRE, lp, file_sha256(lp))[0])
    init = initial_member(ens, "viola_tiny", 0)
    settings = TrainSettings(model="viola_tiny", patch_size=(32, 32, 8), max_steps=2, val_every=2, warmup_steps=0,
                             log_every=2, lr=0.0, optimizer="adamw", weight_decay=0.0)
    result = fit(items[:1], items[1:], settings, tmp_path / "member", init_weights=init)
    start, _ = load_member(init)
    tuned, _ = load_member(result.best_checkpoint)
    weights = [k for k, v in start.state_dict().items() if v.is_floating_point() and "running_" not in k]
    assert weights and all(torch.equal(start.state_dict()[k], tuned.state_dict()[k]) for k in weights)
