"""Inference backends of the sliding-window predictor on a CPU: which one runs, at which precision,
and the OpenVINO backend with its on-disk cache of converted networks (the one module that writes
and reads that cache).

* ``torch``: the evaluation-mode network (batch norm folded, :mod:`viola_models.inference.predictors`), under
  bf16 autocast when the precision is bf16.
* ``openvino``: the same network converted once per member and window shape to OpenVINO's model
  format, kept in a cache folder keyed by the weights' content, and compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` fp32 or bf16. Optional: ``pip install viola-ich[openvino]``.

``auto`` picks are detected, not assumed: OpenVINO when it is installed and the device is the CPU;
bf16 when the CPU computes it natively (its AVX512-BF16 or AMX flags), fp32 otherwise. On CUDA
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
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = ["InferenceSettings", "OpenVINOForward", "cpu_bf16_supported", "default_cache_dir", "openvino_available",
           "prune_cache", "resolve_backend"]

log = logging.getLogger(__name__)

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


class InferenceSettings(BaseModel):
    """How member networks run at prediction time on a CPU (profiles' ``[inference]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["auto", "torch", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cache_dir: Path | None = None  # converted OpenVINO networks; None: default_cache_dir()


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


@functools.cache
def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(settings: InferenceSettings, device: torch.device) -> tuple[str, str]:
    """The (backend, precision) that ``settings`` mean on ``device``; ValueError when the choice
    cannot be honoured here (OpenVINO asked for but not installed, or asked for on a GPU)."""
    if device.type != "cpu":
        if settings.backend == "openvino":
            raise ValueError(f"the OpenVINO backend runs on the CPU, not on {device}")
        return "torch", "auto"
    backend = settings.backend
    if backend == "openvino" and not openvino_available():
        raise ValueError("the OpenVINO backend is not installed: pip install 'viola-ich[openvino]'")
    if backend == "auto":
        backend = "openvino" if openvino_available() else "torch"
    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if cpu_bf16_supported() else "fp32"
    return backend, precision


def _weights_digest(model: nn.Module) -> str:
    """Content hash of a network's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    """

    def __init__(self, model: nn.Module, precision: Literal["fp32", "bf16"] = "fp32",
                 cache_dir: Path | None = None, threads: int | None = None, max_entries: int = 64) -> None:
        import openvino as ov

        self._ov = ov
        self.model = model.eval()
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.threads = threads or torch.get_num_threads()
        self.max_entries = max_entries
        self._digest = _weights_digest(model)
        self._compiled: dict[tuple[int, ...], object] = {}
        self.core = ov.Core()

    def _key(self, shape: tuple[int, ...]) -> str:
        text = f"{self._digest}|{shape}|openvino {self._ov.__version__}|torch {torch.__version__}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _convert(self, shape: tuple[int, ...]):
        example = torch.zeros(shape)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing warnings about Python-side shape arithmetic
            self.model(example)  # fills the attention's folded-DDCM cache, which the trace then reads
            # traced here without torch's re-run check: half the time of letting OpenVINO trace it
            traced = torch.jit.trace(self.model, example, check_trace=False)
            return self._ov.convert_model(traced, input=[shape])

    def _model_for(self, shape: tuple[int, ...]):
        entry = self.cache_dir / self._key(shape)
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
        converted = self._convert(shape)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.cache_dir))
            self._ov.save_model(converted, tmp / "model.xml", compress_to_fp16=False)
            try:
                tmp.rename(entry)
            except OSError:  # another process put the same entry in place first
                shutil.rmtree(tmp, ignore_errors=True)
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
            config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                      "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            self._compiled[shape] = self.core.compile_model(self._model_for(shape), "CPU", config)
            log.debug("compiled an OpenVINO network for input %s (%s)", shape, self.precision)
        return self._compiled[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in x.shape)
        request = self.compiled(shape).create_infer_request()
        out = request.infer({0: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out.copy())

