"""Which pseudo-labels enter training: a calibrated, auditable selection rule.

The paper picked the best prediction per scan by hand (section 3.5). Here the ensemble scores
every candidate (``viola_models.inference.quality.confidence_scores``), a calibration learnt where the
truth is known (the members' out-of-fold predictions of labelled scans) turns the score into a
predicted Dice, and the rule keeps the pseudo-labels whose predicted Dice reaches a target
quality. Every decision is recorded with its reason.

Empty consensus (no member finds blood) is its own category: it has no score, is never ranked
above a lesion the members agree on, is off by default and, when allowed, capped as a fraction
of the selected set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Calibration", "SelectionRule", "fit_calibration", "select_pseudo_labels"]

ScoreName = Literal["agreement", "union_agreement", "mean_max_probability"]


@dataclass
class Calibration:
    """A monotone map from a confidence score to the expected Dice of the ensemble's mask.

    ``x``/``y``: the knots of a non-decreasing piecewise-linear curve (isotonic regression of the
    true Dice on the score, see :func:`fit_calibration`); outside the knots the curve is flat.
    ``kind`` is ``"isotonic"``, or ``"identity"`` when there was nothing to fit (the score itself is
    then taken as the predicted Dice, and the rule says so). ``spearman``: rank correlation of
    score and true Dice over the ``n_points`` out-of-fold points; ``prior_weight``: see the fit.
    """

    score: str
    kind: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    n_points: int = 0
    spearman: float = float("nan")
    prior_weight: float = 0.0

    def predict(self, scores: Sequence[float] | np.ndarray | float) -> np.ndarray:
        """Predicted Dice for each score; NaN stays NaN."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "identity" or not self.x:
            return np.clip(s, 0.0, 1.0)
        out = np.interp(s, self.x, self.y)
        return np.where(np.isnan(s), np.nan, out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**{k: data[k] for k in ("score", "kind", "x", "y", "n_points", "spearman", "prior_weight")
                      if k in data})

    def describe(self) -> str:
        if self.kind == "identity":
            return f"{self.score} taken as Dice (uncalibrated: {self.n_points} point(s))"
        prior = f", prior weight {self.prior_weight:g}" if self.prior_weight else ""
        return (f"{self.score} calibrated on {self.n_points} out-of-fold point(s){prior}, "
                f"Spearman {self.spearman:.2f}")


PRIOR_KNOTS = 11  # the prior's pseudo-points: scores 0, 0.1, ..., 1 with Dice equal to the score


def fit_calibration(scores: Sequence[float], dice: Sequence[float], score: str, prior_weight: float = 2.0
                    ) -> Calibration:
    """Fit the score -> true Dice relation by isotonic regression (non-decreasing, within [0, 1]).

    The out-of-fold points are joined by a prior: pseudo-points on the identity (Dice = score) at
    scores 0, 0.1, ..., 1, of total weight ``prior_weight`` (each real point weighs 1). Where the
    points are many, they decide; where there are none (a handful of labelled scans rarely spans
    the range of the unlabelled ones), the curve follows the prior instead of staying flat at the
    last point. ``prior_weight = 0`` fits the points alone. Points with a NaN score or Dice are
    ignored; with no point and no prior the result is the identity.
    """
    from scipy.stats import spearmanr
    from sklearn.isotonic import IsotonicRegression

    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(dice, dtype=np.float64)
    ok = ~(np.isnan(s) | np.isnan(d))
    s, d = s[ok], d[ok]
    n = len(s)
    rho = float(spearmanr(s, d).statistic) if n >= 3 and np.ptp(s) > 0 and np.ptp(d) > 0 else float("nan")
    knots = np.linspace(0.0, 1.0, PRIOR_KNOTS) if prior_weight > 0 else np.zeros(0)
    x = np.concatenate([s, knots])
    y = np.concatenate([d, knots])
    w = np.concatenate([np.ones(n), np.full(len(knots), prior_weight / PRIOR_KNOTS)])
    if len(x) < 2 or np.ptp(x) == 0:
        return Calibration(score=score, kind="identity", n_points=n, spearman=rho, prior_weight=prior_weight)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y, sample_weight=w)
    return Calibration(score=score, kind="isotonic", x=[float(v) for v in iso.X_thresholds_],
                       y=[float(v) for v in iso.y_thresholds_], n_points=n, spearman=rho, prior_weight=prior_weight)


class SelectionRule(BaseModel):
    """Keep the pseudo-labels whose predicted Dice reaches a target quality.

    ``score``: the confidence score that is calibrated and ranked; ``min_predicted_dice``: the
    target quality (``"keep pseudo-labels with predicted Dice >= 0.8"``); ``max_volume_cv``:
    optionally refuse scans whose members disagree on the volume; ``top_fraction``/``max_count``:
    of the scans reaching the target, keep the best by predicted Dice; ``allow_empty``: accept
    scans where no member finds blood (negative examples), at most ``max_empty_fraction`` of the
    selected set; ``calibration_prior_weight``: how many out-of-fold points the calibration's prior
    (Dice = score) is worth (see :func:`fit_calibration`); ``rank_fraction``/``rank_floor``: also
    keep the best fraction of the lesion candidates by rank (above a floor), whatever the target.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: ScoreName = "agreement"
    min_predicted_dice: float = Field(0.8, ge=0, le=1)
    max_volume_cv: float | None = Field(None, ge=0)
    top_fraction: float = Field(1.0, gt=0, le=1)
    max_count: int | None = Field(None, ge=0)
    allow_empty: bool = False
    max_empty_fraction: float = Field(0.2, ge=0, lt=1)
    calibration_prior_weight: float = Field(2.0, ge=0)
    # selection by rank as well as by target: the best ``rank_fraction`` of the lesion candidates by
    # predicted Dice are kept even below the target (ST++, CVPR 2022, keeps the most reliable half),
    # but never below ``rank_floor``
    rank_fraction: float = Field(0.0, ge=0, le=1)
    rank_floor: float = Field(0.0, ge=0, le=1)

    def describe(self) -> str:
        parts = [f"predicted Dice>={self.min_predicted_dice:g} from {self.score}"]
        if self.rank_fraction > 0:
            parts[0] += (f" or in the best {self.rank_fraction:.0%} of the lesion candidates"
                         + (f" (>={self.rank_floor:g})" if self.rank_floor > 0 else ""))
        if self.max_volume_cv is not None:
            parts.append(f"volume_cv<={self.max_volume_cv:g}")
        if self.top_fraction < 1:
            parts.append(f"top {self.top_fraction:.0%}")
        if self.max_count is not None:
            parts.append(f"at most {self.max_count}")
        parts.append(f"empty consensus up to {self.max_empty_fraction:.0%}" if self.allow_empty else "no empty masks")
        return ", ".join(parts)


_NEEDED = {"scan_id", "consensus", "volume_cv", "volume_ml"}


def _ranked_in(scores: pd.DataFrame, rule: SelectionRule) -> set[str]:
    """The lesion candidates within the best ``rule.rank_fraction`` by predicted Dice (then score,
    then scan id) whose predicted Dice reaches ``rule.rank_floor``."""
    if rule.rank_fraction <= 0:
        return set()
    lesions = scores[(scores["error"] == "") & (scores["consensus"] == "lesion") & scores["predicted_dice"].notna()]
    n = math.floor(rule.rank_fraction * len(lesions) + 1e-9)
    best = lesions.sort_values(["predicted_dice", rule.score, "scan_id"], ascending=[False, False, True]).iloc[:n]
    return set(best.loc[best["predicted_dice"] >= rule.rank_floor, "scan_id"])


def _why_not(r, rule: SelectionRule, by_rank: set) -> str:
    """Why candidate ``r`` fails the rule on its own ("" when it passes; ranks are decided after)."""
    why = []
    if r.error:
        why.append(f"not predicted: {r.error}")
    elif r.consensus == "empty":
        if not rule.allow_empty:
            why.append("empty consensus (empty pseudo-labels are off)")
    elif r.consensus == "disputed":
        why.append("disputed: some members find blood but the ensemble mask is empty")
    else:
        if not r.predicted_dice >= rule.min_predicted_dice and r.scan_id not in by_rank:  # NaN fails too
            why.append(f"predicted Dice {r.predicted_dice:.3f} < {rule.min_predicted_dice:g}")
        if rule.max_volume_cv is not None and r.volume_cv > rule.max_volume_cv:
            why.append(f"volume CV {r.volume_cv:.3f} > {rule.max_volume_cv:g}")
    return "; ".join(why)


def select_pseudo_labels(scores: pd.DataFrame, rule: SelectionRule, calibration: Calibration | None = None
                         ) -> pd.DataFrame:
    """Add ``predicted_dice``, ``selected`` (bool), ``decision`` (why) and ``rule`` to per-scan scores.

    ``scores`` has one row per candidate with scan_id, consensus, the rule's score column,
    volume_cv and volume_ml; a row with a non-empty ``error`` (a scan that could not be
    predicted) is kept and rejected with that reason. Ranking: predicted Dice, then the raw
    score, then scan id, so the result is deterministic. Empty-consensus scans come after every
    lesion-bearing scan and fill at most ``max_empty_fraction`` of the selected set.
    """
    missing = (_NEEDED | {rule.score}) - set(scores.columns)
    if missing:
        raise ValueError(f"scores lack column(s) {sorted(missing)}")
    calibration = calibration or Calibration(score=rule.score, kind="identity")
    if calibration.score != rule.score:
        raise ValueError(f"calibration is for {calibration.score!r} but the rule ranks by {rule.score!r}")
    out = scores.copy().reset_index(drop=True)
    if "error" not in out:
        out["error"] = ""
    out["error"] = out["error"].fillna("").astype(str)
    out["predicted_dice"] = calibration.predict(pd.to_numeric(out[rule.score], errors="coerce").to_numpy())
    by_rank = _ranked_in(out, rule)
    out["decision"] = [_why_not(r, rule, by_rank) for r in out.itertuples()]
    passing = out[(out["decision"] == "") & (out["consensus"] == "lesion")].sort_values(
        ["predicted_dice", rule.score, "scan_id"], ascending=[False, False, True])
    # floor, so "top 50%" of 3 keeps 1; but a non-empty pass list always keeps its best
    keep = max(1, math.floor(rule.top_fraction * len(passing) + 1e-9)) if len(passing) else 0
    if rule.max_count is not None:
        keep = min(keep, rule.max_count)
    kept = list(passing["scan_id"].iloc[:keep])
    ranked_out = set(passing["scan_id"].iloc[keep:])
    empties = out[(out["decision"] == "") & (out["consensus"] == "empty")].sort_values("scan_id")
    # empties may make up at most max_empty_fraction of the final set: e <= f / (1 - f) * lesions
    n_empty = min(len(empties), math.floor(rule.max_empty_fraction / (1 - rule.max_empty_fraction) * len(kept) + 1e-9))
    if rule.max_count is not None:
        n_empty = min(n_empty, rule.max_count - len(kept))
    kept_empty = set(empties["scan_id"].iloc[:n_empty])
    capped_empty = set(empties["scan_id"].iloc[n_empty:])
    out["selected"] = out["scan_id"].isin(set(kept) | kept_empty)
    out.loc[out["scan_id"].isin(ranked_out), "decision"] = "reached the target but ranked below the top fraction"
    out.loc[out["scan_id"].isin(capped_empty), "decision"] = (
        f"empty consensus beyond the cap ({rule.max_empty_fraction:.0%} of the selected set)")
    out.loc[out["selected"], "decision"] = "selected"
    below = out["selected"] & ~(out["predicted_dice"] >= rule.min_predicted_dice) & out["scan_id"].isin(by_rank)
    out.loc[below, "decision"] = f"selected by rank (best {rule.rank_fraction:.0%} of the lesion candidates)"
    out["rule"] = f"{rule.describe()}; {calibration.describe()}"
    return out
