"""The record test's statistics: Student t CDF from the incomplete beta, and the one-sided Welch test."""

from __future__ import annotations

import math

import pytest

from pgolf_core.stats import betainc, mean_std, t_cdf, welch_improvement


@pytest.mark.parametrize(
    "a, b, x, expected",
    [
        (2.0, 3.0, 0.4, 0.5248),  # = sum_{j=2..4} C(4,j) 0.4^j 0.6^(4-j), exactly
        (1.0, 1.0, 0.3, 0.3),  # uniform
        (0.5, 0.5, 0.5, 0.5),  # symmetric
        (0.5, 0.5, 0.3, 2 / math.pi * math.asin(math.sqrt(0.3))),  # arcsine distribution
        (10.0, 0.5, 0.99, 0.6579281751567845),
    ],
)
def test_regularized_incomplete_beta(a, b, x, expected):
    assert betainc(a, b, x) == pytest.approx(expected, abs=1e-13)


@pytest.mark.parametrize(
    "t, df, expected",
    [
        (0.0, 3.0, 0.5),
        (2.0, 5.0, 0.9490302605850709),
        (-1.3, 2.5, 0.15024339463535416),
        (1.0, 1.0, 0.75),  # Cauchy: 1/2 + atan(1)/pi
        (2.763769, 10.0, 0.99),  # the tabulated 99% quantile for 10 degrees of freedom
        (3.2, 7.3, 0.9928801659806709),
        (0.5, 100.0, 0.6909132170845567),
        (-4.0, 3.7, 0.009394455009390571),
    ],
)
def test_student_t_cdf_matches_tables(t, df, expected):
    assert t_cdf(t, df) == pytest.approx(expected, abs=1e-7 if df == 10.0 else 1e-12)


def test_t_cdf_tends_to_the_normal_for_large_df():
    normal = 0.5 * (1 + math.erf(1.96 / math.sqrt(2)))
    assert t_cdf(1.96, 1e7) == pytest.approx(normal, abs=1e-6)


def test_welch_matches_a_worked_example():
    # Three seeds each; reference numbers from an independent Welch implementation.
    r = welch_improvement([1.200, 1.201, 1.199], [1.210, 1.212, 1.209])
    assert r.improvement == pytest.approx(0.0103333333333, abs=1e-12)
    assert r.t == pytest.approx(5.059644256269589, rel=1e-12)
    assert r.df == pytest.approx(3.448275862069029, rel=1e-12)
    assert r.p == pytest.approx(0.005277545585664681, rel=1e-9)
    assert r.significant


def test_a_big_but_noisy_gain_is_not_significant():
    r = welch_improvement([1.18, 1.21, 1.19], [1.20, 1.22, 1.21])
    assert r.improvement > 0.005 and not r.significant and r.p > 0.01


def test_an_improvement_below_the_threshold_is_never_significant():
    r = welch_improvement([1.2000, 1.2001, 1.1999], [1.2040, 1.2041, 1.2039])
    assert r.improvement == pytest.approx(0.004) and r.t < 0 and r.p > 0.5


def test_need_two_runs_per_side():
    with pytest.raises(ValueError, match="at least 2 runs on each side"):
        welch_improvement([1.2], [1.21, 1.22])


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
