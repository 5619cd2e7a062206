"""Inference backends of the sliding-window predictor on a CPU: which one runs, at which precision,
and the OpenVINO backend with its on-disk cache of converted networks (the one module that writes
and reads that cache).

* ``torch``: the evaluation-mode network (batch norm folded, :mod:`viola_models.inference.predictors`), under
  bf16 autocast when the precision is bf16.
* ``openvino``: the same network converted once per member and window shape to OpenVINO's model
  format, kept in a cache folder keyed by the weights' content, and compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` fp32 or bf16. Optional: ``pip install viola-ich[openvino]``.
* ``int8`` (OpenVINO only): the converted network quantized after training by NNCF, calibrated on
  windows of the member's training scans, cached beside the others. It is made, and checked
  against fp32, when a round registers its ensemble (:mod:`viola_models.inference.quantization`);
  ``auto`` takes it only for an ensemble whose check passed and whose int8 networks are cached.

``auto`` picks are detected, not assumed: OpenVINO when it is installed and the device is the CPU;
int8 for an ensemble that passed its int8 check; else bf16 when the CPU computes it natively
(its AVX512-BF16 or AMX flags), fp32 otherwise. On CUDA
the torch predictor decides (bf16 autocast where the GPU supports it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

__all__ = ["InferenceSettings", "OpenVINOForward", "cpu_bf16_supported", "default_cache_dir", "nncf_available",
           "openvino_available", "prune_cache", "resolve_backend", "seed_cache"]

log = logging.getLogger(__name__)

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


class InferenceSettings(BaseModel):
    """How member networks run at prediction time on a CPU (profiles' ``[inference]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["auto", "torch", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    cache_dir: Path | None = None  # converted OpenVINO networks; None: default_cache_dir()
    # at registration: int8 networks made and checked against fp32 eager ("auto": where OpenVINO and
    # NNCF are installed), on windows and whole scans of the round's labelled scans
    quantize: Literal["auto", "off"] = "auto"
    calibration_windows: int = Field(16, ge=1, le=1024)
    guard_scans: int = Field(2, ge=1, le=64)


def default_cache_dir() -> Path:
    """``$VIOLA_CACHE_DIR/openvino``, else ``$XDG_CACHE_HOME/viola-ich/openvino`` (``~/.cache`` by default)."""
    if os.environ.get("VIOLA_CACHE_DIR"):
        return Path(os.environ["VIOLA_CACHE_DIR"]) / "openvino"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "viola-ich" / "openvino"


@functools.cache
def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (its flags list avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@functools.cache
def openvino_available() -> bool:
    return _importable("openvino")


@functools.cache
def nncf_available() -> bool:
    return _importable("nncf")


def resolve_backend(settings: InferenceSettings, device: torch.device, int8_ready: bool = False) -> tuple[str, str]:
    """The (backend, precision) that ``settings`` mean on ``device``; ``int8_ready``: the ensemble
    passed its int8 check and its int8 networks are cached (``auto`` then takes int8). ValueError
    when the choice cannot be honoured here (OpenVINO asked for but not installed, or asked for on
    a GPU; int8 on the PyTorch backend)."""
    if device.type != "cpu":
        if settings.backend == "openvino":
            raise ValueError(f"the OpenVINO backend runs on the CPU, not on {device}")
        return "torch", "auto"
    backend = settings.backend
    if backend == "openvino" and not openvino_available():
        raise ValueError("the OpenVINO backend is not installed: pip install 'viola-ich[openvino]'")
    if backend == "auto":
        backend = "openvino" if openvino_available() else "torch"
    if settings.precision == "int8" and backend != "openvino":
        raise ValueError("int8 inference runs on the OpenVINO backend: pip install 'viola-ich[openvino]'")
    precision = settings.precision
    if precision == "auto":
        precision = "int8" if int8_ready and backend == "openvino" else "bf16" if cpu_bf16_supported() else "fp32"
    return backend, precision


def _weights_digest(model: nn.Module) -> str:
    """Content hash of a network's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def seed_cache(bundled: Path, cache_dir: Path | None = None) -> int:
    """Copy into the cache (default: :func:`default_cache_dir`) the converted networks of
    ``bundled`` (a cache folder shipped inside a model) that it lacks, each entry moved in whole;
    returns how many. A cache that cannot be written is left alone (the networks are then
    converted when first used, as without a bundle)."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    copied = 0
    for entry in sorted(p for p in Path(bundled).iterdir() if (p / "model.xml").is_file()):
        if (target / entry.name / "model.xml").is_file():
            continue
        try:
            copied += _add_entry(target, entry.name,
                                 lambda tmp, src=entry: shutil.copytree(src, tmp, dirs_exist_ok=True))
        except OSError as e:
            log.warning("could not copy the bundled OpenVINO networks into %s (%s)", target, e)
            break
    return copied


def _add_entry(cache_dir: Path, name: str, fill: Callable[[Path], object]) -> bool:
    """Put a cache entry in place whole: ``fill(tmp)`` writes it into a temporary folder of
    ``cache_dir``, which is then renamed to ``name``; False (and nothing left behind) when another
    process put the same entry in place first. OSError when the cache cannot be written."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        fill(tmp)
        tmp.rename(cache_dir / name)
        return True
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (cache_dir / name / "model.xml").is_file():
            return False
        raise


def prune_cache(cache_dir: Path, max_entries: int) -> None:
    """Remove all but the ``max_entries`` most recently used entries of an OpenVINO cache folder."""
    entries = [p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(entries) <= max_entries:
        return
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[max_entries:]:
        shutil.rmtree(old, ignore_errors=True)


class OpenVINOForward:
    """Calls an evaluation-mode network through OpenVINO on the CPU: (B, C, X, Y, Z) float32 in,
    logits out, as torch tensors.

    Each input shape is converted once (static shapes: every sliding window has the training patch
    size) and kept in ``cache_dir`` under a key of the weights' content, the shape and the OpenVINO
    version, so later processes compile from the cache instead of converting again (the
    ``max_entries`` most recently used entries are kept: every round brings new weights). Entries
    are written to a private folder and renamed into place: a concurrent writer or a crash never
    leaves a half-written entry; an unreadable entry is converted again. OpenVINO's results depend
    on ``threads`` in the last bits (nnU-Net's reductions are split by thread): processes that must
    agree use one thread count.

    ``precision="int8"``: the network quantized by NNCF, its own cache entry (key: the same, and
    int8). Made from ``calibration`` (input windows of the patch shape) on a miss; without
    ``calibration`` a missing entry is a LookupError (:meth:`cached` tells beforehand).
    """

    def __init__(self, model: nn.Module, precision: Literal["fp32", "bf16", "int8"] = "fp32",
                 cache_dir: Path | None = None, threads: int | None = None, max_entries: int = 64,
                 calibration: list | None = None) -> None:
        import openvino as ov

        self._ov = ov
        self.model = model.eval()
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.threads = threads or torch.get_num_threads()
        self.max_entries = max_entries
        self.calibration = calibration
        self._digest = _weights_digest(model)
        self._compiled: dict[tuple[int, ...], object] = {}
        self.core = ov.Core()

    def _key(self, shape: tuple[int, ...], int8: bool = False) -> str:
        text = f"{self._digest}|{shape}|openvino {self._ov.__version__}|torch {torch.__version__}"
        if int8:
            import nncf

            text += f"|int8 nncf {nncf.__version__}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def cached(self, shape: tuple[int, ...]) -> bool:
        """Whether this precision's network for ``shape`` is in the cache (nothing is converted)."""
        return (self.cache_dir / self._key(shape, self.precision == "int8") / "model.xml").is_file()

    def _convert(self, shape: tuple[int, ...]):
        example = torch.zeros(shape)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing warnings about Python-side shape arithmetic
            self.model(example)  # fills the attention's folded-DDCM cache, which the trace then reads
            # traced here without torch's re-run check: half the time of letting OpenVINO trace it
            traced = torch.jit.trace(self.model, example, check_trace=False)
            return self._ov.convert_model(traced, input=[shape])

    def _quantize(self, shape: tuple[int, ...]):
        """NNCF post-training quantization of the fp32 network on the calibration windows."""
        import nncf

        if not self.calibration:
            raise LookupError(f"no int8 network for input {shape} in {self.cache_dir}: it is made when a round "
                              "registers the ensemble (or give calibration windows)")
        windows = [np.ascontiguousarray(w, dtype=np.float32).reshape(shape) for w in self.calibration]
        level = logging.getLogger("nncf").level
        logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and notes, per member
        try:
            return nncf.quantize(self._model_for(shape, int8=False), nncf.Dataset(windows),
                                 preset=nncf.QuantizationPreset.MIXED, subset_size=len(windows))
        finally:
            logging.getLogger("nncf").setLevel(level)

    def _read_entry(self, entry: Path):
        xml = entry / "model.xml"
        if xml.is_file():
            try:
                model = self.core.read_model(xml)
                os.utime(entry)  # recently used: pruning keeps it
                return model
            except RuntimeError as e:
                log.warning("cached OpenVINO network %s is unreadable (%s); converting again", entry,
                            str(e).strip().splitlines()[0][:120])
                shutil.rmtree(entry, ignore_errors=True)
        return None

    def _model_for(self, shape: tuple[int, ...], int8: bool | None = None):
        int8 = self.precision == "int8" if int8 is None else int8
        entry = self.cache_dir / self._key(shape, int8)
        model = self._read_entry(entry)
        if model is not None:
            return model
        converted = self._quantize(shape) if int8 else self._convert(shape)
        xml = entry / "model.xml"
        try:
            _add_entry(self.cache_dir, entry.name,
                       lambda tmp: self._ov.save_model(converted, tmp / "model.xml", compress_to_fp16=False))
            prune_cache(self.cache_dir, self.max_entries)
            # compiled from the file, as every later process will: one network whether the cache was warm or not
            return self.core.read_model(xml)
        except (OSError, RuntimeError) as e:  # a read-only or full cache: compiled from a private copy
            log.warning("could not cache the OpenVINO network in %s (%s)", self.cache_dir, e)
        with tempfile.TemporaryDirectory(prefix="viola-openvino-") as private:
            self._ov.save_model(converted, Path(private) / "model.xml", compress_to_fp16=False)
            return self.core.read_model(Path(private) / "model.xml")

    def compiled(self, shape: tuple[int, ...]):
        if shape not in self._compiled:
            # int8: the layers left in float run in bf16 where the CPU has it
            bf16 = self.precision == "bf16" or (self.precision == "int8" and cpu_bf16_supported())
            config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                      "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            self._compiled[shape] = self.core.compile_model(self._model_for(shape), "CPU", config)
            log.debug("compiled an OpenVINO network for input %s (%s)", shape, self.precision)
        return self._compiled[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in x.shape)
        request = self.compiled(shape).create_infer_request()
        out = request.infer({0: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out.copy())
