"""Predictors: evaluation-mode callables of trained networks, made fast (batch-norm folding,
CUDA-graph replay, autocast), and the device they run on.

Both are exact rewrites of evaluation-mode arithmetic (up to float rounding) and are used by the
sliding-window predictor: its windows all have the training patch size, so one captured graph per
window batch shape serves a whole scan.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

__all__ = ["CUDAGraphForward", "as_predictor", "fold_batch_norm", "resolve_device"]

log = logging.getLogger(__name__)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An evaluation-mode copy of ``model`` with every conv -> BatchNorm pair of its DynUNet blocks
    folded into the convolution (weights scaled, bias added, the norm replaced by Identity).

    Instance norms are left alone (their statistics depend on the input). The original model is
    not modified; shared sub-modules (DynUNet's ``skip_layers`` aliases) stay shared in the copy.
    """
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if not isinstance(block, (UnetResBlock, UnetBasicBlock)):
            continue
        for i in (1, 2, 3):
            conv, norm = getattr(block, f"conv{i}", None), getattr(block, f"norm{i}", None)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
                conv.conv = fuse_conv_bn_eval(conv.conv, norm)
                setattr(block, f"norm{i}", nn.Identity())
    return folded


class CUDAGraphForward:
    """Calls ``model(x)`` through a captured CUDA graph, one graph per input shape and dtype.

    For inference only (gradients off, model in eval mode, weights frozen): the graph replays the
    kernels recorded at capture, reading the input from a static buffer. ``autocast_dtype`` runs
    the capture under autocast. The returned tensor is a fresh copy of the graph's output.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None, max_graphs: int = 4) -> None:
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), self._autocast():
            for _ in range(2):  # warm-up: cuDNN autotuning, lazily built caches
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), self._autocast():
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                with torch.no_grad(), self._autocast():
                    return self.model(x)
            entry = self._graphs[key] = self._capture(x)
            log.debug("captured a CUDA graph for input %s", key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


def as_predictor(model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None,
                 cuda_graphs: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fastest exact evaluation-mode callable for ``model`` on ``device``: batch norm folded,
    and on CUDA replayed through CUDA graphs (``cuda_graphs``) or run under autocast."""
    fast = fold_batch_norm(model).to(device)
    if device.type == "cuda" and cuda_graphs:
        return CUDAGraphForward(fast, autocast_dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            return fast(x)

    return run


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; ``"cuda"`` without a GPU is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    return device
