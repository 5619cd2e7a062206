"""int8 CPU networks: NNCF's quantization against fp32, the check that decides whether ``auto``
uses them, and their making at registration, reused by later loads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from viola_models.inference.backends import InferenceSettings, OpenVINOForward, resolve_backend
from viola_models.inference.quantization import GUARD_MIN_VOXELS, Int8Check, calibration_windows, check_int8


def _block_image(size=(40, 40, 12), block=(slice(10, 22), slice(10, 22), slice(3, 9))) -> np.ndarray:
    img = np.zeros((3, *size), np.float32)
    img[(slice(None), *block)] = 1.0
    return img


def _thresholding(at: float):
    """A stand-in network: foreground where the first channel exceeds ``at``."""
    def net(x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] - at) * 20
        return torch.cat([torch.zeros_like(fg), fg], dim=1)
    return net


def test_calibration_windows_are_seeded_patches_of_the_images_padded_where_small():
    images = [np.random.default_rng(0).random((3, 40, 40, 12), dtype=np.float32),
              np.random.default_rng(1).random((3, 20, 40, 12), dtype=np.float32)]
    a = calibration_windows(images, (32, 32, 8), 6, seed=3)
    b = calibration_windows(images, (32, 32, 8), 6, seed=3)
    assert len(a) == 6 and all(w.shape == (1, 3, 32, 32, 8) for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], calibration_windows(images, (32, 32, 8), 6, seed=4)[0])
    assert np.isin(a[1], images[1]).all()  # the small image: its own values, edge-padded
    with pytest.raises(ValueError, match="at least one"):
        calibration_windows([], (32, 32, 8), 2)


def test_the_check_passes_faithful_networks_and_refuses_a_member_made_to_fail():
    img = _block_image()
    ref = [_thresholding(0.5), _thresholding(0.5)]
    ok = check_int8(ref, [_thresholding(0.5), _thresholding(0.5)], ["a", "b"], [(32, 32, 8)] * 2, [img])
    assert ok.passed and ok.checked == 3 and ok.min_dice == 1.0 and ok.max_volume_error == 0.0

    def b_shifted(x):
        out = _thresholding(0.5)(x)
        return torch.cat([out[:, :1], out[:, 1:] + 15.0], dim=1)  # foreground everywhere

    bad = check_int8(ref, [_thresholding(0.5), b_shifted], ["a", "b"], [(32, 32, 8)] * 2, [img])
    assert not bad.passed and bad.reason.startswith("b on scan 0: Dice") and bad.min_dice < 0.99

    def b_wider(x):  # also foreground where the second channel is bright: 13 voxels more than fp32
        fg = (torch.maximum(x[:, :1], x[:, 1:2]) - 0.5) * 20
        return torch.cat([torch.zeros_like(fg), fg], dim=1)

    wider = img.copy()
    wider[1] = 0
    wider[1, 22, 10:23, 5] = 1.0  # beside the 864-voxel block: Dice 0.9925, volume +1.5 %
    off = check_int8(ref, [_thresholding(0.5), b_wider], ["a", "b"], [(32, 32, 8)] * 2, [wider])
    assert not off.passed and off.min_dice >= 0.99 and "b on scan 0: volume off by 1.50%" in off.reason

    empty = np.zeros_like(img)
    none = check_int8(ref, ref, ["a", "b"], [(32, 32, 8)] * 2, [empty])
    assert not none.passed and f"{GUARD_MIN_VOXELS}+ voxels" in none.reason and none.checked == 0
    spurious = check_int8(ref, [_thresholding(0.5), b_shifted], ["a", "b"], [(32, 32, 8)] * 2, [empty])
    assert not spurious.passed and spurious.reason.startswith("b on scan 0:") and "where fp32 finds 0" in \
        spurious.reason


def test_auto_takes_int8_only_for_a_checked_ensemble_on_openvino():
    cpu = torch.device("cpu")
    assert resolve_backend(InferenceSettings(backend="openvino"), cpu, int8_ready=True)[1] == "int8"
    assert resolve_backend(InferenceSettings(backend="openvino"), cpu)[1] in ("bf16", "fp32")
    assert resolve_backend(InferenceSettings(backend="torch"), cpu, int8_ready=True)[1] in ("bf16", "fp32")
    with pytest.raises(ValueError, match="int8 inference runs on the OpenVINO backend"):
        resolve_backend(InferenceSettings(backend="torch", precision="int8"), cpu)


def test_int8_network_follows_fp32_on_the_reference_network(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from viola_models.inference.predictors import fold_batch_norm
    from viola_models.nets.configs import build_model

    torch.manual_seed(0)
    net = fold_batch_norm(build_model("viola_tiny", deep_supervision=False).eval())
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(3, 40, 40, 12)).astype(np.float32) for _ in range(2)]
    low = OpenVINOForward(net, "int8", tmp_path, threads=1,
                          calibration=calibration_windows(images, (32, 32, 8), 8, seed=0))
    x = torch.from_numpy(calibration_windows(images, (32, 32, 8), 1, seed=9)[0])
    with torch.no_grad():
        ref = net(x)
    out = low(x)
    assert out.shape == ref.shape
    rel = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
    agree = float(((out[:, 1] > out[:, 0]) == (ref[:, 1] > ref[:, 0])).float().mean())
    assert rel < 0.15 and agree > 0.9, (rel, agree)
    assert low.cached((1, 3, 32, 32, 8))
    # a later process: read from the cache, not quantized again, and without calibration windows
    again = OpenVINOForward(net, "int8", tmp_path, threads=1)
    assert torch.equal(again(x), out)
    with pytest.raises(LookupError, match="made when a round registers"):
        OpenVINOForward(net, "int8", tmp_path / "empty", threads=1)(x)


@pytest.fixture
def own_ensemble(ensemble_dir, tmp_path):
    """A private copy of the shared ensemble folder (preparation writes its record there), and the
    preprocessed cases its members were trained on."""
    folder = tmp_path / "ens"
    shutil.copytree(ensemble_dir, folder)
    return folder, sorted((ensemble_dir.parent / "cache").rglob("*.npz"))


@pytest.mark.parametrize("passes", [True, False])
def test_prepared_int8_networks_are_used_by_auto_only_when_checked(own_ensemble, tmp_path, monkeypatch, passes):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import viola_models.inference.ensemble as ens
    from viola_models.inference.ensemble import load_ensemble, prepare_cpu_networks, read_cpu_record

    folder, scans = own_ensemble
    seen = []

    def decided(refs, lows, names, patches, images, overlap=0.25):
        seen.append((len(lows), len(images), all(isinstance(low, OpenVINOForward) and low.precision == "int8"
                                                 for low in lows)))
        return Int8Check(passes, "stand-in decision", 3, 0.995 if passes else 0.9, 0.004)

    monkeypatch.setattr(ens, "check_int8", decided)
    inference = InferenceSettings(backend="openvino", cache_dir=tmp_path / "ov", calibration_windows=4, guard_scans=2)
    record = prepare_cpu_networks(folder, inference, scans)
    assert seen == [(2, 2, True)]
    assert record["int8"]["passed"] is passes and read_cpu_record(folder) == record
    assert record["ready"] == (4 if passes else 2) and record["int8"]["calibration_windows"] == 4

    quantized = []
    monkeypatch.setattr(OpenVINOForward, "_quantize", lambda self, shape: quantized.append(shape))
    loaded = load_ensemble(folder, inference=inference)
    assert [p.precision for p in loaded.predictors] == (["int8"] * 2 if passes else [resolve_backend(
        inference, torch.device("cpu"))[1]] * 2)
    assert quantized == []  # made at preparation: the load reads the cache
    # another machine's cache: auto falls back to float; int8 asked for is a one-line error
    elsewhere = inference.model_copy(update={"cache_dir": tmp_path / "other"})
    assert all(p.precision != "int8" for p in load_ensemble(folder, inference=elsewhere).predictors)
    with pytest.raises(ValueError, match="int8 network of viola_tiny, nnunet_tiny is not in"):
        load_ensemble(folder, inference=elsewhere.model_copy(update={"precision": "int8"}))


def test_preparation_without_nncf_or_scans_or_when_off_says_why(own_ensemble, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from viola_models.inference import ensemble as ens

    folder, scans = own_ensemble
    inference = InferenceSettings(backend="openvino", cache_dir=tmp_path / "ov")
    assert ens.prepare_cpu_networks(folder, inference)["int8"] == {"passed": False,
                                                                   "reason": "no labelled scans to calibrate on"}
    off = inference.model_copy(update={"quantize": "off"})
    assert "quantize is off" in ens.prepare_cpu_networks(folder, off, scans)["int8"]["reason"]
    monkeypatch.setattr(ens, "nncf_available", lambda: False)
    assert "NNCF is not installed" in ens.prepare_cpu_networks(folder, inference, scans)["int8"]["reason"]
    torch_cpu = InferenceSettings(backend="torch")
    assert ens.prepare_cpu_networks(folder, torch_cpu, scans)["ready"] == 0
