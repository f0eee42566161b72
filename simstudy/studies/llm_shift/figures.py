"""Figures of an llm-shift study: each metric per evaluation split by method, with MCSE bars (DESIGN §5, §8).

:func:`shift_figures` is the study's figure hook (stored in the results' manifest as
``simstudy.studies.llm_shift:shift_figures``): perplexity, ROUGE-1 and MAUVE per split, and
the paired difference of each split's NLL per token from mle's.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["method_panels", "paired_panels", "shift_figures"]


def _split_labels(result, metric: str) -> list[str]:
    columns = [c[len(metric) + 1:] for c in result.table.columns
               if c.startswith(metric + "_") and not c.endswith("_se")]  # nll_S_se: a split's own error
    order = [s for s in result.options.get("splits", []) if s in columns]
    return order + sorted(s for s in columns if s not in order and s != "ood") + (["ood"] if "ood" in columns else [])


def _method_axis(ax, shown: list[str], panel: str) -> None:
    """A panel's x axis: one tick per method shown, its title, horizontal grid lines, plain y numbers."""
    ax.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_title(panel, fontsize=9)
    ax.grid(True, axis="y", alpha=0.25)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def method_panels(table: pd.DataFrame, columns: list[str], titles: list[str], *, ylabel: str, title: str,
                  methods: list[str] | None = None, z: float = 1.96):
    """One panel per column: the mean over replicates per method with +-z MCSE bars (MCSE = sd / sqrt(R)).

    ``methods`` fixes the order and the colours (default: the table's order), so figures of the same study agree.
    """
    from matplotlib.figure import Figure  # lazily: matplotlib is imported only when a figure is drawn

    from ...engine.plots import COLORS

    methods = list(methods or dict.fromkeys(table["method"]))
    shown = [m for m in methods if m in set(table["method"])]
    fig = Figure(figsize=(max(6.4, 2.4 * len(columns) + 1.2), 4.2), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column, panel in zip(axes, columns, titles):
        for pos, m in enumerate(shown):
            v = table.loc[table["method"] == m, column].dropna().to_numpy(float)
            if not v.size:
                continue
            mcse = v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
            ax.errorbar([pos], [v.mean()], yerr=[z * mcse], fmt="o", capsize=4, ms=5,
                        color=COLORS[methods.index(m) % len(COLORS)])
        _method_axis(ax, shown, panel)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{title}\n(bars: ±{z:.3g} MCSE over replicates)", fontsize=10)
    return fig


def shift_figures(result, outdir) -> list[tuple[str, Path]]:
    """Figure hook: perplexity, ROUGE-1 and MAUVE per evaluation split by method (MCSE bars), and the paired
    difference of each split's NLL per token from mle's (when the study has mle)."""
    from ...engine.plots import save_figure

    table = result.table
    ok = table[table["status"] == "ok"] if "status" in table else table
    if ok.empty:
        return []
    outdir = Path(outdir)
    out = []
    names = {"id": "in-domain", "ood": "out-of-domain (all)"}
    methods = list(dict.fromkeys(table["method"]))
    specs = [("ppl", "perplexity (IWAE bound)", "Perplexity by method and split", "llm_shift_perplexity.png"),
             ("rouge1", "ROUGE-1 F1", "ROUGE-1 of generated continuations", "llm_shift_rouge1.png"),
             ("mauve", "MAUVE", "MAUVE of generated continuations (base-model features)", "llm_shift_mauve.png")]
    for metric, ylabel, title, fname in specs:
        labels = _split_labels(result, metric)
        if not labels:
            continue
        fig = method_panels(ok, [f"{metric}_{s}" for s in labels], [names.get(s, s) for s in labels],
                            ylabel=ylabel, title=title, methods=methods)
        out.append((title, save_figure(fig, outdir / fname)))
    labels = _split_labels(result, "nll")
    if "mle" in set(ok["method"]) and labels:
        title = "NLL per token minus mle's, paired by replicate"
        fig = paired_panels(ok, [f"nll_{s}" for s in labels], [names.get(s, s) for s in labels],
                            reference="mle", methods=methods, ylabel="nats per token (below 0: better than mle)",
                            title=title)
        if fig is not None:
            out.append((title, save_figure(fig, outdir / "llm_shift_nll_vs_mle.png")))
    return out


def paired_panels(table: pd.DataFrame, metrics: list[str], titles: list[str], *, reference: str, ylabel: str,
                  title: str, methods: list[str] | None = None, level: float = 0.95):
    """One panel per metric: each method's mean paired difference from ``reference`` with its paired t interval.

    The intervals are the report's (:func:`simstudy.engine.paired.paired_differences`: d_r over the
    replicates where both rows are ok, mean +- t_{n-1} MCSE, each method with its own n), one marker
    per condition (offset, with a legend, when there are several). None when no method has a pair.
    """
    from matplotlib.figure import Figure  # lazily: matplotlib is imported only when a figure is drawn

    from ...engine.paired import paired_differences
    from ...engine.plots import COLORS

    methods = list(methods or dict.fromkeys(table["method"]))
    shown = [m for m in methods if m != reference and m in set(table["method"])]
    frames = [paired_differences(table, metric=m, pairs=[(s, reference) for s in shown], by="condition",
                                 level=level) for m in metrics]
    frames = [f[np.isfinite(f["ci_low"].to_numpy(float))] for f in frames]  # no interval (< 2 pairs): not drawn
    if not shown or all(f.empty for f in frames):
        return None
    conditions = list(dict.fromkeys(c for f in frames for c in f["condition"]))
    markers = "osD^v<>"
    fig = Figure(figsize=(max(6.4, 2.4 * len(metrics) + 1.2), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, frame, panel in zip(axes, frames, titles):
        for k, cond in enumerate(conditions):
            rows = frame[frame["condition"] == cond]
            offset = (k - (len(conditions) - 1) / 2) * 0.15
            for i, (_, row) in enumerate(rows.iterrows()):
                pos = shown.index(row["method"]) + offset
                color = COLORS[methods.index(row["method"]) % len(COLORS)]
                yerr = [[row["difference"] - row["ci_low"]], [row["ci_high"] - row["difference"]]]
                ax.errorbar([pos], [row["difference"]], yerr=yerr, fmt=markers[k % len(markers)], capsize=4, ms=5,
                            color=color, label=f"condition {cond}" if i == 0 else None)
        ax.axhline(0.0, color="0.4", lw=0.8)
        _method_axis(ax, shown, panel)
    axes[0].set_ylabel(ylabel)
    if len(conditions) > 1:
        axes[-1].legend(fontsize=7)
    pairs = sorted({int(n) for f in frames for n in f["pairs"]})
    counts = f"{pairs[0]} replicates" if len(pairs) == 1 else f"{pairs[0]}-{pairs[-1]} replicates"
    fig.suptitle(f"{title}\n(bars: {level:.0%} paired t interval over {counts}, as in the report)", fontsize=10)
    return fig
