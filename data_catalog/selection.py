"""Which pseudo-labels enter training: an auditable, configurable selection rule.

The paper picked the best prediction per scan by hand (section 3.5). Here every candidate carries
confidence scores computed from the ensemble (``viola_models.predict.confidence_scores``), and a
rule made of thresholds and a top fraction decides; each decision is recorded with its reason.
"""

from __future__ import annotations

import math

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SelectionRule", "select_pseudo_labels"]


class SelectionRule(BaseModel):
    """Thresholds on the ensemble's confidence, then the most agreed-upon fraction.

    ``min_agreement``: mean pairwise Dice between members' masks; ``min_mean_probability``: mean
    ensemble probability inside the lesion; ``max_volume_cv``: spread of the members' volumes;
    ``top_fraction``/``max_count``: of the scans passing the thresholds, keep the best by agreement;
    ``allow_empty``: accept scans where every member agrees there is no blood (negative examples).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_agreement: float = Field(0.7, ge=0, le=1)
    min_mean_probability: float = Field(0.6, ge=0, le=1)
    max_volume_cv: float = Field(0.5, ge=0)
    top_fraction: float = Field(1.0, gt=0, le=1)
    max_count: int | None = Field(None, ge=0)
    allow_empty: bool = True

    def describe(self) -> str:
        parts = [f"agreement>={self.min_agreement:g}", f"mean_probability>={self.min_mean_probability:g}",
                 f"volume_cv<={self.max_volume_cv:g}"]
        if self.top_fraction < 1:
            parts.append(f"top {self.top_fraction:.0%} by agreement")
        if self.max_count is not None:
            parts.append(f"at most {self.max_count}")
        if not self.allow_empty:
            parts.append("no empty masks")
        return ", ".join(parts)


def select_pseudo_labels(scores: pd.DataFrame, rule: SelectionRule) -> pd.DataFrame:
    """Add ``selected`` (bool), ``decision`` (why) and ``rule`` columns to per-scan scores.

    ``scores`` needs columns scan_id, agreement, mean_probability, volume_cv, volume_ml. Ties in
    agreement are broken by mean probability, then scan id, so the result is deterministic.
    """
    needed = {"scan_id", "agreement", "mean_probability", "volume_cv", "volume_ml"}
    missing = needed - set(scores.columns)
    if missing:
        raise ValueError(f"scores lack column(s) {sorted(missing)}")
    out = scores.copy()
    reasons = []
    for r in out.itertuples():
        why = []
        if r.agreement < rule.min_agreement:
            why.append(f"agreement {r.agreement:.3f} < {rule.min_agreement:g}")
        if r.mean_probability < rule.min_mean_probability:
            why.append(f"mean probability {r.mean_probability:.3f} < {rule.min_mean_probability:g}")
        if r.volume_cv > rule.max_volume_cv:
            why.append(f"volume CV {r.volume_cv:.3f} > {rule.max_volume_cv:g}")
        if not rule.allow_empty and r.volume_ml == 0:
            why.append("empty mask")
        reasons.append("; ".join(why))
    out["decision"] = reasons
    passing = out[out["decision"] == ""].sort_values(
        ["agreement", "mean_probability", "scan_id"], ascending=[False, False, True]
    )
    # floor, so "top 50%" of 3 keeps 1; but a non-empty pass list always keeps its best
    keep = max(1, math.floor(rule.top_fraction * len(passing) + 1e-9)) if len(passing) else 0
    if rule.max_count is not None:
        keep = min(keep, rule.max_count)
    kept = set(passing["scan_id"].iloc[:keep])
    ranked_out = set(passing["scan_id"].iloc[keep:])
    out["selected"] = out["scan_id"].isin(kept)
    out.loc[out["scan_id"].isin(ranked_out), "decision"] = "passed the thresholds but ranked below the top fraction"
    out.loc[out["selected"], "decision"] = "selected"
    out["rule"] = rule.describe()
    return out
