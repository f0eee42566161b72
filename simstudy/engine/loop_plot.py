"""Nested loop plot of a performance measure over every design factor (DESIGN §7; Rücker and Schwarzer 2014).

All conditions are put in one row, sorted lexicographically by the factors (the first factor of ``order``
is the outer loop and changes slowest, the last the inner loop), and the measure of each method is drawn
as a step line across them, with a band of +-z MCSE (the Monte Carlo uncertainty of every step). Below the
main panel, one small panel per varying factor draws its level as a step line: reading down from any step
of the measure gives its condition. This is rsimsum's ``nlp``; the dot plot of :func:`.plots.measure_plot`
is unreadable beyond about a dozen conditions, this one stays readable to a few hundred.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import COLORS, measure_rows, summary_factors

__all__ = ["loop_plot", "nested_order", "factor_levels"]

_STYLES = ["-", (0, (5, 2)), (0, (1, 1.5)), "-.", (0, (8, 3, 2, 3))]  # line style of method j


def factor_levels(values: pd.Series) -> list:
    """The levels of one factor in plotting order: ascending for numbers, in order of appearance otherwise."""
    uniq = list(dict.fromkeys(values.tolist()))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in uniq):
        return sorted(uniq)
    return uniq


def nested_order(conditions: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """The rows of ``conditions`` sorted as the nested loops of ``order`` (first factor outermost), with one
    integer column ``_level_FACTOR`` per factor (the level's position in :func:`factor_levels`)."""
    out = conditions.copy()
    keys = []
    for f in order:
        pos = {v: i for i, v in enumerate(factor_levels(out[f]))}
        out[f"_level_{f}"] = out[f].map(pos).astype(int)
        keys.append(f"_level_{f}")
    return out.sort_values(keys + ["condition"], kind="mergesort").reset_index(drop=True) if keys else out


def loop_plot(summary: pd.DataFrame, measure: str = "bias", estimand: str | None = None, *,
              factors: Sequence[str] | None = None, order: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, reference_line: float | None = None, z: float = 1.96,
              title: str | None = None) -> Figure:
    """Nested loop plot of one measure over all varying design factors, one step line per method.

    Parameters
    ----------
    summary : DataFrame
        :meth:`StudyResult.summary` output.
    measure : str
        Measure to plot (``"bias"``, ``"coverage"``, ``"mean"``, a measure of your own, ...).
    estimand : str, optional
        Estimand or metric (default: the first with this measure).
    factors : list of str, optional
        Design factors (default: the summary's columns between ``condition`` and ``method``). Factors
        with one level are named in the title, not drawn.
    order : list of str, optional
        Nesting order, outer loop first (default: ``factors``' order). Rücker and Schwarzer put the
        factor with the largest influence outermost.
    methods : list of str, optional
        Methods to draw (default: all, in the summary's order).
    reference_line : float, optional
        Horizontal line (0 for bias, the nominal level for coverage).
    z : float
        Band half-width in MCSE units: the band is estimate +- z MCSE (none where the MCSE is missing).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Axes 0 holds the measure (two :class:`~matplotlib.patches.StepPatch` per method: the band, then
        the line); axes 1.. one per varying factor, outer loop first.
    """
    s = measure_rows(summary, measure, estimand)
    estimand = s["estimand"].iloc[0]
    factors = summary_factors(summary) if factors is None else list(factors)
    order = list(factors if order is None else order)
    bad = [f for f in order if f not in factors]
    if bad:
        raise ValueError(f"order={order!r} is invalid; allowed: design factors of the summary {list(factors)}")
    conds = s.drop_duplicates("condition")[["condition", *factors]]
    vary = [f for f in order if conds[f].nunique(dropna=False) > 1]
    fixed = [f for f in factors if f not in vary]
    conds = nested_order(conds, vary)
    pos = {c: i for i, c in enumerate(conds["condition"])}
    k = len(conds)
    edges = np.arange(k + 1, dtype=float) - 0.5  # (K + 1,): condition i spans [i - 0.5, i + 0.5]
    all_methods = list(dict.fromkeys(s["method"]))
    if methods is None:
        methods = all_methods
    elif any(m not in all_methods for m in methods):
        raise ValueError(f"methods={list(methods)!r} is invalid; allowed: methods of the summary {all_methods}")

    n_levels = [conds[f].nunique(dropna=False) for f in vary]
    heights = [3.6] + [0.35 + 0.12 * min(n, 8) for n in n_levels]
    fig = Figure(figsize=(min(18.0, max(7.0, 0.09 * k + 4.0)), sum(heights) + 0.9), layout="constrained")
    axes = fig.subplots(1 + len(vary), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    ax = axes[0]
    span = []  # every band edge and estimate: the y range (autoscaling misses a StepPatch's baseline)
    for j, m in enumerate(methods):
        sm = s[s["method"] == m]
        value = np.full(k, np.nan)  # (K,) in nested order; NaN where the method has no row (a gap)
        mcse = np.full(k, np.nan)
        idx = sm["condition"].map(pos).to_numpy(int)
        value[idx] = sm["value"].to_numpy(float)
        mcse[idx] = sm["mcse"].to_numpy(float)
        color = COLORS[j % len(COLORS)]
        ax.stairs(value + z * mcse, edges, baseline=value - z * mcse, fill=True, color=color, alpha=0.22, lw=0,
                  label="_nolegend_")
        # one line style per method, later ones thinner and on top: methods with equal estimates stay visible
        ax.stairs(value, edges, baseline=None, color=color, lw=max(1.0, 2.2 - 0.4 * j),
                  ls=_STYLES[j % len(_STYLES)], label=str(m), zorder=3 + j)
        span += [value, value - z * mcse, value + z * mcse]
    if reference_line is not None:
        ax.axhline(reference_line, color="black", lw=0.8, ls="--")
        span.append(np.array([reference_line]))
    finite = np.concatenate(span)[np.isfinite(np.concatenate(span))] if span else np.array([])
    if len(finite):
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo) or 0.05 * (abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(f"{measure} of {estimand}")
    ax.legend(fontsize=8, loc="best", ncol=min(4, len(methods)))
    ax.grid(True, axis="y", alpha=0.25)
    where = f"\nfixed: {', '.join(f'{f}={conds[f].iloc[0]}' for f in fixed)}" if fixed else ""
    ax.set_title(title or f"Nested loop plot: {measure} of {estimand} over {', '.join(vary) or 'one condition'}"
                 f" (bands: \u00b1{z:g} MCSE){where}", fontsize=10)
    if vary:  # light vertical lines where the outer loop changes, through every panel
        outer = conds[f"_level_{vary[0]}"].to_numpy()
        for x in np.flatnonzero(np.diff(outer)) + 0.5:
            for a in axes:
                a.axvline(x, color="grey", lw=0.6, alpha=0.5)
    for a, f, n in zip(axes[1:], vary, n_levels):
        lev = conds[f"_level_{f}"].to_numpy(float)
        a.stairs(lev, edges, baseline=None, color="black", lw=1.1)
        labels = factor_levels(conds[f])
        a.set_yticks(range(n))
        a.set_yticklabels([str(v) for v in labels] if n <= 8 else
                          [str(v) if i in (0, n - 1) else "" for i, v in enumerate(labels)], fontsize=7)
        a.set_ylim(-0.5, n - 0.5)
        a.set_ylabel(f, rotation=0, ha="right", va="center", fontsize=8)
        a.tick_params(axis="x", length=0)
    axes[-1].set_xlim(edges[0], edges[-1])
    axes[-1].set_xticks([] if k > 40 else range(k))
    axes[-1].set_xticklabels([] if k > 40 else [str(c) for c in conds["condition"]], fontsize=6)
    axes[-1].set_xlabel(f"{k} conditions in nested order ({' > '.join(vary) or '-'}; ticks: condition index)"
                        if k <= 40 else f"{k} conditions in nested order ({' > '.join(vary)})", fontsize=8)
    return fig
