"""Figures of the extrapolation map (DESIGN §6.7, issue 11): ``matplotlib.figure.Figure`` objects, no pyplot.

* :func:`heat_map` -- the paired OOS KL difference (method minus mle) of every cell, rows the teacher
  world x sigma*, columns c x direction, the colour the mean difference (diverging, centred at 0) and
  the text of each cell its mean, 95 % interval and number of pairs;
* the extrapolation curve and the gain by distance of the identified cell (c = 2, tangent, largest
  sigma*) per world, drawn by the extrapolation check's own figure functions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .common import saved
from .extrapolation_figures import curves_figure, gains_figure

__all__ = ["heat_map", "map_figures"]


def heat_map(found: pd.DataFrame) -> Figure:
    """The map: one cell per (world, sigma*) row and (c, direction) column."""
    rows = list(dict.fromkeys(zip(found["world"], found["sigma"])))
    cols = sorted(dict.fromkeys(zip(found["observations"], found["direction"])))
    value = np.full((len(rows), len(cols)), np.nan)  # (rows, cols) mean paired OOS difference
    fig = Figure(figsize=(2.2 + 2.1 * len(cols), 1.4 + 0.95 * len(rows)))
    ax = fig.subplots()
    for r in found.itertuples(index=False):
        value[rows.index((r.world, r.sigma)), cols.index((r.observations, r.direction))] = r.oos_difference
    finite = np.abs(value[np.isfinite(value)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    for r in found.itertuples(index=False):
        i, j = rows.index((r.world, r.sigma)), cols.index((r.observations, r.direction))
        lo, hi = r.oos_ci_low, r.oos_ci_high
        interval = f"[{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "[n/a]"
        mark = {"beats": " *", "worse": " +"}.get(r.oos_verdict, "")
        dark = math.isfinite(r.oos_difference) and abs(r.oos_difference) > 0.6 * limit
        ax.text(j, i, f"{r.oos_difference:+.3f}{mark}\n{interval}\nR={int(r.pairs)}", ha="center", va="center",
                fontsize=8, color="white" if dark else "black")
    image = ax.imshow(value, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=ax, label="paired OOS KL difference (method - mle)")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"c={c}, {d}" for c, d in cols], fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{w}\nsigma*={s:g}" for w, s in rows], fontsize=8)
    method = found["method"].iloc[0] if len(found) else "method"
    reference = found["reference"].iloc[0] if len(found) else "mle"
    ax.set_title(f"{method} minus {reference}: paired OOS KL difference, 95% CI\n"
                 "(* interval below 0: a gain; + above 0: worse)", fontsize=9)
    fig.tight_layout()
    return fig


def map_figures(folder: Path, found: pd.DataFrame, curve: pd.DataFrame, gains: pd.DataFrame) -> list[str]:
    """Draw and save the map's figures under ``folder``; their paths."""
    folder = Path(folder)
    paths = []
    if not found.empty:
        paths.append(saved(heat_map(found), folder / "gain_map.png"))
    worlds = list(dict.fromkeys(curve["world"])) if len(curve) else []
    if worlds:
        paths.append(saved(curves_figure(curve.rename(columns={"world": "design"}), worlds),
                           folder / "identified_cell_curves.png"))
    if len(gains) and "world" in gains:
        paths.append(saved(gains_figure(gains.rename(columns={"world": "design"}), worlds),
                           folder / "identified_cell_gain_by_distance.png"))
    return paths
