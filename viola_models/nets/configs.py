"""Named network configurations and ``build_model``.

``viola_l`` is the paper's Listing 1.1, ``viola_s`` and ``nnunet_r`` its Table 1 (exact widths,
kernels and strides as in the authors' published code and checkpoints). The ``*_small`` variants
keep the depth-5 layout of the authors' tiny reference model at widths a 2-core CPU trains in
minutes (demo profile); the ``*_tiny`` variants are the same layout at the smallest widths, for tests.

Every configuration is plain data (a dict of constructor arguments); ``build_model`` copies it, applies
overrides, and instantiates the class named by ``arch``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from viola_models.nets.viola_unet import NNUNetR, ViolaUNet

__all__ = ["MODEL_CONFIGS", "build_from_config", "build_model", "count_parameters", "model_config"]


def _k(spec: str) -> list[list[int]]:
    """'331,333' -> [[3, 3, 1], [3, 3, 3]]: the compact notation of the spec's tables."""
    return [[int(c) for c in item] for item in spec.split(",")]


_LEAKY = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})

_LARGE = {
    "spatial_dims": 3,
    "in_channels": 3,
    "out_channels": 2,
    "kernel_size": _k("331,331,331,333,333,333,333"),
    "strides": _k("111,221,221,222,222,221,111"),
    "upsample_kernel_size": _k("221,221,222,222,221,111"),
    "filters": [32, 64, 96, 128, 192, 256, 320],
    "act_name": _LEAKY,
    "dropout": 0.2,
    "deep_supervision": True,
    "deep_supr_num": 4,
    "res_block": True,
    "trans_bias": True,
}

# depth 5, strides (8, 8, 2) in all: the authors' tiny reference layout
_SMALL_LAYOUT = {
    "spatial_dims": 3,
    "in_channels": 3,
    "out_channels": 2,
    "kernel_size": _k("331,331,333,333,333"),
    "strides": _k("111,221,222,221,111"),
    "upsample_kernel_size": _k("221,222,221,111"),
    "act_name": _LEAKY,
    "dropout": 0.0,
    "deep_supervision": True,
    "deep_supr_num": 2,
    "res_block": True,
    "trans_bias": True,
}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # the paper's Listing 1.1: 22,116,478 trainable parameters
    "viola_l": {
        "arch": "viola",
        **_LARGE,
        "dec_filters": [32, 64, 96, 128, 192, 256],
        "norm_name": ("BATCH", {"affine": True}),
    },
    # Table 1, viola-Unet-s: 12,773,388
    "viola_s": {
        "arch": "viola",
        **_LARGE,
        "kernel_size": _k("331,331,333,333,333,333,331"),
        "strides": _k("111,221,222,222,222,222,111"),
        "upsample_kernel_size": _k("221,222,222,222,222,111"),
        "dec_filters": [32, 64, 96, 128, 128, 128],
        "deep_supr_num": 2,
        "res_block": False,
        "norm_name": ("BATCH", {"affine": True}),
    },
    # Table 1, nnU-Net-r: MONAI's DynUNet, 22,009,930
    "nnunet_r": {"arch": "dynunet", **_LARGE, "norm_name": ("INSTANCE", {"affine": True})},
    # CPU variants (demo profile)
    "viola_small": {
        "arch": "viola",
        **_SMALL_LAYOUT,
        "filters": [16, 32, 48, 64, 96],
        "dec_filters": [16, 32, 48, 64],
        "norm_name": ("BATCH", {"affine": True}),
    },
    "nnunet_small": {
        "arch": "dynunet",
        **_SMALL_LAYOUT,
        "filters": [16, 32, 48, 64, 96],
        "norm_name": ("INSTANCE", {"affine": True}),
    },
    # test variants: the reference fixture's widths
    "viola_tiny": {
        "arch": "viola",
        **_SMALL_LAYOUT,
        "filters": [8, 16, 32, 48, 64],
        "dec_filters": [8, 16, 32, 48],
        "norm_name": ("BATCH", {"affine": True}),
    },
    "nnunet_tiny": {
        "arch": "dynunet",
        **_SMALL_LAYOUT,
        "filters": [8, 16, 32, 48, 64],
        "norm_name": ("INSTANCE", {"affine": True}),
    },
}

_ARCHS = {"viola": ViolaUNet, "dynunet": NNUNetR}


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of the named configuration with ``overrides`` applied (``arch`` included)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    cfg = copy.deepcopy(MODEL_CONFIGS[name])
    cfg.update(overrides)
    if cfg["arch"] not in _ARCHS:
        raise ValueError(f"unknown arch {cfg['arch']!r}; known: {', '.join(_ARCHS)}")
    if cfg["arch"] == "dynunet":
        for key in ("dec_filters", "viola_att"):
            if key in cfg:
                raise ValueError(f"{key} applies to viola-UNet only, not to {name!r} (arch 'dynunet')")
    return cfg


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Instantiate a named configuration, e.g. ``build_model("viola_l")`` or
    ``build_model("viola_tiny", dropout=0.1, deep_supervision=False)``."""
    cfg = model_config(name, **overrides)
    arch = cfg.pop("arch")
    return _ARCHS[arch](**cfg)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Instantiate a full configuration as returned by :func:`model_config` (as stored in checkpoints)."""
    cfg = copy.deepcopy(dict(config))
    arch = cfg.pop("arch", None)
    if arch not in _ARCHS:
        raise ValueError(f"configuration has unknown arch {arch!r}; known: {', '.join(_ARCHS)}")
    for key in ("norm_name", "act_name"):  # JSON turns tuples into lists
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    return _ARCHS[arch](**cfg)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
