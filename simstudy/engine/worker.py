"""The worker side of the engine (DESIGN §7): what travels to a worker and how it runs replicates.

:class:`Payload` holds everything a worker needs (pickled with cloudpickle by the
backends); :func:`run_batch` runs a batch of (condition, replicate, methods)
items, one thread each, and returns raw rows: one per (condition, replicate,
method) with its status, message, seconds and returned values. Every failure in
``generate`` or a method is recorded, never raised (DESIGN §7). A row's seconds (``_seconds``)
are its method's call; the first row of each task also carries the replicate's ``generate``, so
that the rows' seconds sum to the compute time (a study's "compute time", a check's worker-minutes).

What is a failure (the status recorded): an exception (``"error"``, or the
exception's ``status`` such as ``"diverged"``); a returned NaN or None
(``"nan"``); a returned infinity (``"nonfinite"``); a return value of the
wrong form (``"error"``); a warning of a class promoted to an error
(``"warning"``); the replicate's time limit (``"timeout"``); a replicate that
kills its worker process (``"crashed"``, recorded by the calling process, see
:mod:`simstudy.engine.crashes`). Rows with a NaN or an infinity keep the
returned values in the table. Other warnings are counted per row (columns
``warnings`` and ``warning_message``, see :mod:`simstudy.engine.limits`).
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import limits as _limits
from . import seeds as _seeds
from .artifacts import ReplicateContext
from .design import RESERVED_COLUMNS

__all__ = ["ENGINE_COLUMNS", "Payload", "convert_output", "make_row", "run_batch", "run_one", "to_value",
           "wants_param", "wants_rng"]

_MESSAGE_MAX = 500
#: Columns the engine writes besides RESERVED_COLUMNS (only when some row warned); no method may return them.
WARNING_COLUMNS = ("warnings", "warning_message")
ENGINE_COLUMNS = RESERVED_COLUMNS + WARNING_COLUMNS


@dataclass(frozen=True)
class Payload:
    """Everything a worker needs to run replicates (pickled with cloudpickle)."""

    generate: Callable
    methods: tuple  # ((name, fn, wants_rng), ...)
    conditions: tuple  # (dict, ...)
    seed: int
    factors: frozenset  # design factors and the true_ESTIMAND columns (.design_columns): no method returns them
    seed_torch: bool | None
    copy_data: bool
    timeout: float | None = None  # seconds per replicate (generate + methods)
    promote: tuple = ()  # names of warning classes raised as errors (status "warning")
    artifacts: str | None = None  # the store's artifacts folder (.artifacts); None: no store
    contexts: tuple = ()  # per method: whether it takes ``ctx`` (filled from the signatures)

    def __post_init__(self):
        if len(self.contexts) != len(self.methods):
            object.__setattr__(self, "contexts", tuple(wants_param(fn, "ctx") for _, fn, _ in self.methods))


def wants_param(fn: Callable, name: str) -> bool:
    """Whether ``fn``'s signature has a parameter ``name`` (``rng``, ``ctx``: passed by keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def wants_rng(fn: Callable) -> bool:
    return wants_param(fn, "rng")


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    frame = tb[-1]
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"


def _message(exc: BaseException, stage: str = "") -> str:
    text = f"{stage}{type(exc).__name__}: {exc}{_where(exc)}"
    return text if len(text) <= _MESSAGE_MAX else text[:_MESSAGE_MAX - 3] + "..."


def _status_of(exc: BaseException, promoted: tuple = ()) -> str:
    if promoted and isinstance(exc, promoted):
        return "warning"
    status = getattr(exc, "status", None)
    if isinstance(status, str) and status and status != "ok":
        return status
    return "error"


def to_value(v: Any) -> Any:
    """Convert one returned value to float or str; raise TypeError otherwise."""
    if v is None:
        return math.nan
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, np.ndarray) and v.size == 1:
        return to_value(v.reshape(()).item())
    if hasattr(v, "item") and hasattr(v, "numel") and v.numel() == 1:  # torch tensor, no torch import
        return to_value(v.item())
    raise TypeError(f"value of type {type(v).__name__} is unsupported; allowed: a real scalar, bool, str or None")


def check_truth_value(name: str, value: Any, cond_index: int) -> float:
    """A true value of ``truth(cond)`` as float; ValueError naming it otherwise."""
    try:
        v = to_value(value)
    except TypeError:
        v = None
    if not isinstance(v, float) or math.isnan(v):
        raise ValueError(f"truth(condition {cond_index})[{name!r}]={value!r} is invalid; allowed: a real number")
    return v


def convert_output(out: Any, factors: frozenset) -> tuple[str, str, dict]:
    """Turn a method's return value into (status, message, values)."""
    if isinstance(out, pd.Series):
        out = out.to_dict()
    if not isinstance(out, Mapping):
        if isinstance(out, (numbers.Real, np.ndarray, str)) or hasattr(out, "numel") or out is None:
            out = {"value": out}
        else:
            return "error", f"returned {type(out).__name__}; allowed: a dict of named scalars or one scalar", {}
    values: dict[str, Any] = {}
    for k, v in out.items():
        if not isinstance(k, str) or not k or k in ENGINE_COLUMNS or k in factors or k.startswith("_"):
            return "error", (f"returned key {k!r}; allowed: a non-empty string not starting with '_', not in "
                             f"{list(ENGINE_COLUMNS)}, not a design factor and not true_ESTIMAND"), {}
        try:
            values[k] = to_value(v)
        except TypeError as exc:
            return "error", f"returned {k}: {exc}", {}
    bad = [k for k, v in values.items() if isinstance(v, float) and math.isnan(v)]
    if bad:
        return "nan", "NaN in: " + ", ".join(bad), values
    inf = [f"{k}={v}" for k, v in values.items() if isinstance(v, float) and math.isinf(v)]
    if inf:
        return "nonfinite", "non-finite: " + ", ".join(inf), values
    return "ok", "", values


def _call(payload: Payload, fn: Callable, seed_args: tuple, make_args: Callable[[], tuple],
          kwargs: Callable[[], dict], promoted: tuple = (), seconds: float | None = None) -> tuple[Any, list]:
    """Call ``fn`` with torch seeded from ``seed_args``; return (result, warnings it raised).

    With ``seed_torch=None`` a call that imports torch for the first time in
    this process ran unseeded; it is run once more, now seeded and pinned to
    one thread, so that the row does not depend on which replicate happened
    to import torch in which worker (only the second call's warnings count).
    Warnings and the time limit: :func:`simstudy.engine.limits.guarded`.
    """
    auto = payload.seed_torch is None
    loaded = "torch" in sys.modules
    t0 = time.perf_counter()
    if payload.seed_torch is not False:
        _seeds.seed_torch_if_loaded(*seed_args, force=bool(payload.seed_torch))
    out, caught = _limits.guarded(lambda: fn(*make_args(), **kwargs()), promoted, seconds)
    if auto and not loaded and "torch" in sys.modules:
        _seeds.pin_torch_threads()
        _seeds.seed_torch_if_loaded(*seed_args)
        left = None if seconds is None else seconds - (time.perf_counter() - t0)
        out, caught = _limits.guarded(lambda: fn(*make_args(), **kwargs()), promoted, left)
    return out, caught


def _warning_text(w) -> str:
    text = f"{w.category.__name__}: {w.message}"
    return text if len(text) <= _MESSAGE_MAX else text[:_MESSAGE_MAX - 3] + "..."


def _timeout_message(payload: Payload, stage: str) -> str:
    return f"{stage}exceeded the time limit of the replicate (timeout={payload.timeout:g} s)"


def make_row(c: int, r: int, method: str, status: str, message: str, seconds: float = 0.0) -> dict:
    """One raw row: its key (condition, replicate, method; the seeds follow from the position), status and message."""
    return {"condition": c, "replicate": r, "method": method, "status": status, "message": message,
            "_seconds": seconds}


def _keywords(seed: int, c: int, r: int, m: int, rng: bool, ctx: ReplicateContext | None) -> Callable[[], dict]:
    """The keyword arguments of a method call: its own ``rng`` and its ``ctx`` (:mod:`.artifacts`), if it takes them."""
    if not rng and ctx is None:
        return dict
    return lambda: {**({"rng": _seeds.method_rng(seed, c, r, m)} if rng else {}), **({"ctx": ctx} if ctx is not None else {})}


def run_one(payload: Payload, c: int, r: int, method_indices: Sequence[int]) -> list[dict]:
    """Run the listed methods on replicate ``r`` of condition ``c``; one row per method."""
    seed = payload.seed
    cond = dict(payload.conditions[c])
    promoted = _limits.resolve_warnings(payload.promote)
    rows = []
    t0 = time.perf_counter()
    end = None if payload.timeout is None else t0 + payload.timeout
    gen_warnings: list = []
    try:
        data, gen_warnings = _call(payload, payload.generate, (seed, c, r, None),
                                   lambda: (dict(cond), _seeds.replicate_rng(seed, c, r)), dict, promoted,
                                   payload.timeout)
        failure = None
    except _limits.ReplicateTimeout:
        failure = ("timeout", _timeout_message(payload, "generate: "))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never raised (DESIGN §7)
        failure = (_status_of(exc, promoted), _message(exc, "generate: "))
    # the replicate's generation is charged to the first row of the task, so that the rows' seconds sum to the
    # compute time (each method's row: its own call; the first also the generation)
    charge = time.perf_counter() - t0
    last = len(method_indices) - 1
    for pos, m in enumerate(method_indices):
        name, fn, wants_rng = payload.methods[m]
        caught = list(gen_warnings)
        if failure is not None:
            row = make_row(c, r, name, *failure, charge)
        elif end is not None and time.perf_counter() >= end:
            row = make_row(c, r, name, "timeout", _timeout_message(payload, "not run: "), charge)
        else:
            t1 = time.perf_counter()
            # Methods must all see the same data, also on resume where only some run: copy for all but the last.
            copy_it = payload.copy_data and pos < last
            ctx = ReplicateContext(c, r, name, payload.artifacts) if payload.contexts[m] else None
            try:
                out, more = _call(payload, fn, (seed, c, r, m),
                                  lambda: (copy.deepcopy(data) if copy_it else data, dict(cond)),
                                  _keywords(seed, c, r, m, wants_rng, ctx), promoted, None if end is None else end - t1)
                caught += more
                status, message, values = convert_output(out, payload.factors)
            except _limits.ReplicateTimeout:
                status, message, values = "timeout", _timeout_message(payload, ""), {}
            except Exception as exc:  # noqa: BLE001
                status, message, values = _status_of(exc, promoted), _message(exc), {}
            if ctx is not None and status != "timeout":  # after a timeout the method may still be writing
                try:
                    ctx.publish()
                except OSError as exc:
                    status, message = "error", f"artifacts: {type(exc).__name__}: {exc}"
            row = make_row(c, r, name, status, message, time.perf_counter() - t1 + charge)
            row.update(values)
        charge = 0.0
        if caught:
            row.update(warnings=len(caught), warning_message=_warning_text(caught[0]))
        rows.append(row)
    return rows


def run_batch(payload: Payload, items: Sequence[tuple[int, int, tuple]]) -> list[dict]:
    """Run a batch of (condition, replicate, method indices) items with one thread each."""
    rows: list[dict] = []
    with _seeds.single_threaded(force_torch=bool(payload.seed_torch)):
        for c, r, ms in items:
            rows.extend(run_one(payload, c, r, ms))
    return rows
