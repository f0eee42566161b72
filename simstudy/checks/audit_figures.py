"""Figures of the gradient-audit checks ``unbiasedness`` and ``calibration`` (DESIGN §6.1).

Each function builds a :class:`matplotlib.figure.Figure` (no pyplot state) from a table of
audit rows (:func:`simstudy.checks.audits.run_audit`) and writes it atomically with
:func:`simstudy.checks.common.saved`, returning the path as a string:

* :func:`plot_bias` -- ``bias_audit.png``: bias norm with MCSE bars per equation and point
  (log scale), the noise level and the exact / leading-term expected bias;
* :func:`plot_isk` -- ``is_k_bias.png``: K x bias along u = -grad chi2 / 2 against K, with |u|;
* :func:`plot_mh` -- ``ps_mh_bias.png``: Monte Carlo and exact-chain bias against B;
* :func:`plot_calibration` -- ``calibration/null_pvalues.png``: histogram and -log10 QQ plot of
  the null p-values with a 95% pointwise band.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats as sps

from .audits import AuditSetup, label_parameter
from .common import fmt, saved

__all__ = ["plot_bias", "plot_calibration", "plot_isk", "plot_mh"]


def plot_bias(frame: pd.DataFrame, path: Path, setup: AuditSetup) -> str:
    """Bias norm with MCSE bars per equation and point (log scale); open markers: not rejected."""
    labels = list(dict.fromkeys(frame["equation"]))
    fig = Figure(figsize=(max(6.4, 0.55 * len(labels) + 2), 4.6))
    ax = fig.subplots()
    offsets = {"truth": -0.15, "perturbed": 0.15}
    colours = {"truth": "C0", "perturbed": "C3"}
    for point, g in frame.groupby("point"):
        pos = np.array([labels.index(e) for e in g["equation"]]) + offsets.get(point, 0.0)  # (n,)
        b, se = g["bias_norm"].to_numpy(float), g["bias_norm_mcse"].to_numpy(float)
        lower = np.minimum(se, b * 0.999)  # log scale: keep the bar above zero
        rej = g["reject"].to_numpy(bool)
        colour = colours.get(point, "k")
        ax.errorbar(pos, b, yerr=[lower, se], fmt="none", ecolor=colour, capsize=3)
        ax.scatter(pos[rej], b[rej], color=colour, marker="o", zorder=3, label=f"{point}: rejected")
        ax.scatter(pos[~rej], b[~rej], facecolors="white", edgecolors=colour, marker="o", zorder=3,
                   label=f"{point}: not rejected")
        ax.scatter(pos, g["noise"].to_numpy(float), color="grey", marker="_", s=120, zorder=2,
                   label="noise level sqrt(tr S / R)" if point == frame["point"].iloc[0] else None)
        if "expected_bias_norm" in g:
            e = g["expected_bias_norm"].to_numpy(float)
            keep = np.isfinite(e) & (e > 0)
            ax.scatter(pos[keep], e[keep], color=colour, marker="x", zorder=4,
                       label=f"{point}: expected (exact / leading term)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_ylabel("|mean g - exact gradient|  (MCSE bars)")
    ax.set_title(f"Gradient audit, {setup.design}: R = {setup.num_replicates} per audit, "
                 f"alpha = {fmt(setup.alpha, 6)}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both", axis="y")
    fig.tight_layout()
    return saved(fig, path)


def plot_isk(frame: pd.DataFrame, labels: list[str], path: Path) -> str:
    """K x bias projected on -grad chi2 / 2 (unit direction) against K, with the |u| reference."""
    at = frame[frame["equation"].isin(labels)].copy()
    at["K"] = [label_parameter(e) for e in at["equation"]]
    points = list(dict.fromkeys(at["point"]))
    fig = Figure(figsize=(5.2 * len(points), 4.2))
    axes = fig.subplots(1, len(points), squeeze=False)
    for ax, point in zip(axes[0], points):
        g = at[at["point"] == point].sort_values("K")
        ax.errorbar(g["K"], g["proj"], yerr=g["proj_mcse"], fmt="o-", capsize=3,
                    label="<K (mean g - grad log m), u/|u|>")
        u = float(g["u_norm"].iloc[0])
        ax.axhline(u, color="k", ls="--", label="|u|, u = -grad chi2 / 2 (leading term)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.set_ylabel("K x bias along u")
        ax.set_title(f"is-K, point: {point}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return saved(fig, path)


def plot_mh(frame: pd.DataFrame, labels: list[str], path: Path) -> str:
    """ps-mh: Monte Carlo bias norm (MCSE bars) and the exact chain's bias against B."""
    at = frame[frame["equation"].isin(labels)].copy()
    at["B"] = [label_parameter(e) for e in at["equation"]]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for i, (point, g) in enumerate(at.groupby("point")):
        g = g.sort_values("B")
        ax.errorbar(g["B"], g["bias_norm"], yerr=g["bias_norm_mcse"], fmt="o", capsize=3, color=f"C{i}",
                    label=f"{point}: Monte Carlo")
        if "expected_bias_norm" in g and g["expected_bias_norm"].notna().any():
            ax.plot(g["B"], g["expected_bias_norm"], "x--", color=f"C{i}", label=f"{point}: exact chain")
        ax.plot(g["B"], g["noise"], "_", color=f"C{i}", ms=14, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("B (MH steps per visit, fresh independence chains)")
    ax.set_ylabel("|mean g - grad log m|")
    ax.set_title("ps-mh bias against burn-in (bars: MCSE; dashes: noise level)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return saved(fig, path)


def plot_calibration(null: pd.DataFrame, path: Path, alpha: float) -> str:
    """Null p-values: histogram, and a QQ plot against U(0, 1) on -log10 scales (the lower tail,
    where alpha lives, is what matters) with a 95% pointwise band from the beta order statistics."""
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    top = 0.0
    for i, ((label, point), g) in enumerate(null.groupby(["equation", "point"])):
        p = np.sort(g["p_value"].to_numpy(float))  # (n,)
        n = p.size
        bins = min(20, max(5, n // 10))
        ax1.hist(p, bins=bins, range=(0, 1), alpha=0.6, color=f"C{i}", label=f"{label}@{point} (n={n})")
        k = np.arange(1, n + 1)
        expected = -np.log10(k / (n + 1))
        ax2.plot(expected, -np.log10(np.clip(p, 1e-300, None)), ".", color=f"C{i}", label=f"{label}@{point}")
        top = max(top, float(expected.max()), float(-np.log10(max(p.min(), 1e-300))))
        if i == 0:
            ax1.axhline(n / bins, color="k", ls="--", lw=1, label="uniform")
            ax2.fill_between(expected, -np.log10(sps.beta.ppf(0.975, k, n + 1 - k)),
                             -np.log10(sps.beta.ppf(0.025, k, n + 1 - k)), color="grey", alpha=0.3,
                             label="95% pointwise band")
    ax2.plot([0, top], [0, top], "k--", lw=1)
    ax2.axhline(-math.log10(alpha), color="C3", lw=0.8, ls=":", label=f"alpha = {fmt(alpha, 6)}")
    ax1.set_xlabel("audit p-value under the null")
    ax1.set_ylabel("count")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("-log10 expected p (uniform order statistics)")
    ax2.set_ylabel("-log10 observed p")
    ax2.set_title("QQ vs U(0, 1); above the band = anti-conservative", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return saved(fig, path)
