"""Study files: TOML declarations of studies, validated where they enter (DESIGN §7).

A study file has common tables, read here for every kind of study, and
kind-specific tables read by the builder registered for its ``kind``::

    [study]                      # required
    kind = "generic"             # a registered kind (see `simstudy list`)
    name = "binomial-ci"         # default: the file's stem
    description = "..."          # optional, shown in report.md
    replicates = 500             # integer >= 1
    seed = 1                     # integer >= 0
    fingerprint = "v1"           # optional: overrides the code fingerprint in the config hash
    timeout = 600                # optional: seconds per replicate; a replicate over it is a "timeout" failure
    promote_warnings = ["RuntimeWarning"]   # optional: warning classes recorded as "warning" failures

    [design]                     # full factorial: factor = [levels] (a scalar is one level)
    n = [25, 100, 400]
    p = [0.1, 0.5]
    # or, for a non-factorial design, instead of [design]:
    # [[conditions]]
    # n = 25
    # p = 0.1

    [run]                        # optional; command-line flags override it
    n_jobs = 2                   # integer >= 1, or -1 for all CPUs
    backend = "loky"             # "loky" or "dask"
    scheduler = "tcp://host:8786"   # dask scheduler address (default: a LocalCluster)
    out = "results/binomial"     # output/store directory
    target_mcse = { coverage = 0.01 }   # replicate until each MCSE <= target (as --target-mcse coverage=0.01)
    max_replicates = 20000       # cap per condition, with target_mcse (--max-replicates)
    max_time = 3600              # seconds; launch no replicate after (--max-time; exit 75, re-run continues)
    figure_format = "png,svg"    # or ["png", "svg"] (--figure-format); a flag overrides its key

    [summary]                    # optional
    reference = "wald"           # method for relative efficiency
    alpha = 0.05                 # level of the power measure
    comparisons = [              # paired comparisons of methods, decided in the report (simstudy.engine.paired)
      { method = "wilson", reference = "wald", metric = "width", primary = true },   # lower is better by default
    ]                            # also lower_is_better = false, level = 0.95
    [summary.measures.trimmed]   # optional, repeatable: a measure of your own (simstudy.engine.user_measures)
    function = "pkg.mod:fn"      # fn(values, truth) -> number; also mcse, needs_truth, columns, n_resamples

    [report]                     # optional
    level = 0.95                 # nominal coverage for plots
    figures = ["pkg.mod:fn"]     # extra figure hooks fn(result, figdir) -> [(title, path)]

    [[rates]]                    # optional, repeatable: StudyResult.rate(...) in summaries and reports
    metric = "mse:estimate"      # a returned metric column, or "mse:ESTIMAND"
    x = "n"                      # a design factor
    by = ["method", "p"]         # optional
    theory_slope = -1.0          # optional
    theory_constant = 0.5        # optional, > 0
    level = 0.95                 # optional
    scale = "fixed"              # optional: "fixed" or "estimated"

The ``generic`` kind names Python callables by import path::

    [generate]
    function = "simstudy.studies.examples:binomial_data"
    params = {}                  # optional keyword arguments

    [truth]                      # optional
    function = "simstudy.studies.examples:binomial_truth"

    [methods.wald]               # one table per method; the table name is the method name
    function = "simstudy.studies.examples:wald_interval"
    params = { level = 0.95 }

Extension point: :func:`register_kind` adds a kind whose builder receives the
parsed common part (:class:`StudyFile`, with the kind's own tables in
``StudyFile.tables``) and returns a :class:`~simstudy.engine.Study`;
:func:`register_study` adds a named built-in study (``simstudy run NAME``),
and :data:`DEFAULT_STUDY` names the study ``simstudy run`` runs without
argument. :func:`register_listing` adds a section to ``simstudy list``.
Modules named in :data:`PLUGIN_MODULES` (or in the ``simstudy.plugins``
entry-point group) are imported before a study file is read, so the domain
registers itself without the engine importing it.
Every error is a :class:`SpecError`: one line naming the key or value and
what is allowed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..engine import Study
from ..engine.callables import resolve_callable
from .tables import (MAX_REPLICATES, SpecError, StudyFile, check_design, check_study_limits, check_keys, check_name, check_rates, evaluate_truths,
                     check_run_table, check_summary_table, get_callable, get_value, parse_rates)

__all__ = ["SpecError", "StudyFile", "KINDS", "STUDIES", "DEFAULT_STUDY", "PLUGIN_MODULES", "register_kind",
           "register_study", "register_listing", "load_plugins", "listings", "parse_study_text", "load_study_file", "build_study", "check_keys",
           "get_value", "get_callable"]


@dataclass
class _Kind:
    builder: Callable[[StudyFile], Study]
    tables: frozenset
    description: str
    metrics: Callable[[str], bool] | None = None


@dataclass
class _Builtin:
    source: str | Path
    description: str
    out: str | None


KINDS: dict[str, _Kind] = {}
STUDIES: dict[str, _Builtin] = {}
_LISTINGS: dict[str, Callable[[], Mapping[str, str] | list]] = {}

#: Name of the built-in study ``simstudy run`` runs without argument. The
#: generic demo until the domain's quick study is registered.
DEFAULT_STUDY = "demo"

#: Modules imported (once) before a study file is read or ``simstudy list``
#: runs; each registers kinds, built-in studies and listings at import. The
#: domain's study module goes here (or in the ``simstudy.plugins`` entry-point
#: group of an installed package), so the engine itself never imports it.
PLUGIN_MODULES: list[str] = []
_LOADED_PLUGINS: set[str] = set()


def load_plugins() -> None:
    """Import :data:`PLUGIN_MODULES` and ``simstudy.plugins`` entry points not imported yet."""
    import importlib
    from importlib.metadata import entry_points

    names = list(PLUGIN_MODULES)
    try:
        names += [ep.value.split(":")[0] for ep in entry_points(group="simstudy.plugins")]
    except Exception:  # noqa: BLE001 - broken package metadata must not break the CLI
        pass
    for name in names:
        if name not in _LOADED_PLUGINS:
            importlib.import_module(name)
            _LOADED_PLUGINS.add(name)

_COMMON = {"study", "design", "conditions", "run", "summary", "report", "rates"}


def register_kind(name: str, builder: Callable[[StudyFile], Study], *, tables=(), description: str = "",
                  metrics: Callable[[str], bool] | None = None) -> None:
    """Register a study kind.

    Parameters
    ----------
    name : str
        Value of ``[study] kind``.
    builder : callable
        ``builder(study_file) -> Study``; reads its tables from
        ``study_file.tables`` (use :func:`check_keys`, :func:`get_value`,
        :func:`get_callable`) and raises :class:`SpecError` on bad input.
    tables : iterable of str
        Top-level tables the kind accepts besides the common ones.
    description : str
        One line for ``simstudy list``.
    metrics : callable, optional
        ``metrics(name) -> bool``: whether the kind's methods return the metric ``name``, so that a
        ``[[rates]] metric`` is checked before the run (otherwise only ``"mse:EST"`` is).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is invalid; allowed: a non-empty string")
    if not callable(builder):
        raise ValueError(f"builder={builder!r} is invalid; allowed: a callable StudyFile -> Study")
    KINDS[name] = _Kind(builder, frozenset(tables), description, metrics)


def register_study(name: str, source: str | Path, *, description: str = "", out: str | None = None) -> None:
    """Register a built-in study: ``simstudy run NAME``.

    Parameters
    ----------
    name : str
    source : str or Path
        A TOML file path, or the TOML text itself (a string holding a newline).
    description : str
    out : str, optional
        Default output directory (default ``results/NAME``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is invalid; allowed: a non-empty string")
    STUDIES[name] = _Builtin(source, description, out)


def register_listing(title: str, provider: Callable[[], Mapping[str, str] | list]) -> None:
    """Add a section to ``simstudy list`` (e.g. the domain's DGMs, methods, equations).

    ``provider()`` returns a mapping name -> one-line description, or a list of names.
    """
    _LISTINGS[title] = provider


def listings() -> dict[str, dict[str, str]]:
    """All sections of ``simstudy list``: kinds, built-in studies, then registered listings."""
    load_plugins()
    out = {"study kinds": {k: v.description for k, v in KINDS.items()},
           "built-in studies": {k: v.description + ("  [default]" if k == DEFAULT_STUDY else "")
                                for k, v in STUDIES.items()}}
    for title, provider in _LISTINGS.items():
        items = provider()
        out[title] = dict(items) if isinstance(items, Mapping) else {str(i): "" for i in items}
    return out


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """``doc`` (a parsed study file) with ``TABLE.KEY=VALUE`` overrides applied (the command line's ``--set``).

    VALUE is read as a TOML value (``0.5``, ``"gaussian"``, ``[1, 2]``, ``true``) and, when it is not one,
    as a plain string (``gaussian``). Only keys of tables can be set (``dgm.teacher_law``,
    ``design.sigma``, ``study.replicates``), not entries of arrays of tables such as ``[[methods]]``.
    The result is validated like the file itself.
    """
    for item in overrides:
        path, sep, raw = item.partition("=")
        parts = path.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            named_study = not sep and (item in STUDIES or item.endswith(".toml") or Path(item).is_file())
            hint = "; a study file goes before --set, which takes every value after it" if named_study else ""
            raise SpecError(f"--set {item!r} is invalid; allowed: TABLE.KEY=VALUE (for example dgm.sigma=0.3){hint}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = doc
        for name in parts[:-1]:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise SpecError(f"--set {item!r} is invalid: {name!r} is not a table; allowed: TABLE.KEY=VALUE "
                                "for a key of a table (not of an array of tables such as [[methods]])")
        table[parts[-1]] = value
    return doc


def parse_study_text(text: str, path: str | Path | None = None, *, overrides: list[str] | None = None) -> StudyFile:
    """Parse and validate the common part of a study file (with ``overrides``: :func:`apply_overrides`).

    Raises
    ------
    SpecError
        Invalid TOML, unknown table or key, wrong type or impossible value.
    """
    load_plugins()
    label = str(path) if path is not None else "<text>"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"study file {label!r} is not valid TOML: {exc}") from None
    doc = apply_overrides(doc, list(overrides or []))
    if "study" not in doc or not isinstance(doc["study"], dict):
        raise SpecError(f"study file {label!r} has no [study] table; allowed: a file with [study] kind, "
                        "replicates, seed")
    st = doc["study"]
    check_keys(st, {"kind", "name", "description", "replicates", "seed", "fingerprint", "timeout",
                    "promote_warnings"}, "study")
    kind = get_value(st, "kind", str, "study", default="generic", check=lambda v: v in KINDS,
                     allowed="one of " + ", ".join(sorted(KINDS)))
    allowed_tables = _COMMON | KINDS[kind].tables
    check_keys(doc, allowed_tables, "")
    stem = Path(path).stem if path is not None else "study"
    sf = StudyFile(
        kind=kind,
        name=check_name(get_value(st, "name", str, "study", default=stem, check=bool, allowed="a plain file name")),
        description=get_value(st, "description", str, "study", default=""),
        replicates=get_value(st, "replicates", int, "study", check=lambda v: 1 <= v <= MAX_REPLICATES,
                             allowed=f"an integer >= 1 and <= {MAX_REPLICATES}"),
        seed=get_value(st, "seed", int, "study", check=lambda v: v >= 0, allowed="an integer >= 0"),
        fingerprint=get_value(st, "fingerprint", str, "study", default=None),
        path=Path(path) if path is not None else None,
    )
    sf.timeout, sf.promote_warnings = check_study_limits(st)
    sf.design = check_design(doc)
    sf.run = check_run_table(doc.get("run", {}))
    sf.summary.update(check_summary_table(doc.get("summary", {})))
    rep = doc.get("report", {})
    if not isinstance(rep, dict):
        raise SpecError("report has the wrong type; allowed: a table [report]")
    check_keys(rep, {"level", "figures"}, "report")
    if "level" in rep:
        sf.report["level"] = get_value(rep, "level", float, "report", check=lambda v: 0 < v < 1,
                                       allowed="a number in (0, 1)")
    if "figures" in rep:
        figs = get_value(rep, "figures", list, "report", check=lambda v: all(isinstance(f, str) for f in v),
                         allowed="a list of 'package.module:function' paths")
        for i, f in enumerate(figs):
            try:
                resolve_callable(f, f"report.figures[{i}]")
            except ValueError as exc:
                raise SpecError(str(exc)) from None
        sf.report["figures"] = figs
    if "rates" in doc:
        sf.rates = parse_rates(doc["rates"])
    sf.tables = {k: v for k, v in doc.items() if k not in _COMMON}
    return sf


def build_study(sf: StudyFile, *, replicates: int | None = None) -> Study:
    """Build the :class:`Study` of a parsed file with its kind's builder, and check cross references.

    Parameters
    ----------
    sf : StudyFile
    replicates : int, optional
        Override ``[study] replicates``.
    """
    if replicates is not None:
        if isinstance(replicates, bool) or not isinstance(replicates, int) or not 1 <= replicates <= MAX_REPLICATES:
            raise SpecError(f"replicates={replicates!r} is invalid; allowed: an integer >= 1 and <= {MAX_REPLICATES}")
        sf.replicates = replicates
    try:
        study = KINDS[sf.kind].builder(sf)
    except SpecError:
        raise
    except ValueError as exc:  # validation inside Study(...) etc.: keep it one line
        raise SpecError(str(exc).splitlines()[0]) from None
    # [study] timeout / promote_warnings hold for every kind (validated in parse_study_text)
    if sf.timeout is not None:
        study.timeout = sf.timeout
    if sf.promote_warnings:
        study.promote_warnings = tuple(dict.fromkeys(tuple(study.promote_warnings) + tuple(sf.promote_warnings)))
    ref = sf.summary.get("reference")
    if ref is not None and ref not in study.methods:
        raise SpecError(f"summary.reference={ref!r} is not a method of the study; allowed: "
                        f"{', '.join(study.methods)}")
    for i, c in enumerate(sf.summary.get("comparisons", [])):
        for key in ("method", "reference"):
            if c[key] not in study.methods:
                raise SpecError(f"summary.comparisons[{i}].{key}={c[key]!r} is not a method of the study; allowed: "
                                f"{', '.join(study.methods)}")
    truths = evaluate_truths(study)  # a truth that raises is a bad file, found now rather than mid-run
    estimands = list(dict.fromkeys(k for t in truths for k in t))
    levels = {f: len({repr(c.get(f)) for c in study.conditions}) for f in study.factors}
    check_rates(sf.rates, study.factors, levels, estimands, KINDS[sf.kind].metrics)
    return study


def load_study_file(source: str | Path | None = None, *, replicates: int | None = None,
                    overrides: list[str] | None = None) -> tuple[StudyFile, Study, str | None]:
    """Read a study file (or built-in study name) and build its :class:`Study`.

    Parameters
    ----------
    source : str or Path, optional
        Path to a TOML file, or the name of a built-in study; default
        :data:`DEFAULT_STUDY`.
    replicates : int, optional
        Override the file's replicates.
    overrides : list of "TABLE.KEY=VALUE", optional
        Override keys of the file's tables (:func:`apply_overrides`; the command line's ``--set``).

    Returns
    -------
    (StudyFile, Study, str or None)
        The parsed file, the study, and the built-in study's default output
        directory (None for files).
    """
    load_plugins()
    source = DEFAULT_STUDY if source is None else source
    default_out = None
    if isinstance(source, str) and source in STUDIES:
        b = STUDIES[source]
        default_out = b.out or f"results/{source}"
        if isinstance(b.source, str) and "\n" in b.source:
            text, path = b.source, Path(f"{source}.toml")
        else:
            path = Path(b.source)
            text = path.read_text(encoding="utf-8")
    else:
        path = Path(source)
        if path.is_dir():
            raise SpecError(f"study file {str(source)!r} is a directory; allowed: a path to a TOML file or a "
                            f"built-in study ({', '.join(sorted(STUDIES))})")
        if not path.is_file():
            raise SpecError(f"study file {str(source)!r} does not exist; allowed: a path to a TOML file or a "
                            f"built-in study ({', '.join(sorted(STUDIES))})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"study file {str(source)!r} cannot be read ({exc}); allowed: a UTF-8 TOML file") from None
    sf = parse_study_text(text, path, overrides=overrides)
    return sf, build_study(sf, replicates=replicates), default_out


from .generic import DEMO_TOML, build_generic  # noqa: E402  (the generic kind registers with this module)

register_kind("generic", build_generic, tables=("generate", "truth", "methods"),
              description="any study: generate, methods and truth named by import path")
register_study("demo", DEMO_TOML, description="generic demo: mean vs median vs trimmed mean of a location",
               out="results/demo")
