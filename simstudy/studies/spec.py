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

    [summary]                    # optional
    reference = "wald"           # method for relative efficiency
    alpha = 0.05                 # level of the power measure

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

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..engine import Study
from ..engine.callables import resolve_callable

__all__ = ["SpecError", "StudyFile", "KINDS", "STUDIES", "DEFAULT_STUDY", "PLUGIN_MODULES", "register_kind",
           "register_study", "register_listing", "load_plugins", "listings", "parse_study_text", "load_study_file", "build_study", "check_keys",
           "get_value", "get_callable"]


class SpecError(ValueError):
    """A study file is malformed; the message is one line naming the key or value and what is allowed."""


# ------------------------------------------------------------------------------------------------------------
# helpers for builders
# ------------------------------------------------------------------------------------------------------------
_MISSING = object()


def _type_name(types) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_keys(table: Mapping, allowed, where: str) -> None:
    """Raise SpecError for a key of ``table`` not in ``allowed``."""
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


# ------------------------------------------------------------------------------------------------------------
# the common part
# ------------------------------------------------------------------------------------------------------------
@dataclass
class StudyFile:
    """Parsed common part of a study file.

    Attributes
    ----------
    kind, name, description : str
    replicates, seed : int
    fingerprint : str or None
    design : dict or list of dict or None
        ``[design]`` (factorial) or ``[[conditions]]`` (non-factorial), as in the file.
    run : dict
        ``n_jobs``, ``backend``, ``scheduler``, ``out`` when given.
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
        if "level" in self.report:
            out["level"] = self.report["level"]
        if self.report.get("figures"):
            out["figures"] = list(self.report["figures"])
        return out


@dataclass
class _Kind:
    builder: Callable[[StudyFile], Study]
    tables: frozenset
    description: str


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


def register_kind(name: str, builder: Callable[[StudyFile], Study], *, tables=(), description: str = "") -> None:
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
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is invalid; allowed: a non-empty string")
    if not callable(builder):
        raise ValueError(f"builder={builder!r} is invalid; allowed: a callable StudyFile -> Study")
    KINDS[name] = _Kind(builder, frozenset(tables), description)


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


def _check_design(sf_tables: dict) -> Any:
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
        return design
    if "conditions" in sf_tables:
        conds = sf_tables["conditions"]
        if not isinstance(conds, list) or not conds or not all(isinstance(c, dict) for c in conds):
            raise SpecError("conditions has the wrong type; allowed: a non-empty array of tables [[conditions]]")
        for i, c in enumerate(conds):
            for k, v in c.items():
                if not isinstance(v, (bool, int, float, str)):
                    raise SpecError(f"conditions[{i}].{k}={v!r} has the wrong type; allowed: a number, string "
                                    "or boolean")
        return conds
    return None


def _parse_rates(value: Any) -> list[dict]:
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


def parse_study_text(text: str, path: str | Path | None = None) -> StudyFile:
    """Parse and validate the common part of a study file.

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
    if "study" not in doc or not isinstance(doc["study"], dict):
        raise SpecError(f"study file {label!r} has no [study] table; allowed: a file with [study] kind, "
                        "replicates, seed")
    st = doc["study"]
    check_keys(st, {"kind", "name", "description", "replicates", "seed", "fingerprint"}, "study")
    kind = get_value(st, "kind", str, "study", default="generic", check=lambda v: v in KINDS,
                     allowed="one of " + ", ".join(sorted(KINDS)))
    allowed_tables = _COMMON | KINDS[kind].tables
    check_keys(doc, allowed_tables, "")
    stem = Path(path).stem if path is not None else "study"
    sf = StudyFile(
        kind=kind,
        name=get_value(st, "name", str, "study", default=stem, check=bool, allowed="a non-empty string"),
        description=get_value(st, "description", str, "study", default=""),
        replicates=get_value(st, "replicates", int, "study", check=lambda v: v >= 1, allowed="an integer >= 1"),
        seed=get_value(st, "seed", int, "study", check=lambda v: v >= 0, allowed="an integer >= 0"),
        fingerprint=get_value(st, "fingerprint", str, "study", default=None),
        path=Path(path) if path is not None else None,
    )
    sf.design = _check_design(doc)
    run = doc.get("run", {})
    if not isinstance(run, dict):
        raise SpecError("run has the wrong type; allowed: a table [run]")
    check_keys(run, {"n_jobs", "backend", "scheduler", "out"}, "run")
    if "n_jobs" in run:
        sf.run["n_jobs"] = get_value(run, "n_jobs", int, "run", check=lambda v: v >= 1 or v == -1,
                                     allowed="an integer >= 1, or -1 for all CPUs")
    if "backend" in run:
        sf.run["backend"] = get_value(run, "backend", str, "run", check=lambda v: v in ("loky", "dask"),
                                      allowed="'loky' or 'dask'")
    if "scheduler" in run:
        sf.run["scheduler"] = get_value(run, "scheduler", str, "run", check=bool, allowed="a scheduler address")
    if "out" in run:
        sf.run["out"] = get_value(run, "out", str, "run", check=bool, allowed="a directory path")
    summ = doc.get("summary", {})
    if not isinstance(summ, dict):
        raise SpecError("summary has the wrong type; allowed: a table [summary]")
    check_keys(summ, {"reference", "alpha"}, "summary")
    if "reference" in summ:
        sf.summary["reference"] = get_value(summ, "reference", str, "summary", check=bool,
                                            allowed="the name of a method")
    if "alpha" in summ:
        sf.summary["alpha"] = get_value(summ, "alpha", float, "summary", check=lambda v: 0 < v < 1,
                                        allowed="a number in (0, 1)")
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
        sf.rates = _parse_rates(doc["rates"])
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
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
            raise SpecError(f"replicates={replicates!r} is invalid; allowed: an integer >= 1")
        sf.replicates = replicates
    try:
        study = KINDS[sf.kind].builder(sf)
    except SpecError:
        raise
    except ValueError as exc:  # validation inside Study(...) etc.: keep it one line
        raise SpecError(str(exc).splitlines()[0]) from None
    ref = sf.summary.get("reference")
    if ref is not None and ref not in study.methods:
        raise SpecError(f"summary.reference={ref!r} is not a method of the study; allowed: "
                        f"{', '.join(study.methods)}")
    for i, r in enumerate(sf.rates):
        if r["x"] not in study.factors:
            raise SpecError(f"rates[{i}].x={r['x']!r} is not a design factor; allowed: {', '.join(study.factors)}")
        for b in r.get("by", []):
            if b not in study.factors and b != "method":
                raise SpecError(f"rates[{i}].by entry {b!r} is invalid; allowed: method, "
                                f"{', '.join(study.factors)}")
    return study


def load_study_file(source: str | Path | None = None, *, replicates: int | None = None
                    ) -> tuple[StudyFile, Study, str | None]:
    """Read a study file (or built-in study name) and build its :class:`Study`.

    Parameters
    ----------
    source : str or Path, optional
        Path to a TOML file, or the name of a built-in study; default
        :data:`DEFAULT_STUDY`.
    replicates : int, optional
        Override the file's replicates.

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
        if not path.is_file():
            raise SpecError(f"study file {str(source)!r} does not exist; allowed: a path to a TOML file or a "
                            f"built-in study ({', '.join(sorted(STUDIES))})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"study file {str(source)!r} cannot be read ({exc}); allowed: a UTF-8 TOML file") from None
    sf = parse_study_text(text, path)
    return sf, build_study(sf, replicates=replicates), default_out


# ------------------------------------------------------------------------------------------------------------
# the generic kind
# ------------------------------------------------------------------------------------------------------------
def _build_generic(sf: StudyFile) -> Study:
    """Builder of ``kind = "generic"``: callables by import path (see the module docstring)."""
    t = sf.tables
    if sf.design is None:
        raise SpecError("design is missing; allowed: a [design] table or [[conditions]] tables")
    if "generate" not in t or not isinstance(t["generate"], dict):
        raise SpecError("generate is missing; allowed: a table [generate] with function = 'package.module:function'")
    generate = get_callable(t["generate"], "generate")
    truth = None
    if "truth" in t:
        if not isinstance(t["truth"], dict):
            raise SpecError("truth has the wrong type; allowed: a table [truth] with function = '...'")
        truth = get_callable(t["truth"], "truth", n_positional=1)
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise SpecError("methods is missing; allowed: one table [methods.NAME] per method with function = '...'")
    methods = {}
    for name, mt in methods_t.items():
        if not isinstance(mt, dict):
            raise SpecError(f"methods.{name} has the wrong type; allowed: a table with function = '...'")
        methods[name] = get_callable(mt, f"methods.{name}")
    return Study(design=sf.design, generate=generate, analyse=methods, truth=truth, replicates=sf.replicates,
                 seed=sf.seed, name=sf.name, fingerprint=sf.fingerprint, options=sf.options())


register_kind("generic", _build_generic, tables=("generate", "truth", "methods"),
              description="any study: generate, methods and truth named by import path")

#: The built-in generic demo (``simstudy run demo``): mean, median and trimmed mean of a symmetric location.
DEMO_TOML = """\
[study]
kind = "generic"
name = "demo"
description = \"\"\"Generic demo (the default until the domain's quick study is registered): the centre of a \
symmetric distribution estimated by the mean (t interval), the median (order-statistic interval) and the 20% \
trimmed mean (Tukey-McLaughlin interval), for normal and t3 data. Expect relative efficiency of the median near \
0.7 (2/pi asymptotically) for normal data and above 1 for t3, MSE falling like 1/n.\"\"\"
replicates = 300
seed = 1

[design]
n = [10, 40, 160]
dist = ["normal", "t3"]

[generate]
function = "simstudy.studies.examples:location_data"

[truth]
function = "simstudy.studies.examples:location_truth"

[methods.mean_t]
function = "simstudy.studies.examples:mean_t"

[methods.median]
function = "simstudy.studies.examples:median_ci"

[methods.trimmed]
function = "simstudy.studies.examples:trimmed_mean"
params = { proportion = 0.2 }

[summary]
reference = "mean_t"

[[rates]]
metric = "mse:estimate"
x = "n"
theory_slope = -1.0
"""

register_study("demo", DEMO_TOML, description="generic demo: mean vs median vs trimmed mean of a location",
               out="results/quick")
