"""Reading the tables of a study file: one-line errors naming the key, the value and what is allowed (DESIGN §7).

:class:`SpecError` is the error of every malformed study file; :func:`check_keys`,
:func:`get_value` and :func:`get_callable` are what a kind's builder reads its tables
with; :class:`StudyFile` is the parsed common part handed to the builder.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.callables import resolve_callable
from ..engine.limits import check_limits
from ..engine.performance import MEASURES
from ..engine.user_measures import check_measures

__all__ = ["MAX_CONDITIONS", "MAX_REPLICATES", "SpecError", "StudyFile", "check_design", "check_keys", "check_name",
           "check_rates", "check_run_table", "check_study_limits", "check_summary_measures", "check_summary_table", "check_table", "evaluate_truths", "get_callable", "get_value", "parse_rates"]

#: Bounds that keep a typo from allocating until memory runs out or hanging silently.
MAX_REPLICATES = 10**7
MAX_CONDITIONS = 10**6


class SpecError(ValueError):
    """A study file is malformed; the message is one line naming the key or value and what is allowed."""


_MISSING = object()


def _type_name(types) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_table(value: Any, where: str) -> dict:
    """``value`` if it is a table, else SpecError naming ``where``."""
    if not isinstance(value, dict):
        raise SpecError(f"{where}={value!r} has the wrong type; allowed: a table [{where}]")
    return value


def check_name(name: str) -> str:
    """A study name must be a plain file name (it names the default folder results/NAME)."""
    bad = (not name or name in (".", "..") or any(c in name for c in "/\\:\0") or name != name.strip()
           or name.startswith("."))
    if bad:
        raise SpecError(f"study.name={name!r} is invalid; allowed: a plain file name (letters, digits, '-', '_', "
                        "'.'; no '/', '\\', ':' and not starting with '.')")
    return name


def check_keys(table: Mapping, allowed, where: str) -> None:
    """Raise SpecError for a key of ``table`` not in ``allowed``."""
    if not isinstance(table, Mapping):
        raise SpecError(f"{where}={table!r} has the wrong type; allowed: a table [{where}] with keys "
                        f"{', '.join(sorted(allowed)) or 'none'}")
    for key in table:
        if key not in allowed:
            loc = f"{where}.{key}" if where else key
            raise SpecError(f"{loc} is an unknown key; allowed: {', '.join(sorted(allowed)) or 'none'}")


def get_value(table: Mapping, key: str, types, where: str, default: Any = _MISSING,
              check: Callable[[Any], bool] | None = None, allowed: str | None = None) -> Any:
    """Read ``table[key]`` with a type and value check.

    Parameters
    ----------
    table : mapping
        A parsed TOML table.
    key : str
    types : type or tuple of types
        Accepted Python types (``float`` also accepts integers; ``bool`` is
        never accepted as ``int``).
    where : str
        Dotted location of the table, for messages.
    default : optional
        Value when the key is absent; without it the key is required.
    check : callable, optional
        Predicate on the value; False raises SpecError with ``allowed``.
    allowed : str, optional
        Text describing the allowed values.
    """
    loc = f"{where}.{key}" if where else key
    if key not in table:
        if default is _MISSING:
            raise SpecError(f"{loc} is missing; allowed: {allowed or _type_name(types)}")
        return default
    value = table[key]
    tys = types if isinstance(types, tuple) else (types,)
    ok = any((isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)))
             or (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in tys)
    if not ok:
        raise SpecError(f"{loc}={value!r} has the wrong type; allowed: {allowed or _type_name(types)}")
    if float in tys and isinstance(value, int) and not isinstance(value, bool) and int not in tys:
        value = float(value)
    if check is not None and not check(value):
        raise SpecError(f"{loc}={value!r} is invalid; allowed: {allowed or _type_name(types)}")
    return value


def get_callable(table: Mapping, where: str, *, n_positional: int = 2) -> Callable:
    """Read ``function`` (import path) and ``params`` (keyword arguments) of a table.

    Returns ``functools.partial(function, **params)`` (or the function), after
    checking that every parameter name exists in its signature.
    """
    check_keys(table, {"function", "params"}, where)
    path = get_value(table, "function", str, where, allowed="an import path 'package.module:function'")
    try:
        fn = resolve_callable(path, f"{where}.function")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    params = get_value(table, "params", dict, where, default={})
    if not params:
        return fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        names = list(sig.parameters)
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        for key in params:
            if key not in names[n_positional:] and not accepts_kwargs:
                raise SpecError(f"{where}.params.{key} is not a parameter of {path}; allowed: "
                                f"{', '.join(names[n_positional:]) or 'none'}")
    return functools.partial(fn, **params)


def check_study_limits(st: Mapping) -> tuple[float | None, tuple[str, ...]]:
    """``[study] timeout`` and ``promote_warnings`` (:func:`simstudy.engine.limits.check_limits`), one-line errors."""
    timeout = get_value(st, "timeout", float, "study", default=None, check=lambda v: math.isfinite(v) and v > 0,
                        allowed="seconds per replicate, a number > 0")
    promote = get_value(st, "promote_warnings", list, "study", default=[],
                        check=lambda v: all(isinstance(w, str) and w for w in v),
                        allowed="a list of warning class names ('RuntimeWarning', 'package.module.Class')")
    try:
        return check_limits(timeout, promote)
    except ValueError as exc:
        raise SpecError(f"study.{exc}") from None


def check_run_table(run) -> dict:
    """``[run]``: n_jobs, backend, scheduler, out and the run control of ``simstudy run``'s flags (target_mcse,
    max_replicates, max_time, figure_format), each validated (command-line flags override them)."""
    from ..engine.figures import figure_formats

    out: dict = {}
    if not isinstance(run, dict):
        raise SpecError("run has the wrong type; allowed: a table [run]")
    check_keys(run, {"n_jobs", "backend", "scheduler", "out", "target_mcse", "max_replicates", "max_time",
                     "figure_format"}, "run")
    if "n_jobs" in run:
        out["n_jobs"] = get_value(run, "n_jobs", int, "run", check=lambda v: v >= 1 or v == -1,
                                  allowed="an integer >= 1, or -1 for all CPUs")
    if "backend" in run:
        out["backend"] = get_value(run, "backend", str, "run", check=lambda v: v in ("loky", "dask"),
                                   allowed="'loky' or 'dask'")
    if "scheduler" in run:
        out["scheduler"] = get_value(run, "scheduler", str, "run", check=bool, allowed="a scheduler address")
    if "out" in run:
        out["out"] = get_value(run, "out", str, "run", check=bool, allowed="a directory path")
    if "target_mcse" in run:  # a table measure = MCSE, as --target-mcse MEASURE=MCSE
        targets = get_value(run, "target_mcse", dict, "run", check=bool,
                            allowed="a table of measure = MCSE, e.g. target_mcse = { coverage = 0.01 }")
        out["target_mcse"] = {k: get_value(targets, k, float, "run.target_mcse",
                                           check=lambda v: math.isfinite(v) and v > 0, allowed="an MCSE > 0")
                              for k in targets}
    if "max_replicates" in run:
        out["max_replicates"] = get_value(run, "max_replicates", int, "run", check=lambda v: 1 <= v <= MAX_REPLICATES,
                                          allowed=f"an integer >= 1 and <= {MAX_REPLICATES}")
    if "max_time" in run:
        out["max_time"] = get_value(run, "max_time", float, "run", check=lambda v: math.isfinite(v) and v >= 0,
                                    allowed="a number of seconds >= 0")
    if "figure_format" in run:
        fmts = get_value(run, "figure_format", (str, list), "run", allowed="'png', 'svg', 'png,svg' or a list of them")
        try:
            out["figure_format"] = list(figure_formats(fmts))
        except (ValueError, TypeError) as exc:
            raise SpecError(f"run.figure_format={fmts!r} is invalid; allowed: {str(exc).split('allowed: ')[-1]}") \
                from None
    return out


@dataclass
class StudyFile:
    """Parsed common part of a study file.

    Attributes
    ----------
    kind, name, description : str
    replicates, seed : int
    fingerprint : str or None
    timeout : float or None
        ``[study] timeout``: seconds per replicate (``Study(timeout=)``).
    promote_warnings : tuple of str
        ``[study] promote_warnings``: warning classes recorded as failures (``Study(promote_warnings=)``).
    design : dict or list of dict or None
        ``[design]`` (factorial) or ``[[conditions]]`` (non-factorial), as in the file.
    run : dict
        ``n_jobs``, ``backend``, ``scheduler``, ``out``, ``target_mcse``, ``max_replicates``, ``max_time``,
        ``figure_format`` when given.
    summary, report : dict
    rates : list of dict
        Keyword arguments of :meth:`StudyResult.rate`.
    tables : dict
        Every other top-level table, for the kind's builder.
    path : Path or None
    """

    kind: str
    name: str
    replicates: int
    seed: int
    description: str = ""
    fingerprint: str | None = None
    timeout: float | None = None
    promote_warnings: tuple = ()
    design: Any = None
    run: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    rates: list = field(default_factory=list)
    tables: dict = field(default_factory=dict)
    path: Path | None = None

    def options(self) -> dict:
        """Reporting options stored with the results (``Study(options=...)``)."""
        out = {"rates": list(self.rates), "description": self.description}
        if self.summary.get("reference"):
            out["reference"] = self.summary["reference"]
        if "alpha" in self.summary:
            out["alpha"] = self.summary["alpha"]
        if self.summary.get("comparisons"):
            out["comparisons"] = [dict(c) for c in self.summary["comparisons"]]
        if self.summary.get("measures"):  # import paths: stored with the results, so a re-read store has them
            out["measures"] = {k: dict(v) for k, v in self.summary["measures"].items()}
        if "level" in self.report:
            out["level"] = self.report["level"]
        if self.report.get("figures"):
            out["figures"] = list(self.report["figures"])
        return out


def check_summary_table(summ: Any) -> dict:
    """``[summary]`` (reference, alpha, measures, comparisons: :mod:`simstudy.engine.paired`), validated."""
    from ..engine.paired import check_comparisons
    if not isinstance(summ, dict):
        raise SpecError("summary has the wrong type; allowed: a table [summary]")
    check_keys(summ, {"reference", "alpha", "measures", "comparisons"}, "summary")
    out: dict = {}
    if "measures" in summ:
        out["measures"] = check_summary_measures(summ["measures"])
    if "reference" in summ:
        out["reference"] = get_value(summ, "reference", str, "summary", check=bool, allowed="the name of a method")
    if "alpha" in summ:
        out["alpha"] = get_value(summ, "alpha", float, "summary", check=lambda v: 0 < v < 1, allowed="a number in (0, 1)")
    if "comparisons" in summ:
        try:
            out["comparisons"] = check_comparisons(summ["comparisons"], where="summary.comparisons")
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    return out


def check_summary_measures(value: Any) -> dict:
    """``[summary.measures.NAME]`` tables (``function``, ``mcse``, ``needs_truth``, ``columns``, ``n_resamples``).

    Validated as :class:`simstudy.engine.user_measures.UserMeasure` (import paths resolved now), and
    returned as given, so that they are stored with the results in ``options["measures"]``.
    """
    table = check_table(value, "summary.measures")
    for name, spec in table.items():
        check_table(spec, f"summary.measures.{name}")
    try:
        check_measures(table, reserved=MEASURES, where="summary.measures", dotted=True)
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[0]) from None
    return {name: dict(spec) for name, spec in table.items()}


def check_design(sf_tables: dict) -> Any:
    if "design" in sf_tables and "conditions" in sf_tables:
        raise SpecError("design and conditions are both given; allowed: [design] (factorial) or [[conditions]] "
                        "(explicit list), not both")
    if "design" in sf_tables:
        design = sf_tables["design"]
        if not isinstance(design, dict):
            raise SpecError(f"design={design!r} has the wrong type; allowed: a table factor = [levels]")
        if not design:
            raise SpecError("design is empty; allowed: at least one factor = [levels]")
        for k, v in design.items():
            levels = v if isinstance(v, list) else [v]
            if not levels:
                raise SpecError(f"design.{k}=[] is invalid; allowed: a non-empty list of levels")
            for lv in levels:
                if not isinstance(lv, (bool, int, float, str)):
                    raise SpecError(f"design.{k} level {lv!r} has the wrong type; allowed: numbers, strings or "
                                    "booleans")
        count = math.prod(len(v) if isinstance(v, list) else 1 for v in design.values())
        if count > MAX_CONDITIONS:
            raise SpecError(f"design has {count} conditions ({' x '.join(str(len(v) if isinstance(v, list) else 1) for v in design.values())}); "
                            f"allowed: at most {MAX_CONDITIONS}")
        return design
    if "conditions" in sf_tables:
        conds = sf_tables["conditions"]
        if not isinstance(conds, list) or not conds or not all(isinstance(c, dict) for c in conds):
            raise SpecError("conditions has the wrong type; allowed: a non-empty array of tables [[conditions]]")
        if len(conds) > MAX_CONDITIONS:
            raise SpecError(f"conditions has {len(conds)} entries; allowed: at most {MAX_CONDITIONS}")
        for i, c in enumerate(conds):
            for k, v in c.items():
                if not isinstance(v, (bool, int, float, str)):
                    raise SpecError(f"conditions[{i}].{k}={v!r} has the wrong type; allowed: a number, string "
                                    "or boolean")
        return conds
    return None


def parse_rates(value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise SpecError("rates has the wrong type; allowed: an array of tables [[rates]]")
    out = []
    allowed = {"metric", "x", "by", "theory_slope", "theory_constant", "level", "scale"}
    for i, r in enumerate(value):
        where = f"rates[{i}]"
        check_keys(r, allowed, where)
        spec = {"metric": get_value(r, "metric", str, where, check=bool, allowed="a metric column or 'mse:ESTIMAND'"),
                "x": get_value(r, "x", str, where, default="n", check=bool, allowed="a design factor name")}
        if "by" in r:
            spec["by"] = get_value(r, "by", list, where, check=lambda v: all(isinstance(b, str) for b in v),
                                   allowed="a list of column names")
        for key in ("theory_slope", "theory_constant"):
            if key in r:
                spec[key] = get_value(r, key, float, where, check=math.isfinite, allowed="a finite number")
        if "theory_constant" in spec and spec["theory_constant"] <= 0:
            raise SpecError(f"{where}.theory_constant={spec['theory_constant']!r} is invalid; allowed: a positive "
                            "number")
        if "level" in r:
            spec["level"] = get_value(r, "level", float, where, check=lambda v: 0 < v < 1,
                                      allowed="a number in (0, 1)")
        if "scale" in r:
            spec["scale"] = get_value(r, "scale", str, where, check=lambda v: v in ("fixed", "estimated"),
                                      allowed="'fixed' or 'estimated'")
        out.append(spec)
    return out


def evaluate_truths(study) -> list[dict]:
    """``study.truths()`` now, before anything runs: a truth function that raises (the engine's one-line
    :class:`~simstudy.engine.errors.TruthError`, naming the condition) or returns a non-number is a SpecError."""
    try:
        return study.truths()
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[0]) from None


def check_rates(rates: list[dict], factors: list, levels: Mapping, estimands: list, metrics=None) -> None:
    """Check the ``[[rates]]`` against the built study before it runs.

    ``levels`` maps each factor to its number of distinct levels; ``estimands`` are the truth keys
    (``"mse:EST"`` needs EST among them); ``metrics``, when the kind knows them, is a predicate on a
    bare metric name (otherwise a bare name is a column the methods return, known only after the run).
    """
    for i, r in enumerate(rates):
        where = f"rates[{i}]"
        if r["x"] not in factors:
            raise SpecError(f"{where}.x={r['x']!r} is not a design factor; allowed: {', '.join(factors)}")
        by = r.get("by", [])
        for b in by:
            if (b not in factors and b != "method") or b == r["x"]:
                raise SpecError(f"{where}.by entry {b!r} is invalid; allowed: method, "
                                f"{', '.join(f for f in factors if f != r['x'])}")
        pooled = [f for f in factors if f != r["x"] and f not in by and levels.get(f, 1) > 1]
        if "by" in r and pooled:  # without by, every varying factor is a group
            raise SpecError(f"{where}.by={by!r} is invalid: design factors {pooled} vary and would be pooled; "
                            f"allowed: include them in by")
        metric = r["metric"]
        if ":" in metric:
            measure, est = metric.split(":", 1)
            if measure != "mse":
                raise SpecError(f"{where}.metric={metric!r} is invalid; allowed: a returned metric column or "
                                "'mse:ESTIMAND'")
            if est not in estimands:
                raise SpecError(f"{where}.metric={metric!r} is invalid; allowed: 'mse:ESTIMAND' with ESTIMAND an "
                                f"estimand that has a truth ({', '.join(estimands) or 'none: the study has no truth'})")
        elif metrics is not None and not metrics(metric):
            raise SpecError(f"{where}.metric={metric!r} is not a metric of the study; allowed: a returned metric "
                            "column (see the headline metrics) or 'mse:ESTIMAND'")
