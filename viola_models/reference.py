"""Compatibility with the authors' implementation: their constructor arguments and checkpoints.

The authors' viola-UNet names its attention ``canc_att`` with one sub-module per axis
(``xconv``, ``yconv``, ``zconv``: a LayerNorm gain then a DDCM with ``features.{i}.0`` convolutions
and a ``conv1x1_out.1`` merge convolution) and the tanh gate's GroupNorm as ``act.0``. Ours keeps
the three axes stacked in one tensor per layer so they run as one batched call; every other key
(the DynUNet backbone, its ``skip_layers`` aliases, heads) is the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from viola_models.viola_unet import ViolaUNet

__all__ = ["convert_reference_state_dict", "from_reference_config", "to_reference_state_dict"]

_AXES = ("xconv", "yconv", "zconv")  # H, W, D branches in the authors' naming
_ATT_KEY = re.compile(
    r"^(?P<prefix>.*)canc_att\.(?:"
    r"(?P<axis>[xyz]conv)\.(?:0\.gamma|1\.features\.(?P<layer>\d+)\.0\.weight|1\.conv1x1_out\.1\.weight)"
    r"|act\.0\.(?P<gn>weight|bias))$"
)

_REFERENCE_ARGS = {
    "spatial_dims", "in_channels", "out_channels", "kernel_size", "strides", "upsample_kernel_size",
    "filters", "dec_filters", "norm_name", "act_name", "dropout", "deep_supervision", "deep_supr_num",
    "res_block", "trans_bias", "viola_att", "gated_att", "sum_deep_supr",
}


def _as_tuple_arg(value: Any) -> Any:
    """JSON turns ("BATCH", {...}) into ["BATCH", {...}]; MONAI wants the tuple back."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
        return (value[0], value[1])
    return value


def from_reference_config(config: Mapping[str, Any] | str) -> ViolaUNet:
    """Build our ViolaUNet from the authors' ``ViolaUNet(...)`` keyword arguments (dict or JSON).

    ``gated_att=True`` and ``sum_deep_supr=True`` are refused: no published model uses them, so
    their behaviour cannot be checked against the authors' outputs.
    """
    cfg = dict(json.loads(config) if isinstance(config, str) else config)
    unknown = sorted(set(cfg) - _REFERENCE_ARGS)
    if unknown:
        raise ValueError(f"unknown viola-UNet argument(s) {unknown}; known: {sorted(_REFERENCE_ARGS)}")
    if cfg.pop("gated_att", False):
        raise ValueError("gated_att=True is not supported (no published viola-UNet uses gated attention)")
    if cfg.pop("sum_deep_supr", False):
        raise ValueError("sum_deep_supr=True is not supported (no published viola-UNet sums its heads)")
    for key in ("norm_name", "act_name", "dropout"):
        if key in cfg:
            cfg[key] = _as_tuple_arg(cfg[key])
    cfg.setdefault("spatial_dims", 3)
    return ViolaUNet(**cfg)


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state_dict of the authors' viola-UNet or nnU-Net-r to our module names.

    Accepts the raw state_dict, one wrapped as ``{"state_dict": ...}``, and keys prefixed with
    ``module.`` (DataParallel). Backbone keys pass through; the per-axis attention tensors are
    stacked. Raises ValueError when an attention module is incomplete.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    for raw_key, value in state_dict.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        m = _ATT_KEY.match(key)
        if m is None:
            if "canc_att." in key:
                raise ValueError(f"unrecognised attention key in reference state_dict: {raw_key}")
            out[key] = value
            continue
        g = groups.setdefault(m["prefix"], {"gain": {}, "layers": {}, "merge": {}, "gn": {}})
        if m["gn"]:
            g["gn"][m["gn"]] = value
        elif m["layer"] is not None:
            g["layers"].setdefault(int(m["layer"]), {})[m["axis"]] = value
        elif key.endswith("gamma"):
            g["gain"][m["axis"]] = value
        else:
            g["merge"][m["axis"]] = value
    for prefix, g in groups.items():
        where = f"{prefix}canc_att"
        if set(g["gain"]) != set(_AXES) or set(g["merge"]) != set(_AXES) or set(g["gn"]) != {"weight", "bias"}:
            raise ValueError(f"incomplete attention module {where} in reference state_dict")
        att = f"{prefix}attention"
        out[f"{att}.axis_gain"] = torch.stack([g["gain"][a].reshape(-1) for a in _AXES])  # (3, C)
        for i, per_axis in sorted(g["layers"].items()):
            if set(per_axis) != set(_AXES):
                raise ValueError(f"incomplete DDCM layer {i} in {where}")
            # (e, n, k, 1) per axis -> (3, e, n, k)
            out[f"{att}.ddcm_weights.{i}"] = torch.stack([per_axis[a][..., 0] for a in _AXES])
        out[f"{att}.merge_weight"] = torch.stack([g["merge"][a].reshape(-1) for a in _AXES])  # (3, 4e+2)
        out[f"{att}.group_norm.weight"] = g["gn"]["weight"]
        out[f"{att}.group_norm.bias"] = g["gn"]["bias"]
    return out


def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_reference_state_dict`: our keys back to the authors' layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^(?P<prefix>.*)attention\.(?P<rest>.+)$", key)
        if m is None:
            out[key] = value
            continue
        pre, rest = f"{m['prefix']}canc_att", m["rest"]
        if rest == "axis_gain":
            for i, a in enumerate(_AXES):
                out[f"{pre}.{a}.0.gamma"] = value[i].view(1, -1, 1, 1, 1).clone()
        elif rest.startswith("ddcm_weights."):
            layer = rest.split(".")[1]
            for i, a in enumerate(_AXES):
                out[f"{pre}.{a}.1.features.{layer}.0.weight"] = value[i].unsqueeze(-1).clone()
        elif rest == "merge_weight":
            for i, a in enumerate(_AXES):
                out[f"{pre}.{a}.1.conv1x1_out.1.weight"] = value[i].view(1, -1, 1, 1).clone()
        elif rest.startswith("group_norm."):
            out[f"{pre}.act.0.{rest.split('.')[1]}"] = value
        else:
            raise ValueError(f"unexpected attention key {key}")
    return out

