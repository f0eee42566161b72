"""Performance measures of your own, with a Monte Carlo standard error by a stated route (DESIGN §7).

A user-defined measure is a function ``fn(values, truth) -> number`` of the replicate values of one
column (a 1-D float array over the replicates with status ``"ok"`` that returned the column) and the
condition's true value (a float, or ``None`` for a column without a truth). Its MCSE comes by one of
three routes, named in :class:`UserMeasure`:

- ``mcse=callable``: a formula of your own, same signature ``mcse(values, truth) -> number``;
- ``mcse="jackknife"`` (default): ``sqrt((n-1)/n sum (T_(i) - T_(.))^2)`` over the n leave-one-out
  values ``T_(i)`` of the measure (for the mean this equals ``sd / sqrt(n)`` exactly); it needs a smooth
  statistic (it is inconsistent for a median or another quantile: use the bootstrap there);
- ``mcse="bootstrap"``: the standard deviation of the measure over ``n_resamples`` nonparametric
  bootstrap resamples of the replicates (:func:`scipy.stats.bootstrap`), drawn from a stream keyed by
  the study's root seed and (condition, method, column, measure name), so a summary is the same on every
  run and does not depend on the order of the measures.

The measures enter :func:`simstudy.engine.performance.summarise` (and ``StudyResult.summary``) as a
mapping ``name -> spec``; their rows have the same columns as the built-in measures. A spec is a
:class:`UserMeasure`, a bare function (jackknife MCSE), an import path ``"package.module:function"``,
or a table ``{"function": ..., "mcse": ..., "needs_truth": ..., "columns": [...], "n_resamples": ...}``
(the form of a study file's ``[summary.measures.NAME]``, which is stored with the results and so
re-summarises a store read back later).
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .callables import resolve_callable
from .seeds import measure_rng

__all__ = ["ROUTES", "UserMeasure", "bootstrap_se", "check_measures", "evaluate", "jackknife_se"]

#: Named MCSE routes (a callable, or its import path, is the third).
ROUTES = ("jackknife", "bootstrap")
_SPEC_KEYS = ("function", "mcse", "needs_truth", "columns", "n_resamples")
_FN_ALLOWED = "a function (values, truth) -> number, or its import path 'package.module:function'"


def _two_positional(fn: Callable) -> bool:
    """False only when the signature of ``fn`` surely cannot take ``(values, truth)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    return len(pos) >= 2 and len(required) <= 2


def _function(value: Any, where: str) -> Callable:
    if isinstance(value, str):
        fn = resolve_callable(value, where)
    elif callable(value):
        fn = value
    else:
        raise ValueError(f"{where}={value!r} is invalid; allowed: {_FN_ALLOWED}")
    if not _two_positional(fn):
        raise ValueError(f"{where}={value!r} does not take two positional arguments; allowed: {_FN_ALLOWED}")
    return fn


def _fields(fn, mcse, needs_truth, columns, n_resamples, where: str) -> tuple:
    fn = _function(fn, f"{where}.function")
    if isinstance(mcse, str) and mcse in ROUTES:
        route = mcse
    elif callable(mcse) or (isinstance(mcse, str) and ":" in mcse):
        route = _function(mcse, f"{where}.mcse")
    else:
        raise ValueError(f"{where}.mcse={mcse!r} is invalid; allowed: 'jackknife', 'bootstrap', or a formula: "
                         f"{_FN_ALLOWED}")
    if not isinstance(needs_truth, (bool, np.bool_)):
        raise ValueError(f"{where}.needs_truth={needs_truth!r} is invalid; allowed: true or false")
    if columns is not None:
        if isinstance(columns, str):
            columns = [columns]
        if (not isinstance(columns, Sequence) or not columns
                or not all(isinstance(c, str) and c for c in columns)):
            raise ValueError(f"{where}.columns={columns!r} is invalid; allowed: a non-empty list of column names, "
                             "or none for every estimand")
        columns = tuple(columns)
    if isinstance(n_resamples, np.integer):
        n_resamples = int(n_resamples)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or not 2 <= n_resamples <= 10**6:
        raise ValueError(f"{where}.n_resamples={n_resamples!r} is invalid; allowed: an integer in [2, 1000000]")
    return fn, route, bool(needs_truth), columns, n_resamples


@dataclass(frozen=True)
class UserMeasure:
    """A performance measure of your own and the route of its MCSE.

    Parameters
    ----------
    fn : callable or str
        ``fn(values, truth) -> number``: ``values`` is a 1-D float64 array of one column over the ok
        replicates of a condition and method that returned it, ``truth`` the condition's true value of
        that column (float) or ``None``. An import path ``"package.module:function"`` is resolved now.
    mcse : {"jackknife", "bootstrap"} or callable or str
        Route of the Monte Carlo SE (see :mod:`simstudy.engine.user_measures`): the jackknife, the
        nonparametric bootstrap (:func:`scipy.stats.bootstrap`, seeded from the study seed), or a formula
        ``mcse(values, truth) -> number`` (or its import path).
    needs_truth : bool
        Compute the measure only for columns with a truth (estimands); otherwise ``truth`` may be ``None``.
    columns : tuple of str, optional
        Columns it applies to; default every estimand, and with ``needs_truth=False`` every metric too.
    n_resamples : int
        Bootstrap resamples (only for ``mcse="bootstrap"``): 2000 give the MCSE to about 1.6 % of itself.

    Examples
    --------
    >>> trimmed = UserMeasure(lambda x, truth: float(np.mean(np.sort(x)[5:-5])) - truth, mcse="bootstrap",
    ...                       needs_truth=True)
    """

    fn: Callable | str
    mcse: Callable | str = "jackknife"
    needs_truth: bool = False
    columns: tuple[str, ...] | None = None
    n_resamples: int = 2000

    def __post_init__(self):
        self._set(_fields(self.fn, self.mcse, self.needs_truth, self.columns, self.n_resamples, "UserMeasure"))

    def _set(self, values: tuple) -> None:
        for name, v in zip(("fn", "mcse", "needs_truth", "columns", "n_resamples"), values):
            object.__setattr__(self, name, v)


def _one(value: Any, where: str) -> UserMeasure:
    if isinstance(value, UserMeasure):
        return value
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in _SPEC_KEYS]
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is an unknown key; allowed: {', '.join(_SPEC_KEYS)}")
        if "function" not in value:
            raise ValueError(f"{where}.function is missing; allowed: {_FN_ALLOWED}")
        args = (value["function"], value.get("mcse", "jackknife"), value.get("needs_truth", False),
                value.get("columns"), value.get("n_resamples", 2000))
        return UserMeasure(*_fields(*args, where))
    if callable(value) or isinstance(value, str):
        return UserMeasure(*_fields(value, "jackknife", False, None, 2000, where))
    raise ValueError(f"{where}={value!r} is invalid; allowed: a UserMeasure, {_FN_ALLOWED}, or a table with keys "
                     f"{', '.join(_SPEC_KEYS)}")


def check_measures(measures: Mapping | None, *, reserved: Sequence[str] = (), where: str = "measures",
                   dotted: bool = False) -> dict[str, UserMeasure]:
    """Validate a mapping name -> spec of user-defined measures.

    Parameters
    ----------
    measures : mapping or None
        ``name -> UserMeasure | callable | "package.module:function" | table`` (see module docstring).
    reserved : list of str
        Names not allowed (the built-in measures).
    where, dotted : str, bool
        Location for messages: ``measures['NAME']`` or, dotted (study files), ``summary.measures.NAME``.

    Returns
    -------
    dict
        name -> :class:`UserMeasure`, in the given order.

    Raises
    ------
    ValueError
        One line naming the measure, the key, the value and what is allowed.
    """
    if measures is None:
        return {}
    if not isinstance(measures, Mapping):
        raise ValueError(f"{where}={measures!r} is invalid; allowed: a mapping name -> measure (UserMeasure, "
                         "function or import path)")
    out = {}
    for name, value in measures.items():
        loc = f"{where}.{name}" if dotted else f"{where}[{name!r}]"
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{loc} has an invalid name; allowed: letters, digits and '_', not starting with a "
                             "digit")
        if name in reserved:
            raise ValueError(f"{loc} has the name of a built-in measure; allowed: another name (built-ins: "
                             f"{', '.join(reserved)})")
        out[name] = _one(value, loc)
    return out


# ------------------------------------------------------------------------------------------------------------
def _scalar(v: Any, what: str) -> float:
    if np.ndim(v) != 0:
        raise ValueError(f"{what} returned a value of shape {np.shape(v)}; allowed: one number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} returned {v!r}; allowed: one number") from None


def _call(fn: Callable, x: np.ndarray, truth, what: str) -> float:
    try:
        v = fn(x, truth)
    except Exception as exc:  # noqa: BLE001 - the user's code: one line naming the measure and the cell
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{what} raised {type(exc).__name__}{(': ' + msg) if msg else ''}; allowed: a function "
                         "(values, truth) -> number defined on the replicate values") from exc
    return _scalar(v, what)


def jackknife_se(fn: Callable, x: np.ndarray, truth, what: str = "measure") -> float:
    """Jackknife SE ``sqrt((n-1)/n sum (T_(i) - T_(.))^2)`` of ``fn(x, truth)``; NaN for n < 2."""
    n = x.size
    if n < 2:
        return math.nan
    keep = np.ones(n, dtype=bool)
    loo = np.empty(n)
    for i in range(n):
        keep[i] = False
        loo[i] = _call(fn, x[keep], truth, what)
        keep[i] = True
    if not np.all(np.isfinite(loo)):
        return math.nan
    return float(math.sqrt((n - 1) / n * float(np.sum((loo - loo.mean()) ** 2))))


def bootstrap_se(fn: Callable, x: np.ndarray, truth, rng: np.random.Generator, n_resamples: int = 2000,
                 what: str = "measure") -> float:
    """SD of ``fn`` over nonparametric bootstrap resamples (:func:`scipy.stats.bootstrap`); NaN for n < 2."""
    from scipy import stats

    if x.size < 2:
        return math.nan
    batch = max(1, min(n_resamples, 2_000_000 // x.size))  # memory: batch x n indices at a time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples: scipy warns about its interval, not the SE
        res = stats.bootstrap((x,), lambda s: _call(fn, s, truth, what), n_resamples=n_resamples, batch=batch,
                              vectorized=False, method="percentile", rng=rng)
    return float(res.standard_error)


def evaluate(m: UserMeasure, values, truth, *, rng_key: tuple, what: str) -> tuple[float, float]:
    """Value and MCSE of ``m`` on ``values``; ``rng_key`` = (seed, condition, method, column, name)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    value = _call(m.fn, x, truth, what)
    if m.mcse == "jackknife":
        se = jackknife_se(m.fn, x, truth, what)
    elif m.mcse == "bootstrap":
        se = bootstrap_se(m.fn, x, truth, measure_rng(*rng_key), m.n_resamples, what)
    else:
        se = _call(m.mcse, x, truth, f"{what} (its mcse formula)")
    return value, se


def check_columns(user: Mapping[str, UserMeasure], numeric: Sequence[str]) -> None:
    """Every column a measure names is a numeric column of the (non-empty) table, else one line."""
    for name, m in user.items():
        for col in m.columns or ():
            if col not in numeric:
                raise ValueError(f"measures[{name!r}].columns names {col!r}, not a numeric column of the results; "
                                 f"allowed: one of {list(numeric)}")


def cells(user: Mapping[str, UserMeasure], rows, truth: Mapping[str, float], estimands: Sequence[str],
          metrics: Sequence[str], *, seed: int, condition: int, method: str):
    """Yield ``(column, name, value, mcse, n_used)`` of each user measure on one condition and method."""
    for name, m in user.items():
        for col in m.columns or (list(estimands) + ([] if m.needs_truth else list(metrics))):
            theta = truth.get(col)
            if col not in rows or (m.needs_truth and theta is None):
                continue
            x = rows[col].dropna().to_numpy(np.float64)
            if x.size:
                what = f"measures[{name!r}] on condition {condition}, method {method!r}, column {col!r}"
                value, se = evaluate(m, x, None if theta is None else float(theta),
                                     rng_key=(seed, condition, method, col, name), what=what)
                yield col, name, value, se, x.size
