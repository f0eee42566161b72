"""The built-in performance measures, each with its Monte Carlo standard error (DESIGN §7).

Formulas of Morris, White and Crowther (2019), "Using simulation studies to
evaluate statistical methods", Statistics in Medicine 38:2074-2102, Table 6,
and rsimsum (Gasparini 2018) for relbias. With n successful
replicates, estimates t_i of a true value theta, model standard errors s_i,
interval limits (l_i, u_i) and p-values p_i:

==============  =========================================  ==========================================================
measure         estimate                                   Monte Carlo SE
==============  =========================================  ==========================================================
mean            tbar = sum t_i / n                         sqrt(sum (t_i - tbar)^2 / (n (n-1)))
bias            tbar - theta                               same as mean
relbias         (tbar - theta) / theta  (theta != 0)       mcse(bias) / |theta|  (rsimsum's rbias)
median_bias     median(t) - theta                          (t_(n-c+1) - t_(c)) / (2 z), c = round((n+1)/2 - z sqrt(n)/2)
empse           sqrt(sum (t_i - tbar)^2 / (n-1))           empse / sqrt(2 (n-1))
mse             sum (t_i - theta)^2 / n                    sqrt(sum ((t_i - theta)^2 - mse)^2 / (n (n-1)))
rmse            sqrt(mse)                                  mcse(mse) / (2 rmse)  (delta method)
mae             sum |t_i - theta| / n                      sd(|t_i - theta|) / sqrt(n)
coverage        sum 1(l_i <= theta <= u_i) / n             sqrt(cov (1 - cov) / n)
be_coverage     sum 1(l_i <= tbar <= u_i) / n              sqrt(cov (1 - cov) / n)
miss_below      sum 1(theta < l_i) / n                     sqrt(P (1 - P) / n)
miss_above      sum 1(theta > u_i) / n                     sqrt(P (1 - P) / n)
ci_width        sum (u_i - l_i) / n                        sd(u_i - l_i) / sqrt(n)
modse           sqrt(sum s_i^2 / n)                        sqrt(V / (4 n modse^2)), V = sum (s_i^2 - mean s^2)^2 / (n-1)
relerr_modse    modse / empse - 1                          (modse/empse) sqrt(V / (4 n modse^4) + 1 / (2 (n-1)))
rel_efficiency  (empse_ref / empse)^2, paired replicates   2 ratio sqrt((1 - rho^2) / (n-1)),  rho = corr(t_ref, t)
power           sum 1(p_i <= alpha) / n                    sqrt(power (1 - power) / n)
==============  =========================================  ==========================================================

Units: proportions and fractions, never percentages (rsimsum's ``relerror``
is 100 ``relerr_modse``, its relative precision ``relprec`` is
100 (``rel_efficiency`` - 1): above 1 the method is more precise than the
reference). ``median_bias`` uses the order-statistic SE of a median
(McKean and Schrader 1984; no density bandwidth to choose). For proper
intervals ``coverage + miss_below + miss_above = 1``. ``power`` is the
rejection rate of the method's p-value column. Your own measures:
:mod:`simstudy.engine.user_measures`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Measure", "mean", "bias", "relbias", "median_bias", "empse", "mse", "rmse", "mae", "coverage",
           "be_coverage", "miss_below", "miss_above", "ci_width", "modse", "relerr_modse", "rel_efficiency",
           "power", "MEASURES"]

#: Built-in measure names in the order summaries list them (user-defined measures follow).
MEASURES = ("mean", "bias", "relbias", "median_bias", "empse", "mse", "rmse", "mae", "coverage", "be_coverage",
            "miss_below", "miss_above", "ci_width", "modse", "relerr_modse", "rel_efficiency", "power")

NAN = math.nan


class Measure(NamedTuple):
    """A performance measure and its Monte Carlo standard error."""

    value: float
    mcse: float


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def mean(estimates) -> Measure:
    """Mean of a quantity with MCSE sd / sqrt(n)."""
    t = _arr(estimates)
    n = t.size
    if n == 0:
        return Measure(NAN, NAN)
    m = float(t.mean())
    if n < 2 or not np.isfinite(m):
        return Measure(m, NAN)
    return Measure(m, float(np.sqrt(np.sum((t - m) ** 2) / (n * (n - 1)))))


def bias(estimates, truth: float) -> Measure:
    """Bias ``tbar - theta`` with MCSE ``sqrt(sum (t - tbar)^2 / (n (n-1)))``."""
    m = mean(estimates)
    return Measure(m.value - float(truth), m.mcse)


def relbias(estimates, truth: float) -> Measure:
    """Relative bias ``(tbar - theta) / theta`` (a fraction) with MCSE ``mcse(bias) / |theta|``; NaN if theta = 0."""
    theta = float(truth)
    if theta == 0 or not math.isfinite(theta):
        return Measure(NAN, NAN)
    b = bias(estimates, theta)
    return Measure(b.value / theta, b.mcse / abs(theta))


_Z = 1.959963984540054  # standard normal 0.975 quantile


def median_bias(estimates, truth: float) -> Measure:
    """Median bias ``median(t) - theta`` with the order-statistic MCSE of a median.

    MCSE ``(t_(n-c+1) - t_(c)) / (2 z)``, ``c = round((n+1)/2 - z sqrt(n/4))``,
    z = 1.96 (McKean and Schrader 1984): a consistent estimate of
    ``1 / (2 f(median) sqrt(n))``. NaN for n < 3, and when those two order
    statistics tie while the estimates vary (discrete estimates).
    """
    t = np.sort(_arr(estimates))
    n = t.size
    if n == 0:
        return Measure(NAN, NAN)
    value = float(np.median(t)) - float(truth)
    if n < 3:
        return Measure(value, NAN)
    c = min(max(1, math.floor((n + 1) / 2 - _Z * math.sqrt(n / 4) + 0.5)), n // 2)
    width = float(t[n - c] - t[c - 1])
    if not math.isfinite(width) or (width == 0 and t[0] != t[-1]):
        return Measure(value, NAN)
    return Measure(value, width / (2 * _Z))


def empse(estimates) -> Measure:
    """Empirical standard error with MCSE ``empse / sqrt(2 (n-1))``."""
    t = _arr(estimates)
    n = t.size
    if n < 2:
        return Measure(NAN, NAN)
    e = float(np.std(t, ddof=1))
    return Measure(e, e / math.sqrt(2 * (n - 1)))


def mse(estimates, truth: float) -> Measure:
    """Mean squared error with MCSE ``sqrt(sum ((t-theta)^2 - mse)^2 / (n (n-1)))``."""
    t = _arr(estimates)
    n = t.size
    if n == 0:
        return Measure(NAN, NAN)
    sq = (t - float(truth)) ** 2
    m = float(sq.mean())
    if n < 2 or not np.isfinite(m):
        return Measure(m, NAN)
    return Measure(m, float(np.sqrt(np.sum((sq - m) ** 2) / (n * (n - 1)))))


def rmse(estimates, truth: float) -> Measure:
    """Root MSE with delta-method MCSE ``mcse(mse) / (2 rmse)``."""
    m = mse(estimates, truth)
    r = math.sqrt(m.value) if np.isfinite(m.value) else m.value
    se = m.mcse / (2 * r) if r > 0 else NAN
    return Measure(r, se)


def mae(estimates, truth: float) -> Measure:
    """Mean absolute error ``mean |t - theta|`` with MCSE ``sd(|t - theta|) / sqrt(n)``."""
    return mean(np.abs(_arr(estimates) - float(truth)))


def _proportion(hits: np.ndarray) -> Measure:
    n = hits.size
    if n == 0:
        return Measure(NAN, NAN)
    p = float(hits.mean())
    return Measure(p, math.sqrt(p * (1 - p) / n))


def coverage(ci_low, ci_high, truth: float) -> Measure:
    """Coverage ``mean 1(l <= theta <= u)`` with MCSE ``sqrt(cov (1-cov) / n)``."""
    lo, hi = _arr(ci_low), _arr(ci_high)
    return _proportion((lo <= truth) & (truth <= hi))


def be_coverage(ci_low, ci_high, estimates) -> Measure:
    """Bias-eliminated coverage: intervals covering the mean estimate tbar."""
    tbar = float(_arr(estimates).mean()) if _arr(estimates).size else NAN
    return coverage(ci_low, ci_high, tbar)


def miss_below(ci_low, truth: float) -> Measure:
    """Rate ``mean 1(theta < l)`` of intervals wholly above the truth, MCSE ``sqrt(P (1-P) / n)``."""
    return _proportion(float(truth) < _arr(ci_low))


def miss_above(ci_high, truth: float) -> Measure:
    """Rate ``mean 1(theta > u)`` of intervals wholly below the truth, MCSE ``sqrt(P (1-P) / n)``."""
    return _proportion(float(truth) > _arr(ci_high))


def ci_width(ci_low, ci_high) -> Measure:
    """Average interval width ``mean (u - l)`` with MCSE ``sd(u - l) / sqrt(n)``."""
    return mean(_arr(ci_high) - _arr(ci_low))


def modse(se) -> Measure:
    """Average model SE ``sqrt(mean s^2)`` with MCSE ``sqrt(V / (4 n modse^2))``."""
    s2 = _arr(se) ** 2
    n = s2.size
    if n == 0:
        return Measure(NAN, NAN)
    m = math.sqrt(float(s2.mean()))
    if n < 2 or m == 0 or not np.isfinite(m):
        return Measure(m, NAN)
    v = float(np.var(s2, ddof=1))
    return Measure(m, math.sqrt(v / (4 * n * m**2)))


def relerr_modse(se, estimates) -> Measure:
    """Relative error in model SE ``modse/empse - 1`` (a fraction).

    MCSE ``(modse/empse) sqrt(V / (4 n modse^4) + 1 / (2 (n-1)))`` with
    V the variance of the squared model SEs (Morris et al. 2019, Table 6).
    """
    s2 = _arr(se) ** 2
    n = s2.size
    if n < 2:
        return Measure(NAN, NAN)
    ms = math.sqrt(float(s2.mean()))
    es = empse(estimates).value
    if not (es > 0 and ms > 0 and np.isfinite(ms) and np.isfinite(es)):
        return Measure(NAN, NAN)
    v = float(np.var(s2, ddof=1))
    ratio = ms / es
    return Measure(ratio - 1, ratio * math.sqrt(v / (4 * n * ms**4) + 1 / (2 * (n - 1))))


def rel_efficiency(reference_estimates, estimates) -> Measure:
    """Relative efficiency ``(empse_ref / empse)^2`` on paired replicates.

    Parameters
    ----------
    reference_estimates, estimates : array_like, shape (n,)
        Estimates of the reference method and of the method, from the same
        replicates (paired).

    Returns
    -------
    Measure
        Ratio (> 1: more precise than the reference) with MCSE
        ``2 ratio sqrt((1 - rho^2) / (n - 1))``.
    """
    a, b = _arr(reference_estimates), _arr(estimates)
    if a.size != b.size:
        raise ValueError(f"reference_estimates has {a.size} values and estimates {b.size}; allowed: paired "
                         "arrays of equal length")
    n = a.size
    if n < 3:
        return Measure(NAN, NAN)
    if np.array_equal(a, b):
        return Measure(1.0, 0.0)
    va, vb = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    if not (vb > 0 and va > 0):
        return Measure(NAN, NAN)
    ratio = va / vb
    rho = float(np.corrcoef(a, b)[0, 1])
    return Measure(ratio, 2 * ratio * math.sqrt(max(0.0, 1 - rho**2) / (n - 1)))


def power(pvalues, alpha: float = 0.05) -> Measure:
    """Rejection rate ``mean 1(p <= alpha)`` with MCSE ``sqrt(P (1-P) / n)``."""
    return _proportion(_arr(pvalues) <= alpha)
