"""Performance measures with Monte Carlo standard errors (DESIGN §7).

Formulas of Morris, White and Crowther (2019), "Using simulation studies to
evaluate statistical methods", Statistics in Medicine 38:2074-2102, Table 6.
With n successful replicates, estimates t_i of a true value theta, model
standard errors s_i and interval limits (l_i, u_i):

=====================  ==============================================  ==========================================================
measure                estimate                                        Monte Carlo SE
=====================  ==============================================  ==========================================================
mean                   tbar = sum t_i / n                              sqrt(sum (t_i - tbar)^2 / (n (n-1)))
bias                   tbar - theta                                    same as mean
empse                  sqrt(sum (t_i - tbar)^2 / (n-1))                empse / sqrt(2 (n-1))
mse                    sum (t_i - theta)^2 / n                         sqrt(sum ((t_i - theta)^2 - mse)^2 / (n (n-1)))
rmse                   sqrt(mse)                                       mcse(mse) / (2 rmse)  (delta method)
coverage               sum 1(l_i <= theta <= u_i) / n                  sqrt(cov (1 - cov) / n)
be_coverage            sum 1(l_i <= tbar <= u_i) / n                   sqrt(cov (1 - cov) / n)
modse                  sqrt(sum s_i^2 / n)                             sqrt(V / (4 n modse^2)),  V = sum (s_i^2 - mean s^2)^2 / (n-1)
relerr_modse           modse / empse - 1 (fraction; x100 = Morris %)   (modse/empse) sqrt(V / (4 n modse^4) + 1 / (2 (n-1)))
rel_efficiency         (empse_ref / empse)^2 over paired replicates    2 ratio sqrt((1 - rho^2) / (n-1)),  rho = corr(t_ref, t)
power                  sum 1(p_i <= alpha) / n                         sqrt(power (1 - power) / n)
=====================  ==============================================  ==========================================================

``rel_efficiency`` is Morris's "relative % increase in precision" written as
a ratio (ratio - 1 = the % increase / 100): above 1 the method is more
precise than the reference.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from .tidy import companion_columns

__all__ = ["Measure", "mean", "bias", "empse", "mse", "rmse", "coverage", "be_coverage", "modse",
           "relerr_modse", "rel_efficiency", "power", "summarise", "MEASURES"]

#: Measure names in the order summaries list them.
MEASURES = ("mean", "bias", "empse", "mse", "rmse", "coverage", "be_coverage", "modse", "relerr_modse",
            "rel_efficiency", "power")

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


# ------------------------------------------------------------------------------------------------------------
def summarise(table: pd.DataFrame, *, factors: Sequence[str], methods: Sequence[str],
              truths: Sequence[Mapping[str, float]], reference: str | None = None,
              alpha: float = 0.05) -> pd.DataFrame:
    """Tidy performance summary of a results table.

    Parameters
    ----------
    table : DataFrame
        Results table (:attr:`StudyResult.table`).
    factors : list of str
        Design factor columns.
    methods : list of str
        Methods in order.
    truths : list of dict
        Per condition, estimand -> true value.
    reference : str, optional
        Method against which ``rel_efficiency`` is computed (paired on the
        replicates where both succeeded).
    alpha : float
        Level for ``power`` (estimands with a p-value column).

    Returns
    -------
    DataFrame
        Columns ``condition``, factors, ``method``, ``estimand``, ``measure``,
        ``value``, ``mcse``, ``n_used`` (replicates used: those with status
        ``"ok"`` and the estimand present), ``failures`` (rows of that
        condition and method whose status is not ``"ok"``). Estimands with a
        truth get every applicable measure of :data:`MEASURES`; any other
        numeric column gets ``mean``. A method whose ok rows return a value
        in some replicates and not in others is never dropped silently: the
        column ``missing`` (after ``failures``, present when any count is
        above 0) counts the ok rows of that condition and method that lack
        a value the measure needs (``n_used + missing`` = the ok rows).
        The ``warnings`` count of the table is not a metric.
    """

    if reference is not None and reference not in methods:
        raise ValueError(f"reference={reference!r} is invalid; allowed: one of {list(methods)}")
    fixed = {"condition", "replicate", "method", "status", "message", "warnings", "warning_message", *factors}
    numeric = [c for c in table.columns if c not in fixed and pd.api.types.is_numeric_dtype(table[c])]
    estimands: list[str] = []
    for t in truths:
        for k in t:
            if k not in estimands:
                estimands.append(k)
    estimands = [e for e in estimands if e in numeric]
    comp = {e: companion_columns(e, numeric, len(estimands)) for e in estimands}
    helpers = {c for e in estimands for c in comp[e].values()}
    metrics = [c for c in numeric if c not in estimands and c not in helpers]
    out: list[dict] = []
    for c, ctab in table.groupby("condition", sort=True):
        c = int(c)
        base = {f: ctab[f].iloc[0] for f in factors}
        ok = ctab[ctab["status"] == "ok"]
        by_method = {m: ok[ok["method"] == m] for m in methods}
        fails = {m: int(((ctab["method"] == m) & (ctab["status"] != "ok")).sum()) for m in methods}
        for m in methods:
            mt = by_method[m]
            if not len(mt) and not fails[m] and not (ctab["method"] == m).any():
                continue

            def add(estimand, measure, meas, n, missing=None):
                out.append({"condition": c, **base, "method": m, "estimand": estimand, "measure": measure,
                            "value": meas.value, "mcse": meas.mcse, "n_used": int(n), "failures": fails[m],
                            "missing": int(len(mt) - n if missing is None else missing)})

            for e in estimands:
                if e not in truths[c]:
                    continue
                theta = truths[c][e]
                rows = mt[mt[e].notna()]
                t = rows[e].to_numpy(np.float64)
                n = t.size
                if n == 0:
                    continue
                add(e, "mean", mean(t), n)
                add(e, "bias", bias(t, theta), n)
                add(e, "empse", empse(t), n)
                add(e, "mse", mse(t, theta), n)
                add(e, "rmse", rmse(t, theta), n)
                cc = comp[e]
                if "ci_low" in cc and "ci_high" in cc:
                    sub = rows[rows[cc["ci_low"]].notna() & rows[cc["ci_high"]].notna()]
                    if len(sub):
                        lo, hi = sub[cc["ci_low"]].to_numpy(np.float64), sub[cc["ci_high"]].to_numpy(np.float64)
                        add(e, "coverage", coverage(lo, hi, theta), len(sub))
                        add(e, "be_coverage", be_coverage(lo, hi, sub[e].to_numpy(np.float64)), len(sub))
                if "se" in cc:
                    sub = rows[rows[cc["se"]].notna()]
                    if len(sub):
                        s = sub[cc["se"]].to_numpy(np.float64)
                        add(e, "modse", modse(s), len(sub))
                        add(e, "relerr_modse", relerr_modse(s, sub[e].to_numpy(np.float64)), len(sub))
                if reference is not None:
                    ref = by_method[reference]
                    ref = ref[ref[e].notna()][["replicate", e]]
                    pair = rows[["replicate", e]].merge(ref, on="replicate", suffixes=("", "_ref"))
                    if len(pair):
                        add(e, "rel_efficiency", rel_efficiency(pair[f"{e}_ref"].to_numpy(np.float64),
                                                                pair[e].to_numpy(np.float64)), len(pair),
                            len(mt) - len(rows))
                if "pvalue" in cc:
                    pv = rows[cc["pvalue"]].dropna().to_numpy(np.float64)
                    if pv.size:
                        add(e, "power", power(pv, alpha), pv.size)
            for col in metrics:
                x = mt[col].dropna().to_numpy(np.float64)
                if x.size:
                    add(col, "mean", mean(x), x.size)
    columns = ["condition", *factors, "method", "estimand", "measure", "value", "mcse", "n_used", "failures"]
    frame = pd.DataFrame(out, columns=columns + ["missing"])
    note = ("measures use replicates with status 'ok' (column n_used); column failures counts the other rows of "
            "each condition and method")
    if len(frame) and (frame["missing"] > 0).any():
        note += "; column missing counts ok rows that did not return the value"
    else:
        frame = frame[columns]
    frame.attrs["note"] = note
    return frame
