"""Raw rows -> the tidy results table (DESIGN §7).

:func:`finalise` deduplicates, sorts and types the raw rows of a study and adds
the design factors; the result depends only on the set of rows, never on their
arrival order, so tables are bitwise identical across backends and worker
counts. Columns ``warnings`` (int64) and ``warning_message`` follow ``message``
when any row recorded a warning (see :mod:`simstudy.engine.limits`); rows
without one have 0 and "". :func:`companion_columns` finds the standard error, interval and
p-value columns that belong to an estimand.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .design import conditions_frame
from .design_columns import without_design
from .storage import KEY
from .worker import WARNING_COLUMNS

__all__ = ["Final", "companion_columns", "finalise", "raw_frame"]


# ------------------------------------------------------------------------------------------------------------
def raw_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({"condition": pd.Series(dtype="int64"), "replicate": pd.Series(dtype="int64"),
                             "method": pd.Series(dtype="str"), "status": pd.Series(dtype="str"),
                             "message": pd.Series(dtype="str"), "_seconds": pd.Series(dtype="float64")})
    return pd.DataFrame(rows)


def companion_columns(estimand: str, columns, n_estimands: int) -> dict[str, str]:
    """Columns holding the standard error, interval limits and p-value of an estimand.

    ``est_se``, ``est_ci_low``, ``est_ci_high``, ``est_pvalue`` if present;
    otherwise the bare ``se``, ``ci_low``, ``ci_high``, ``pvalue`` when the
    estimand is called ``"estimate"`` or is the only one.
    """
    cols = set(columns)
    out = {}
    for part in ("se", "ci_low", "ci_high", "pvalue"):
        if f"{estimand}_{part}" in cols:
            out[part] = f"{estimand}_{part}"
        elif (estimand == "estimate" or n_estimands == 1) and part in cols:
            out[part] = part
    return out


@dataclass
class Final:
    table: pd.DataFrame
    raw: pd.DataFrame
    timings: pd.DataFrame


def finalise(raw: pd.DataFrame, conditions: list[dict], methods: list[str], truths: list[dict]) -> Final:
    """Deduplicate, sort and type the raw rows; add condition columns.

    The result depends only on the set of rows, never on arrival order, so
    tables are bitwise identical across backends and worker counts. Factor and truth columns of a stored
    table are dropped first (they are derived from ``conditions`` and ``truths``; :mod:`.design_columns`).
    """
    raw = without_design(raw, conditions, truths).drop_duplicates(subset=KEY, keep="first")
    order = {m: i for i, m in enumerate(methods)}
    midx = raw["method"].map(order).to_numpy()
    raw = raw.assign(_m=midx).sort_values(["condition", "replicate", "_m"], kind="mergesort")
    raw = raw.drop(columns="_m").reset_index(drop=True)
    raw["condition"] = raw["condition"].astype("int64")
    raw["replicate"] = raw["replicate"].astype("int64")
    for col in ("method", "status", "message"):
        raw[col] = raw[col].fillna("").astype("str")
    if "_seconds" not in raw:
        raw["_seconds"] = np.nan
    raw["_seconds"] = raw["_seconds"].astype("float64")
    warned = [c for c in WARNING_COLUMNS if c in raw.columns]
    if "warnings" in raw.columns and (raw["warnings"].fillna(0) > 0).any():
        raw["warnings"] = raw["warnings"].fillna(0).astype("int64")
        raw["warning_message"] = raw.get("warning_message", pd.Series("", index=raw.index)).fillna("").astype("str")
        warned = list(WARNING_COLUMNS)
    else:
        raw = raw.drop(columns=warned)
        warned = []
    fixed = {"condition", "replicate", "method", "status", "message", "_seconds", *WARNING_COLUMNS}
    value_cols = [c for c in raw.columns if c not in fixed]
    for col in value_cols:
        s = raw[col]
        if pd.api.types.is_numeric_dtype(s) or s.isna().all():
            raw[col] = s.astype("float64")
        else:
            raw[col] = s.astype("object").where(s.notna(), None)
    estimands = []
    for t in truths:
        for k in t:
            if k not in estimands:
                estimands.append(k)
    ordered: list[str] = []
    for e in estimands:
        if e in value_cols:
            ordered.append(e)
            for part, col in companion_columns(e, value_cols, len(estimands)).items():
                if col not in ordered:
                    ordered.append(col)
    ordered += sorted(c for c in value_cols if c not in ordered)
    cond = conditions_frame(conditions)
    factors = [c for c in cond.columns if c != "condition"]
    idx = raw["condition"].to_numpy()
    table = pd.DataFrame({"condition": raw["condition"]})
    for f in factors:
        table[f] = cond[f].to_numpy()[idx] if len(idx) else cond[f].iloc[:0].to_numpy()
        table[f] = table[f].astype(cond[f].dtype)
    for col in ["replicate", "method", "status", "message"] + warned + ordered:
        table[col] = raw[col]
    timings = raw[["condition", "replicate", "method", "_seconds"]].rename(columns={"_seconds": "seconds"})
    raw = raw[["condition", "replicate", "method", "status", "message", "_seconds"] + warned + ordered]
    return Final(table=table, raw=raw, timings=timings)
