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

import pandas as pd

from ..engine.paired import paired_differences, verdict  # the engine's paired comparison

__all__ = ["bin_gains", "capped_fits", "curves", "findings", "paired_differences", "per_method", "verdict"]

#: Columns summarised per method (those present).
SUMMARY_COLUMNS = ("kl_id", "kl_oos", "scale_ratio", "truth_shift_oos", "fit_best_pass", "fit_passes_run",
                   "fit_stopped_early", "fit_hit_cap", "fit_eq_fallback_fraction")


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
