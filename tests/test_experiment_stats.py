"""The protocol's shared measures: the comparison rule, best LR, divergence, LR sensitivity, verdicts."""

import math

import pytest

from lecture3.experiment import stats


def test_compare_follows_the_protocol_rule():
    a, b = [2.00, 2.01, 1.99], [2.10, 2.11, 2.09]
    c = stats.compare(a, b)
    assert c.delta == pytest.approx(-0.10)
    assert c.se == pytest.approx(math.sqrt(0.0001 / 3 + 0.0001 / 3))
    assert c.verdict == "better"
    assert stats.compare(b, a).verdict == "worse"
    # below the 0.01 floor: equal however small the SE
    assert stats.compare([2.000, 2.000, 2.000], [2.009, 2.009, 2.009]).verdict == "equal"
    # a large SE makes a 0.05 gap equal
    assert stats.compare([2.0, 2.2, 1.8], [2.05, 2.25, 1.85]).verdict == "equal"
    assert stats.compare([2.0], [2.5]).relative == pytest.approx(-0.2)


def test_compare_needs_both_sides():
    with pytest.raises(ValueError, match="both sides"):
        stats.compare([], [1.0])


def test_best_lr_is_the_lowest_mean_and_ties_go_to_the_smaller_lr():
    assert stats.best_lr({1e-3: [3.0, 3.2], 3e-3: [2.9, 3.0], 1e-2: [7.6, 2.0]}) == 3e-3
    assert stats.best_lr({3e-3: [2.0], 1e-3: [2.0]}) == 1e-3


def test_diverged_means_non_finite_or_above_the_initial_loss():
    assert stats.is_diverged([5.0, float("nan")], 7.6)
    assert stats.is_diverged([5.0, 7.7], 7.6)
    assert not stats.is_diverged([5.0, 3.0], 7.6)


def test_lr_sensitivity_counts_a_diverged_run_as_the_initial_loss():
    # L* = 2.0; min(L, L0) - L* = 0, 0.5, 7.6 - 2.0 (diverged) -> mean
    s = stats.lr_sensitivity({1e-3: 2.0, 3e-3: 2.5, 1e-2: None}, initial=7.6)
    assert s == pytest.approx((0 + 0.5 + 5.6) / 3)
    # a loss above L0 is capped at L0
    assert stats.lr_sensitivity({1e-3: 2.0, 1e-2: 9.0}, initial=7.6) == pytest.approx(5.6 / 2)


def test_verdict():
    assert stats.verdict([True, True]) == "reproduced"
    assert stats.verdict([True, False]) == "partly reproduced"
    assert stats.verdict([False, False]) == "not reproduced"
    assert stats.verdict([True, None]) == "incomplete"
