"""``report.html``: the whole report in one self-contained file (DESIGN §7).

The same content as ``report.md`` (:mod:`.report`: the design with truths, failures, performance tables with
MCSE, rates, figures) plus the study's settings, in one HTML file with no outside reference: figures are
embedded as ``data:`` URIs (PNG or SVG, base64), the style sheet is inline, there is no script. Every text
taken from the study (names, levels, messages, options) is escaped with :func:`html.escape`, so a failure
message holding ``<script>`` shows as text. Open it in any browser, mail it, attach it to a paper's
supplement.

:func:`write_reports` writes ``report.md`` and ``report.html`` side by side; the command line and
:meth:`StudyResult.report` call it.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .paired import comparison_parts
from .rates import RateResult
from .report import (PERFORMANCE_NOTE, PRECISION_NOTE, design_table, format_value, ordered_estimands, rate_parts,
                     report_facts, summary_wide, write_report)
from .storage import atomic_write_text

__all__ = ["write_report_html", "write_reports", "html_table", "MIME"]

#: File suffix -> MIME type of the figures that can be embedded.
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem auto;
       max-width: 78rem; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2rem; } h3 { font-size: 1.05rem; }
table.simstudy { border-collapse: collapse; font-size: 0.82rem; margin: 0.5rem 0 1rem; }
table.simstudy th, table.simstudy td { border: 1px solid #d0d0d0; padding: 0.15rem 0.45rem; text-align: right;
                                     white-space: nowrap; }
table.simstudy th { background: #f1f3f5; }
table.simstudy tr:nth-child(even) td { background: #fafafa; }
table.simstudy td.text, table.simstudy th.text { text-align: left; }
.scroll { overflow-x: auto; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #555; }
code { background: #f4f4f4; padding: 0 0.2rem; }
nav a { margin-right: 0.8rem; }
.note { color: #8a4b00; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _code(text: str) -> str:
    """Escaped text with ``backticks`` as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _esc(text))


def html_table(frame: pd.DataFrame, *, max_rows: int | None = None) -> str:
    """A DataFrame as an escaped HTML table (``class="simstudy"``; numbers as :func:`~.report.format_value`,
    left-aligned text columns), at most ``max_rows`` rows with a line saying how many were left out."""
    cols = [str(c) for c in frame.columns]
    text = [not pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    head = "".join(f'<th class="{"text" if t else "num"}">{_esc(c)}</th>' for c, t in zip(cols, text))
    rows = []
    for i, row in enumerate(frame.itertuples(index=False)):
        if max_rows is not None and i >= max_rows:
            rows.append(f'<tr><td class="text" colspan="{len(cols)}">... {len(frame) - max_rows} more rows</td></tr>')
            break
        cells = "".join(f'<td class="{"text" if t else "num"}">{_esc(format_value(v))}</td>' for v, t in zip(row, text))
        rows.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table class="simstudy"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _figure(title: str, path: Path) -> str:
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        why = "not found" if not path.is_file() else f"a {path.suffix} file cannot be embedded"
        return f'<p class="note">Figure {_esc(title)}: {_esc(path.name)} {why}.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_esc(title)}">'
            f"<figcaption>{_esc(title)} ({_esc(path.name)})</figcaption></figure>")


def _settings(result) -> pd.DataFrame:
    """Manifest keys (but the design, shown above) and each study option, as setting / value text."""
    man = result.manifest
    rows = [(k, man[k]) for k in man if k not in ("conditions", "truths", "options")]
    rows += [(f"options.{k}", v) for k, v in result.options.items()]
    text = [v if isinstance(v, str) else json.dumps(v, default=repr) for _, v in rows]
    return pd.DataFrame({"setting": [k for k, _ in rows], "value": text})


def write_report_html(result, outdir: str | os.PathLike, *,
                      figures: Sequence[tuple[str, os.PathLike]] | None = None, summary: pd.DataFrame | None = None,
                      rates: Sequence[RateResult] | None = None, max_failures: int = 20,
                      skipped_figures: Sequence[str] | None = None) -> Path:
    """Write ``outdir/report.html`` (parameters as :func:`simstudy.engine.report.write_report`).

    Returns
    -------
    Path
        The report file. Figures named in ``figures`` are read and embedded; one whose file is missing, or
        of a format a browser cannot show inline, is named in a note instead.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summary = result.summary() if summary is None else summary
    rates = result.rates() if rates is None else rates
    opts, t = result.options, result.table
    skipped = list(getattr(figures, "skipped", ()) or ()) + list(skipped_figures or ())
    parts = [f"<h1>Simulation study: {_esc(result.name)}</h1>"]
    if opts.get("description"):
        parts.append(f"<p>{_esc(opts['description'])}</p>")
    parts.append("<ul>" + "".join(f"<li>{_code(f)}</li>" for f in report_facts(result)) + "</ul>")
    compared = comparison_parts(result)  # the study's declared paired comparisons, the primary one first
    sections = ["design", "failures"] + (["precision"] if result.precision is not None else []) + (
        ["comparisons"] if compared is not None else []) + ["performance"] + (["rates"] if rates else []) + (
        ["figures"] if figures or skipped else []) + ["settings"]
    parts.append("<nav>" + "".join(f'<a href="#{s}">{s.capitalize()}</a>' for s in sections) + "</nav>")
    parts += ['<h2 id="design">Design</h2>', html_table(design_table(result))]
    parts.append('<h2 id="failures">Failures</h2>')
    n_fail = int((t["status"] != "ok").sum())
    if n_fail == 0:
        parts.append(f"<p>None: all {len(t)} finished rows have status ok.</p>")
    else:
        fl = result.failures()
        parts += ["<p>Performance measures use only the replicates with status ok (column n_used); failed rows "
                  "are counted, never re-drawn.</p>", html_table(result.failure_counts()),
                  f"<p>First {min(max_failures, len(fl))} of {len(fl)} failures (reproduce with "
                  "<code>Study.run_replicate(condition, replicate)</code>):</p>",
                  html_table(fl.drop(columns=["seed"]), max_rows=max_failures)]
    if result.precision is not None:
        parts += ['<h2 id="precision">Precision target</h2>', f"<p>{_esc(PRECISION_NOTE)}</p>",
                  html_table(result.precision)]
    if compared is not None:
        parts += ['<h2 id="comparisons">Paired comparisons</h2>', f"<p>{_esc(compared['rule'])}</p>"]
        parts += [f"<p><strong>Primary comparison</strong> ({_esc(p)}).</p>" for p in compared["primary"]]
        parts.append(html_table(compared["table"]))
    parts += ['<h2 id="performance">Performance</h2>', f"<p>{_esc(PERFORMANCE_NOTE)}</p>"]
    if opts.get("reference"):
        parts.append(f"<p>Reference method for relative efficiency: {_esc(opts['reference'])}.</p>")
    if not len(summary):
        parts.append("<p>No finished rows.</p>")
    estimands, n_headline = ordered_estimands(summary, opts)
    for i, e in enumerate(estimands):
        if n_headline and i == n_headline:
            parts += ["<h3>Further metrics</h3>", "<p>Diagnostics and secondary metrics of every method.</p>"]
        wide = summary_wide(summary, e, combined=True).drop(columns=["condition"])
        is_metric = set(summary.loc[summary["estimand"] == e, "measure"]) == {"mean"}
        parts += [f"<h3>{'Metric' if is_metric else 'Estimand'}: {_esc(e)}</h3>", html_table(wide)]
    if rates:
        parts.append('<h2 id="rates">Rates</h2>')
        for r in rates:
            part = rate_parts(r)
            parts += [f"<h3>{_esc(part['title'])}</h3>", f"<p>{_esc(part['text'])}</p>", html_table(part["fits"])]
            parts += [f"<p>{_esc(part['blank_note'])}</p>"] if part["blank_note"] else []
            parts += [f"<p>{_esc(part['points_text'])}</p>", html_table(part["points"])]
            parts += [f"<p>{_esc(n)}</p>" for n in part["notes"]]
    if figures or skipped:
        parts.append('<h2 id="figures">Figures</h2>')
        parts += [_figure(str(title), Path(path)) for title, path in figures or []]
        if skipped:
            parts.append("<ul>" + "".join(f'<li class="note">skipped: {_esc(n)}</li>' for n in skipped) + "</ul>")
    parts += ['<h2 id="settings">Settings</h2>', html_table(_settings(result))]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>Simulation study: {_esc(result.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    path = outdir / "report.html"
    atomic_write_text(path, page)
    return path


def write_reports(result, outdir: str | os.PathLike, **kwargs) -> Path:
    """Write ``report.md`` and ``report.html`` into ``outdir`` (keyword arguments of
    :func:`simstudy.engine.report.write_report`); returns the path of ``report.md`` (``report.html`` is
    beside it). The summary and rates are computed once for both."""
    if kwargs.get("summary") is None:
        kwargs["summary"] = result.summary()
    if kwargs.get("rates") is None:
        kwargs["rates"] = result.rates()
    path = write_report(result, outdir, **kwargs)
    write_report_html(result, outdir, **kwargs)
    return path
