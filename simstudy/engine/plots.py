"""Result figures (DESIGN §7): convergence rates, bias, zip plots, extrapolation curves.

Figures are built on :class:`matplotlib.figure.Figure` directly (Agg canvas,
no pyplot state), so they can be drawn in worker processes and on headless
machines. Every point estimate is drawn with an error bar of +-z MCSE
(z = 1.96 by default), the Monte Carlo uncertainty of the plotted number.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from scipy import stats

from .rates import RateResult
from .storage import atomic_write_bytes
from .tidy import companion_columns

__all__ = ["COLORS", "save_figure", "rate_plot", "measure_plot", "bias_plot", "zip_plot", "extrapolation_plot",
           "condition_labels", "summary_factors", "measure_rows"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _axes(ax, figsize=(6.4, 4.4)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def condition_labels(frame: pd.DataFrame, factors: Sequence[str]) -> pd.Series:
    """Labels ``"n=20, p=0.1"`` per row, using only the factors that vary."""
    vary = [f for f in factors if f in frame and frame[f].nunique(dropna=False) > 1] or list(factors)[:1]
    if not vary:
        return pd.Series(["all"] * len(frame), index=frame.index)
    return frame[vary].astype(str).apply(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1)


def summary_factors(summary: pd.DataFrame) -> list[str]:
    """The design factors of a :meth:`StudyResult.summary` frame: its columns between ``condition`` and
    ``method``."""
    cols = list(summary.columns)
    return cols[cols.index("condition") + 1:cols.index("method")]


def measure_rows(summary: pd.DataFrame, measure: str, estimand: str | None = None) -> pd.DataFrame:
    """The summary rows of one measure of one estimand (default: the first estimand with that measure);
    ValueError naming what is allowed when there are none."""
    s = summary[summary["measure"] == measure]
    if estimand is None:
        if not len(s):
            raise ValueError(f"measure={measure!r} is invalid; allowed: one of {sorted(summary['measure'].unique())}")
        estimand = s["estimand"].iloc[0]
    s = s[s["estimand"] == estimand]
    if not len(s):
        raise ValueError(f"estimand={estimand!r} has no {measure!r} rows; allowed: one of "
                         f"{sorted(summary.loc[summary['measure'] == measure, 'estimand'].unique())}")
    return s


def rate_plot(rate: RateResult, ax=None, *, z: float = 1.96, title: str | None = None) -> Figure:
    """Log-log convergence plot: means with +-z MCSE, fitted and theoretical lines.

    Parameters
    ----------
    rate : RateResult
        From :meth:`StudyResult.rate`.
    ax : matplotlib Axes, optional
        Axes to draw on (default: a new figure).
    z : float
        Error bar half-width in MCSE units.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    pts, fits = rate.points, rate.fits
    if not len(pts) or not pts["fitted"].astype(bool).any():
        raise ValueError(f"no level of {rate.x} has a positive mean of {rate.metric} with an MCSE (an MCSE needs "
                         f"at least 2 replicates per level), so there is nothing to draw on a log axis")
    fig, ax = _axes(ax)
    for i, (_, fit) in enumerate(fits.iterrows()):
        color = COLORS[i % len(COLORS)]
        mask = np.ones(len(pts), dtype=bool)
        for b in rate.by:
            mask &= (pts[b] == fit[b]).to_numpy()
        p = pts[mask]
        label = ", ".join(str(fit[b]) if b == "method" else f"{b}={fit[b]}" for b in rate.by) or rate.metric
        xv, mv, sv = p[rate.x].to_numpy(float), p["mean"].to_numpy(float), p["mcse"].to_numpy(float)
        # the levels the fit used; the others (a mean made infinite by one fit, say) are marked with an x
        # at the bottom edge, and no line crosses them
        usable = p["fitted"].to_numpy(bool)
        lower = np.clip(z * sv[usable], 0, mv[usable] * (1 - 1e-9))  # keep bars on the log axis
        ax.errorbar(xv[usable], mv[usable], yerr=[lower, z * sv[usable]], fmt="o", color=color, capsize=3, ms=4)
        for x_out in xv[~usable]:
            ax.plot([x_out], [0.02], "x", color=color, ms=7, transform=ax.get_xaxis_transform(), clip_on=False)
        if (~usable).any():
            label += f" (x: {int((~usable).sum())} level(s) not fitted, mean infinite or undefined)"
        xv = xv[usable]
        grid = np.geomspace(xv.min(), xv.max(), 50) if len(xv) else xv
        if np.isfinite(fit["slope"]):
            ax.plot(grid, fit["constant"] * grid ** fit["slope"], "-", color=color,
                    label=f"{label}: slope {fit['slope']:.2f} [{fit['slope_low']:.2f}, {fit['slope_high']:.2f}]")
        else:
            ax.plot([], [], "o", color=color, label=f"{label}: no fit")
        if rate.theory_slope is not None and len(xv):
            c0 = rate.theory_constant if rate.theory_constant is not None else fit.get("theory_fit_constant", np.nan)
            if np.isfinite(c0):
                ax.plot(grid, c0 * grid ** rate.theory_slope, ":", color=color, alpha=0.8)
    if rate.theory_slope is not None:
        ax.plot([], [], ":", color="black", label=f"theory slope {rate.theory_slope:g}"
                + (f", C={rate.theory_constant:g}" if rate.theory_constant is not None else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(rate.x)
    ax.set_ylabel(f"mean {rate.metric}")
    ax.set_title(title or f"Rate of {rate.metric} in {rate.x} (bars: +-{z:g} MCSE)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return fig


def measure_plot(summary: pd.DataFrame, measure: str = "bias", estimand: str | None = None, *,
                 factors: Sequence[str] | None = None, reference_line: float | None = None, z: float = 1.96,
                 ax=None, title: str | None = None) -> Figure:
    """One performance measure by condition and method with +-z MCSE bars.

    Parameters
    ----------
    summary : DataFrame
        :meth:`StudyResult.summary` output.
    measure : str
        Measure to plot (e.g. ``"bias"``, ``"coverage"``, ``"mean"``).
    estimand : str, optional
        Estimand or metric (default: the first with this measure).
    factors : list of str, optional
        Design factors for the condition labels (default: the columns
        between ``condition`` and ``method``).
    reference_line : float, optional
        Horizontal line (0 for bias, the nominal level for coverage).
    z : float
        Error bar half-width in MCSE units.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    s = measure_rows(summary, measure, estimand)
    estimand = s["estimand"].iloc[0]
    if factors is None:
        factors = summary_factors(summary)
    conds = s.drop_duplicates("condition").sort_values("condition")
    labels = condition_labels(conds, factors).tolist()
    pos = {c: i for i, c in enumerate(conds["condition"])}
    methods = list(dict.fromkeys(s["method"]))
    width = 0.7 / max(1, len(methods))
    fig, ax = _axes(ax, figsize=(max(6.4, 0.6 * len(labels) * max(1, len(methods)) ** 0.5 + 2), 4.4))
    for j, m in enumerate(methods):
        sm = s[s["method"] == m]
        xs = np.array([pos[c] for c in sm["condition"]], dtype=float) + (j - (len(methods) - 1) / 2) * width
        ax.errorbar(xs, sm["value"].to_numpy(float), yerr=z * sm["mcse"].fillna(0).to_numpy(float), fmt="o",
                    capsize=3, ms=4, color=COLORS[j % len(COLORS)], label=m)
    if reference_line is not None:
        ax.axhline(reference_line, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel(f"{measure} of {estimand}")
    ax.set_title(title or f"{measure} of {estimand} by method (bars: +-{z:g} MCSE)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.25)
    return fig


def bias_plot(summary: pd.DataFrame, estimand: str | None = None, **kwargs) -> Figure:
    """Bias by condition and method with MCSE bars (see :func:`measure_plot`)."""
    return measure_plot(summary, "bias", estimand, reference_line=0.0, **kwargs)


def zip_plot(result, estimand: str = "estimate", *, conditions: Sequence[int] | None = None, level: float = 0.95,
             max_conditions: int = 4) -> Figure:
    """Zip plot of confidence intervals (Morris, White and Crowther 2019, Fig. 3).

    For each method (columns) and condition (rows), the successful
    replicates' intervals are drawn as horizontal lines ranked by the
    centile of ``|z| = |estimate - truth| / se`` (with ``se`` read off the
    interval's half-width on the truth's side, so asymmetric intervals rank
    correctly); intervals that miss the truth are drawn in red, at the top. The dashed line marks the nominal level,
    the grey band the coverage estimate +-1.96 MCSE read from the top.

    Parameters
    ----------
    result : StudyResult
    estimand : str
        Estimand with a truth and interval columns.
    conditions : list of int, optional
        Condition indices (default: the first ``max_conditions``).
    level : float
        Nominal coverage.
    max_conditions : int

    Returns
    -------
    matplotlib.figure.Figure
    """

    truths = result.truths
    n_est = len({k for t in truths for k in t})
    comp = companion_columns(estimand, result.table.columns, n_est)
    if "ci_low" not in comp or "ci_high" not in comp:
        raise ValueError(f"estimand={estimand!r} has no interval columns; allowed: an estimand whose methods "
                         "return ci_low/ci_high")
    conds = list(conditions) if conditions is not None else [
        c for c in range(len(truths)) if estimand in truths[c]][:max_conditions]
    methods = result.methods
    zq = stats.norm.ppf(0.5 + level / 2)
    fig = Figure(figsize=(2.6 * len(methods) + 0.6, 2.4 * len(conds) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(conds), len(methods), squeeze=False))
    labels = condition_labels(result.conditions, result.factors)
    ok = result.table[result.table["status"] == "ok"]
    for i, c in enumerate(conds):
        theta = truths[c][estimand]
        for j, m in enumerate(methods):
            ax = axes[i, j]
            rows = ok[(ok["condition"] == c) & (ok["method"] == m)].dropna(subset=[estimand, comp["ci_low"],
                                                                                 comp["ci_high"]])
            if not len(rows):
                ax.set_axis_off()
                continue
            est = rows[estimand].to_numpy(float)
            lo, hi = rows[comp["ci_low"]].to_numpy(float), rows[comp["ci_high"]].to_numpy(float)
            # |z| from the half-width on the truth's side: equals |est - truth| / se for est +- z se intervals,
            # and keeps non-covering intervals on top for asymmetric ones (order statistics, profile likelihood)
            half = np.where(theta < est, est - lo, hi - est)
            with np.errstate(divide="ignore", invalid="ignore"):
                zabs = zq * np.abs(est - theta) / half
            zabs = np.where(np.isfinite(zabs), zabs, np.inf)
            order = np.argsort(zabs, kind="mergesort")
            n = len(order)
            cent = (np.arange(n) + 0.5) / n * 100
            cover = (lo <= theta) & (theta <= hi)
            segs = np.stack([np.stack([lo[order], cent], 1), np.stack([hi[order], cent], 1)], 1)
            colors = np.where(cover[order][:, None], np.array([[0.12, 0.47, 0.71, 0.6]]),
                              np.array([[0.84, 0.15, 0.16, 0.9]]))
            ax.add_collection(LineCollection(segs, colors=colors, linewidths=max(0.3, min(1.5, 300 / n))))
            cov = cover.mean()
            mc = np.sqrt(cov * (1 - cov) / n)
            ax.axhspan(100 * (cov - 1.96 * mc), 100 * (cov + 1.96 * mc), color="grey", alpha=0.3, lw=0)
            ax.axhline(100 * level, color="black", ls="--", lw=0.8)
            ax.axvline(theta, color="black", lw=0.8)
            span = np.nanpercentile(np.r_[lo, hi], [1, 99])
            pad = 0.05 * (span[1] - span[0] + 1e-12)
            ax.set_xlim(min(span[0], theta) - pad, max(span[1], theta) + pad)
            ax.set_ylim(0, 100)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{m} | {labels.iloc[c]}\ncoverage {cov:.3f} ({mc:.3f})", fontsize=8)
            if j == 0:
                ax.set_ylabel("centile of |z|", fontsize=8)
    n_with = sum(estimand in t for t in truths)
    shown = f"\n{len(conds)} of {n_with} conditions shown ({', '.join(map(str, conds))})" if len(conds) < n_with else ""
    fig.suptitle(f"Zip plot of {int(level * 100)}% intervals for {estimand} (red: miss the truth){shown}", fontsize=10)
    return fig


def extrapolation_plot(frame: pd.DataFrame, metric: str, *, distance: str = "distance", method: str = "method",
                       z: float = 1.96, ax=None, xlabel: str | None = None, title: str | None = None,
                       dodge: float = 0.5) -> Figure:
    """Extrapolation curve: mean metric against distance to the support, per method.

    Parameters
    ----------
    frame : DataFrame
        Tidy, one row per replicate (x method x distance bin) with columns
        ``method``, ``distance`` and ``metric`` (e.g. an out-of-support KL
        per distance bin from a domain study).
    metric : str
        Column to average.
    distance : str
        Column of distances (bins or bin centres).
    method : str
        Column naming the method.
    z : float
        Error bar half-width in MCSE units (MCSE = sd / sqrt(n) per point).
    ax : matplotlib Axes, optional
    xlabel, title : str, optional
    dodge : float
        Methods' points are offset horizontally (as in :func:`measure_plot`)
        so that they do not sit on top of each other: together they span this
        fraction of the smallest gap between distances (0: no offset).

    Returns
    -------
    matplotlib.figure.Figure
    """
    for col in (metric, distance, method):
        if col not in frame.columns:
            raise ValueError(f"column {col!r} is missing; allowed: columns of frame {list(frame.columns)}")
    fig, ax = _axes(ax)
    data = frame[[method, distance, metric]].dropna()
    agg = data.groupby([method, distance], sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    agg["mcse"] = agg["std"] / np.sqrt(agg["count"])
    methods = list(dict.fromkeys(agg[method]))
    levels = np.unique(agg[distance].to_numpy(float))
    gaps = np.diff(levels)
    gap = float(gaps.min()) if len(gaps) else (abs(float(levels[0])) or 1.0) * 0.2 if len(levels) else 1.0
    width = dodge * gap / max(1, len(methods))
    for j, m in enumerate(methods):
        a = agg[agg[method] == m].sort_values(distance)
        xs = a[distance].to_numpy(float) + (j - (len(methods) - 1) / 2) * width
        ax.errorbar(xs, a["mean"].to_numpy(float), yerr=z * a["mcse"].fillna(0).to_numpy(),
                    fmt="-o", capsize=3, ms=4, color=COLORS[j % len(COLORS)], label=str(m))
    ax.set_xlabel(xlabel or distance)
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(title or f"{metric} by {distance} (bars: +-{z:g} MCSE)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.25)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (a kill mid-write never leaves a torn file); the format is the
    path's suffix (``.png``, ``.svg``, ``.pdf``). Returns the path."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fmt = path.suffix[1:].lower() or "png"
    # no date and no random ids in an SVG (a fixed hash salt)
    with matplotlib.rc_context({"svg.hashsalt": "simstudy"}):
        fig.savefig(buffer, dpi=dpi, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    atomic_write_bytes(path, buffer.getvalue())
    return path
