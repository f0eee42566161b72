"""The standard figures of a study and the figure hooks, drawn so that one failure never breaks the outputs
(DESIGN §7: every figure shows uncertainty; a figure that cannot be drawn is skipped with a one-line note).

:func:`make_figures` draws the bias, coverage, zip, mean and rate plots of :mod:`.plots` and every
``figures`` hook a study names, each through one guard; it returns a :class:`FigureList`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .plots import bias_plot, measure_plot, rate_plot, save_figure, zip_plot
from .rates import RateResult
from .tidy import companion_columns

__all__ = ["FigureList", "make_figures"]


class FigureList(list):
    """The figures written by :func:`make_figures`: a list of ``(title, path)``, with ``skipped``, the
    one-line notes of the figures that could not be drawn (``"Rate of kl in n: not drawn (...)"``)."""

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped: list[str] = list(skipped)


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_figures(result, outdir: str | os.PathLike, *, summary: pd.DataFrame | None = None,
                 rates: Sequence[RateResult] | None = None, max_metrics: int = 6,
                 stderr: bool = True) -> FigureList:
    """Write the standard figures of a study to ``outdir``.

    Bias (estimands with a truth), coverage and zip plots (estimands with
    intervals), the mean of each other metric, the rate plots declared in the
    study's ``options["rates"]`` and any ``options["figures"]`` hooks
    (``options["headline"]``, a list of metric names, restricts and orders the
    mean plots)
    (``"module:function"``, called as ``fn(result, outdir)`` and returning
    ``[(title, path), ...]``).

    A figure that cannot be drawn (a rate plot with no level that has an MCSE,
    as with one replicate; a hook that raises) is skipped: a one-line note is
    kept in the returned list's ``skipped`` (and shown by
    :func:`simstudy.engine.report.write_report`) and printed to stderr. The
    study's outputs never fail for a figure.

    Parameters
    ----------
    result : StudyResult
    outdir : path
        Folder for the PNG files (created).
    summary : DataFrame, optional
        Precomputed :meth:`StudyResult.summary`.
    rates : list of RateResult, optional
        Precomputed rate fits (default: :meth:`StudyResult.rates`).
    max_metrics : int
        At most this many ``mean`` plots.
    stderr : bool
        Print the note of each skipped figure to stderr (default).

    Returns
    -------
    FigureList
        Title and file of each figure written; ``.skipped`` the notes of
        those not drawn.
    """

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = FigureList()

    def skip(title: str, exc: BaseException) -> None:
        note = f"{title}: not drawn ({_one_line(exc)})"
        out.skipped.append(note)
        if stderr:
            print(f"simstudy: figure skipped: {note}", file=sys.stderr)

    def draw(title: str, build, filename: str) -> None:
        # the one place a figure is drawn: whatever goes wrong, the figure is skipped with a note
        try:
            fig = build()
            out.append((title, save_figure(fig, outdir / filename)))
        except Exception as exc:  # noqa: BLE001 - a figure never stops the outputs
            skip(title, exc)

    summary = result.summary() if summary is None else summary
    level = float(result.options.get("level", 0.95))
    estimands = list(dict.fromkeys(summary.loc[summary["measure"] == "bias", "estimand"]))
    n_est = len({k for t in result.truths for k in t})
    for e in estimands:
        draw(f"Bias of {e}", lambda: bias_plot(summary, e, factors=result.factors), f"bias_{e}.png")
        if ((summary["estimand"] == e) & (summary["measure"] == "coverage")).any():
            draw(f"Coverage of {e}", lambda: measure_plot(summary, "coverage", e, factors=result.factors,
                                                          reference_line=level), f"coverage_{e}.png")
            if {"ci_low", "ci_high"} <= set(companion_columns(e, result.table.columns, n_est)):
                draw(f"Zip plot of {e}", lambda: zip_plot(result, e, level=level), f"zip_{e}.png")
    metrics = [m for m in dict.fromkeys(summary.loc[summary["measure"] == "mean", "estimand"]) if m not in estimands]
    headline = result.options.get("headline")
    if headline:  # the study names the metrics that matter; plot those, in that order
        metrics = [m for m in headline if m in metrics]
    for m in metrics[:max_metrics]:
        draw(f"Mean of {m}", lambda: measure_plot(summary, "mean", m, factors=result.factors), f"mean_{m}.png")
    if rates is None:
        try:
            rates = result.rates()
        except Exception as exc:  # noqa: BLE001
            skip("Rate plots", exc)
            rates = []
    for i, r in enumerate(rates):
        draw(f"Rate of {r.metric} in {r.x}", lambda: rate_plot(r), f"rate_{i}_{_slug(r.metric)}.png")
    from .callables import resolve_callable

    for hook in result.options.get("figures", []):
        name = hook if isinstance(hook, str) else getattr(hook, "__qualname__", repr(hook))
        try:
            fn = resolve_callable(hook, "figures") if isinstance(hook, str) else hook
            made = fn(result, outdir) or []
            out.extend((str(title), Path(path)) for title, path in made)
            out.skipped.extend(str(n) for n in getattr(made, "skipped", ()))  # a hook may return a FigureList
        except Exception as exc:  # noqa: BLE001
            skip(f"Figure hook {name}", exc)
    return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "metric"
