"""Compatibility with the authors' implementation: their constructor arguments and checkpoints.

The authors' viola-UNet names its attention ``canc_att`` with one sub-module per axis
(``xconv``, ``yconv``, ``zconv``: a LayerNorm gain then a DDCM with ``features.{i}.0`` convolutions
and a ``conv1x1_out.1`` merge convolution) and the tanh gate's GroupNorm as ``act.0``. Ours keeps
the three axes stacked in one tensor per layer so they run as one batched call; every other key
(the DynUNet backbone, its ``skip_layers`` aliases, heads) is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from viola_models.nets.viola_unet import ViolaUNet

__all__ = ["REFERENCE_PATCH_SIZE", "convert_reference_state_dict", "from_reference_config",
           "identify_reference_checkpoint", "import_reference_checkpoints", "to_reference_state_dict"]

log = logging.getLogger(__name__)

# the authors' inference ROI (160 x 160 x 32): their published members were run with it, and the
# attention's output depends on the window (spec, "Configurations")
REFERENCE_PATCH_SIZE = (160, 160, 32)
# the authors' final preprocessing (spec, "The authors' inference tool")
REFERENCE_PREPROCESS = {"target_spacing": (0.902, 0.902, 4.997), "windows": ((0, 100), (-15, 200), (-100, 1300))}
# configurations tried, in this order, on a checkpoint that does not carry its own: the published
# ones first, then this package's smaller layouts
_PUBLISHED = ("viola_l", "viola_s", "nnunet_r")

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



# ------------------------------------------------------------------------------ checkpoint import
def _tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    """The weights in a loaded checkpoint: a bare state_dict, or one under a usual key."""
    if _tensor_mapping(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "network", "weights"):
            if _tensor_mapping(obj.get(key)):
                return obj[key]
    raise ValueError("holds no state_dict (a mapping of parameter names to tensors)")


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _config_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of a configuration with its shape, without allocating the weights."""
    from viola_models.nets.configs import build_from_config

    with torch.device("meta"):
        return _shapes(build_from_config(config).state_dict())


def _config_from_reference(raw: Mapping[str, Any] | str) -> dict:
    """The authors' constructor arguments as this package's configuration (``arch`` included)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            from viola_models.nets.configs import MODEL_CONFIGS

            raise ValueError(f"unknown configuration {raw!r}: give one of {', '.join(MODEL_CONFIGS)}, or the "
                             "authors' constructor arguments as JSON") from None
    model = from_reference_config(raw)  # validates them (unknown, unsupported arguments)
    del model
    cfg = dict(raw)
    cfg.pop("gated_att", None)
    cfg.pop("sum_deep_supr", None)
    cfg.setdefault("spatial_dims", 3)
    return {"arch": "viola", **json.loads(json.dumps(cfg))}


def _same_config(a: dict, b: dict) -> bool:
    """Equal as stored (JSON turns tuples into lists); ``viola_att`` defaults to on."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for c in (a, b):
        if c.get("arch") == "viola":
            c.setdefault("viola_att", True)
    return a == b


def identify_reference_checkpoint(obj: Any, config: str | Mapping[str, Any] | None = None,
                                  shape_cache: dict | None = None) -> dict:
    """Which network a loaded checkpoint of the authors holds: ``name`` (a configuration name, or
    ``viola_custom``), ``model_config`` (this package's form) and ``state_dict`` (our key names).

    ``config``: a configuration name of :data:`viola_models.nets.configs.MODEL_CONFIGS`, or the
    authors' constructor arguments (dict or JSON); default: the ``config`` the file carries, else
    the configuration whose state_dict keys and shapes the weights match (``viola_l``, ``viola_s``,
    ``nnunet_r``, then the smaller layouts). ValueError with the reason when none matches.
    """
    from viola_models.nets.configs import MODEL_CONFIGS, model_config

    state = convert_reference_state_dict(_unwrap_state_dict(obj))
    shapes = _shapes(state)
    cache = {} if shape_cache is None else shape_cache
    if config is None and isinstance(obj, Mapping) and isinstance(obj.get("config"), str | Mapping):
        config = obj["config"]
    if isinstance(config, str) and config in MODEL_CONFIGS:
        candidates = [(config, model_config(config))]
    elif config is not None:
        cfg = _config_from_reference(config)
        named = [n for n in MODEL_CONFIGS if _same_config(model_config(n), cfg)]
        candidates = [(named[0] if named else "viola_custom", cfg)]
    else:
        names = [*_PUBLISHED, *(n for n in MODEL_CONFIGS if n not in _PUBLISHED)]
        candidates = [(n, model_config(n)) for n in names]
    for name, cfg in candidates:
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            cache[key] = _config_shapes(cfg)
        want = cache[key]
        if want == shapes:
            return {"name": name, "model_config": cfg, "state_dict": state}
    if len(candidates) == 1:
        want = cache[json.dumps(candidates[0][1], sort_keys=True)]
        missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
        wrong = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
        first = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                 f"{wrong[0]} has shape {shapes[wrong[0]]}, expected {want[wrong[0]]}")
        raise ValueError(f"weights do not fit configuration {candidates[0][0]!r} ({len(missing)} missing, "
                         f"{len(extra)} unexpected, {len(wrong)} mis-shaped key(s); first: {first})")
    raise ValueError(f"weights ({len(shapes)} tensors) match none of the known configurations "
                     f"({', '.join(n for n, _ in candidates)}): give the configuration explicitly")


def _load_untrusted(path: Path) -> Any:
    """A checkpoint file read without running code: tensors and plain containers only."""
    import zipfile

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise ValueError(f"{path}: not a PyTorch checkpoint file (or a truncated one)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled model object, or a damaged file
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(f"{path}: holds a pickled Python object ({found[1]}) that would run code when loaded; "
                             "re-save it as a state_dict (torch.save(model.state_dict(), ...))") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path}: unreadable checkpoint ({first})") from None


def _checked_member(path: Path, config, cache: dict, patch: list[int]) -> tuple[dict, torch.nn.Module]:
    """One authors' checkpoint, loaded without running code, identified, and loaded (strict) into our
    network, which must take ``patch``; ValueError naming the file otherwise."""
    from viola_models.nets.configs import build_from_config

    obj = _load_untrusted(path)
    try:
        member = identify_reference_checkpoint(obj, config, cache)
        model = build_from_config(member["model_config"])
        model.load_state_dict(member["state_dict"], strict=True)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    divisor = model.size_divisor
    if any(p % d for p, d in zip(patch, divisor)):
        raise ValueError(f"patch size {tuple(patch)} is not divisible by {member['name']}'s strides "
                         f"{tuple(divisor)}: give --patch-size")
    return member, model


def import_reference_checkpoints(
    paths: Sequence[Path],
    out_dir: Path,
    config: str | Mapping[str, Any] | None = None,
    patch_size: Sequence[int] = REFERENCE_PATCH_SIZE,
    preprocess: Any = None,
) -> Path:
    """Turn checkpoints of the authors' code into an ensemble folder (``viola_models.inference.ensemble``).

    Each file is loaded without running code, identified (:func:`identify_reference_checkpoint`),
    converted, checked by loading it into our network (strict), and written as a member checkpoint
    ``<config>-fold<i>/best.pt`` (``i`` counts the files of each configuration in the order given,
    so the authors' five folds of viola_l and nnunet_r become the members a profile with those
    architectures and five folds fine-tunes). ``preprocess``: a ``PreprocessSettings`` (default:
    the authors' final spacing and windows). The manifest records each member's source file and
    its SHA-256. Returns the manifest's path; ValueError naming the file when one cannot be used.
    """
    from data_catalog.preprocessing import PreprocessSettings
    from data_catalog.scans import atomic_write
    from viola_models.inference.ensemble import write_ensemble

    if not paths:
        raise ValueError("no checkpoint given")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {out_dir} is not empty: give a new folder")
    preprocess = preprocess or PreprocessSettings(**REFERENCE_PREPROCESS)
    patch = [int(v) for v in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch size must be three positive integers, got {patch_size}")
    counts: dict[str, int] = {}
    members, cache, seen = [], {}, {}
    staged = out_dir / ".import"
    for path in (Path(p) for p in paths):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        if digest and digest in seen:
            raise ValueError(f"{path} has the same content as {seen[digest]}: each member must be its own file")
        seen[digest] = path
        member, model = _checked_member(path, config, cache, patch)
        i = counts[member["name"]] = counts.get(member["name"], -1) + 1
        name = f"{member['name']}-fold{i}"
        ck = {"model_name": member["name"], "model_config": json.dumps(member["model_config"]),
              "state_dict": model.state_dict(), "patch_size": patch, "member": name, "fold": i,
              "source": path.name, "source_sha256": digest}
        target = staged / name / "best.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, ck=ck: torch.save(ck, tmp))
        members.append({"name": name, "checkpoint": str(target), "architecture": member["name"], "fold": i,
                        "source": str(path.name), "source_sha256": digest})
        log.info("%s: %s (%d tensors) -> %s", path.name, member["name"], len(member["state_dict"]), name)
    manifest = write_ensemble(out_dir, members, preprocess, origin="authors' checkpoints (viola import-reference)")
    for m in members:  # the staged files are linked into the folder; the staging area goes
        Path(m["checkpoint"]).unlink(missing_ok=True)
    for folder in sorted(staged.glob("*"), reverse=True):
        folder.rmdir()
    staged.rmdir()
    return manifest
