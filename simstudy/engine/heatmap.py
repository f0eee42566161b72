"""Heat map of a performance measure over two design factors (DESIGN §7: every figure shows uncertainty).

One panel per method (columns) and per combination of the other varying factors (rows); each cell is
coloured by the estimate and annotated with ``estimate`` and ``(MCSE)``. Measures with a target (bias 0,
coverage at the nominal level) use a diverging scale centred on it, so the colour says how far and in
which direction a cell misses; the others a sequential one. All panels share one colour scale.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .loop_plot import factor_levels
from .plots import measure_rows, summary_factors

__all__ = ["heatmap", "heatmap_axes_factors", "cell_text", "MAX_PANELS"]

#: At most this many panels (methods x combinations of the other factors) in one heat map.
MAX_PANELS = 24


def heatmap_axes_factors(summary: pd.DataFrame, factors: Sequence[str] | None = None) -> tuple[str, str]:
    """The two factors a heat map of ``summary`` uses by default: the two varying ones with the most levels
    (ties in the design's order), the one with more levels on the x axis. ValueError if fewer than two vary."""
    factors = summary_factors(summary) if factors is None else list(factors)
    conds = summary.drop_duplicates("condition")
    counts = {f: conds[f].nunique(dropna=False) for f in factors}
    vary = sorted((f for f in factors if counts[f] > 1), key=lambda f: -counts[f])  # stable: design order on ties
    if len(vary) < 2:
        raise ValueError(f"a heat map needs two varying design factors; the summary varies {vary or 'none'} "
                         f"of {list(factors)}")
    return vary[0], vary[1]


def cell_text(value: float, mcse: float) -> str:
    """``"estimate\n(MCSE)"`` with both to the decimal of the MCSE's second significant digit (``0.420`` and
    ``(0.049)``; ``0.0000`` and ``(0.0064)`` for a bias of 7e-18), so no cell shows digits the Monte Carlo
    error makes meaningless; 3 significant digits and ``(-)`` without an MCSE."""
    if not (np.isfinite(mcse) and mcse > 0):
        return f"{value:.3g}\n(-)" if not np.isfinite(mcse) else f"{value:.3g}\n(0)"
    d = int(min(6, max(0, 1 - np.floor(np.log10(mcse)))))
    return f"{round(value, d) + 0.0:.{d}f}\n({mcse:.{d}f})"  # + 0.0: no "-0.000"


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def heatmap(summary: pd.DataFrame, measure: str = "bias", estimand: str | None = None, *, x: str | None = None,
            y: str | None = None, where: Mapping[str, object] | None = None, methods: Sequence[str] | None = None,
            factors: Sequence[str] | None = None, center: float | None = None, title: str | None = None,
            max_panels: int = MAX_PANELS) -> Figure:
    """Heat map of one measure over the factors ``x`` and ``y``, cells annotated with estimate and MCSE.

    Parameters
    ----------
    summary : DataFrame
        :meth:`StudyResult.summary` output.
    measure : str
        Measure to plot.
    estimand : str, optional
        Estimand or metric (default: the first with this measure).
    x, y : str, optional
        Factors of the columns and rows (default: :func:`heatmap_axes_factors`).
    where : mapping, optional
        Fix other factors to one level each (``{"sigma": 1.0}``); factors that still vary give one row of
        panels per combination of their levels.
    methods : list of str, optional
        Methods, one column of panels each (default: all).
    factors : list of str, optional
        Design factors (default: the summary's columns between ``condition`` and ``method``).
    center : float, optional
        Target of the measure (0 for bias, the nominal level for coverage): a diverging colour scale
        symmetric about it. Without it, a sequential scale from the smallest to the largest estimate.
    title : str, optional
    max_panels : int
        ValueError (naming ``where=``) when more panels would be drawn.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel, each with one image of shape (levels of y, levels of x) and one text per cell
        with an estimate; then the colour bar's axes.
    """
    s = measure_rows(summary, measure, estimand)
    estimand = s["estimand"].iloc[0]
    factors = summary_factors(summary) if factors is None else list(factors)
    for key, value in (where or {}).items():
        if key not in factors:
            raise ValueError(f"where={dict(where)!r} is invalid; allowed: design factors {list(factors)}")
        s = s[s[key] == value]
        if not len(s):
            raise ValueError(f"where={dict(where)!r} selects no condition; allowed: levels of {key} in the summary")
    if x is None or y is None:
        dx, dy = heatmap_axes_factors(s, factors)
        x, y = x or (dy if dx == y else dx), y or (dx if dy == x else dy)
    for name, f in (("x", x), ("y", y)):
        if f not in factors:
            raise ValueError(f"{name}={f!r} is invalid; allowed: design factors {list(factors)}")
    if x == y:
        raise ValueError(f"x={x!r} and y={y!r} are invalid; allowed: two different design factors")
    all_methods = list(dict.fromkeys(s["method"]))
    methods = all_methods if methods is None else list(methods)
    if any(m not in all_methods for m in methods):
        raise ValueError(f"methods={methods!r} is invalid; allowed: methods of the summary {all_methods}")
    others = [f for f in factors if f not in (x, y) and s[f].nunique(dropna=False) > 1]
    combos = list(itertools.product(*(factor_levels(s[f]) for f in others)))  # [()] when none vary
    if len(combos) * len(methods) > max_panels:
        raise ValueError(f"{len(combos)} combinations of {others} x {len(methods)} methods would be "
                         f"{len(combos) * len(methods)} panels (more than {max_panels}); allowed: fix factors "
                         f"with where={{...}} or choose x and y among {list(factors)}")
    xs, ys = factor_levels(s[x]), factor_levels(s[y])
    vals = s["value"].to_numpy(float)
    finite = vals[np.isfinite(vals)]
    if center is not None:
        half = float(np.max(np.abs(finite - center))) if len(finite) else 1.0
        norm, cmap = Normalize(center - (half or 1e-12), center + (half or 1e-12)), "RdBu_r"
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        norm, cmap = Normalize(lo, hi if hi > lo else lo + 1e-12), "viridis"
    cell_w, cell_h = 0.62, 0.42  # inches per cell: room for two lines of text
    panel_w, panel_h = cell_w * len(xs) + 0.9, cell_h * len(ys) + 0.8
    fig = Figure(figsize=(panel_w * len(methods) + 1.4, panel_h * len(combos) + 0.7), layout="constrained")
    axes = fig.subplots(len(combos), len(methods), squeeze=False)
    font = 7 if len(xs) <= 8 else 6
    image = None
    for i, combo in enumerate(combos):
        rows = s
        for f, v in zip(others, combo):
            rows = rows[rows[f] == v]
        for j, m in enumerate(methods):
            ax = axes[i, j]
            sm = rows[rows["method"] == m]
            value = np.full((len(ys), len(xs)), np.nan)  # (Y, X)
            mcse = np.full((len(ys), len(xs)), np.nan)
            iy, ix = [ys.index(v) for v in sm[y]], [xs.index(v) for v in sm[x]]
            value[iy, ix] = sm["value"].to_numpy(float)
            mcse[iy, ix] = sm["mcse"].to_numpy(float)
            image = ax.imshow(np.ma.masked_invalid(value), cmap=cmap, norm=norm, aspect="auto", origin="lower")
            for (iy, ix), v in np.ndenumerate(value):
                if not np.isfinite(v):
                    continue
                text = cell_text(v, mcse[iy, ix])
                color = "white" if _luminance(image.cmap(norm(v))) < 0.45 else "black"
                ax.text(ix, iy, text, ha="center", va="center", fontsize=font, color=color, linespacing=0.95)
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(v) for v in xs], fontsize=7)
            ax.set_yticks(range(len(ys)))
            ax.set_yticklabels([str(v) for v in ys], fontsize=7)
            ax.set_xlabel(x, fontsize=8)
            if j == 0:
                ax.set_ylabel(y, fontsize=8)
            label = ", ".join(f"{f}={v}" for f, v in zip(others, combo))
            ax.set_title(f"{m}" + (f" | {label}" if label else ""), fontsize=8)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
    bar.ax.tick_params(labelsize=7)
    if center is not None and len(finite):  # the scale is symmetric about the target; show only the data's span
        bar.ax.set_ylim(min(float(finite.min()), center), max(float(finite.max()), center))
    bar.set_label(f"{measure} of {estimand}" + (f" (centre {center:g})" if center is not None else ""), fontsize=8)
    fixed = ", ".join(f"{k}={v}" for k, v in (where or {}).items())
    fig.suptitle(title or f"{measure} of {estimand} over {x} x {y}: estimate (MCSE)"
                 + (f"; {fixed}" if fixed else ""), fontsize=10)
    return fig
