"""Figures of the asymptotic checks (DESIGN §6.2-§6.5): ``matplotlib.figure.Figure`` objects (no pyplot),
written atomically by :func:`simstudy.checks.common.saved`; each function returns the written path.

* :func:`rate_theory_plot` -- log-log mean KL against n with the WLS line and the theory line C / n;
* :func:`constant_plot` -- n E[KL] against n with the theory constants (r/2, sandwich);
* :func:`coverage_plot` -- coverage of the sandwich Wald intervals per functional;
* :func:`efficiency_plot` -- ps-exact against the Cramér-Rao limit and q2 over ps-exact.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..engine.plots import COLORS
from .asymptotic_study import STUDY_METHODS, root_objective
from .common import saved

__all__ = ["constant_plot", "coverage_plot", "efficiency_plot", "rate_theory_plot", "theory_label"]

_COLOR_OF = dict(zip(STUDY_METHODS, COLORS))


def theory_label(method: str) -> str:
    """How the theory constant of ``method``'s root is named: r/2 for the likelihood root, else the sandwich."""
    return "r/2" if root_objective(method) == "likelihood" else "sandwich"


def _infinite_note(p: pd.DataFrame, column: str) -> str:
    bad = p.loc[~np.isfinite(p[column].to_numpy(float)), "n"]
    return f"; infinite mean at n = {', '.join(str(int(n)) for n in bad)}" if len(bad) else ""


def _finish(ax, ylabel: str, title: str, fontsize: int) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)


def constant_plot(points: pd.DataFrame, theory: dict, path: Path, title: str, starts: dict) -> str:
    """n E[KL] against n per method with 2-MCSE bars and the theory lines (r/2, sandwich)."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for method, p in points.groupby("method", sort=False):
        p = p.sort_values("n")
        color = _COLOR_OF.get(method)
        finite = np.isfinite(p["constant"].to_numpy(float))
        ax.errorbar(p["n"][finite], p["constant"][finite], yerr=2 * p["constant_mcse"][finite], fmt="o-",
                    capsize=3, ms=4, color=color,
                    label=f"{method}: n mean KL (+-2 MCSE){_infinite_note(p, 'constant')}")
        ax.axhline(theory[method], color=color, ls="--", lw=1,
                   label=f"{method} theory {theory_label(method)} = {theory[method]:.3g}")
        if np.isfinite(starts.get(method, math.nan)):
            ax.axvline(starts[method], color=color, ls=":", lw=1,
                       label=f"{method}: asymptotic from n = {int(starts[method])}")
    _finish(ax, "n E[KL]", title, 10)
    return saved(fig, path)


def rate_theory_plot(points: pd.DataFrame, fits: pd.DataFrame, theory: dict | None, n_min: float, path: Path,
                     title: str) -> str:
    """Log-log mean KL against n per method: +-2 MCSE bars, the WLS line over n >= n_min and
    (with ``theory``) the theory line theory_constant / n. Levels with an infinite mean (a fit
    giving zero mass to a possible token) are named in the legend."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for method, p in points.groupby("method", sort=False):
        p = p.sort_values("n")
        note = _infinite_note(p, "mean")
        p = p[np.isfinite(p["mean"].to_numpy(float))]
        color = _COLOR_OF.get(method)
        mean, mcse = p["mean"].to_numpy(float), p["mcse"].to_numpy(float)
        lower = np.minimum(2 * mcse, 0.9 * mean)  # keep the bars on the log axis
        ax.errorbar(p["n"], mean, yerr=[lower, 2 * mcse], fmt="o", capsize=3, ms=4, color=color)
        if not len(p):
            continue
        fit = fits[fits["method"] == method].iloc[0]
        g = np.geomspace(max(p["n"].min(), n_min), p["n"].max(), 50)
        if np.isfinite(fit["slope"]):
            ax.plot(g, fit["constant"] * g ** fit["slope"], "-", color=color,
                    label=f"{method}: WLS slope {fit['slope']:.3f} [{fit['slope_low']:.3f}, {fit['slope_high']:.3f}]"
                    + note)
        if theory is not None:
            grid = np.geomspace(p["n"].min(), p["n"].max(), 50)
            ax.plot(grid, theory[method] / grid, "--", color=color, lw=1,
                    label=f"{method}: theory {theory_label(method)} / n = {theory[method]:.3g} / n")
    ax.set_yscale("log")
    _finish(ax, "mean KL", title, 9)
    return saved(fig, path)


def coverage_plot(cells: pd.DataFrame, path: Path, n_min: int) -> str:
    """Coverage of each functional against n, one panel per method, with the nominal 0.95 +- 2 MCSE band."""
    methods = list(dict.fromkeys(cells["method"]))
    fig = Figure(figsize=(6.4 * len(methods), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True))
    for ax, method in zip(axes, methods):
        c = cells[cells["method"] == method]
        funcs = list(dict.fromkeys(c["functional"]))
        for j, f in enumerate(funcs):
            cf = c[c["functional"] == f].sort_values("n")
            shift = 1.0 + 0.04 * (j - (len(funcs) - 1) / 2)
            ax.errorbar(cf["n"] * shift, cf["coverage"], yerr=2 * cf["mcse"], fmt="o-", capsize=3, ms=4, label=f)
        ns = np.sort(c["n"].unique())
        mc = np.sqrt(0.95 * 0.05 / c["replicates"].max())
        ax.axhline(0.95, color="black", lw=0.8)
        ax.fill_between([ns.min() * 0.8, ns.max() * 1.25], 0.95 - 2 * mc, 0.95 + 2 * mc, color="grey", alpha=0.2,
                        label="0.95 +- 2 MCSE (nominal)")
        ax.axvline(n_min * 0.97, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("n")
        ax.set_title(f"{method}: coverage of 95% sandwich Wald intervals (bars: +-2 MCSE)", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("coverage")
    return saved(fig, path)


def efficiency_plot(frame: pd.DataFrame, theory_ratio: float, path: Path) -> str:
    """ps-exact's n E[KL] / (r/2) and the paired ratio q2 / ps-exact against n, with their theory lines."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    f = frame.sort_values("n")
    ax.errorbar(f["n"], f["ps_ratio_to_cr"], yerr=2 * f["ps_ratio_to_cr_mcse"], fmt="o-", capsize=3, ms=4,
                label="ps-exact: n E[KL] / (r/2)")
    ax.errorbar(f["n"] * 1.04, f["q2_over_ps"], yerr=2 * f["q2_over_ps_mcse"], fmt="s-", capsize=3, ms=4,
                label="q2 / ps-exact: paired ratio of E[KL]")
    ax.axhline(1.0, color=COLORS[0], ls="--", lw=1, label="Cramer-Rao limit (1)")
    ax.axhline(theory_ratio, color=COLORS[1], ls="--", lw=1, label=f"sandwich theory ratio {theory_ratio:.3g}")
    _finish(ax, "ratio (ID KL)", "Efficiency (bars: +-2 MCSE)", 10)
    return saved(fig, path)
