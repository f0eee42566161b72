"""Design grids: the data-generating conditions of a study (DESIGN §7, ADEMP "D").

A design is either a full factorial grid, given as a mapping from factor
name to a list of levels (``{"n": [20, 50], "p": [0.1, 0.5]}`` gives four
conditions, the last factor varying fastest as in ``itertools.product``), an
explicit list of condition dicts (non-factorial designs), or a pandas
DataFrame with one row per condition. Condition values must be scalars
(bool, int, float, str or None) so that they become table columns, enter the
study's config hash and survive a JSON round trip.
"""
from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["RESERVED_COLUMNS", "RESERVED_FACTORS", "expand_design", "conditions_frame", "condition_label"]

#: Column names the engine owns in the results table; neither a design factor
#: nor a value returned by a method may use them.
RESERVED_COLUMNS = ("condition", "replicate", "method", "status", "message")
#: Further names a design factor may not use: columns of summaries and failure tables.
RESERVED_FACTORS = RESERVED_COLUMNS + ("estimand", "measure", "value", "mcse", "n_used", "failures", "seed",
                                       "spawn_key", "mean", "constant")


def _scalar(value: Any, where: str) -> Any:
    """Return ``value`` as a plain Python scalar or raise ValueError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{where}=nan is invalid; allowed: a bool, int, finite float, str or None")
        return value
    raise ValueError(f"{where}={value!r} is invalid; allowed: a bool, int, float, str or None "
                     "(encode structured levels as strings)")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} factor name {name!r} is invalid; allowed: a non-empty string")
    if name in RESERVED_FACTORS or name.startswith("_"):
        raise ValueError(f"{where} factor name {name!r} is reserved; allowed: a name not in "
                         f"{list(RESERVED_FACTORS)} and not starting with '_'")
    return name


def expand_design(design: Mapping[str, Any] | Sequence[Mapping[str, Any]] | pd.DataFrame) -> list[dict]:
    """Expand a design into the ordered list of its conditions.

    Parameters
    ----------
    design : mapping, sequence of mappings or DataFrame
        Mapping ``factor -> levels`` for a full factorial grid (a scalar level
        is a factor with one level); a sequence of dicts, one per condition;
        or a DataFrame with one row per condition.

    Returns
    -------
    list of dict
        One dict per condition, in a fixed order. The position in this list
        is the condition index that keys the random streams (DESIGN §7).

    Raises
    ------
    ValueError
        Empty design, empty factor, duplicate condition, reserved factor name
        or a non-scalar level.
    """
    if isinstance(design, pd.DataFrame):
        design = design.to_dict(orient="records")
    if isinstance(design, Mapping):
        if not design:
            raise ValueError("design={} is invalid; allowed: a mapping factor -> non-empty list of levels, "
                             "or a non-empty list of condition dicts")
        names, levels = [], []
        for name, values in design.items():
            names.append(_check_name(name, "design"))
            if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, pd.Index)):
                values = [values]
            values = [_scalar(v, f"design[{name!r}] level") for v in values]
            if not values:
                raise ValueError(f"design[{name!r}]=[] is invalid; allowed: a non-empty list of levels")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"design[{name!r}]={values!r} is invalid; allowed: distinct levels")
            levels.append(values)
        conditions = [dict(zip(names, combo)) for combo in itertools.product(*levels)]
    elif isinstance(design, Sequence) and not isinstance(design, (str, bytes)):
        if len(design) == 0:
            raise ValueError("design=[] is invalid; allowed: a non-empty list of condition dicts")
        conditions = []
        for i, cond in enumerate(design):
            if not isinstance(cond, Mapping):
                raise ValueError(f"design[{i}]={cond!r} is invalid; allowed: a dict factor -> value")
            conditions.append({_check_name(k, "design"): _scalar(v, f"design[{i}][{k!r}]")
                               for k, v in cond.items()})
        seen = {}
        for i, cond in enumerate(conditions):
            key = repr(sorted(cond.items()))
            if key in seen:
                raise ValueError(f"design[{i}]={cond!r} is invalid; it repeats design[{seen[key]}] "
                                 "(allowed: distinct conditions; use more replicates instead)")
            seen[key] = i
    else:
        raise ValueError(f"design={design!r} is invalid; allowed: a mapping factor -> levels, a list of "
                         "condition dicts, or a DataFrame")
    return conditions


def factor_names(conditions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Factor names in order of first appearance over the conditions."""
    names: list[str] = []
    for cond in conditions:
        for k in cond:
            if k not in names:
                names.append(k)
    return names


def conditions_frame(conditions: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per condition: ``condition`` (the index) then the factors.

    Parameters
    ----------
    conditions : sequence of dict
        As returned by :func:`expand_design`.

    Returns
    -------
    DataFrame
        Columns ``condition`` (int64) and one per factor; a factor missing
        from a condition (non-factorial designs) is missing in its row.
    """
    names = factor_names(conditions)
    frame = pd.DataFrame([{k: c.get(k) for k in names} for c in conditions], columns=names)
    frame.insert(0, "condition", np.arange(len(conditions), dtype=np.int64))
    return frame


def condition_label(cond: Mapping[str, Any]) -> str:
    """Short label such as ``"n=20, p=0.1"`` for plots and reports."""
    return ", ".join(f"{k}={v}" for k, v in cond.items())
