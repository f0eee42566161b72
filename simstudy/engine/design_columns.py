"""The design factors and the truths as columns of the stored table (DESIGN §7: one tidy table).

``replicates.parquet`` is readable by itself (R's ``arrow::read_parquet``, DuckDB, pandas): after
``condition`` come the design factors, one column each, then one ``true_ESTIMAND`` column per estimand with a
truth (missing where a condition has none), then the row key and the values::

    condition | n | p | true_estimate | replicate | method | status | message | _seconds | estimate | se | ...

They are derived from the manifest (``conditions``, ``truths``), so the engine drops them when it reads rows
(:func:`without_design`, called by :func:`simstudy.engine.tidy.finalise`) and adds them again when it writes
the consolidated table (:func:`with_design`, called by :meth:`simstudy.engine.storage.Store.consolidate` and
:meth:`simstudy.engine.result.StudyResult.save`). Stores written before these columns existed, chunks (which
hold the bare rows) and tables rewritten by other tools all read the same way. A method may not return a value
named ``true_ESTIMAND`` for an estimand with a truth (:func:`reserved_names`), so the name is never ambiguous.

A factor whose levels mix types (``[1, "a"]``) has no single parquet type; it is stored as text
(``str(level)``, None kept missing). The in-memory table (:attr:`StudyResult.table`) keeps the factors with
their own types and holds no truth columns; :func:`truth_frame` gives them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .design import conditions_frame, factor_names

__all__ = ["TRUTH_PREFIX", "truth_column", "truth_estimands", "design_column_names", "reserved_names",
           "truth_frame", "with_design", "without_design"]

#: Prefix of the truth columns of the stored table: ``true_`` + estimand.
TRUTH_PREFIX = "true_"


def truth_column(estimand: str) -> str:
    """The stored table's column holding the true value of ``estimand``."""
    return f"{TRUTH_PREFIX}{estimand}"


def truth_estimands(truths: Sequence[Mapping[str, float]]) -> list[str]:
    """Estimands with a truth in some condition, in order of first appearance."""
    return list(dict.fromkeys(k for t in truths for k in t))


def design_column_names(conditions: Sequence[Mapping], truths: Sequence[Mapping[str, float]]) -> list[str]:
    """The columns :func:`with_design` adds: the factors, then ``true_ESTIMAND`` for each estimand."""
    return factor_names(conditions) + reserved_names(truths)


def reserved_names(truths: Sequence[Mapping[str, float]]) -> list[str]:
    """Value names a method may not return: the truth columns of the stored table."""
    return [truth_column(e) for e in truth_estimands(truths)]


def truth_frame(condition: np.ndarray, truths: Sequence[Mapping[str, float]]) -> pd.DataFrame:
    """One ``true_ESTIMAND`` column (float64, NaN where the condition has no truth) per estimand.

    Parameters
    ----------
    condition : array of int, shape (rows,)
        Condition index of each row.
    truths : list of dict
        Per condition, estimand -> true value (the manifest's ``truths``).
    """
    idx = np.asarray(condition, dtype=np.int64)  # (rows,)
    out = {}
    for e in truth_estimands(truths):
        per_condition = np.array([float(t.get(e, np.nan)) for t in truths], dtype=np.float64)  # (conditions,)
        out[truth_column(e)] = per_condition[idx] if len(idx) else np.empty(0, dtype=np.float64)
    return pd.DataFrame(out, index=pd.RangeIndex(len(idx)))


def _storable(column: pd.Series) -> pd.Series:
    """``column`` itself when parquet can type it, else its levels as text (None kept missing)."""
    if column.dtype != object:
        return column
    import pyarrow as pa

    try:
        pa.array(column, from_pandas=True)
        return column
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return column.map(lambda v: None if v is None else str(v)).astype(object)


def with_design(raw: pd.DataFrame, conditions: Sequence[Mapping], truths: Sequence[Mapping[str, float]] | None
                ) -> pd.DataFrame:
    """Stored rows with the factor and truth columns inserted after ``condition`` (the layout above).

    Parameters
    ----------
    raw : DataFrame
        Stored rows (``condition``, ``replicate``, ``method``, ``status``, ``message``, values), no factors.
    conditions, truths : list of dict
        The manifest's ``conditions`` and ``truths`` (missing truths: none).
    """
    truths = list(truths or [{}] * len(conditions))
    raw = without_design(raw, conditions, truths).reset_index(drop=True)
    idx = raw["condition"].to_numpy(np.int64)  # (rows,)
    cond = conditions_frame(conditions)
    parts = {f: _storable(cond[f].take(idx).reset_index(drop=True)) for f in cond.columns if f != "condition"}
    design = pd.concat([pd.DataFrame(parts, index=raw.index), truth_frame(idx, truths)], axis=1)
    at = list(raw.columns).index("condition") + 1
    return pd.concat([raw.iloc[:, :at], design, raw.iloc[:, at:]], axis=1)


def without_design(raw: pd.DataFrame, conditions: Sequence[Mapping], truths: Sequence[Mapping[str, float]] | None
                   ) -> pd.DataFrame:
    """Stored rows without the columns :func:`with_design` adds (those present; ``raw`` itself if none)."""
    names = [c for c in design_column_names(conditions, list(truths or [])) if c in raw.columns]
    return raw.drop(columns=names) if names else raw
