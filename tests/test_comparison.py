"""viola_models.evaluation.scoring.two_level_bootstrap: the interval of a paired difference between two arms
scored on the same test cases over several seeds, on hand-made per-case tables."""

from __future__ import annotations

import numpy as np
import pytest

from viola_models.evaluation.scoring import paired_difference, two_level_bootstrap


def _seeds(effect: float, n_seeds: int = 5, n_cases: int = 64, noise: float = 0.07, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seeds):
        control = rng.uniform(0.3, 0.8, n_cases)  # cases differ far more than the arms do
        out.append((control + effect + rng.normal(0.0, noise, n_cases), control))
    return out


def test_a_known_paired_difference_is_recovered_with_an_interval_that_excludes_zero():
    res = paired_difference(_seeds(0.03), n_boot=2000)
    assert res.estimate == pytest.approx(0.03, abs=0.008)
    assert 0 < res.low < 0.03 < res.high < 0.06
    assert res.n_seeds == 5 and res.n_cases == 320 and res.n_boot == 2000


def test_no_difference_gives_an_interval_around_zero():
    res = paired_difference(_seeds(0.0, seed=1), n_boot=2000)
    assert res.low < 0 < res.high and abs(res.estimate) < 0.01 and res.high - res.low < 0.04


def test_the_pairing_matters_a_shared_case_effect_does_not_widen_the_interval():
    # an unpaired view of the same numbers would see the case spread (sd ~0.14); the paired one only
    # the noise (0.07): its interval is narrow
    res = paired_difference(_seeds(0.0, seed=2), n_boot=2000)
    assert res.high - res.low < 0.1 * 0.5


def test_seeds_are_resampled_too_a_seed_that_disagrees_widens_the_interval():
    steady = _seeds(0.03, seed=3)
    wild = [*steady[:4], (steady[4][1] - 0.1, steady[4][1])]  # one seed where the round loses by 0.1
    a, b = paired_difference(steady, n_boot=2000), paired_difference(wild, n_boot=2000)
    assert b.high - b.low > 2 * (a.high - a.low)
    assert b.estimate < a.estimate - 0.02 and b.low < 0  # one bad seed of five: no longer shown to help


def test_a_ratio_statistic_and_bad_input():
    rng = np.random.default_rng(4)
    tables = []
    for _ in range(5):
        control = rng.uniform(0.3, 0.7, 64)
        tables.append(np.column_stack([control + 0.05 + rng.normal(0, 0.02, 64), control,
                                       control + 0.10 + rng.normal(0, 0.02, 64)]))
    gap = two_level_bootstrap(tables, lambda m: (m[0] - m[1]) / (m[2] - m[1]), n_boot=1000)
    assert gap.estimate == pytest.approx(0.5, abs=0.05) and gap.low < 0.5 < gap.high
    with pytest.raises(ValueError, match="no seed"):
        two_level_bootstrap([np.full((3, 2), np.nan)], lambda m: m[0] - m[1])
    assert "95% CI; 5 seed(s), 320 case(s)" in gap.describe()
