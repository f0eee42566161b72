"""Paired comparisons of methods on the same replicates (DESIGN §7: methods within a replicate see the same data).

For method M, reference R and metric Y, the paired differences d_r = Y(M, r) - Y(R, r)
over the replicates r where both rows are ok: their mean, MCSE = sd / sqrt(n_pairs)
and a t interval mean +- t_{n-1, (1+level)/2} MCSE (:func:`paired_differences`).
:func:`verdict` reads an interval against 0 with a stated direction ("lower is better" by
default: a metric such as a KL divergence or an NLL). :func:`comparison_table` evaluates the
comparisons a study declares (``options["comparisons"]``: a list of ``{method, reference,
metric, lower_is_better, primary}``) per condition, one row each with its verdict, for the
report.

The engine knows nothing of what the metric means: the study states which direction is better
and which comparison is primary, before the run (a pre-registered decision rule).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["COMPARISON_KEYS", "COMPARISON_RULE", "check_comparisons", "comparison_parts", "comparison_sentence",
           "comparison_table", "format_comparisons", "paired_differences", "verdict"]

#: keys of one declared comparison (``[summary] comparisons`` / ``Study(options={"comparisons": [...]})``)
COMPARISON_KEYS = ("method", "reference", "metric", "lower_is_better", "primary", "level")


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


def verdict(ci_low: float, ci_high: float, *, lower_is_better: bool = True) -> str:
    """'beats' (the interval lies on the better side of 0), 'worse' (on the other side), 'no decisive
    difference' (it contains 0), or 'undefined' (no finite interval)."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "undefined"
    below, above = ci_high < 0, ci_low > 0
    if below or above:
        return "beats" if below == lower_is_better else "worse"
    return "no decisive difference"


def check_comparisons(value, methods=None, where: str = "comparisons") -> list[dict]:
    """Declared comparisons, validated: a list of tables with ``method``, ``reference``, ``metric`` (strings),
    optional ``lower_is_better`` (default true), ``primary`` (default false; at most one) and ``level``
    (default 0.95). One-line ValueError naming the key, the value and what is allowed."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, dict) for c in value):
        raise ValueError(f"{where}={value!r} is invalid; allowed: a list of tables {{ method, reference, metric }}")
    out = []
    for i, c in enumerate(value):
        at = f"{where}[{i}]"
        unknown = [k for k in c if k not in COMPARISON_KEYS]
        if unknown:
            raise ValueError(f"{at}.{unknown[0]} is an unknown key; allowed: {', '.join(COMPARISON_KEYS)}")
        for key in ("method", "reference", "metric"):
            if not isinstance(c.get(key), str) or not c.get(key):
                raise ValueError(f"{at}.{key}={c.get(key)!r} is invalid; allowed: a non-empty string")
        if methods is not None:
            for key in ("method", "reference"):
                if c[key] not in methods:
                    raise ValueError(f"{at}.{key}={c[key]!r} is not a method of the study; allowed: one of "
                                     f"{', '.join(methods)}")
        for key in ("lower_is_better", "primary"):
            if key in c and not isinstance(c[key], bool):
                raise ValueError(f"{at}.{key}={c[key]!r} is invalid; allowed: true or false")
        level = c.get("level", 0.95)
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"{at}.level={level!r} is invalid; allowed: a number in (0, 1)")
        out.append({"method": c["method"], "reference": c["reference"], "metric": c["metric"],
                    "lower_is_better": c.get("lower_is_better", True), "primary": c.get("primary", False),
                    "level": float(level)})
    if sum(c["primary"] for c in out) > 1:
        raise ValueError(f"{where} declares {sum(c['primary'] for c in out)} primary comparisons; allowed: at "
                         "most one")
    return out


def comparison_table(result) -> pd.DataFrame:
    """The study's declared comparisons (``result.options["comparisons"]``) per condition: the columns of
    :func:`paired_differences` (``condition`` as the group) plus ``level``, ``lower_is_better``, ``primary``
    and ``verdict``. Empty when the study declares none; a metric the table lacks gives no rows."""
    declared = check_comparisons(result.options.get("comparisons") or [])
    frames = []
    for c in declared:
        if c["metric"] not in result.table:
            continue
        found = paired_differences(result.table, metric=c["metric"], pairs=[(c["method"], c["reference"])],
                                   by="condition", level=c["level"])
        found["level"], found["lower_is_better"], found["primary"] = c["level"], c["lower_is_better"], c["primary"]
        found["verdict"] = [verdict(lo, hi, lower_is_better=c["lower_is_better"])
                            for lo, hi in zip(found["ci_low"], found["ci_high"])]
        frames.append(found)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def comparison_sentence(row) -> str:
    """One comparison as a sentence: ``M - R in Y: d [lo, hi] (level paired t, n pairs): verdict``."""
    interval = (f"[{row['ci_low']:+.4g}, {row['ci_high']:+.4g}]" if math.isfinite(row["ci_low"])
                else "no interval")
    better = "lower" if row["lower_is_better"] else "higher"
    return (f"{row['method']} - {row['reference']} in {row['metric']}: {row['difference']:+.4g} (MCSE "
            f"{row['mcse']:.2g}), {int(round(100 * row['level']))}% paired t interval {interval} over "
            f"{int(row['pairs'])} replicates ({better} is better): {row['verdict']}")


#: how a declared comparison is decided (stated in every report that has one)
COMPARISON_RULE = ("Paired comparisons: per condition, d_r = metric(method, r) - metric(reference, r) over the "
                   "replicates r where both rows are ok; mean, MCSE = sd / sqrt(n) and a t interval with n - 1 "
                   "degrees of freedom. Verdict: 'beats' when the interval lies wholly on the better side of 0, "
                   "'worse' when wholly on the other, else 'no decisive difference'. The comparisons, their "
                   "direction and which one is primary are declared in the study before it runs.")


def _condition_labels(result):
    """condition -> "n=10, p=0.05: " (its varying factors; "" when only one condition varies nothing)."""
    conditions = result.conditions.set_index("condition")
    vary = [f for f in conditions.columns if conditions[f].astype(str).nunique() > 1]
    return lambda c: ", ".join(f"{f}={conditions.loc[c, f]}" for f in vary) + ": " if vary else ""


def comparison_parts(result) -> dict | None:
    """The report's pieces of the declared comparisons: ``rule``, ``primary`` (sentences of the primary
    comparison, one per condition) and ``table`` (every comparison); None when the study declares none."""
    table = comparison_table(result)
    if not len(table):
        return None
    label = _condition_labels(result)
    primary = [label(r["condition"]) + comparison_sentence(r) for _, r in table[table["primary"]].iterrows()]
    shown = table.drop(columns=["infinite"] if not table["infinite"].any() else [])
    return {"rule": COMPARISON_RULE, "primary": primary, "table": shown}


def format_comparisons(result) -> str | None:
    """The declared comparisons for a terminal: the primary one as a sentence per condition, then every
    comparison's verdict on a line; None when the study declares none."""
    parts = comparison_parts(result)
    if parts is None:
        return None
    lines = [f"Primary comparison: {p}" for p in parts["primary"]]
    table = parts["table"]
    lines.append(f"Paired comparisons ({len(table)}; report.md says how they are decided):")
    label = _condition_labels(result)  # the same condition labels as the report's
    for _, r in table.iterrows():
        lines.append(f"  {label(r['condition'])}{r['method']} - {r['reference']} in {r['metric']}: {r['difference']:+.4g} "
                     f"[{r['ci_low']:+.4g}, {r['ci_high']:+.4g}] ({int(r['pairs'])} pairs): {r['verdict']}")
    return "\n".join(lines)
