"""Small generic studies used by the demo, the example TOML files and the engine tests.

They show the three callables a generic study supplies (DESIGN §7, ADEMP):
``generate(cond, rng) -> data``, methods ``fn(data, cond, **params) -> dict``
and ``truth(cond) -> dict``. Nothing here depends on the perturbation domain.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["binomial_data", "binomial_truth", "wald_interval", "wilson_interval", "location_data",
           "location_truth", "mean_t", "median_ci", "trimmed_mean"]


# -- a binomial proportion: Wald against Wilson intervals -----------------------------------------------------
def binomial_data(cond: dict, rng: np.random.Generator) -> np.ndarray:
    """``n`` Bernoulli(``p``) draws. Shape (n,)."""
    return rng.binomial(1, cond["p"], cond["n"])


def binomial_truth(cond: dict) -> dict:
    """The true proportion."""
    return {"estimate": float(cond["p"])}


def wald_interval(data: np.ndarray, cond: dict, level: float = 0.95) -> dict:
    """Sample proportion with the Wald interval ``p +- z sqrt(p (1-p) / n)``."""
    n = len(data)
    p = float(np.mean(data))
    se = math.sqrt(p * (1 - p) / n)
    z = stats.norm.ppf(0.5 + level / 2)
    return {"estimate": p, "se": se, "ci_low": p - z * se, "ci_high": p + z * se}


def wilson_interval(data: np.ndarray, cond: dict, level: float = 0.95) -> dict:
    """Sample proportion with the Wilson score interval (Wilson 1927)."""
    n = len(data)
    p = float(np.mean(data))
    z = stats.norm.ppf(0.5 + level / 2)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return {"estimate": p, "se": math.sqrt(p * (1 - p) / n), "ci_low": centre - half, "ci_high": centre + half}


# -- a location parameter: mean, median and trimmed mean ------------------------------------------------------
_LOCATION = {
    "normal": lambda rng, n: rng.standard_normal(n),
    "t3": lambda rng, n: rng.standard_t(3, n),
    "laplace": lambda rng, n: rng.laplace(0.0, 1.0, n),
}


def location_data(cond: dict, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of a symmetric distribution centred at ``mu`` (default 0).

    ``cond["dist"]`` is ``"normal"`` (default), ``"t3"`` or ``"laplace"``.
    """
    dist = cond.get("dist", "normal")
    if dist not in _LOCATION:
        raise ValueError(f"dist={dist!r} is invalid; allowed: one of {sorted(_LOCATION)}")
    return cond.get("mu", 0.0) + _LOCATION[dist](rng, cond["n"])


def location_truth(cond: dict) -> dict:
    """The centre of symmetry."""
    return {"estimate": float(cond.get("mu", 0.0))}


def mean_t(data: np.ndarray, cond: dict, level: float = 0.95) -> dict:
    """Sample mean with the t interval and the t-test p-value of ``H0: mean = mu``."""
    n = len(data)
    m = float(np.mean(data))
    se = float(np.std(data, ddof=1)) / math.sqrt(n)
    q = stats.t.ppf(0.5 + level / 2, n - 1)
    p = 2 * stats.t.sf(abs(m - cond.get("mu", 0.0)) / se, n - 1)
    return {"estimate": m, "se": se, "ci_low": m - q * se, "ci_high": m + q * se, "pvalue": p}


def median_ci(data: np.ndarray, cond: dict, level: float = 0.95) -> dict:
    """Sample median with the distribution-free order-statistic interval.

    The interval is ``(x_(j), x_(k))`` with j, k from the Binomial(n, 1/2)
    quantiles; ``se`` is its half-width over the normal quantile.
    """
    x = np.sort(data)
    n = len(x)
    j = int(stats.binom.ppf((1 - level) / 2, n, 0.5))
    k = n - j
    lo, hi = x[max(j - 1, 0)], x[min(k, n - 1)]
    z = stats.norm.ppf(0.5 + level / 2)
    return {"estimate": float(np.median(x)), "se": float(hi - lo) / (2 * z), "ci_low": float(lo),
            "ci_high": float(hi)}


def trimmed_mean(data: np.ndarray, cond: dict, proportion: float = 0.1, level: float = 0.95) -> dict:
    """Trimmed mean with the Tukey-McLaughlin (winsorised variance) t interval."""
    x = np.sort(data)
    n = len(x)
    g = int(math.floor(proportion * n))
    est = float(np.mean(x[g:n - g]))
    w = x.copy()
    w[:g], w[n - g:] = x[g], x[n - g - 1]
    se = float(np.std(w, ddof=1)) / ((1 - 2 * g / n) * math.sqrt(n))
    q = stats.t.ppf(0.5 + level / 2, n - 2 * g - 1)
    return {"estimate": est, "se": se, "ci_low": est - q * se, "ci_high": est + q * se}
