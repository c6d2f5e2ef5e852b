"""The protocol's shared measures (v2): the paired comparison and its CI rebuilt by hand for every statement
and outcome, best LR, divergence, LR sensitivity, verdicts."""

import math

import pytest

from lecture3.experiment import stats

T_975_3 = 3.182  # Student's t, 0.975 quantile, 3 degrees of freedom (n = 4 seeds), from the table
B = {0: 3.00, 1: 3.10, 2: 2.90, 3: 3.00}  # mean(B) = 3.0: the default margin m = 1% = 0.03
SPREAD = (-0.01, -0.01, 0.01, 0.01)  # d_s = d + spread: sd = sqrt(4 · 0.01² / 3), SE = sd / 2


def _by_hand(diffs):
    """d, SE and the 95% CI of per-seed differences, written out."""
    n = len(diffs)
    d = sum(diffs) / n
    sd = math.sqrt(sum((x - d) ** 2 for x in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    return d, se, (d - T_975_3 * se, d + T_975_3 * se)


# (statement, mean difference d, outcome): with SE = 0.00577 the CI is d ± 0.0184
CASES = [
    ("better", -0.03, "pass"),  # CI [-0.048, -0.012]: CI_high < 0
    ("better", +0.02, "fail"),  # CI [+0.002, +0.038]: CI_low >= 0
    ("better", -0.01, "inconclusive"),  # CI [-0.028, +0.008]
    ("equivalent", 0.00, "pass"),  # CI [-0.018, +0.018] inside (-0.03, 0.03)
    ("equivalent", 0.06, "fail"),  # CI_low +0.042 > m
    ("equivalent", -0.06, "fail"),  # CI_high -0.042 < -m
    ("equivalent", 0.02, "inconclusive"),  # CI [+0.002, +0.038] straddles m
    ("not_worse", 0.00, "pass"),  # CI_high +0.018 < m
    ("not_worse", 0.06, "fail"),  # CI_low +0.042 > m
    ("not_worse", 0.02, "inconclusive"),
    ("worse", 0.06, "pass"),  # CI_low +0.042 > m
    ("worse", 0.00, "fail"),  # CI_high +0.018 < m
    ("worse", 0.02, "inconclusive"),
]


def test_the_t_quantile_is_the_tables():
    assert stats.t_quantile(4) == pytest.approx(T_975_3, abs=5e-4)


@pytest.mark.parametrize("kind, d, outcome", CASES)
def test_a_comparison_is_its_ci_rebuilt_by_hand(kind, d, outcome):
    a = {s: B[s] + d + SPREAD[s] for s in B}
    p = stats.paired(a, B, kind)
    d_hand, se_hand, (lo, hi) = _by_hand([a[s] - B[s] for s in sorted(B)])
    assert p.d == pytest.approx(d_hand, abs=1e-12) and p.se == pytest.approx(se_hand, abs=1e-12)
    assert p.ci == pytest.approx((lo, hi), abs=1e-5)  # 3.182 is the table's rounding of 3.18245
    assert p.margin == pytest.approx(0.0 if kind == "better" else 0.03)
    assert p.relative == pytest.approx(d_hand / 3.0)
    assert p.outcome == outcome
    text = str(p)
    assert f"{p.d:+.4f}" in text and f"{lo:+.4f}" in text and text.endswith(f": {outcome}")
    assert f"relative {100 * d_hand / 3.0:+.2f}%" in text


def test_a_stated_margin_and_a_per_seed_quantity_follow_the_same_rules():
    diffs = {s: 0.015 + SPREAD[s] for s in B}  # CI [-0.003, +0.033]
    assert stats.of_diffs(diffs, "not_worse", margin=0.02).outcome == "inconclusive"
    assert stats.of_diffs(diffs, "not_worse", margin=0.04).outcome == "pass"
    assert math.isnan(stats.of_diffs(diffs, "better").relative)
    a = {s: B[s] + diffs[s] for s in B}
    assert stats.paired(a, B, "not_worse", margin=0.04).outcome == "pass"
    assert stats.paired(a, B, "not_worse", margin_fraction=0.02).margin == pytest.approx(0.06)


def test_a_comparison_needs_the_same_seeds_and_two_of_them():
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0}, "better")
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.paired({0: 1.0}, {0: 1.0}, "better")
    with pytest.raises(ValueError, match="kind"):
        stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, "smaller")


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


@pytest.mark.parametrize("outcomes, verdict", [
    (["pass", "pass"], "reproduced"),
    (["pass", "fail", "inconclusive"], "partly reproduced"),
    (["fail", "inconclusive"], "not reproduced"),
    (["fail", "fail"], "not reproduced"),
    (["pass", "inconclusive"], "inconclusive"),
    (["inconclusive"], "inconclusive"),
    (["pass", None], "incomplete"),
    ([], "incomplete"),
])
def test_verdict(outcomes, verdict):
    assert stats.verdict(outcomes) == verdict


def test_a_verdict_refuses_an_outcome_it_does_not_know():
    with pytest.raises(ValueError, match="'passed' is invalid"):
        stats.verdict(["pass", "passed"])


@pytest.mark.parametrize(("outs", "each", "some"), [
    (("pass", "pass"), "pass", "pass"), (("pass", "fail"), "fail", "pass"), (("fail", "fail"), "fail", "fail"),
    (("pass", "inconclusive"), "inconclusive", "pass"), (("fail", "inconclusive"), "fail", "inconclusive"),
    (("inconclusive", "inconclusive"), "inconclusive", "inconclusive"), (("pass", None), None, None),
])
def test_each_of_and_some_of_combine_outcomes(outs, each, some):
    from lecture3.experiment import judge

    parts = [(o, f"part {i}", ()) for i, o in enumerate(outs)]
    assert judge.all_of(parts)[0] == each and judge.any_of(parts)[0] == some
    assert judge.all_of(parts)[1] == "part 0; part 1"
