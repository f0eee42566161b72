"""The worker side of the engine (DESIGN §7): what travels to a worker and how it runs replicates.

:class:`Payload` holds everything a worker needs (pickled with cloudpickle by the
backends); :func:`run_batch` runs a batch of (condition, replicate, methods)
items, one thread each, and returns raw rows: one per (condition, replicate,
method) with its status, message, seconds and returned values. Every failure in
``generate`` or a method is recorded, never raised (DESIGN §7).
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

from . import seeds as _seeds
from .design import RESERVED_COLUMNS

__all__ = ["Payload", "convert_output", "run_batch", "run_one", "to_value", "wants_rng"]

_MESSAGE_MAX = 500


@dataclass(frozen=True)
class Payload:
    """Everything a worker needs to run replicates (pickled with cloudpickle)."""

    generate: Callable
    methods: tuple  # ((name, fn, wants_rng), ...)
    conditions: tuple  # (dict, ...)
    seed: int
    factors: frozenset
    seed_torch: bool | None
    copy_data: bool


def wants_rng(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rng" in params


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    frame = tb[-1]
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"


def _message(exc: BaseException, stage: str = "") -> str:
    text = f"{stage}{type(exc).__name__}: {exc}{_where(exc)}"
    return text if len(text) <= _MESSAGE_MAX else text[:_MESSAGE_MAX - 3] + "..."


def _status_of(exc: BaseException) -> str:
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
        if not isinstance(k, str) or not k or k in RESERVED_COLUMNS or k in factors or k.startswith("_"):
            return "error", (f"returned key {k!r}; allowed: a non-empty string not starting with '_', not in "
                             f"{list(RESERVED_COLUMNS)} and not a design factor"), {}
        try:
            values[k] = to_value(v)
        except TypeError as exc:
            return "error", f"returned {k}: {exc}", {}
    bad = [k for k, v in values.items() if isinstance(v, float) and math.isnan(v)]
    if bad:
        return "nan", "NaN in: " + ", ".join(bad), values
    return "ok", "", values


def _call(payload: Payload, fn: Callable, seed_args: tuple, make_args: Callable[[], tuple],
          kwargs: Callable[[], dict]) -> Any:
    """Call ``fn`` with torch seeded from ``seed_args``.

    With ``seed_torch=None`` a call that imports torch for the first time in
    this process ran unseeded; it is run once more, now seeded and pinned to
    one thread, so that the row does not depend on which replicate happened
    to import torch in which worker.
    """
    auto = payload.seed_torch is None
    loaded = "torch" in sys.modules
    if payload.seed_torch is not False:
        _seeds.seed_torch_if_loaded(*seed_args, force=bool(payload.seed_torch))
    out = fn(*make_args(), **kwargs())
    if auto and not loaded and "torch" in sys.modules:
        _seeds.pin_torch_threads()
        _seeds.seed_torch_if_loaded(*seed_args)
        out = fn(*make_args(), **kwargs())
    return out


def run_one(payload: Payload, c: int, r: int, method_indices: Sequence[int]) -> list[dict]:
    """Run the listed methods on replicate ``r`` of condition ``c``; one row per method."""
    seed = payload.seed
    cond = dict(payload.conditions[c])
    rows = []
    t0 = time.perf_counter()
    try:
        data = _call(payload, payload.generate, (seed, c, r, None),
                     lambda: (dict(cond), _seeds.replicate_rng(seed, c, r)), dict)
        failure = None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never raised (DESIGN §7)
        failure = (_status_of(exc), _message(exc, "generate: "))
    gen_seconds = time.perf_counter() - t0
    last = len(method_indices) - 1
    for pos, m in enumerate(method_indices):
        name, fn, wants_rng = payload.methods[m]
        row = {"condition": c, "replicate": r, "method": name}
        if failure is not None:
            row.update(status=failure[0], message=failure[1], _seconds=0.0)
            rows.append(row)
            continue
        t1 = time.perf_counter()
        # Methods must all see the same data, also on resume where only some run: copy for all but the last.
        copy_it = payload.copy_data and pos < last
        try:
            out = _call(payload, fn, (seed, c, r, m),
                        lambda: (copy.deepcopy(data) if copy_it else data, dict(cond)),
                        (lambda: {"rng": _seeds.method_rng(seed, c, r, m)}) if wants_rng else dict)
            status, message, values = convert_output(out, payload.factors)
        except Exception as exc:  # noqa: BLE001
            status, message, values = _status_of(exc), _message(exc), {}
        row.update(status=status, message=message, _seconds=time.perf_counter() - t1 + gen_seconds)
        row.update(values)
        rows.append(row)
    return rows


def run_batch(payload: Payload, items: Sequence[tuple[int, int, tuple]]) -> list[dict]:
    """Run a batch of (condition, replicate, method indices) items with one thread each."""
    rows: list[dict] = []
    with _seeds.single_threaded(force_torch=bool(payload.seed_torch)):
        for c, r, ms in items:
            rows.extend(run_one(payload, c, r, ms))
    return rows
