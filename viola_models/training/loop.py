"""The training loop of one network (paper sections 3.3 and 3.4): ``fit`` (warm-up + cosine schedule,
periodic validation, best checkpoint by mean Dice, atomic checkpoints, resume after a kill),
``validate`` (sliding-window mean Dice) and ``fit_digest``. Callbacks let the caller track progress
(the pipeline's tasks log to MLflow through them) without this module knowing about it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

from data_catalog.preprocessing import load_preprocessed
from data_catalog.scans import atomic_write
from viola_models.inference.backends import cpu_bf16_supported
from viola_models.inference.sliding_window import FOREGROUND_THRESHOLD, sliding_window_probability
from viola_models.nets.configs import build_from_config, count_parameters, model_config
from viola_models.training.data import make_loaders
from viola_models.training.losses import DiceFocalIgnoring, deep_supervision_loss
from viola_models.training.settings import TrainSettings, lr_at, pseudo_ramp

log = logging.getLogger(__name__)


@dataclass
class TrainCallbacks:
    """Hooks called by ``fit``; each receives plain numbers (step, metrics) or a path."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_validation: Callable[[int, float, bool], None] | None = None
    on_checkpoint: Callable[[Path], None] | None = None


@dataclass
class FitResult:
    best_dice: float
    best_step: int
    steps: int
    best_checkpoint: Path
    seconds: float
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    selection: str = "best validation Dice"  # how best.pt was chosen (``TrainSettings.checkpoint``)

    def to_json(self) -> dict:
        d = asdict(self)
        d["best_checkpoint"] = str(self.best_checkpoint)
        return d


@torch.no_grad()
def validate(model: torch.nn.Module, val_items: Sequence[Path], settings: TrainSettings,
             device: torch.device) -> float:
    """Mean Dice of the foreground over the validation cases (sliding window at the patch size).

    A case where both prediction and label are empty scores 1.
    """
    if not val_items:
        return float("nan")
    was_training = model.training
    model.eval()
    amp_dtype = _amp_dtype(settings, device)
    scores = []
    for path in val_items:
        case = load_preprocessed(Path(path))
        image = torch.as_tensor(case.image, dtype=torch.float32)
        label = torch.as_tensor(case.label[0] > 0)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            prob = sliding_window_probability(model, image, settings.patch_size, settings.val_overlap,
                                              device=device).cpu()
        pred = prob >= FOREGROUND_THRESHOLD
        denom = int(pred.sum() + label.sum())
        scores.append(1.0 if denom == 0 else 2.0 * float((pred & label).sum()) / denom)
    model.train(was_training)
    return float(np.mean(scores))


def _amp_dtype(settings: TrainSettings, device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (CUDA, or a CPU with AVX512-BF16 / AMX), fp16 on
    older GPUs, else None (fp32)."""
    if not settings.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_supported() else None


def _selection(settings: TrainSettings, n_val: int) -> str:
    """How ``fit`` chooses best.pt: by validation Dice only when asked to and with enough cases."""
    if settings.checkpoint == "last":
        return "last step's weights (checkpoint = last)"
    if n_val < settings.min_val_cases:
        return (f"last step's weights: {n_val} validation case(s), fewer than the {settings.min_val_cases} "
                "a best step is chosen by")
    return "best validation Dice"


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                           nesterov=settings.nesterov, weight_decay=settings.weight_decay)


def _save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _rng_state() -> dict:
    """Global random states, as plain types and tensors (``last.pt`` is read with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.as_tensor(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fit_digest(train_items: Sequence[Path], val_items: Sequence[Path], settings: TrainSettings,
               init_weights: Path | None = None, item_weights: Sequence[float] | None = None,
               pseudo: Sequence[bool] | None = None) -> str:
    """The reuse and resume key of a training run: the settings, the content of every training and
    validation item (the preprocessing cache names its files by content), the loss weights, which
    items are pseudo-labelled, and the content of the initial weights. Any change gives a new key,
    and the run starts again."""
    payload = {
        "settings": settings.model_dump(mode="json"),
        "train": [Path(p).name for p in train_items],
        "val": [Path(p).name for p in val_items],
        "weights": None if item_weights is None else [round(float(w), 6) for w in item_weights],
        "init": _file_sha256(Path(init_weights)) if init_weights else None,
    }
    if pseudo is not None and any(pseudo):
        payload["pseudo"] = [bool(f) for f in pseudo]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _finished(out_dir: Path, digest: str) -> FitResult | None:
    """The result of a member already trained in ``out_dir`` on the same inputs (``digest``); a
    result of other inputs is removed."""
    done_file = out_dir / "result.json"
    if not done_file.exists():
        return None
    done = json.loads(done_file.read_text())
    if done.get("digest") != digest:
        done_file.unlink()
        return None
    log.info("%s: already trained (best Dice %.4f at step %d)", out_dir.name, done["best_dice"], done["best_step"])
    return FitResult(**{k: v for k, v in done.items() if k != "digest"} | {"best_checkpoint": out_dir / "best.pt"})


@dataclass
class _Run:
    """One fit in progress: the network, its optimiser and loss scaler, and where it stands."""

    out_dir: Path
    digest: str
    cfg: dict
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    step: int = 0
    best_dice: float = -math.inf
    best_step: int = -1
    history: list = field(default_factory=list)

    def save_last(self) -> None:
        """``last.pt``: everything needed to resume exactly here."""
        _save_atomic({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                      "scaler": self.scaler.state_dict(), "step": self.step, "best_dice": self.best_dice,
                      "best_step": self.best_step, "history": self.history, "rng": _rng_state(),
                      "digest": self.digest}, self.out_dir / "last.pt")

    def resume(self) -> None:
        """Continue from ``last.pt`` when it was written for the same inputs (``digest``)."""
        last = self.out_dir / "last.pt"
        if not last.exists():
            return
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # a planted or damaged file is never executed, only refused
            raise ValueError(f"{last} is not a resumable checkpoint ({type(e).__name__}); delete it to start "
                             "this member again") from None
        if state.get("digest") != self.digest:
            log.warning("%s: last.pt was written for other inputs or settings; starting again", self.out_dir.name)
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_dice, self.best_step = state["step"], state["best_dice"], state["best_step"]
        self.history = state["history"]
        _set_rng_state(state["rng"])
        log.info("%s: resuming at step %d (best Dice %.4f)", self.out_dir.name, self.step, self.best_dice)


def _start(out_dir: Path, digest: str, settings: TrainSettings, init_weights: Path | None,
           device: torch.device) -> _Run:
    """A seeded network (from ``init_weights`` when given), its optimiser, resumed where a killed
    fit left it."""
    set_determinism(seed=settings.seed)
    cfg = model_config(settings.model, **settings.model_overrides)
    model = build_from_config(cfg).to(device)
    if init_weights:
        ck = torch.load(init_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["state_dict"])
        log.info("%s: fine-tuning from %s", out_dir.name, init_weights)
    opt = _optimizer(model, settings)
    amp_dtype = _amp_dtype(settings, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    run = _Run(out_dir, digest, cfg, model, opt, scaler, amp_dtype)
    run.resume()
    return run


def _train_step(run: _Run, forward, batch: dict, settings: TrainSettings, loss_fn, device: torch.device
                ) -> tuple[float, float]:
    """One optimiser step on ``batch`` (pseudo-labels' loss ramped in); returns (loss, learning rate)."""
    lr = lr_at(run.step, settings)
    for group in run.opt.param_groups:
        group["lr"] = lr
    # plain tensors: MONAI's MetaTensor dispatches every operation through Python, and torch.compile refuses it
    image, label = (torch.as_tensor(batch[k]).as_subclass(torch.Tensor).to(device) for k in ("image", "label"))
    run.opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        out = forward(image)
    weight = batch["weight"].to(device)
    ramp = pseudo_ramp(run.step, settings)
    if ramp < 1.0:
        is_pseudo = batch["pseudo"].to(device) > 0
        weight = torch.where(is_pseudo, weight * ramp, weight)
    loss = deep_supervision_loss(out, label, loss_fn, weight)
    run.scaler.scale(loss).backward()
    if settings.grad_clip:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.step += 1
    return float(loss.detach()), lr


def _validate(run: _Run, val_items: Sequence[Path], settings: TrainSettings, device: torch.device, selection: str,
              cb: TrainCallbacks, meta: dict | None) -> None:
    """Validate; keep ``best.pt`` when the weights are the best so far (by ``selection``), then
    ``last.pt``."""
    dice = validate(run.model, val_items, settings, device)
    # without validation cases worth choosing by, the latest weights are the best we know
    improved = selection != "best validation Dice" or math.isnan(dice) or dice > run.best_dice
    if improved:
        run.best_dice, run.best_step = dice, run.step
        _save_atomic({"model_name": settings.model, "model_config": json.dumps(run.cfg),
                      "state_dict": run.model.state_dict(), "patch_size": list(settings.patch_size),
                      "val_dice": dice, "step": run.step, **(meta or {})}, run.out_dir / "best.pt")
    run.history.append({"step": run.step, "val/dice": dice})
    log.info("%s: step %d validation Dice %.4f%s", run.out_dir.name, run.step, dice, " (best)" if improved else "")
    if cb.on_validation:
        cb.on_validation(run.step, dice, improved)
    run.save_last()
    if cb.on_checkpoint:
        cb.on_checkpoint(run.out_dir / "last.pt")


class _LossWindow:
    """The training loss and seconds per step since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.loss, self.n = time.perf_counter(), 0.0, 0

    def add(self, loss: float) -> None:
        self.loss, self.n = self.loss + loss, self.n + 1

    def report(self, run: _Run, lr: float, settings: TrainSettings, cb: TrainCallbacks) -> None:
        sec = (time.perf_counter() - self.t) / self.n
        metrics = {"train/loss": self.loss / self.n, "train/lr": lr, "train/sec_per_step": sec}
        run.history.append({"step": run.step, **metrics})
        log.info("%s: step %d/%d loss %.4f lr %.2e (%.2f s/step, about %.1f min left)", run.out_dir.name, run.step,
                 settings.max_steps, metrics["train/loss"], lr, sec, sec * (settings.max_steps - run.step) / 60)
        if cb.on_log:
            cb.on_log(run.step, metrics)
        self.reset()


def fit(
    train_items: Sequence[Path],
    val_items: Sequence[Path],
    settings: TrainSettings,
    out_dir: Path,
    init_weights: Path | None = None,
    callbacks: TrainCallbacks | None = None,
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
    item_weights: Sequence[float] | None = None,
    pseudo: Sequence[bool] | None = None,
) -> FitResult:
    """Train one network; idempotent and resumable in ``out_dir``.

    Writes ``last.pt`` (everything needed to resume) every ``val_every`` steps, ``best.pt`` (a
    member checkpoint: configuration + weights, see ``viola_models.inference.ensemble.load_member``) whenever
    the validation Dice improves, and ``result.json`` when done; a finished ``out_dir`` with the
    same :func:`fit_digest` returns its result without training, and a killed one resumes exactly
    where ``last.pt`` left it (batches and augmentations are a function of the step). ``init_weights``
    (a member checkpoint) starts fine-tuning from another network's weights; ``item_weights``
    scales each training item's loss; ``pseudo`` marks the pseudo-labelled items (their batch
    share, augmentation and loss ramp: ``TrainSettings.pseudo_*``). ``meta`` is stored in ``best.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cb = callbacks or TrainCallbacks()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    digest = fit_digest(train_items, val_items, settings, init_weights, item_weights, pseudo)
    done = _finished(out_dir, digest)
    if done is not None:
        return done
    run = _start(out_dir, digest, settings, init_weights, device)
    resumed_from = run.step
    loader = make_loaders(train_items, settings, item_weights=item_weights, start_step=resumed_from, pseudo=pseudo)
    selection = _selection(settings, len(val_items))
    if "validation case(s)" in selection:  # a fallback, not a choice: the user should know
        log.warning("%s: best.pt holds the %s", out_dir.name, selection)
    batches, started, window = iter(loader), time.perf_counter(), _LossWindow()
    log.info("%s: %s (%s parameters), %d training / %d validation cases, %d steps on %s%s", out_dir.name,
             settings.model, f"{count_parameters(run.model):,}", len(train_items), len(val_items), settings.max_steps,
             device, f", resuming after step {resumed_from}" if resumed_from else "")
    loss_fn = DiceFocalIgnoring()
    run.model.train()
    forward = run.model if settings.compile == "off" else torch.compile(run.model, mode=settings.compile)
    while run.step < settings.max_steps:
        loss, lr = _train_step(run, forward, next(batches), settings, loss_fn, device)
        window.add(loss)
        if run.step % settings.log_every == 0 or run.step == settings.max_steps:
            window.report(run, lr, settings, cb)
        if run.step % settings.val_every == 0 or run.step == settings.max_steps:
            _validate(run, val_items, settings, device, selection, cb, meta)
    result = FitResult(best_dice=run.best_dice, best_step=run.best_step, steps=run.step,
                       best_checkpoint=out_dir / "best.pt", seconds=time.perf_counter() - started,
                       resumed_from=resumed_from, history=run.history, selection=selection)
    text = json.dumps(result.to_json() | {"digest": digest}, indent=1)
    atomic_write(out_dir / "result.json", lambda tmp: tmp.write_text(text))
    return result
