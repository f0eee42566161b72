"""Paper checks: one claim of DESIGN §6 per check, each with a stated decision rule
built on Monte Carlo standard errors.

A check is a function ``run(context) -> CheckResult`` registered under a name.
:class:`CheckContext` carries the scale ("smoke" for CI, "full" for the results
page), the output folder, worker count, and the user's ``--set key=value``
overrides, which :meth:`CheckContext.param` applies with the default's type.
Every result is written to ``OUT/NAME.json`` (claim, decision rule, decision,
statistics with their MCSEs), its tables to ``OUT/NAME/*.csv`` and its figures
to ``OUT/NAME/*.png``; the CLI prints one verdict line per check and exits 0
when every decided claim holds, 1 when one fails.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

SCALES = ("smoke", "full")
DECISIONS = ("pass", "fail", "reported")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else str(v)  # JSON has no inf/nan: "inf", "nan"
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


@dataclass
class CheckResult:
    """The outcome of one check.

    ``decision`` is "pass" (the claim holds by the rule), "fail" (it does not), or
    "reported" (numbers without a verdict, e.g. sumo's spread). ``statistics`` is a
    JSON-serialisable dict; every estimate in it carries its MCSE.
    """

    name: str
    claim: str
    decision_rule: str
    decision: str
    statistics: dict
    summary: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    scale: str = "smoke"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of this run (near 0 when it resumed from stored rows)
    replicate_seconds: float | None = None  # summed time of the replicates behind the numbers, stored ones included

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"decision={self.decision!r} is invalid; allowed: {', '.join(DECISIONS)}")

    def verdict_line(self) -> str:
        return f"{self.name}: {self.decision.upper()} - {self.summary}"

    def to_dict(self) -> dict:
        return _jsonable({"name": self.name, "claim": self.claim, "decision_rule": self.decision_rule,
                          "decision": self.decision, "summary": self.summary, "statistics": self.statistics,
                          "tables": sorted(self.tables), "figures": self.figures, "scale": self.scale,
                          "settings": self.settings, "seconds": self.seconds,
                          "replicate_seconds": self.replicate_seconds})

    def save(self, out: Path) -> Path:
        out = Path(out)
        folder = out / self.name
        folder.mkdir(parents=True, exist_ok=True)
        for key, table in self.tables.items():
            table.to_csv(folder / f"{key}.csv", index=False)
        path = out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path


@dataclass
class CheckContext:
    """What a check needs to run: scale, output folder, workers and overrides."""

    scale: str = "smoke"
    out: Path = Path("results/checks")
    n_jobs: int = 1
    overrides: dict = field(default_factory=dict)
    used: set = field(default_factory=set)
    replicate_seconds: float = 0.0  # summed by :meth:`record` over the studies a check used

    def record(self, result):
        """Count the time of a study's replicates (stored rows included) towards the running check;
        returns ``result``."""
        timings = getattr(result, "timings", None)
        if timings is not None and "seconds" in timings:
            self.replicate_seconds += float(np.nansum(timings["seconds"].to_numpy(dtype=float)))
        return result

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r} is invalid; allowed: {', '.join(SCALES)}")
        self.out = Path(self.out)

    def param(self, key: str, smoke: Any, full: Any | None = None) -> Any:
        """The value of a check parameter: the override when given (coerced to the
        default's type), else the default for this scale."""
        default = smoke if self.scale == "smoke" or full is None else full
        self.used.add(key)
        if key not in self.overrides:
            return default
        return coerce(key, self.overrides[key], default)

    def folder(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert a ``--set`` string to the type of the default; one-line errors."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            kind = type(default[0]) if default else str
            return [coerce(key, part, kind()) if kind in (int, float) else part for part in raw.split(",")]
    except ValueError:
        raise ValueError(f"--set {key}={raw!r} is invalid; allowed: a value of type "
                         f"{type(default).__name__} like {default!r}") from None
    return raw


@dataclass
class Check:
    """A registered check: its name, its claim and the function that runs it."""

    name: str
    claim: str
    run: Callable[[CheckContext], CheckResult]


CHECKS: dict[str, Check] = {}


def register(name: str, claim: str):
    """Decorator registering ``run(context) -> CheckResult`` as check ``name``."""

    def wrap(fn: Callable[[CheckContext], CheckResult]):
        CHECKS[name] = Check(name=name, claim=claim, run=fn)
        return fn

    return wrap


def listing() -> dict[str, str]:
    """``simstudy list``'s section of the paper checks: name -> claim (every check module registers itself)."""
    import importlib

    importlib.import_module(__package__)  # the package imports (and so registers) every check module

    return {name: check.claim for name, check in CHECKS.items()}


def run_check(name: str, context: CheckContext) -> CheckResult:
    """Run one check, time it, save its JSON and tables, and return the result."""
    if name not in CHECKS:
        raise ValueError(f"check={name!r} is unknown; allowed: all, {', '.join(CHECKS)}")
    started = time.perf_counter()
    context.replicate_seconds = 0.0
    result = CHECKS[name].run(context)
    result.seconds = time.perf_counter() - started
    if result.replicate_seconds is None and context.replicate_seconds > 0:
        result.replicate_seconds = context.replicate_seconds
    result.scale = context.scale
    result.save(context.out)
    return result
