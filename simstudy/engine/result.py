"""Results of a study: the tidy table and statistics computed on demand (DESIGN §7).

Modelled on statsmodels' results classes: the data live in tidy DataFrames,
performance measures, rates and failure tables are computed when asked for,
and :meth:`StudyResult.summary` is the entry point for people.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import performance
from .design import conditions_frame
from .design_columns import with_design
from .plan import planned_rows
from .rates import RateResult, fit_rate
from .storage import MANIFEST, PRECISION, TABLE, atomic_write_parquet, atomic_write_text, read_manifest, read_rows
from .summary_view import StudySummary
from .tidy import finalise

__all__ = ["StudyResult"]


class StudyResult:
    """Tidy results of a :class:`~simstudy.engine.Study` run.

    Parameters
    ----------
    table : DataFrame
        One row per (condition, replicate, method): ``condition``, the design
        factors, ``replicate``, ``method``, ``status`` (``"ok"``, ``"error"``,
        ``"nan"`` or a typed failure such as ``"diverged"``), ``message``,
        then one column per returned value.
    manifest : dict
        Study description (seed, methods, conditions, truths, options,
        config hash).
    timings : DataFrame, optional
        Seconds per row (generate + method), kept out of ``table`` so that
        tables are bitwise reproducible.
    interrupted : bool
        The run was stopped by Ctrl-C; the table is partial.
    """

    def __init__(self, table: pd.DataFrame, *, manifest: dict, timings: pd.DataFrame | None = None,
                 interrupted: bool = False):
        self.table = table
        self.manifest = manifest
        self.timings = timings
        self.interrupted = bool(interrupted)
        #: The run stopped at its ``max_time`` (:mod:`.runner`); the table is partial, a re-run continues.
        self.out_of_time = False
        #: With a precision target: replicates used and MCSE reached per condition (:mod:`.precision`).
        self.precision: pd.DataFrame | None = None
        #: Measures of your own given as Python objects (``Study(measures=)``); study-file ones live in options.
        self.measures: dict = {}

    # -- descriptors ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.get("name", "study")

    @property
    def methods(self) -> list[str]:
        return list(self.manifest["methods"])

    @property
    def factors(self) -> list[str]:
        return list(self.manifest["factors"])

    @property
    def conditions(self) -> pd.DataFrame:
        """The design: ``condition`` index and factor columns."""
        return conditions_frame(self.manifest["conditions"])

    @property
    def truths(self) -> list[dict]:
        return [dict(t) for t in self.manifest.get("truths", [{}] * len(self.manifest["conditions"]))]

    @property
    def options(self) -> dict:
        return dict(self.manifest.get("options") or {})

    @property
    def expected_rows(self) -> int:
        """Rows of the complete study (or shard; replicates per condition where they differ: :mod:`.plan`)."""
        return planned_rows(self.manifest)

    @property
    def complete(self) -> bool:
        """Every (condition, replicate, method) row is present."""
        return len(self.table) == self.expected_rows

    def __repr__(self) -> str:
        return (f"StudyResult(name={self.name!r}, rows={len(self.table)}/{self.expected_rows}, "
                f"methods={self.methods}, failures={int((self.table['status'] != 'ok').sum())})")

    # -- statistics ----------------------------------------------------------------------------------------
    def summary(self, reference: str | None = None, *, alpha: float | None = None, measures=None) -> StudySummary:
        """Performance measures with Monte Carlo standard errors, as a frame that prints as a summary.

        Parameters
        ----------
        reference : str, optional
            Method for ``rel_efficiency`` (default: the study's
            ``options["reference"]``, if any).
        alpha : float, optional
            Significance level for ``power`` (default: ``options["alpha"]``
            or 0.05).
        measures : mapping, optional
            Measures of your own (:mod:`simstudy.engine.user_measures`), added to the study's
            (``Study(measures=)``, ``[summary.measures]``); a same name replaces.

        Returns
        -------
        StudySummary
            A DataFrame, tidy: condition columns, ``method``, ``estimand``,
            ``measure``, ``value``, ``mcse``, ``n_used``, ``failures``; see
            :func:`simstudy.engine.performance.summarise`. It prints as a
            readable summary (the design, replicates per condition, the
            performance tables with MCSE, the failures) and has ``as_text``,
            ``as_html`` and ``_repr_html_`` (:mod:`simstudy.engine.summary_view`).
        """
        if reference is None:
            reference = self.options.get("reference")
        if alpha is None:
            alpha = float(self.options.get("alpha", 0.05))
        own = {**self.options.get("measures", {}), **self.measures, **(measures or {})}
        frame = performance.summarise(self.table, factors=self.factors, methods=self.methods, truths=self.truths,
                                      reference=reference, alpha=alpha, measures=own,
                                      seed=int(self.manifest.get("seed") or 0))
        return StudySummary.build(frame, self, reference=reference, alpha=alpha, own=list(own))

    def failures(self) -> pd.DataFrame:
        """Rows whose status is not ``"ok"``, with what reproduces them.

        Returns
        -------
        DataFrame
            Condition columns, ``replicate``, ``method``, ``status``,
            ``message``, ``seed`` (root) and ``spawn_key``: the data of the
            replicate are ``np.random.default_rng(SeedSequence(seed,
            spawn_key=spawn_key))``; ``Study.run_replicate(condition,
            replicate)`` re-runs it.
        """
        cols = ["condition", *self.factors, "replicate", "method", "status", "message"]
        bad = self.table.loc[self.table["status"] != "ok", cols].reset_index(drop=True)
        bad["seed"] = int(self.manifest["seed"])
        bad["spawn_key"] = [f"({c}, {r})" for c, r in zip(bad["condition"], bad["replicate"])]
        return bad

    def failure_counts(self) -> pd.DataFrame:
        """Counts of rows per method and status (all conditions)."""
        t = self.table
        counts = t.groupby(["method", "status"], sort=False).size().rename("rows").reset_index()
        order = {m: i for i, m in enumerate(self.methods)}
        return counts.sort_values(["method", "status"], key=lambda s: s.map(order) if s.name == "method" else s,
                                  kind="mergesort").reset_index(drop=True)

    def metric_frame(self, metric: str) -> tuple[pd.DataFrame, str]:
        """Per-replicate values of ``metric`` among ok rows, as column ``_value``.

        ``metric`` is a numeric column of the table, or ``"mse:EST"`` for the
        squared error ``(EST - truth)^2`` of an estimand with a truth.
        """
        ok = self.table[self.table["status"] == "ok"]
        if metric.startswith("mse:"):
            est = metric[4:]
            truth = np.array([t.get(est, np.nan) for t in self.truths], dtype=np.float64)
            if est not in ok.columns or np.isnan(truth).all():
                raise ValueError(f"metric={metric!r} is invalid; allowed: 'mse:EST' with EST an estimand that has "
                                 f"a truth ({self._estimands()})")
            value = (ok[est].to_numpy(np.float64) - truth[ok["condition"].to_numpy()]) ** 2
        else:
            numeric = [c for c in ok.columns if c not in ("condition", "replicate", *self.factors)
                       and pd.api.types.is_numeric_dtype(ok[c])]
            if metric not in numeric:
                raise ValueError(f"metric={metric!r} is invalid; allowed: one of {numeric} or 'mse:EST'")
            value = ok[metric].to_numpy(np.float64)
        return ok.assign(_value=value), metric

    def _estimands(self) -> list[str]:
        out = []
        for t in self.truths:
            out += [k for k in t if k not in out]
        return out

    def rate(self, metric: str, x: str = "n", by: Sequence[str] | None = None, *, theory_slope: float | None = None,
             theory_constant: float | None = None, level: float = 0.95, scale: str = "fixed") -> RateResult:
        """Convergence rate of the mean of ``metric`` in ``x`` (WLS on the log-log scale).

        Parameters
        ----------
        metric : str
            A numeric column (e.g. ``"kl"``) or ``"mse:EST"``.
        x : str
            Design factor of the rate (default ``"n"``).
        by : list of str, optional
            Grouping columns; default ``method`` plus every other design
            factor that varies.
        theory_slope, theory_constant : float, optional
            Theoretical ``metric ~ C x^slope``, e.g. ``-1`` for KL or MSE of a
            regular parametric estimator.
        level : float
            Interval level.
        scale : {"fixed", "estimated"}
            See :mod:`simstudy.engine.rates`.

        Returns
        -------
        RateResult
        """
        if x not in self.table.columns:
            raise ValueError(f"x={x!r} is invalid; allowed: one of the design factors {self.factors}")
        if by is None:
            by = ["method"] + [f for f in self.factors if f != x and self.table[f].nunique(dropna=False) > 1]
        else:
            by = list(by)
            for b in by:
                if b not in self.table.columns or b == x:
                    raise ValueError(f"by={by!r} is invalid; allowed: columns of the table other than x={x!r}")
            missing = [f for f in self.factors if f != x and f not in by and self.table[f].nunique(dropna=False) > 1]
            if missing:
                raise ValueError(f"by={by!r} is invalid: design factors {missing} vary and would be pooled; "
                                 "allowed: include them in by")
        frame, name = self.metric_frame(metric)
        return fit_rate(frame, "_value", x, by, theory_slope=theory_slope, theory_constant=theory_constant,
                        level=level, scale=scale, metric=name)

    def rates(self) -> list[RateResult]:
        """The rate fits declared in the study's ``options["rates"]``."""
        return [self.rate(**spec) for spec in self.options.get("rates", [])]

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``replicates.parquet`` and ``manifest.json`` to ``path``.

        The parquet file holds the stored row format (timings as
        ``_seconds``) with the factors and truths as columns
        (:mod:`.design_columns`), so the directory can also be resumed by
        the same study.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        raw = self.table.drop(columns=self.factors)
        if self.timings is not None and len(self.timings) == len(raw):
            raw.insert(5, "_seconds", self.timings["seconds"].to_numpy())
        else:
            raw.insert(5, "_seconds", np.nan)
        atomic_write_parquet(with_design(raw, self.manifest["conditions"], self.truths), path / TABLE)
        manifest = dict(self.manifest, complete=self.complete)
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1, default=repr))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StudyResult":
        """Read a directory written by :meth:`save` or by a stored run (complete or not)."""

        manifest = read_manifest(path)
        fin = finalise(read_rows(path), manifest["conditions"], list(manifest["methods"]),
                        manifest.get("truths") or [{}] * len(manifest["conditions"]))
        res = cls(fin.table, manifest=manifest, timings=fin.timings)
        res.precision = _stored_precision(Path(path), res.table)
        return res

    def comparisons(self) -> pd.DataFrame:
        """The study's declared paired comparisons (``options["comparisons"]``) per condition, with their
        intervals and verdicts (:func:`simstudy.engine.paired.comparison_table`)."""
        from .paired import comparison_table

        return comparison_table(self)

    # -- output --------------------------------------------------------------------------------------------
    def plot(self, outdir: str | os.PathLike, *, formats: str | Sequence[str] = ("png",)) -> list[tuple[str, Path]]:
        """Write the standard figures, in each of ``formats`` (``"png"``, ``"svg"``, ``"png,svg"``; see
        :func:`simstudy.engine.figures.make_figures`)."""
        from .figures import make_figures

        return make_figures(self, outdir, formats=formats)

    def report(self, outdir: str | os.PathLike, figures: list | None = None) -> Path:
        """Write ``report.md`` and the self-contained ``report.html`` beside it (see
        :func:`simstudy.engine.report_html.write_reports`); returns the path of ``report.md``."""
        from .report_html import write_reports

        return write_reports(self, outdir, figures=figures)


def _stored_precision(path: Path, table: pd.DataFrame) -> pd.DataFrame | None:
    """The store's ``precision.csv`` (a run to a precision target) while it still describes the stored rows:
    None when there is none, or when the replicates per condition have changed since (a later run)."""
    file = path / PRECISION
    if not file.is_file():
        return None
    try:
        precision = pd.read_csv(file)
        done = table.groupby("condition")["replicate"].nunique()
        current = all(int(done.get(c, 0)) == int(n) for c, n in zip(precision["condition"], precision["replicates"]))
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return None
    return precision if current else None

