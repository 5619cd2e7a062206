"""data_catalog.selection: calibrated selection of pseudo-labels, its categories, caps and recorded decisions;
viola_models.inference.quality.confidence_scores on hand-made member masks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from data_catalog.selection import Calibration, SelectionRule, fit_calibration, select_pseudo_labels
from viola_models.inference.quality import confidence_scores


def _table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["scan_id", "consensus", "agreement", "volume_cv", "volume_ml"])


def test_an_empty_consensus_never_outranks_a_lesion_the_members_agree_on():
    scores = _table([("empty1", "empty", math.nan, 0.0, 0.0), ("lesion", "lesion", 0.85, 0.1, 5.0),
                     ("weak", "lesion", 0.40, 0.3, 2.0)])
    off = select_pseudo_labels(scores, SelectionRule(min_predicted_dice=0.8)).set_index("scan_id")
    assert off.selected.to_dict() == {"empty1": False, "lesion": True, "weak": False}
    assert off.loc["empty1"].decision == "empty consensus (empty pseudo-labels are off)"
    assert off.loc["weak"].decision == "predicted Dice 0.400 < 0.8"
    # allowed, an empty still comes after every lesion: with max_count 1 the lesion takes the place
    one = select_pseudo_labels(scores, SelectionRule(min_predicted_dice=0.8, allow_empty=True, max_count=1,
                                                     max_empty_fraction=0.5)).set_index("scan_id")
    assert one.selected.to_dict() == {"empty1": False, "lesion": True, "weak": False}


def test_empty_pseudo_labels_are_capped_as_a_fraction_of_the_selected_set():
    rows = [(f"e{i}", "empty", math.nan, 0.0, 0.0) for i in range(5)]
    rows += [(f"l{i}", "lesion", 0.9, 0.1, 4.0) for i in range(3)]
    out = select_pseudo_labels(_table(rows), SelectionRule(allow_empty=True, max_empty_fraction=0.25))
    chosen = out[out.selected]
    # at most 25% of the selected set: 3 lesions allow 1 empty (1/4), not 2 (2/5)
    assert set(chosen.scan_id) == {"l0", "l1", "l2", "e0"}
    assert (out.set_index("scan_id").loc["e1"].decision ==
            "empty consensus beyond the cap (25% of the selected set)")
    # no lesion selected: no empty either (a set of only negatives teaches nothing about blood)
    none = select_pseudo_labels(_table(rows[:5]), SelectionRule(allow_empty=True, max_empty_fraction=0.5))
    assert not none.selected.any()


def test_ties_are_broken_by_score_then_scan_id_and_the_top_fraction_floors():
    rows = [("c", "lesion", 0.9, 0.1, 3.0), ("a", "lesion", 0.9, 0.1, 3.0), ("b", "lesion", 0.95, 0.1, 3.0)]
    # a calibration that saturates: every score >= 0.85 predicts Dice 0.9, so the raw score breaks the tie
    cal = Calibration(score="agreement", kind="isotonic", x=[0.0, 0.85, 1.0], y=[0.0, 0.9, 0.9], n_points=9)
    out = select_pseudo_labels(_table(rows), SelectionRule(top_fraction=0.67), cal).set_index("scan_id")
    assert out.predicted_dice.to_dict() == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.9})
    # floor(0.67 * 3) = 2: b (higher raw score), then a before c by scan id
    assert out.selected.to_dict() == {"a": True, "b": True, "c": False}
    assert out.loc["c"].decision == "reached the target but ranked below the top fraction"
    again = select_pseudo_labels(_table(rows[::-1]), SelectionRule(top_fraction=0.67), cal).set_index("scan_id")
    assert again.selected.to_dict() == out.selected.to_dict()


def test_errors_disputes_and_caps_are_recorded_with_reasons():
    scores = _table([("ok", "lesion", 0.9, 0.05, 5.0), ("spread", "lesion", 0.9, 0.9, 5.0),
                     ("disputed", "disputed", 0.1, 1.5, 0.0), ("broken", "lesion", math.nan, math.nan, math.nan)])
    scores["error"] = ["", "", "", "not gzip"]
    out = select_pseudo_labels(scores, SelectionRule(max_volume_cv=0.5)).set_index("scan_id")
    assert out.selected.to_dict() == {"ok": True, "spread": False, "disputed": False, "broken": False}
    assert out.loc["spread"].decision == "volume CV 0.900 > 0.5"
    assert out.loc["disputed"].decision.startswith("disputed:")
    assert out.loc["broken"].decision == "not predicted: not gzip"
    assert "uncalibrated" in out.loc["ok"].rule and "predicted Dice>=0.8 from agreement" in out.loc["ok"].rule
    with pytest.raises(ValueError, match="lack column"):
        select_pseudo_labels(scores.drop(columns=["volume_cv"]), SelectionRule())
    with pytest.raises(ValueError, match="calibration is for"):
        select_pseudo_labels(scores, SelectionRule(), Calibration(score="union_agreement", kind="identity"))


def test_the_calibration_recovers_a_known_monotone_relation():
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, 200)
    true = np.clip(score**2 + rng.normal(0, 0.03, 200), 0, 1)  # true Dice = score squared, plus noise
    cal = fit_calibration(score, true, "agreement")
    assert cal.kind == "isotonic" and cal.n_points == 200 and cal.spearman > 0.95
    grid = np.linspace(0.1, 0.9, 9)
    assert np.abs(cal.predict(grid) - grid**2).max() < 0.06
    assert np.all(np.diff(cal.predict(np.linspace(0, 1, 50))) >= 0)  # monotone
    assert cal.predict([2.0])[0] == pytest.approx(cal.y[-1]) and cal.y[0] >= 0 and cal.y[-1] <= 1  # flat outside
    assert np.isnan(cal.predict([math.nan])[0])
    assert Calibration.from_dict(cal.to_dict()).predict([0.5]) == pytest.approx(cal.predict([0.5]))
    # a selection at 0.5 predicted Dice keeps scores above sqrt(0.5) ~ 0.71, not the raw score's 0.5
    table = _table([(f"s{i}", "lesion", s, 0.1, 2.0) for i, s in enumerate([0.55, 0.65, 0.75, 0.85])])
    kept = select_pseudo_labels(table, SelectionRule(min_predicted_dice=0.5), cal)
    assert list(kept.scan_id[kept.selected]) == ["s2", "s3"]


def test_the_prior_speaks_only_where_the_points_are_silent():
    # two hard out-of-fold scans and their perturbed copies: low scores, low Dice
    score = [0.0, 0.02, 0.06, 0.22, 0.28, 0.34]
    dice = [0.0, 0.0, 0.09, 0.18, 0.21, 0.21]
    alone = fit_calibration(score, dice, "agreement", prior_weight=0)
    assert alone.predict([0.8])[0] == pytest.approx(0.21)  # flat beyond the last point: nothing reaches 0.8
    cal = fit_calibration(score, dice, "agreement")
    assert cal.predict([0.8, 1.0]).tolist() == pytest.approx([0.8, 1.0])  # the identity where no point is
    assert cal.predict([0.25])[0] == pytest.approx(0.2, abs=0.03)  # the points where they are
    assert cal.n_points == 6 and cal.prior_weight == 2.0 and "prior weight 2" in cal.describe()
    # no point at all: the prior alone is the identity
    assert fit_calibration([], [], "agreement").predict([0.3])[0] == pytest.approx(0.3)
    nothing = fit_calibration([math.nan], [0.5], "agreement", prior_weight=0)
    assert nothing.kind == "identity" and nothing.n_points == 0
    assert nothing.predict([0.3, 1.4]).tolist() == [0.3, 1.0]


def test_confidence_scores_of_hand_made_members():
    probs = torch.zeros(3, 8, 8, 2)
    assert confidence_scores(probs, 0.001)["consensus"] == "empty"
    empty = confidence_scores(probs, 0.001)
    assert math.isnan(empty["agreement"]) and math.isnan(empty["union_agreement"]) and empty["volume_ml"] == 0
    probs[0, :4, :4, 0] = 0.9  # 16 voxels
    probs[1, :4, :4, 0] = 0.9
    probs[2, :2, :4, 0] = 0.6  # 8 voxels inside the others
    s = confidence_scores(probs, 0.001)
    assert s["consensus"] == "lesion" and s["n_members"] == 3
    assert s["agreement"] == pytest.approx((1 + 2 * 8 / 24 * 2) / 3)
    assert s["union_agreement"] == pytest.approx(8 / 16)
    # the ensemble mean is (0.9 + 0.9 + 0.6) / 3 = 0.8 on 8 voxels and 0.6 on the other 8: max(p, 1-p)
    assert s["mean_max_probability"] == pytest.approx((0.8 + 0.6) / 2)
    assert s["volume_ml"] == pytest.approx(16 * 0.001)
    lone = torch.zeros(3, 8, 8, 2)
    lone[0, :2, :2, 0] = 0.9  # one member of three: the ensemble mean 0.3 stays below 0.5
    assert confidence_scores(lone, 0.001)["consensus"] == "disputed"


def test_rank_selection_keeps_the_best_fraction_of_the_lesions_below_the_target_but_above_its_floor():
    rows = [("a", "lesion", 0.9, 0.1, 3.0), ("b", "lesion", 0.55, 0.1, 3.0), ("c", "lesion", 0.5, 0.1, 3.0),
            ("d", "lesion", 0.2, 0.1, 3.0), ("e", "empty", math.nan, 0.0, 0.0), ("f", "disputed", 0.7, 0.1, 0.0)]
    by_target = select_pseudo_labels(_table(rows), SelectionRule(min_predicted_dice=0.8)).set_index("scan_id")
    assert set(by_target.index[by_target.selected]) == {"a"}
    # the best half of the 4 lesion candidates (the empty and the disputed scan are no candidates)
    half = select_pseudo_labels(_table(rows), SelectionRule(min_predicted_dice=0.8, rank_fraction=0.5))
    half = half.set_index("scan_id")
    assert set(half.index[half.selected]) == {"a", "b"}
    assert half.loc["a"].decision == "selected"
    assert half.loc["b"].decision == "selected by rank (best 50% of the lesion candidates)"
    assert half.loc["c"].decision == "predicted Dice 0.500 < 0.8"
    # three quarters would take c too, and d only without a floor
    floor = select_pseudo_labels(_table(rows), SelectionRule(min_predicted_dice=0.8, rank_fraction=1.0,
                                                             rank_floor=0.3)).set_index("scan_id")
    assert set(floor.index[floor.selected]) == {"a", "b", "c"}
    assert "or in the best 100% of the lesion candidates (>=0.3)" in floor.rule.iloc[0]
