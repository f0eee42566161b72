"""Figures of the extrapolation check (DESIGN §6.7): ``matplotlib.figure.Figure`` objects, no pyplot.

* :func:`paired_figure` -- per design, each method's paired OOS and ID KL difference
  against each reference with its 95 % interval (the ID margin dotted);
* :func:`curves_figure` -- the extrapolation curves: mean OOS KL by distance to the support;
* :func:`gains_figure` -- the paired OOS difference bin by bin (the gain by distance).

:func:`figures` draws them and saves them with :func:`simstudy.checks.common.saved`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .common import saved

__all__ = ["curves_figure", "figures", "gains_figure", "paired_figure"]


def paired_figure(found: pd.DataFrame, designs: list[str], references: list[str]) -> Figure:
    """Paired OOS and ID KL differences (95 % CI) of every method against each reference, per design."""
    rows = found[found["reference"].isin(references)]
    fig = Figure(figsize=(12, 1.2 + 0.45 * max(4, rows["method"].nunique()) * len(designs)))
    axes = fig.subplots(len(designs), 2, squeeze=False)
    markers = {ref: m for ref, m in zip(references, "os^D")}
    colours = {ref: c for ref, c in zip(references, ("C0", "C3", "C2", "C4"))}
    for i, design in enumerate(designs):
        sub = rows[rows["design"] == design]
        methods = list(dict.fromkeys(sub["method"]))
        ypos = {m: j for j, m in enumerate(methods)}
        for col, (tag, title) in enumerate((("oos", "OOS KL"), ("id", "ID KL"))):
            ax = axes[i, col]
            drawn = False
            for k, ref in enumerate(references):
                r = sub[sub["reference"] == ref]
                if r.empty:
                    continue
                drawn = True
                y = np.array([ypos[m] for m in r["method"]]) + (k - (len(references) - 1) / 2) * 0.18
                mid = r[f"{tag}_difference"].to_numpy(float)
                lo = mid - r[f"{tag}_ci_low"].to_numpy(float)
                hi = r[f"{tag}_ci_high"].to_numpy(float) - mid
                err = np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)])  # (2, methods)
                ax.errorbar(mid, y, xerr=err, fmt=markers[ref], color=colours[ref], capsize=3, ms=5,
                            label=f"minus {ref}")
            if tag == "id":
                for ref in references:
                    r = sub[sub["reference"] == ref]
                    if len(r):
                        ax.axvline(float(r["id_margin"].iloc[0]), color=colours[ref], ls=":", lw=1)
            ax.axvline(0.0, color="k", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("symlog", linthresh=0.02)
            ax.set_title(f"{design}: paired {title} difference (95% CI)" +
                         (" ; dotted: +10% margin" if tag == "id" else ""), fontsize=9)
            ax.grid(True, alpha=0.25)
            if drawn:
                ax.legend(fontsize=7, loc="best")
            else:  # one method only: nothing to pair
                ax.text(0.5, 0.5, "no paired difference (fewer than two methods)", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(curves: pd.DataFrame, designs: list[str]) -> Figure:
    """Mean OOS KL by distance bin per method (bars: +-1.96 MCSE), one panel per design."""
    fig = Figure(figsize=(6.5 * len(designs), 4.8))
    axes = fig.subplots(1, len(designs), squeeze=False)
    for i, design in enumerate(designs):
        ax = axes[0, i]
        sub = curves[curves["design"] == design]
        for j, method in enumerate(dict.fromkeys(sub["method"])):
            c = sub[sub["method"] == method].sort_values("distance")
            ax.errorbar(c["distance"], c["kl_oos"], yerr=1.96 * c["mcse"].fillna(0.0), marker="o", ms=3, capsize=2,
                        color=f"C{j % 10}", ls="-" if "(sgd)" in method else "--", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("distance to the support (s units, bin mean)")
        ax.set_ylabel("mean OOS KL(m* || m-hat)")
        ax.set_title(f"{design}: extrapolation curve (bars: +-1.96 MCSE)", fontsize=9)
        ax.grid(True, alpha=0.25, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def gains_figure(gains: pd.DataFrame, designs: list[str]) -> Figure:
    """Paired OOS KL difference by distance bin (95 % CI) of each gain pair, one panel per design;
    a symlog axis when the pairs differ in scale by more than 30 times."""
    fig = Figure(figsize=(6.0 * len(designs), 4.0))
    axes = fig.subplots(1, len(designs), squeeze=False)
    for i, design in enumerate(designs):
        ax = axes[0, i]
        sub = gains[gains["design"] == design]
        for j, (pair, g) in enumerate(sub.groupby(["method", "reference"], sort=False)):
            g = g.sort_values("distance")
            ax.errorbar(g["distance"], g["difference"],
                        yerr=np.vstack([g["difference"] - g["ci_low"], g["ci_high"] - g["difference"]]),
                        fmt="-o", capsize=3, color=f"C{j}", label=f"{pair[0]} minus {pair[1]}")
        ax.axhline(0, color="k", lw=0.8)
        spread = np.abs(sub["difference"].to_numpy(float))
        spread = spread[np.isfinite(spread) & (spread > 0)]
        wide = spread.size > 0 and spread.max() > 30 * np.median(spread)  # pairs on very different scales
        if wide:
            ax.set_yscale("symlog", linthresh=0.02)
        ax.set_xlabel("distance to the support (s units, bin mean)")
        ax.set_ylabel("paired OOS KL difference" + (" (symlog)" if wide else ""))
        ax.set_title(f"{design}: gain by distance (95% CI)", fontsize=9)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figures(folder: Path, found: pd.DataFrame, curves: pd.DataFrame, gains: pd.DataFrame,
            designs: list[str], references: list[str]) -> list[str]:
    """Draw and save the check's figures under ``folder``; their paths."""
    folder = Path(folder)
    paths = [saved(paired_figure(found, designs, references), folder / "paired_differences.png"),
             saved(curves_figure(curves, designs), folder / "extrapolation_curves.png")]
    if not gains.empty:
        paths.append(saved(gains_figure(gains, designs), folder / "gain_by_distance.png"))
    return paths
