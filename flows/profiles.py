"""Pipeline settings: one validated object per stage, loaded from a profile file (TOML).

Profiles shipped with the package live in ``flows/profiles/`` (``tiny``, ``demo``, ``paper``);
``--profile`` also takes a path to a user's own copy. Relative paths inside a profile are
resolved against the current directory once, here, at the edge.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_catalog.preprocessing import PreprocessSettings
from data_catalog.selection import SelectionRule
from tasks.compute import ComputeSettings
from viola_models.inference.backends import InferenceSettings
from viola_models.training import TrainSettings

__all__ = ["PipelineSettings", "ProfileError", "load_profile", "parse_overrides", "profile_names"]

PROFILE_DIR = Path(__file__).parent / "profiles"
WORK_DIR = "viola_work"  # beside the data, in every data root: caches, rounds, pseudo-labels


class ProfileError(ValueError):
    """A profile that cannot be used, with a one-line reason."""


class SynthSettings(BaseModel):
    """Phantoms generated into the data root when it holds no scans (the embedded default data)."""

    model_config = ConfigDict(extra="forbid")
    labelled: int = 4
    unlabelled: int = 16
    test: int = 8
    seed: int = 0
    size: str = "small"


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path = Path("data/demo")
    synth: SynthSettings | None = None  # None: never generate, the root must hold scans
    binarize_labels: bool = False
    n_folds: int = Field(5, ge=2)
    fold_seed: int = 0


class MembersSettings(BaseModel):
    """Which networks form a round's ensemble: every architecture on every listed fold.

    ``init``: an ensemble folder (e.g. the authors' checkpoints, ``viola import-reference``) whose
    members round 0 fine-tunes instead of training from scratch: the member of the same name, else
    those of the same architecture in turn (``viola_models.inference.ensemble.initial_member``)."""

    model_config = ConfigDict(extra="forbid")
    architectures: list[str] = Field(default_factory=lambda: ["viola_l", "nnunet_r"])
    folds: list[int] | None = None  # None: all folds
    init: Path | None = None


class CalibrationSettings(BaseModel):
    """How the selection rule's score is calibrated: each fold's members predict their own
    validation scans (out of fold, see ``viola_models.inference.quality``) at this sliding-window overlap."""

    model_config = ConfigDict(extra="forbid")
    overlap: float = Field(0.5, ge=0, lt=1)


class PseudoSettings(BaseModel):
    """How the teacher labels the unlabelled scans and which labels are kept (``rule``).

    ``ignore_band`` (low, high): voxels whose ensemble probability is in [low, high) carry no loss
    for the student (voxel-level confidence; Lin and Yuh, arXiv 2105.00582, ignored 0.3-0.7)."""

    model_config = ConfigDict(extra="forbid")
    overlap: float = Field(0.5, ge=0, lt=1)
    tta: bool = False
    ignore_band: tuple[float, float] | None = None
    rule: SelectionRule = Field(default_factory=SelectionRule)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    overlays: int = 4  # PNG overlays logged for this many selected and this many rejected scans

    @model_validator(mode="after")
    def _check_band(self) -> PseudoSettings:
        if self.ignore_band is not None and not 0 <= self.ignore_band[0] < self.ignore_band[1] <= 1:
            raise ValueError(f"ignore_band {list(self.ignore_band)}: need 0 <= low < high <= 1")
        return self


class StudentSettings(BaseModel):
    """How a round >= 1 trains its members (the student) on labelled + pseudo-labelled scans.

    ``init``: ``teacher`` fine-tunes the previous round's member (the paper), ``scratch`` trains a
    new network with the round-0 settings (noisy student); ``pseudo_weight``: ``uniform`` (the
    paper) or ``predicted_dice`` (each pseudo-label's loss weighted by its calibrated predicted
    Dice; labelled scans weigh 1); ``labelled_only_steps``: a last fine-tune of that many steps on
    the labelled scans alone (0: none); ``batch_pseudo_fraction``: the share of every batch drawn
    from the pseudo-labelled scans (0.5: labelled and pseudo-labelled 1:1, as ST++ and 3-D CPS; 0:
    one pool); ``pseudo_augment``: ``strong`` noise on the pseudo-labelled samples only
    (``viola_models.training.STRONG_AUGMENT``), ``same``: the labelled scans' augmentation;
    ``pseudo_rampup_steps``: the pseudo-label loss weight ramps up over the student's first steps.
    The control trains with the same settings (it has no pseudo-labelled scan to apply them to).
    """

    model_config = ConfigDict(extra="forbid")
    init: Literal["teacher", "scratch"] = "teacher"
    pseudo_weight: Literal["uniform", "predicted_dice"] = "uniform"
    labelled_only_steps: int = Field(0, ge=0)
    batch_pseudo_fraction: float = Field(0.0, ge=0, lt=1)
    pseudo_augment: Literal["same", "strong"] = "same"
    pseudo_rampup_steps: int = Field(0, ge=0)

    def train_changes(self) -> dict:
        """The ``TrainSettings`` fields these options set for a round >= 1."""
        from viola_models.training import STRONG_AUGMENT

        return {"pseudo_fraction": self.batch_pseudo_fraction, "pseudo_rampup_steps": self.pseudo_rampup_steps,
                "pseudo_augment": STRONG_AUGMENT.model_dump() if self.pseudo_augment == "strong" else None}


class RoundSettings(BaseModel):
    """What one call runs: ``control`` adds the equal-compute control arm to each round >= 1 (the
    same round without pseudo-labels); ``skip_unchanged`` skips a round whose inputs did not change
    since the last pseudo-label round (new unlabelled scans, catalog or profile); ``guard``: a round
    whose members' mean out-of-fold validation Dice is below its teacher's does not teach the next
    round (the teacher it had does, and its students start from that teacher's members)."""

    model_config = ConfigDict(extra="forbid")
    control: bool = False
    skip_unchanged: bool = True
    guard: bool = True


class EvaluateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap: float = Field(0.5, ge=0, lt=1)
    tta: bool = False
    nsd_tolerance_mm: float = 0.42


class TrackingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment: str = "self-training"
    registered_model: str = "viola-ich-ensemble"


class ScheduleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str = "0 2 * * *"  # a round every night at 02:00
    watch_interval_s: int = 300  # how often the watcher looks for new unlabelled scans


class PipelineSettings(BaseModel):
    """Everything one self-training round needs."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    data: DataSettings = Field(default_factory=DataSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    members: MembersSettings = Field(default_factory=MembersSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    finetune: dict[str, Any] = Field(default_factory=dict)  # TrainSettings fields changed for rounds >= 1
    pseudo: PseudoSettings = Field(default_factory=PseudoSettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    round: RoundSettings = Field(default_factory=RoundSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    device: str = "auto"  # auto: CUDA when present

    @model_validator(mode="after")
    def _check_finetune(self) -> PipelineSettings:
        try:
            self.train_settings(1, self.members.architectures[0], 0)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"finetune.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        if self.pseudo.rule.score in ("agreement", "union_agreement") and len(self.members.architectures) < 2:
            raise ValueError(f"pseudo.rule.score = {self.pseudo.rule.score!r} compares members of one fold: it "
                             "needs at least two architectures (or use 'mean_max_probability')")
        return self

    def train_settings(self, round_: int, architecture: str, fold: int) -> TrainSettings:
        """The training settings of one member: round 0 supervised; later rounds fine-tune the
        teacher (``finetune`` changes) or, with ``student.init = "scratch"``, train as round 0 does."""
        base = self.train.model_dump()
        if round_ >= 1 and self.student.init == "teacher":
            base.update(self.finetune)
        if round_ >= 1:
            base.update(self.student.train_changes())
        base.update(model=architecture, seed=self.train.seed + 1000 * round_ + 10 * fold)
        return TrainSettings.model_validate(base)

    def labelled_only_settings(self, round_: int, architecture: str, fold: int) -> TrainSettings | None:
        """The last labelled-only fine-tune of a round >= 1 (None when ``student.labelled_only_steps`` is 0)."""
        steps = self.student.labelled_only_steps
        if round_ < 1 or steps == 0:
            return None
        base = self.train.model_dump() | self.finetune
        base.update(model=architecture, seed=self.train.seed + 1000 * round_ + 10 * fold + 5, max_steps=steps,
                    warmup_steps=min(base.get("warmup_steps", 0), steps // 5),
                    val_every=min(base.get("val_every", steps), steps))
        return TrainSettings.model_validate(base)

    def digest(self) -> str:
        """A hash of everything that decides a round's result (not where it runs or when)."""
        # how members run (compute, inference) changes a round's numbers by float rounding at most
        data = self.model_dump(mode="json", exclude={"schedule", "device", "round", "name", "tracking", "compute",
                                                     "inference"})
        data["data"].pop("root", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def inference_settings(self) -> InferenceSettings:
        """``[inference]`` with its cache folder defaulting to the work folder's ``openvino/``."""
        if self.inference.cache_dir is not None:
            return self.inference
        return self.inference.model_copy(update={"cache_dir": self.work_dir / "openvino"})

    @property
    def work_dir(self) -> Path:
        """Pipeline outputs beside the data: preprocessing cache, rounds, pseudo-labels."""
        return self.data.root / WORK_DIR


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def merge_settings(base: dict, changes: dict) -> dict:
    """``changes`` laid over ``base``, nested tables merged key by key (neither is modified)."""
    out = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if nested else value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["student.init=scratch", "train.max_steps=100"]`` -> nested dict; values are TOML values
    (numbers, booleans, arrays, quoted strings), and a bare word is a string."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"override {item!r}: expected KEY=VALUE, e.g. student.init=scratch")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_profile(profile: str | Path, data_root: str | Path | None = None,
                 overrides: dict | None = None) -> PipelineSettings:
    """Load a shipped profile by name, or a TOML file by path; ``data_root`` overrides ``data.root``
    and ``overrides`` (nested, see :func:`parse_overrides`) any other setting."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.toml"
        if not path.exists():
            raise ProfileError(f"unknown profile {profile!r}; shipped profiles: {', '.join(profile_names())}, "
                               "or give the path of a .toml file")
    if not path.exists():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path}: not valid TOML ({e})") from None
    raw.setdefault("name", path.stem)
    if overrides:
        raw = merge_settings(raw, overrides)
    if data_root is not None:
        raw.setdefault("data", {})["root"] = str(data_root)
    try:
        settings = PipelineSettings.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        where = f"{where}: " if where else ""
        raise ProfileError(f"profile {path}: {where}{first['msg']} ({e.error_count()} error(s) in all)") from None
    settings.data.root = settings.data.root.expanduser().resolve()
    if settings.members.init is not None:
        settings.members.init = settings.members.init.expanduser().resolve()
        from viola_models.inference.ensemble import EnsembleError, initial_member

        try:  # every member of round 0 must find its starting point now, not hours into the round
            for arch in settings.members.architectures:
                initial_member(settings.members.init, arch, 0)
        except EnsembleError as e:
            raise ProfileError(f"profile {path}: members.init: {e}") from None
    folds = settings.members.folds
    if folds is not None and any(f < 0 or f >= settings.data.n_folds for f in folds):
        raise ProfileError(f"profile {path}: members.folds {folds} outside 0..{settings.data.n_folds - 1}")
    return settings
