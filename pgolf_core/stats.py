"""The challenge's record test: is a candidate's mean val_loss at least 0.005 nats below the baseline's, at p < 0.01?

A one-sided Welch t-test (unequal variances) of H0: mean(baseline) - mean(candidate) <= delta against
H1: > delta, over per-seed final losses. The Student t CDF comes from the regularized incomplete beta
function (continued fraction, Numerical Recipes §6.4) with ``math.lgamma``, so no scipy is needed; the
tests pin it against tabulated values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

RECORD_DELTA = 0.005
"""Nats a record must improve on the state of the art (openai/parameter-golf README, Submission Process)."""
RECORD_ALPHA = 0.01


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """Lentz's method for the continued fraction of I_x(a, b)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1)."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var)


@attrs.define(frozen=True)
class WelchResult:
    n_candidate: int
    n_baseline: int
    mean_candidate: float
    mean_baseline: float
    std_candidate: float
    std_baseline: float
    improvement: float  # mean_baseline - mean_candidate (positive: candidate is better)
    delta: float
    t: float
    df: float
    p: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p < self.alpha


def welch_improvement(candidate: Sequence[float], baseline: Sequence[float], delta: float = RECORD_DELTA, alpha: float = RECORD_ALPHA) -> WelchResult:
    """One-sided Welch test that ``baseline - candidate > delta`` (lower loss is better)."""
    if len(candidate) < 2 or len(baseline) < 2:
        raise ValueError(f"need at least 2 runs on each side for a variance, got {len(candidate)} candidate and {len(baseline)} baseline")
    mc, sc = mean_std(candidate)
    mb, sb = mean_std(baseline)
    vc, vb = sc * sc / len(candidate), sb * sb / len(baseline)
    se2 = vc + vb
    improvement = mb - mc
    if se2 == 0.0:  # identical runs on both sides: the difference is exact
        t = math.copysign(math.inf, improvement - delta) if improvement != delta else 0.0
        return WelchResult(len(candidate), len(baseline), mc, mb, sc, sb, improvement, delta, t, math.inf, 0.0 if t > 0 else 1.0, alpha)
    t = (improvement - delta) / math.sqrt(se2)
    df = se2 * se2 / ((vc * vc / (len(candidate) - 1) if vc else 0.0) + (vb * vb / (len(baseline) - 1) if vb else 0.0))
    p = 1.0 - t_cdf(t, df)
    return WelchResult(len(candidate), len(baseline), mc, mb, sc, sb, improvement, delta, t, df, p, alpha)
