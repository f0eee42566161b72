"""Statistics the asymptotic checks share (DESIGN §6.2-§6.6), on a study's tidy table.

* :func:`ok_rows` -- the fits that succeeded;
* :func:`mean_table` -- per method and n: the mean of a metric with its MCSE (an infinite value,
  a fit giving zero mass to a possible token, makes the mean infinite: reported, never dropped);
* :func:`subset_result` -- a :class:`~simstudy.engine.StudyResult` of some rows (for rate fits);
* :func:`asymptotic_start` -- the smallest n from which the constants n E[KL] agree with theory;
* :func:`paired_values` and :func:`paired_ratio` -- two methods on the same replicates, and the
  ratio of their means with its delta-method MCSE.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ..engine import StudyResult

__all__ = ["asymptotic_start", "mean_table", "ok_rows", "paired_ratio", "paired_values", "subset_result"]


def ok_rows(result: StudyResult) -> pd.DataFrame:
    """The rows of ``result`` whose fit succeeded (status "ok")."""
    return result.table[result.table["status"] == "ok"]


def mean_table(result: StudyResult, metric: str) -> pd.DataFrame:
    """Per method and n: mean of ``metric`` with MCSE, replicates used, infinite values, failures."""
    rows = []
    table = result.table
    for (method, n), g in table.groupby(["method", "n"], sort=True):
        ok = g[g["status"] == "ok"]
        v = ok[metric].to_numpy(np.float64) if metric in ok else np.array([])
        finite = np.isfinite(v)
        mean = float(v.mean()) if v.size and finite.all() else (math.inf if v.size else math.nan)
        mcse = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 and finite.all() else math.nan
        rows.append({"method": method, "n": int(n), "mean": mean, "mcse": mcse, "replicates": int(v.size),
                     "infinite": int((~finite).sum()), "failures": int((g["status"] != "ok").sum()),
                     "converged": float(ok["fit_converged"].mean()) if "fit_converged" in ok and len(ok) else math.nan})
    return pd.DataFrame(rows)


def subset_result(result: StudyResult, mask) -> StudyResult:
    """The rows of ``result`` selected by the boolean ``mask``, with the same manifest."""
    return StudyResult(result.table[mask].reset_index(drop=True), manifest=result.manifest)


def asymptotic_start(n: np.ndarray, constant: np.ndarray, mcse: np.ndarray, theory: float,
                     level: float = 0.95) -> float:
    """The smallest n from which the constants at every larger n are jointly consistent with
    ``theory``: sum z^2 <= chi2_{level}(k) over the k levels >= n (nan when none)."""
    order = np.argsort(n)
    n, constant, mcse = np.asarray(n)[order], np.asarray(constant)[order], np.asarray(mcse)[order]
    start = math.nan
    for i in range(len(n) - 1, -1, -1):
        z = (constant[i:] - theory) / mcse[i:]
        if not np.all(np.isfinite(z)) or float(np.sum(z ** 2)) > stats.chi2.ppf(level, len(z)):
            break
        start = float(n[i])
    return start


def paired_ratio(numerator, denominator) -> tuple[float, float]:
    """mean(a) / mean(b) over paired replicates with its delta-method MCSE."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    k = a.size
    if k < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan, math.nan
    ma, mb = a.mean(), b.mean()
    ratio = ma / mb
    cov = np.cov(a, b, ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[1, 1]) / (k * mb ** 2)
    return float(ratio), float(math.sqrt(max(var, 0.0)))


def paired_values(result: StudyResult, metric: str, n: int, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """``metric`` of methods ``a`` and ``b`` at sample size ``n`` on the replicates where both succeeded."""
    ok = ok_rows(result)
    ok = ok[ok["n"] == n]
    wide = ok.pivot(index="replicate", columns="method", values=metric).dropna()
    if a not in wide or b not in wide:
        return np.array([]), np.array([])
    return wide[a].to_numpy(np.float64), wide[b].to_numpy(np.float64)
