"""The standard figures of a study and the figure hooks, drawn so that one failure never breaks the outputs
(DESIGN §7: every figure shows uncertainty; a figure that cannot be drawn is skipped with a one-line note).

:func:`make_figures` draws the bias, coverage, zip, mean and rate plots of :mod:`.plots` and every
``figures`` hook a study names, each through one guard; it returns a :class:`FigureList`.

Many conditions. The dot plots of :func:`.plots.measure_plot` put every condition side by side and are
unreadable beyond about a dozen. The rule: with more than :data:`DOT_PLOT_MAX_CONDITIONS` (12) conditions,
each bias, coverage and mean dot plot is replaced by a nested loop plot (:mod:`.loop_plot`, files
``loop_MEASURE_NAME``), and, when two or more factors vary, a heat map (:mod:`.heatmap`, files
``heatmap_MEASURE_NAME``) of the coverage of each estimand (its bias if it has no interval) and of the mean
of each plotted metric is added, over the two factors with the most levels. A heat map that would need more
than :data:`~.heatmap.MAX_PANELS` panels is skipped with a note (draw it with ``heatmap(..., where=)``).

Formats. Every standard figure is written once per format of ``formats`` (``png``, ``svg``); the list holds
the first format's file, ``FigureList.files`` every file. Figure hooks write what they write.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .heatmap import heatmap
from .loop_plot import loop_plot
from .plots import measure_plot, rate_plot, save_figure, zip_plot
from .rates import RateResult
from .tidy import companion_columns

__all__ = ["FigureList", "file_stem", "make_figures", "figure_formats", "FIGURE_FORMATS", "DOT_PLOT_MAX_CONDITIONS"]

#: The formats :func:`make_figures` writes (``--figure-format``).
FIGURE_FORMATS = ("png", "svg")
#: Above this many conditions the dot plots give way to nested loop plots and heat maps.
DOT_PLOT_MAX_CONDITIONS = 12


def figure_formats(value) -> tuple[str, ...]:
    """Figure formats from ``"png,svg"``, ``["png", "svg"]`` or a list of such strings (``--figure-format``
    given twice), in order, without repeats; ValueError naming the value and :data:`FIGURE_FORMATS`."""
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        for word in str(item).split(","):
            fmt = word.strip().lower().lstrip(".")
            if fmt not in FIGURE_FORMATS:
                where = "" if value == word else f" (in {value!r})"
                raise ValueError(f"figure format {word.strip()!r}{where} is invalid; allowed: one or more of "
                                 f"{', '.join(FIGURE_FORMATS)}, comma separated (e.g. png,svg)")
            if fmt not in out:
                out.append(fmt)
    if not out:
        raise ValueError(f"figure formats {value!r} are invalid; allowed: one or more of {', '.join(FIGURE_FORMATS)}")
    return tuple(out)


class FigureList(list):
    """The figures written by :func:`make_figures`: a list of ``(title, path)``, with ``skipped``, the
    one-line notes of the figures that could not be drawn (``"Rate of kl in n: not drawn (...)"``), and
    ``files``, every file written (one per figure and format)."""

    def __init__(self, items=(), skipped=(), files=()):
        super().__init__(items)
        self.skipped: list[str] = list(skipped)
        self.files: list[Path] = list(files)


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_figures(result, outdir: str | os.PathLike, *, summary: pd.DataFrame | None = None,
                 rates: Sequence[RateResult] | None = None, max_metrics: int = 6,
                 stderr: bool = True, formats: str | Sequence[str] = ("png",),
                 many_conditions: int = DOT_PLOT_MAX_CONDITIONS) -> FigureList:
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
        Folder for the figure files (created).
    summary : DataFrame, optional
        Precomputed :meth:`StudyResult.summary`.
    rates : list of RateResult, optional
        Precomputed rate fits (default: :meth:`StudyResult.rates`).
    max_metrics : int
        At most this many ``mean`` plots.
    stderr : bool
        Print the note of each skipped figure to stderr (default).
    formats : str or list of str
        ``"png"`` (default), ``"svg"``, or several (``"png,svg"``, ``["png", "svg"]``): each figure is
        written in each; the returned list names the first format's file.
    many_conditions : int
        Above this many conditions, nested loop plots replace the dot plots and heat maps are added (see
        the module's docstring).

    Returns
    -------
    FigureList
        Title and file of each figure written; ``.skipped`` the notes of
        those not drawn.
    """

    formats = figure_formats(formats)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = FigureList()

    def skip(title: str, exc: BaseException) -> None:
        note = f"{title}: not drawn ({_one_line(exc)})"
        out.skipped.append(note)
        if stderr:
            print(f"simstudy: figure skipped: {note}", file=sys.stderr)

    def draw(title: str, build, stem: str) -> None:
        # the one place a figure is drawn: whatever goes wrong, the figure is skipped with a note
        try:
            fig = build()
            paths = [save_figure(fig, outdir / f"{stem}.{fmt}") for fmt in formats]
            out.append((title, paths[0]))
            out.files.extend(paths)
        except Exception as exc:  # noqa: BLE001 - a figure never stops the outputs
            skip(title, exc)

    def dots_or_loop(title: str, measure: str, name: str, reference: float | None) -> None:
        if many:
            draw(f"{title} (nested loop plot)", lambda: loop_plot(summary, measure, name, factors=result.factors,
                                                                  reference_line=reference),
                 f"loop_{measure}_{name}")
        else:
            draw(title, lambda: measure_plot(summary, measure, name, factors=result.factors,
                                             reference_line=reference), f"{measure}_{name}")

    def heat(title: str, measure: str, name: str, center: float | None) -> None:
        if many and len(varying) >= 2:
            draw(f"{title} (heat map)", lambda: heatmap(summary, measure, name, factors=result.factors,
                                                        center=center), f"heatmap_{measure}_{name}")

    summary = result.summary() if summary is None else summary
    level = float(result.options.get("level", 0.95))
    estimands = list(dict.fromkeys(summary.loc[summary["measure"] == "bias", "estimand"]))
    n_est = len({k for t in result.truths for k in t})
    many = summary["condition"].nunique() > many_conditions if len(summary) else False
    varying = [f for f in result.factors if f in summary and summary[f].nunique(dropna=False) > 1]
    for e in estimands:
        dots_or_loop(f"Bias of {e}", "bias", e, 0.0)
        has_coverage = ((summary["estimand"] == e) & (summary["measure"] == "coverage")).any()
        if has_coverage:
            dots_or_loop(f"Coverage of {e}", "coverage", e, level)
            if {"ci_low", "ci_high"} <= set(companion_columns(e, result.table.columns, n_est)):
                draw(f"Zip plot of {e}", lambda: zip_plot(result, e, level=level), f"zip_{e}")
        heat(f"Coverage of {e}" if has_coverage else f"Bias of {e}", "coverage" if has_coverage else "bias", e,
             level if has_coverage else 0.0)
    metrics = [m for m in dict.fromkeys(summary.loc[summary["measure"] == "mean", "estimand"]) if m not in estimands]
    headline = result.options.get("headline")
    if headline:  # the study names the metrics that matter; plot those, in that order
        metrics = [m for m in headline if m in metrics]
    for m in metrics[:max_metrics]:
        dots_or_loop(f"Mean of {m}", "mean", m, None)
        heat(f"Mean of {m}", "mean", m, None)
    if rates is None:
        try:
            rates = result.rates()
        except Exception as exc:  # noqa: BLE001
            skip("Rate plots", exc)
            rates = []
    for i, r in enumerate(rates):
        draw(f"Rate of {r.metric} in {r.x}", lambda: rate_plot(r), f"rate_{i}_{file_stem(r.metric)}")
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


def file_stem(text: str) -> str:
    """``text`` as part of a file name: letters and digits kept, everything else ``_``."""
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "metric"
