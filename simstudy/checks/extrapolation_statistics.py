"""The statistics of the extrapolation check from its tidy table (DESIGN §6.7, MCSE as in DESIGN §7).

For method M and reference R in design D, the paired differences
d_r = KL(M, r) - KL(R, r) over the replicates r where both fits are ok: mean,
MCSE = sd / sqrt(n_pairs), 95 % interval mean +- t_{n-1, 0.975} MCSE
(:func:`paired_differences`). :func:`findings` joins the OOS and ID differences, adds the
ID margin and the verdicts; :func:`curves` is the extrapolation curve (mean OOS KL by
distance bin), :func:`bin_gains` the paired difference bin by bin, :func:`per_method`
the mean metrics of each method with their MCSE.

The table is the engine's (``replicate``, ``method``, ``status`` and the metric columns;
``design`` is the grouping column).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["bin_gains", "capped_fits", "curves", "findings", "paired_differences", "per_method", "verdict"]

#: Columns summarised per method (those present).
SUMMARY_COLUMNS = ("kl_id", "kl_oos", "scale_ratio", "truth_shift_oos", "fit_best_pass", "fit_passes_run",
                   "fit_stopped_early", "fit_hit_cap", "fit_eq_fallback_fraction")


def paired_differences(table: pd.DataFrame, *, metric: str, pairs: list[tuple[str, str]], by: str = "design",
                       level: float = 0.95) -> pd.DataFrame:
    """Paired differences ``metric(method) - metric(reference)`` per ``by`` group.

    ``table`` is the engine's tidy table (``replicate``, ``method``, ``status``,
    ``metric`` and the ``by`` column). Pairs are the replicates where both rows are
    ok. Columns: by, method, reference, metric, pairs, mean_method, mean_reference,
    difference, mcse (sd / sqrt(pairs)), ci_low, ci_high (t_{pairs-1} quantile),
    infinite (pairs with an infinite value: the difference is then +-inf and the
    interval undefined).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid; allowed: a number in (0, 1)")
    ok = table[table["status"] == "ok"]
    rows = []
    for group, sub in ok.groupby(by, sort=False):
        wide = sub.pivot_table(index="replicate", columns="method", values=metric, aggfunc="first")
        for method, reference in pairs:
            if method not in wide or reference not in wide:
                continue
            both = wide[[method, reference]].dropna()
            a, b = both[method].to_numpy(float), both[reference].to_numpy(float)
            d = a - b
            n = len(d)
            infinite = int((~np.isfinite(a) | ~np.isfinite(b)).sum())
            row = {by: group, "method": method, "reference": reference, "metric": metric, "pairs": n,
                   "mean_method": float(a.mean()) if n else math.nan,
                   "mean_reference": float(b.mean()) if n else math.nan, "infinite": infinite}
            if n >= 2 and infinite == 0:
                mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
                tq = float(stats.t.ppf(0.5 + level / 2, n - 1))
                row.update(difference=mean, mcse=se, ci_low=mean - tq * se, ci_high=mean + tq * se)
            else:
                mean = float(d.mean()) if n else math.nan
                row.update(difference=mean, mcse=math.nan, ci_low=math.nan, ci_high=math.nan)
            rows.append(row)
    return pd.DataFrame(rows, columns=[by, "method", "reference", "metric", "pairs", "mean_method",
                                       "mean_reference", "difference", "mcse", "ci_low", "ci_high", "infinite"])


def verdict(ci_low: float, ci_high: float) -> str:
    """'beats' (interval below 0), 'worse' (above 0), 'no decisive difference', or 'undefined'."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "undefined"
    if ci_high < 0:
        return "beats"
    if ci_low > 0:
        return "worse"
    return "no decisive difference"


def findings(oos: pd.DataFrame, idd: pd.DataFrame, *, margin_fraction: float, by: str = "design") -> pd.DataFrame:
    """Join the OOS and ID paired differences, add the ID margin and the verdicts."""
    key = [by, "method", "reference"]
    i = idd[key + ["mean_method", "mean_reference", "difference", "mcse", "ci_low", "ci_high"]].rename(
        columns={"mean_method": "id_method", "mean_reference": "id_reference", "difference": "id_difference",
                 "mcse": "id_mcse", "ci_low": "id_ci_low", "ci_high": "id_ci_high"})
    o = oos.rename(columns={"mean_method": "oos_method", "mean_reference": "oos_reference",
                            "difference": "oos_difference", "mcse": "oos_mcse", "ci_low": "oos_ci_low",
                            "ci_high": "oos_ci_high"}).drop(columns=["metric"])
    f = o.merge(i, on=key, how="left")
    f["id_margin"] = margin_fraction * f["id_reference"]
    f["id_within_margin"] = f["id_ci_high"] < f["id_margin"]
    f["oos_verdict"] = [verdict(lo, hi) for lo, hi in zip(f["oos_ci_low"], f["oos_ci_high"])]
    return f


def _bins(table: pd.DataFrame) -> list[int]:
    """The distance bins ``k`` of the table's ``kl_oos_bin<k>`` columns, in order."""
    return sorted(int(c[len("kl_oos_bin"):]) for c in table.columns if c.startswith("kl_oos_bin"))


def curves(table: pd.DataFrame, by: str = "design") -> pd.DataFrame:
    """Extrapolation curves: per design, method and distance bin, the mean OOS KL over
    replicates with its MCSE (sd / sqrt(replicates))."""
    ok = table[table["status"] == "ok"]
    bins = _bins(ok)
    rows = []
    for (group, method), sub in ok.groupby([by, "method"], sort=False):
        for k in bins:
            vals = sub[f"kl_oos_bin{k}"].dropna().to_numpy(float)
            dist = sub[f"distance_bin{k}"].dropna().to_numpy(float)
            if not len(vals):
                continue
            se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
            rows.append({by: group, "method": method, "bin": k, "distance": float(dist.mean()),
                         "replicates": len(vals), "kl_oos": float(vals.mean()), "mcse": se})
    return pd.DataFrame(rows, columns=[by, "method", "bin", "distance", "replicates", "kl_oos", "mcse"])


def bin_gains(table: pd.DataFrame, pair: tuple[str, str], by: str = "design") -> pd.DataFrame:
    """Paired OOS differences of ``pair`` bin by bin (the gain by distance)."""
    frames = []
    for k in _bins(table):
        d = paired_differences(table, metric=f"kl_oos_bin{k}", pairs=[pair], by=by)
        dist = table[table["method"] == pair[1]].groupby(by)[f"distance_bin{k}"].mean()
        d["bin"] = k
        d["distance"] = d[by].map(dist)
        frames.append(d)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def per_method(table: pd.DataFrame) -> pd.DataFrame:
    """Per design and method: replicates, failures, and the mean of each :data:`SUMMARY_COLUMNS`
    metric present with its MCSE (sd / sqrt(replicates)), over the ok rows. For the sgd fits the
    early-stopping statistics: the mean pass of the best validation score and of the stop, and the
    fractions of fits whose early stopping fired (``fit_stopped_early``) or that ran to the budget's end
    (``fit_hit_cap``); for ps-exact (sgd) the mean fraction of datum-visits that fell back to importance
    resampling (``fit_eq_fallback_fraction``)."""
    columns = [c for c in SUMMARY_COLUMNS if c in table]
    grouped = (table[table["status"] == "ok"].groupby(["design", "method"], sort=False)[columns]
               .agg(["mean", "std", "count"]))
    rows = []
    for (design, method), r in grouped.iterrows():
        item = {"design": design, "method": method, "replicates": int(r[("kl_oos", "count")]),
                "failures": int(((table["design"] == design) & (table["method"] == method)
                                 & (table["status"] != "ok")).sum())}
        for col in columns:
            item[col] = float(r[(col, "mean")])
            item[f"{col}_mcse"] = float(r[(col, "std")] / math.sqrt(max(r[(col, "count")], 1)))
        rows.append(item)
    return pd.DataFrame(rows)


def capped_fits(table: pd.DataFrame) -> dict[str, int]:
    """Per method, the fits that ran to the end of their budget before early stopping fired
    (``fit_hit_cap`` = 1; none when the table has no such column)."""
    if "fit_hit_cap" not in table:
        return {}
    return {str(m): int(k) for m, k in table[table["fit_hit_cap"] == 1].groupby("method").size().items()}
