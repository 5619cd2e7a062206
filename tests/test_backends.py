"""CPU inference backends: what ``auto`` picks, the accuracy of every fast path against the fp32
eager network, and the OpenVINO cache of converted networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from viola_models.inference import backends
from viola_models.inference.backends import InferenceSettings, OpenVINOForward, prune_cache, resolve_backend
from viola_models.inference.sliding_window import make_predictors, predict_ensemble
from viola_models.nets.reference import convert_reference_state_dict, from_reference_config

REFERENCE = Path(__file__).parent / "fixtures" / "reference_viola" / "tiny_viola.pt"
CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(not backends.openvino_available(), reason="OpenVINO is not installed")


@pytest.fixture(scope="module")
def reference():
    ref = torch.load(REFERENCE, weights_only=True)
    model = from_reference_config(ref["config"])
    model.load_state_dict(convert_reference_state_dict(ref["state_dict"]))
    return model.eval(), ref["input"]


def _mask(pred, x: torch.Tensor) -> torch.Tensor:
    out = pred(x)
    return torch.softmax(out.float(), 1)[:, 1] >= 0.5


def test_auto_is_detected_not_assumed(monkeypatch):
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    monkeypatch.setattr(backends, "cpu_bf16_supported", lambda: False)
    assert resolve_backend(InferenceSettings(), CPU) == ("torch", "fp32")
    monkeypatch.setattr(backends, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    assert resolve_backend(InferenceSettings(), CPU) == ("openvino", "bf16")
    assert resolve_backend(InferenceSettings(backend="torch", precision="fp32"), CPU) == ("torch", "fp32")
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    with pytest.raises(ValueError, match=r"not installed: pip install 'viola-ich\[openvino\]'"):
        resolve_backend(InferenceSettings(backend="openvino"), CPU)
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend(InferenceSettings(backend="openvino"), torch.device("cuda"))
    with pytest.raises(ValueError):
        InferenceSettings(backend="tensorrt")


def test_bf16_is_read_from_the_cpu_flags():
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    assert backends.cpu_bf16_supported() == bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@pytest.mark.parametrize(("backend", "precision"), [
    ("torch", "bf16"),
    pytest.param("openvino", "fp32", marks=needs_openvino),
    pytest.param("openvino", "bf16", marks=needs_openvino),
])
def test_fast_paths_keep_the_mask_of_the_fp32_network(reference, tmp_path, backend, precision):
    """Accuracy guard on the authors' reference network: Dice >= 0.99 and volume within 1 % of the
    fp32 eager mask (benchmarks/bench_predict.py --ensemble gives the full-size figure)."""
    model, x = reference
    with torch.no_grad():
        expected = torch.softmax(model(x).float(), 1)[:, 1] >= 0.5
    settings = InferenceSettings(backend=backend, precision=precision, cache_dir=tmp_path)
    fast = make_predictors([(model, None)], CPU, inference=settings)[0]
    got = _mask(fast, x)
    dice = 2 * (got & expected).sum().item() / (got.sum() + expected.sum()).item()
    assert dice >= 0.99
    assert abs(got.sum().item() / expected.sum().item() - 1) <= 0.01
    if precision == "fp32":  # same arithmetic up to rounding
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x), atol=1e-3)


@needs_openvino
def test_openvino_networks_are_converted_once_and_cached_by_content(reference, tmp_path, monkeypatch):
    model, x = reference
    first = OpenVINOForward(model, "fp32", cache_dir=tmp_path)
    out = first(x)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file() and (entries[0] / "model.bin").is_file()

    def no_conversion(self, shape):
        raise AssertionError("converted again despite a cached network")

    monkeypatch.setattr(OpenVINOForward, "_convert", no_conversion)
    again = OpenVINOForward(model, "fp32", cache_dir=tmp_path)  # a later process: read from the cache
    assert torch.equal(again(x), out)
    monkeypatch.undo()

    other = from_reference_config(torch.load(REFERENCE, weights_only=True)["config"]).eval()  # other weights
    OpenVINOForward(other, "fp32", cache_dir=tmp_path)(x)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    # a damaged entry is converted again, with the same result
    (entries[0] / "model.xml").write_text("<net>not a network")
    assert torch.allclose(OpenVINOForward(model, "fp32", cache_dir=tmp_path)(x), out, atol=1e-5)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no half-written entry left


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path):
    import os

    for i in range(5):
        (tmp_path / f"e{i}").mkdir()
        os.utime(tmp_path / f"e{i}", (1000 + i, 1000 + i))
    prune_cache(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2", "e3", "e4"]


@needs_openvino
def test_an_ensemble_on_openvino_predicts_as_the_torch_one(ensemble_dir, tmp_path):
    from tests.helpers import head_volume
    from viola_models.inference.ensemble import load_ensemble

    img, _, aff = head_volume(seed=3)
    from data_catalog.preprocessing import preprocess_arrays
    from tests.conftest import PRE

    case = preprocess_arrays(img, aff, None, PRE)
    outs = {}
    for backend in ("torch", "openvino"):
        ens = load_ensemble(ensemble_dir, inference=InferenceSettings(backend=backend, precision="fp32",
                                                                      cache_dir=tmp_path))
        outs[backend] = predict_ensemble(ens.members, case.image, overlap=0.5, predictors=ens.predictors)
    # both fp32, summed in other orders: 4e-5 apart at most on 2 threads, 1.6e-4 on one (OMP_NUM_THREADS=1)
    assert np.allclose(outs["torch"].member_probs.numpy(), outs["openvino"].member_probs.numpy(), atol=5e-4)


def test_cli_predict_takes_a_backend_and_refuses_an_unknown_one(ensemble_dir, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.helpers import head_volume, write_nifti

    img, _, aff = head_volume(seed=5)
    write_nifti(tmp_path / "in" / "a.nii.gz", img, aff, np.int16)
    runner = CliRunner()
    args = ["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoints", str(ensemble_dir),
            "--device", "cpu"]
    res = runner.invoke(app, [*args, "--backend", "torch", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "on cpu (torch, fp32)" in res.output and (tmp_path / "out" / "a.nii.gz").is_file()
    res = runner.invoke(app, [*args, "--backend", "tensorrt"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error: --backend")
    assert "Traceback" not in res.output
