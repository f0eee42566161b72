"""Performance summaries: every built-in measure (:mod:`simstudy.engine.measures`, with the formulas of
Morris, White and Crowther 2019) and your own (:mod:`simstudy.engine.user_measures`) over each condition x
method x estimand cell of a results table, as one tidy frame with MCSEs (DESIGN §7).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .measures import (MEASURES, Measure, be_coverage, bias, ci_width, coverage, empse, mae, mean,
                       median_bias, miss_above, miss_below, modse, mse, power, rel_efficiency, relbias, relerr_modse,
                       rmse)
from .tidy import companion_columns
from .user_measures import UserMeasure, cells, check_columns, check_measures

__all__ = ["Measure", "UserMeasure", "mean", "bias", "relbias", "median_bias", "empse", "mse", "rmse", "mae",
           "coverage", "be_coverage", "miss_below", "miss_above", "ci_width", "modse", "relerr_modse",
           "rel_efficiency", "power", "summarise", "user_measures", "MEASURES"]


def user_measures(measures: Mapping | None) -> dict[str, UserMeasure]:
    """Validated user-defined measures, name -> :class:`UserMeasure` (see :mod:`~simstudy.engine.user_measures`)."""
    return check_measures(measures, reserved=MEASURES)


# ------------------------------------------------------------------------------------------------------------
def summarise(table: pd.DataFrame, *, factors: Sequence[str], methods: Sequence[str],
              truths: Sequence[Mapping[str, float]], reference: str | None = None,
              alpha: float = 0.05, measures: Mapping | None = None, seed: int = 0) -> pd.DataFrame:
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
    measures : mapping, optional
        User-defined measures, name -> spec (:class:`UserMeasure`, function,
        import path or table; :mod:`simstudy.engine.user_measures`). Their
        rows follow the built-in ones, with the same columns.
    seed : int
        Root seed of the study: keys the streams of bootstrap MCSEs.

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
    user = user_measures(measures)
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
    if len(table):
        check_columns(user, numeric)
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
                if theta != 0:
                    add(e, "relbias", relbias(t, theta), n)
                add(e, "median_bias", median_bias(t, theta), n)
                add(e, "empse", empse(t), n)
                add(e, "mse", mse(t, theta), n)
                add(e, "rmse", rmse(t, theta), n)
                add(e, "mae", mae(t, theta), n)
                cc = comp[e]
                if "ci_low" in cc and "ci_high" in cc:
                    sub = rows[rows[cc["ci_low"]].notna() & rows[cc["ci_high"]].notna()]
                    if len(sub):
                        lo, hi = sub[cc["ci_low"]].to_numpy(np.float64), sub[cc["ci_high"]].to_numpy(np.float64)
                        add(e, "coverage", coverage(lo, hi, theta), len(sub))
                        add(e, "be_coverage", be_coverage(lo, hi, sub[e].to_numpy(np.float64)), len(sub))
                        add(e, "miss_below", miss_below(lo, theta), len(sub))
                        add(e, "miss_above", miss_above(hi, theta), len(sub))
                        add(e, "ci_width", ci_width(lo, hi), len(sub))
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
            for col, name, value, se, n in cells(user, mt, truths[c], estimands, metrics, seed=seed, condition=c,
                                                 method=m):
                add(col, name, Measure(value, se), n)
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
