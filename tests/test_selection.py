"""data_catalog.selection: the pseudo-label selection rule and its recorded decisions."""

from __future__ import annotations

import pandas as pd
import pytest

from data_catalog.selection import SelectionRule, select_pseudo_labels


def _scores() -> pd.DataFrame:
    return pd.DataFrame({
        "scan_id": ["a", "b", "c", "d", "e", "f"],
        "agreement": [0.95, 0.90, 0.85, 0.40, 0.99, 1.0],
        "mean_probability": [0.9, 0.8, 0.9, 0.9, 0.5, 1.0],
        "volume_cv": [0.05, 0.10, 0.20, 0.1, 0.02, 0.0],
        "volume_ml": [12.0, 3.0, 30.0, 5.0, 8.0, 0.0],
    })


def test_thresholds_then_top_fraction():
    rule = SelectionRule(min_agreement=0.8, min_mean_probability=0.6, max_volume_cv=0.3, top_fraction=0.5)
    out = select_pseudo_labels(_scores(), rule).set_index("scan_id")
    # passing the thresholds: f (1.0), a (0.95), b (0.90), c (0.85); top half by agreement: f, a
    assert out.selected.to_dict() == {"a": True, "b": False, "c": False, "d": False, "e": False, "f": True}
    assert out.loc["b"].decision == "passed the thresholds but ranked below the top fraction"
    assert "agreement 0.400 < 0.8" in out.loc["d"].decision
    assert "mean probability 0.500 < 0.6" in out.loc["e"].decision
    assert out.loc["a"].decision == "selected"
    assert set(out.rule) == {rule.describe()} and "top 50%" in rule.describe()


def test_empty_masks_and_max_count():
    out = select_pseudo_labels(_scores(), SelectionRule(min_agreement=0, min_mean_probability=0, allow_empty=False,
                                                       max_count=2)).set_index("scan_id")
    assert out.loc["f"].decision == "empty mask" and not out.loc["f"].selected
    assert out.selected.sum() == 2 and set(out.index[out.selected]) == {"e", "a"}


def test_nothing_passes_and_bad_input():
    out = select_pseudo_labels(_scores(), SelectionRule(min_agreement=1.01 - 0.01, min_mean_probability=1.0))
    assert out.selected.tolist() == [False, False, False, False, False, True]
    with pytest.raises(ValueError, match="lack column"):
        select_pseudo_labels(_scores().drop(columns=["volume_cv"]), SelectionRule())
