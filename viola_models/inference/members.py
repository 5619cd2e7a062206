"""A trained member: what its checkpoint (``best.pt``, written by training) says about itself, and
the network rebuilt from it alone (the configuration travels with the weights). Below the ensemble
and the sliding window, which both use it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from viola_models.nets.configs import build_from_config

__all__ = ["MemberCheckpoint", "load_member"]


@dataclass
class MemberCheckpoint:
    """What a trained member's checkpoint says about itself (``best.pt`` written by training)."""

    path: Path
    name: str  # e.g. "viola_small-fold0"
    model_name: str
    model_config: dict
    patch_size: tuple[int, int, int]
    val_dice: float = float("nan")
    extra: dict = field(default_factory=dict)


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # damaged, truncated, not a checkpoint, or a pickle that would run code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"checkpoint {path} is unreadable ({first})") from None


def load_member(path: Path) -> tuple[nn.Module, MemberCheckpoint]:
    """Rebuild a trained network from its checkpoint alone (configuration travels with the weights)."""
    ck = _read_checkpoint(Path(path))
    for key in ("model_name", "model_config", "state_dict", "patch_size"):
        if key not in ck:
            raise ValueError(f"checkpoint {path} lacks {key!r}: not a viola-ich member checkpoint")
    cfg = json.loads(ck["model_config"]) if isinstance(ck["model_config"], str) else dict(ck["model_config"])
    model = build_from_config(cfg)
    model.load_state_dict(ck["state_dict"])
    meta = MemberCheckpoint(
        path=Path(path),
        name=str(ck.get("member", Path(path).parent.name)),
        model_name=ck["model_name"],
        model_config=cfg,
        patch_size=tuple(int(v) for v in ck["patch_size"]),
        val_dice=float(ck.get("val_dice", float("nan"))),
        extra={k: ck[k] for k in ("step", "fold", "round") if k in ck},
    )
    return model.eval(), meta
