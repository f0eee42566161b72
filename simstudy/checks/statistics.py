"""Small statistics shared by the paper checks (DESIGN §6): binomial rates and a log-log slope, with MCSEs.

* :func:`binomial_rate` -- a proportion k / n with its MCSE (Morris et al. 2019, Table 6) and the
  Clopper-Pearson interval (the calibration check's false-alarm rates and power);
* :func:`binomial_excess_pvalue` -- the one-sided exact binomial test of H0: rate <= alpha;
* :func:`loglog_slope` -- weighted least squares of log s on log K with known variances (the
  unbiasedness check's "K x bias roughly constant" for is-K).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

__all__ = ["binomial_excess_pvalue", "binomial_rate", "loglog_slope"]


def binomial_rate(k: int, n: int, level: float = 0.95) -> dict:
    """A proportion k / n with its MCSE sqrt(p (1 - p) / n) (Morris et al. 2019, Table 6) and the
    Clopper-Pearson interval.

    Returns
    -------
    dict with ``rate``, ``mcse``, ``ci_low``, ``ci_high`` (all NaN when n <= 0), ``k`` and ``n``.
    """
    if n <= 0:
        return {"rate": math.nan, "mcse": math.nan, "ci_low": math.nan, "ci_high": math.nan, "k": k, "n": n}
    p = k / n
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(sps.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(sps.beta.ppf(1 - a, k + 1, n - k))
    return {"rate": p, "mcse": math.sqrt(p * (1 - p) / n), "ci_low": low, "ci_high": high, "k": int(k), "n": int(n)}


def binomial_excess_pvalue(k: int, n: int, alpha: float) -> float:
    """One-sided exact binomial test of H0: rate <= alpha against rate > alpha: P(Bin(n, alpha) >= k)."""
    return float(sps.binom.sf(k - 1, n, alpha)) if k > 0 else 1.0


def loglog_slope(K, s, s_mcse) -> dict:
    """Weighted least squares of log s on log K with known variances (delta method: var log s =
    (mcse / s)^2).

    Returns
    -------
    dict with ``slope``, its standard error ``slope_se`` and 95% interval ``slope_low``, ``slope_high``
    (all NaN if there are fewer than two points, any s <= 0 or any MCSE not finite and positive).
    """
    K, s, se = (np.asarray(v, dtype=float) for v in (K, s, s_mcse))  # (n,) each
    if K.size < 2 or np.any(s <= 0) or np.any(~np.isfinite(se)) or np.any(se <= 0):
        return {"slope": math.nan, "slope_se": math.nan, "slope_low": math.nan, "slope_high": math.nan}
    X = np.column_stack([np.ones_like(K), np.log(K)])  # (n, 2)
    W = (s / se) ** 2  # (n,) 1 / var(log s)
    cov = np.linalg.inv(X.T @ (W[:, None] * X))  # (2, 2)
    beta = cov @ X.T @ (W * np.log(s))  # (2,)
    se_slope = float(math.sqrt(cov[1, 1]))
    return {"slope": float(beta[1]), "slope_se": se_slope, "slope_low": float(beta[1] - 1.96 * se_slope),
            "slope_high": float(beta[1] + 1.96 * se_slope)}
