"""The readable summary of a study, in the manner of statsmodels' ``Summary`` (DESIGN §7; STYLE: statsmodels).

:meth:`StudyResult.summary` returns a :class:`StudySummary`: the tidy performance frame it always returned (one
row per condition x method x estimand x measure, with ``value``, ``mcse``, ``n_used``, ``failures``; every
DataFrame operation works and gives a plain DataFrame) that *prints* as a summary for people::

    >>> s = result.summary()
    >>> print(s)            # the design, replicates per condition, performance with MCSE, failures
    >>> s.as_html()         # the same as HTML tables; notebooks show it through _repr_html_
    >>> s.query("measure == 'coverage'")   # still the tidy frame

The text and the HTML are two renderings of the same :meth:`StudySummary.tables`. The performance tables show
the key measures (:data:`KEY_MEASURES` and measures of your own, each cell ``value (MCSE)``) by default;
``as_text(measures="all")`` shows every one; the frame (and ``summary.csv``) always holds them all.
"""
from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .design_columns import truth_frame
from .measures import MEASURES
from .report import format_failures, summary_wide

__all__ = ["StudySummary", "KEY_MEASURES"]

#: Measures the text and HTML show by default (with the user's own measures), in this order when present.
KEY_MEASURES = ("bias", "empse", "rmse", "coverage", "rel_efficiency", "power")
_WIDTH = 78  # of the rules and the header, as statsmodels' summaries


def _num(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


class StudySummary(pd.DataFrame):
    """The tidy performance frame of a study that prints as a readable summary.

    Built by :meth:`StudyResult.summary` (:meth:`build`); holds the result it summarises, which is not
    carried to frames derived from it (``s.query(...)``, ``s.copy()`` are plain DataFrames) nor pickled
    (an unpickled summary prints as its frame).
    """

    _internal_names = pd.DataFrame._internal_names + ["_result", "_settings"]
    _internal_names_set = set(_internal_names)

    @property
    def _constructor(self):
        return pd.DataFrame

    @classmethod
    def build(cls, frame: pd.DataFrame, result, *, reference: str | None = None, alpha: float = 0.05,
              own: Sequence[str] = ()) -> "StudySummary":
        """Wrap a :func:`~simstudy.engine.performance.summarise` frame of ``result``.

        ``reference`` and ``alpha`` are the settings it was computed with; ``own``: names of measures of your
        own (shown by default beside :data:`KEY_MEASURES`).
        """
        out = cls(frame)
        out.attrs = dict(frame.attrs)
        out._result = result
        out._settings = {"reference": reference, "alpha": float(alpha), "own": list(own)}
        return out

    # -- the tables ----------------------------------------------------------------------------------------
    def tables(self, measures: str | Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
        """The summary's tables, as DataFrames of text cells ready to render.

        Parameters
        ----------
        measures : None, "all" or list of str
            Columns of the performance tables: by default :data:`KEY_MEASURES` and your own measures
            (an estimand with none of them, such as a metric with only a mean, shows what it has).

        Returns
        -------
        dict
            ``"header"`` (two columns: item, value), ``"design"`` (condition, factors, ``true_ESTIMAND``,
            ``replicates`` finished of planned), ``"performance: ESTIMAND"`` for each estimand (factors,
            ``method``, ``n_used``, ``failures``, one ``value (MCSE)`` column per measure) and ``"failures"``
            (rows per method and status that are not ok; empty when none).
        """
        res = self._result
        man = res.manifest
        t = res.table
        n_fail = int((t["status"] != "ok").sum())
        s = self._settings
        header = [("Conditions", f"{len(man['conditions'])} (factors: "
                                                      f"{', '.join(res.factors) or 'none'})"),
                  ("Methods", ", ".join(res.methods)), ("Replicates per condition", str(man["replicates"])),
                  ("Root seed", str(man.get("seed"))),
                  ("Rows finished", f"{len(t)} of {res.expected_rows}" + ("" if res.complete else " (INCOMPLETE)")),
                  ("Failures", f"{n_fail} rows not ok"), ("Config hash", str(man.get("config_hash", ""))[:16])]
        if s["reference"] is not None:
            header.append(("Reference (rel_efficiency)", str(s["reference"])))
        if len(self) and (self["measure"] == "power").any():
            header.append(("alpha (power)", f"{s['alpha']:g}"))
        out = {"header": pd.DataFrame(header, columns=["item", "value"])}
        design = res.conditions
        truths = truth_frame(design["condition"].to_numpy(), res.truths)
        design = pd.concat([design, truths], axis=1)
        done = t.groupby("condition")["replicate"].nunique() if len(t) else pd.Series(dtype="int64")
        design["replicates"] = [f"{int(done.get(c, 0))} of {man['replicates']}" for c in design["condition"]]
        out["design"] = design.map(_num)
        wanted = self._wanted(measures)
        for e in dict.fromkeys(self["estimand"]) if len(self) else ():
            wide = summary_wide(self, e, combined=True).drop(columns=["condition"])
            present = [m for m in MEASURES + tuple(s["own"]) if m in wide.columns]
            chosen = present if wanted is None else ([m for m in present if m in wanted] or present)
            keys = [c for c in wide.columns if c not in present]
            out[f"performance: {e}"] = wide[keys + chosen].map(_num)
        counts = res.failure_counts() if len(t) else pd.DataFrame(columns=["method", "status", "rows"])
        out["failures"] = counts[counts["status"] != "ok"].reset_index(drop=True).map(_num)
        return out

    def _wanted(self, measures) -> set | None:
        if measures == "all":
            return None
        if measures is None:
            return set(KEY_MEASURES) | set(self._settings["own"])
        if isinstance(measures, str) or not all(isinstance(m, str) for m in measures):
            raise ValueError(f"measures={measures!r} is invalid; allowed: None, 'all' or a list of measure names")
        return set(measures)

    # -- renderings ----------------------------------------------------------------------------------------
    def as_text(self, measures: str | Sequence[str] | None = None, *, max_rows: int = 60) -> str:
        """The summary as plain text (what ``print(summary)`` shows); ``max_rows`` per table."""
        if getattr(self, "_result", None) is None:
            return pd.DataFrame(self).to_string()
        tabs = self.tables(measures)
        rule, thin = "=" * _WIDTH, "-" * _WIDTH
        head = tabs.pop("header")
        width = int(head["item"].str.len().max()) + 2
        lines = [rule, f"Simulation study: {self._result.name}".center(_WIDTH), rule]
        lines += [f"{item + ':':<{width}}{value}" for item, value in head.itertuples(index=False)]

        def block(title: str, frame: pd.DataFrame) -> None:
            lines.extend([thin, title, thin])
            with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_colwidth", 40):
                lines.append(frame.to_string(index=False, max_rows=max_rows))

        block("Design (replicates: finished of planned)", tabs.pop("design"))
        tabs.pop("failures")  # the text lists them with their messages (format_failures)
        perf = [k for k in tabs if k.startswith("performance: ")]
        for key in perf:
            block(f"Performance of {key.split(': ', 1)[1]}: value (MCSE)", tabs[key])
        if not perf:
            lines.extend([thin, "Performance", thin, "(no finished rows)"])
        lines.extend([thin, "Failures", thin])
        lines += format_failures(self._result) or [f"None: all {len(self._result.table)} finished rows are ok."]
        lines.append(rule)
        lines += [textwrap.fill(n, _WIDTH, subsequent_indent="      ") for n in self._notes(measures)]
        return "\n".join(lines)

    def as_html(self, measures: str | Sequence[str] | None = None, *, max_rows: int = 200) -> str:
        """The summary as HTML tables (``<div class="simstudy-summary">``); ``max_rows`` per table."""
        if getattr(self, "_result", None) is None:
            return pd.DataFrame(self).to_html(index=False, max_rows=max_rows)
        tabs = self.tables(measures)
        esc = html.escape
        head = tabs.pop("header")
        parts = ['<div class="simstudy-summary">', f"<h3>Simulation study: {esc(self._result.name)}</h3>",
                 '<table class="simstudy-header">']
        parts += [f"<tr><th>{esc(i)}</th><td>{esc(v)}</td></tr>" for i, v in head.itertuples(index=False)]
        parts.append("</table>")
        failures = tabs.pop("failures")
        titles = {"design": "Design (replicates: finished of planned)"}
        for key, frame in tabs.items():
            title = titles.get(key, f"Performance of {key.split(': ', 1)[-1]}: value (MCSE)")
            parts += [f"<h4>{esc(title)}</h4>", frame.to_html(index=False, border=0, max_rows=max_rows,
                                                              classes="simstudy-table")]
        parts.append("<h4>Failures</h4>")
        lines = format_failures(self._result)
        if lines:
            parts.append(failures.to_html(index=False, border=0, classes="simstudy-table"))
            parts += [f"<pre>{esc(chr(10).join(lines[1:]))}</pre>"] if len(lines) > 1 else []
        else:
            parts.append(f"<p>None: all {len(self._result.table)} finished rows are ok.</p>")
        parts += [f"<p><small>{esc(n)}</small></p>" for n in self._notes(measures)]
        parts.append("</div>")
        return "\n".join(parts)

    def _notes(self, measures) -> list[str]:
        notes = [f"Note: {self.attrs['note']}."] if self.attrs.get("note") else []
        wanted = self._wanted(measures)
        if wanted is not None and len(self):
            hidden = [m for m in dict.fromkeys(self["measure"]) if m not in wanted and m != "mean"]
            if hidden:
                notes.append(f"Note: not shown: {', '.join(hidden)} (as_text(measures='all'); all are rows of "
                             "this frame and of summary.csv).")
        return notes

    def __repr__(self) -> str:
        return self.as_text()

    __str__ = __repr__

    def _repr_html_(self) -> str:
        return self.as_html()
