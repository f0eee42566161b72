"""``report.md``: design, failures, performance tables with MCSE, rates and figures (DESIGN §7)."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .paired import comparison_parts
from .performance import MEASURES
from .progress import clock
from .rates import RateResult
from .storage import atomic_write_text

__all__ = ["write_report", "summary_wide", "markdown_table", "format_summary", "format_failures", "format_value",
           "report_facts", "design_table", "ordered_estimands", "rate_parts", "PERFORMANCE_NOTE", "PRECISION_NOTE"]

#: The paragraph above the performance tables of ``report.md`` and ``report.html``.
PERFORMANCE_NOTE = ("Cells are value (Monte Carlo standard error); formulas of Morris, White and Crowther (2019), "
                    "Table 6. n_used: replicates with status ok. relerr_modse is a fraction (x100 for percent); "
                    "rel_efficiency is (empSE_ref / empSE)^2 on paired replicates.")

#: The paragraph above the precision table (a run with ``target_mcse``; :mod:`.precision`).
PRECISION_NOTE = ("Replicated in rounds until each condition's MCSE of the measure was at or below the target "
                  "(status reached) or the cap was hit (capped); replicates: the count each condition ended with.")


def _fmt(v) -> str:
    return format_value(v).replace("|", "\\|").replace("\n", " ")  # a markdown cell


def format_value(v) -> str:
    """One table cell as text: numbers to 4 significant digits, NaN blank, booleans yes/no."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def markdown_table(frame: pd.DataFrame, max_rows: int | None = None) -> str:
    """Render a DataFrame as a GitHub-flavoured markdown table (numbers to 4 significant digits)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    rows = frame.itertuples(index=False)
    for i, row in enumerate(rows):
        if max_rows is not None and i >= max_rows:
            lines.append(f"| ... {len(frame) - max_rows} more rows |" + " |" * (len(cols) - 1))
            break
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def summary_wide(summary: pd.DataFrame, estimand: str | None = None, *, combined: bool = False) -> pd.DataFrame:
    """Pivot a tidy summary to one row per condition x method (x estimand).

    Parameters
    ----------
    summary : DataFrame
        :meth:`StudyResult.summary` output.
    estimand : str, optional
        Keep only this estimand (and drop the ``estimand`` column).
    combined : bool
        One text column per measure, ``"value (mcse)"``, instead of the
        numeric ``measure`` and ``measure_mcse`` columns.
    """
    cols = list(summary.columns)
    factors = cols[cols.index("condition") + 1:cols.index("method")]
    s = summary if estimand is None else summary[summary["estimand"] == estimand]
    keys = ["condition", *factors, "method"] + (["estimand"] if estimand is None else [])
    if not len(s):
        return pd.DataFrame(columns=keys)
    order = {m: i for i, m in enumerate(MEASURES)}
    measures = sorted(s["measure"].unique(), key=lambda m: order.get(m, len(order)))
    out = s.groupby(keys, sort=False, dropna=False).agg(n_used=("n_used", "max"),
                                                         failures=("failures", "max")).reset_index()
    for m in measures:
        sm = s[s["measure"] == m][keys + ["value", "mcse"]]
        if combined:
            sm = sm.assign(**{m: [f"{_fmt(v)} ({_fmt(e) or '-'})" for v, e in zip(sm["value"], sm["mcse"])]})
            sm = sm[keys + [m]]
        else:
            sm = sm.rename(columns={"value": m, "mcse": f"{m}_mcse"})
        out = out.merge(sm, on=keys, how="left")
    if combined:
        for m in measures:
            out[m] = out[m].fillna("")
    return out


def format_summary(summary: pd.DataFrame, max_rows: int = 60) -> str:
    """Plain-text summary for terminals: one row per condition x method x estimand, cells ``value (mcse)``."""
    if not len(summary):
        return "(no finished rows)"
    wide = summary_wide(summary, combined=True).drop(columns=["condition"])
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_rows", max_rows,
                           "display.max_colwidth", 40):
        text = wide.to_string(index=False, max_rows=max_rows)
    return text + "\n(cells: value (MCSE); " + summary.attrs.get("note", "") + ")"


def format_failures(result, max_messages: int = 3) -> list[str]:
    """Lines for the terminal: failed rows per method and status, then the most frequent messages with counts
    (all failures are in ``report.md`` and :meth:`StudyResult.failures`). Empty when nothing failed."""
    bad = result.table[result.table["status"] != "ok"]
    if bad.empty:
        return []
    counts = result.failure_counts()
    counts = counts[counts["status"] != "ok"]
    lines = ["failed rows: " + ", ".join(f"{m} {s} {n}" for m, s, n in counts.itertuples(index=False))]
    messages = bad.groupby(["method", "message"], sort=False).size().sort_values(ascending=False, kind="mergesort")
    for (method, message), n in messages.head(max_messages).items():
        text = str(message).splitlines()[0] if str(message) else ""
        lines.append(f"  {n} x {method}: {text[:200]}")
    if len(messages) > max_messages:
        lines.append(f"  ... {len(messages) - max_messages} other messages (report.md lists the failures)")
    return lines


def rate_parts(rate: RateResult) -> dict:
    """The pieces of a rate's report section: ``title``, ``text`` (the fit), ``fits`` (table), ``blank_note``
    (or None), ``points_text``, ``points`` (table) and ``notes`` (list); ``report.md`` and ``report.html``
    render them."""
    keep = list(rate.by) + [c for c in ["k", "slope", "slope_low", "slope_high", "theory_slope", "slope_ok",
                                        "constant", "theory_fit_constant", "theory_fit_constant_low",
                                        "theory_fit_constant_high", "lack_of_fit_p"] if c in rate.fits]
    blank = None
    if "lack_of_fit_p" in rate.fits and rate.fits["lack_of_fit_p"].isna().any():
        blank = ("lack_of_fit_p is blank where it is not testable: the chi-square lack-of-fit test needs 3 or "
                 f"more levels of {rate.x} (with 2 the line fits exactly; no degrees of freedom).")
    s_txt = "the theoretical slope" if rate.theory_slope is not None else "the fitted slope"
    pk = list(rate.by) + [c for c in [rate.x, "n_used", "mean", "mcse", "constant", "constant_mcse", "constant_z",
                                      "constant_ok"] if c in rate.points]
    return {"title": f"Rate of {rate.metric} in {rate.x}",
            "text": f"WLS of log mean {rate.metric} on log {rate.x}, weights from the replicate-level MCSE "
                    f"({int(rate.level * 100)}% intervals, scale={rate.scale})"
                    + (f"; theoretical slope {rate.theory_slope:g}" if rate.theory_slope is not None else "")
                    + (f", theoretical constant {rate.theory_constant:g}" if rate.theory_constant is not None
                       else "") + ".",
            "fits": rate.fits[keep], "blank_note": blank,
            "points_text": f"Per {rate.x}: mean with MCSE, and the constant {rate.x}^(-s) x mean with s {s_txt}:",
            "points": rate.points[pk], "notes": [f"Note: {n}" for n in rate.notes]}


def _rate_section(rate: RateResult) -> list[str]:
    part = rate_parts(rate)
    lines = [f"### {part['title']}", "", part["text"], "", markdown_table(part["fits"]), ""]
    if part["blank_note"]:
        lines += [part["blank_note"], ""]
    lines += [part["points_text"], "", markdown_table(part["points"]), ""]
    return lines + part["notes"]


def report_facts(result) -> list[str]:
    """The header lines of a report (conditions, rows, failures, time, hash, seeds); code in backticks."""
    man, t = result.manifest, result.table
    total = result.expected_rows
    n_fail = int((t["status"] != "ok").sum())
    secs = float(result.timings["seconds"].sum()) if result.timings is not None and len(result.timings) else math.nan
    return [f"conditions: {len(man['conditions'])}; methods: {', '.join(result.methods)}; replicates per "
            f"condition: {man['replicates']}; root seed: {man['seed']}",
            f"rows finished: {len(t)} of {total}" + ("" if len(t) == total else " (INCOMPLETE: partial results)")
            + f"; failures: {n_fail}",
            (f"compute time (sum over rows): {secs:.1f} s" + (f" ({clock(secs)})" if secs >= 60 else ""))
            if math.isfinite(secs) else "compute time: unknown",
            f"config hash: `{man.get('config_hash', '')[:16]}`; simstudy {man.get('simstudy_version', '?')}; "
            f"written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            "seeds: replicate r of condition c draws from `numpy.random.SeedSequence(seed, spawn_key=(c, r))`"]


def design_table(result) -> pd.DataFrame:
    """The design: ``condition``, the factors and one ``truth: ESTIMAND`` column per estimand with a truth."""
    design = result.conditions.copy()
    for e in dict.fromkeys(k for tr in result.truths for k in tr):
        design[f"truth: {e}"] = [tr.get(e, np.nan) for tr in result.truths]
    return design


def ordered_estimands(summary: pd.DataFrame, options: dict) -> tuple[list[str], int]:
    """The estimands and metrics of a summary in report order (the study's ``headline`` first) and how many
    of them are headline ones."""
    estimands = list(dict.fromkeys(summary["estimand"]))
    headline = [e for e in options.get("headline") or [] if e in estimands]
    return headline + [e for e in estimands if e not in headline], len(headline)


def write_report(result, outdir: str | os.PathLike, *, figures: Sequence[tuple[str, os.PathLike]] | None = None,
                 summary: pd.DataFrame | None = None, rates: Sequence[RateResult] | None = None,
                 max_failures: int = 20, skipped_figures: Sequence[str] | None = None) -> Path:
    """Write ``outdir/report.md``.

    Parameters
    ----------
    result : StudyResult
    outdir : path
        Folder of the report; figure paths are written relative to it.
    figures : list of (title, path), optional
        Figures to embed (e.g. from :func:`simstudy.engine.figures.make_figures`).
    summary : DataFrame, optional
        Precomputed summary.
    rates : list of RateResult, optional
        Precomputed rate fits (default: the study's declared rates).
    max_failures : int
        Failure messages listed individually.
    skipped_figures : list of str, optional
        One-line notes of figures that could not be drawn, listed under
        Figures (those of a :class:`~simstudy.engine.figures.FigureList` passed
        as ``figures`` are listed too).

    Returns
    -------
    Path
        The report file.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summary = result.summary() if summary is None else summary
    rates = result.rates() if rates is None else rates
    opts = result.options
    t = result.table
    lines = [f"# Simulation study: {result.name}", ""]
    if opts.get("description"):
        lines += [str(opts["description"]), ""]
    n_fail = int((t["status"] != "ok").sum())
    lines += [f"- {fact}" for fact in report_facts(result)] + [""]
    lines += ["## Design", ""]
    lines += [markdown_table(design_table(result)), ""]
    lines += ["## Failures", ""]
    if n_fail == 0:
        lines += [f"None: all {len(t)} finished rows have status ok.", ""]
    else:
        lines += ["Performance measures use only the replicates with status ok (column n_used); failed rows are "
                  "counted, never re-drawn.", ""]
        lines += [markdown_table(result.failure_counts()), ""]
        fl = result.failures()
        lines += [f"First {min(max_failures, len(fl))} of {len(fl)} failures (reproduce with "
                  "`Study.run_replicate(condition, replicate)`):", "",
                  markdown_table(fl.drop(columns=["seed"]), max_rows=max_failures), ""]
    if result.precision is not None:  # a run to a precision target: replicates used and MCSE reached
        lines += ["## Precision target", "", PRECISION_NOTE, "", markdown_table(result.precision), ""]
    compared = comparison_parts(result)  # the study's declared paired comparisons, the primary one first
    if compared is not None:
        lines += ["## Paired comparisons", "", compared["rule"], ""]
        lines += [f"- **Primary comparison** ({p})." for p in compared["primary"]] + ([""] if compared["primary"] else [])
        lines += [markdown_table(compared["table"]), ""]
    lines += ["## Performance", "", PERFORMANCE_NOTE, ""]
    if opts.get("reference"):
        lines += [f"Reference method for relative efficiency: {opts['reference']}.", ""]
    if not len(summary):
        lines += ["No finished rows.", ""]
    estimands, n_headline = ordered_estimands(summary, opts)  # the study's headline metrics first
    for i, e in enumerate(estimands):
        if n_headline and i == n_headline:
            lines += ["### Further metrics", "", "Diagnostics and secondary metrics of every method.", ""]
        wide = summary_wide(summary, e, combined=True).drop(columns=["condition"])
        is_metric = set(summary.loc[summary["estimand"] == e, "measure"]) == {"mean"}
        lines += [f"### {'Metric' if is_metric else 'Estimand'}: {e}", "", markdown_table(wide), ""]
    if rates:
        lines += ["## Rates", ""]
        for r in rates:
            lines += _rate_section(r)
    skipped = list(getattr(figures, "skipped", ()) or ()) + list(skipped_figures or ())
    if figures or skipped:
        lines += ["## Figures", ""]
        for title, path in figures or []:
            rel = os.path.relpath(Path(path), outdir)
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
        lines += [f"- skipped: {note}" for note in skipped] + ([""] if skipped else [])
    path = outdir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
