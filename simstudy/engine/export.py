"""A study's rows for other tools: the long table R's ``rsimsum::multisimsum`` reads (DESIGN §7).

``simstudy export DIR --format rsimsum [--out FILE]`` (Python: :func:`write_rsimsum`) writes one CSV row per
replicate x method x estimand with a truth:

==============  =========  =============================================================================
column          type       meaning
==============  =========  =============================================================================
par             text       the estimand (multisimsum's ``par``)
estimate        number     its estimate (``estvarname``); NA where the row failed (status not ``ok``)
se              number     its standard error (``se``): the ``EST_se`` or bare ``se`` column; NA if none
conf.low        number     interval limits (``ci.limits``): ``EST_ci_low`` / ``ci_low``; NA if none
conf.high       number     ... ``EST_ci_high`` / ``ci_high``
true            number     the truth of the row's condition (``true = "true"``)
method          text       the method (``methodvar``)
FACTOR ...      as stored  one column per design factor (``by``)
condition       integer    the store's condition index (0-based)
repno           integer    the replicate, counted from 1 (the store's ``replicate`` + 1)
status          text       ``ok`` or the failure (``error``, ``nan``, ``diverged``, ...)
==============  =========  =============================================================================

Read it in R with::

    d <- read.csv("rsimsum.csv")
    ms <- rsimsum::multisimsum(data = d, par = "par", estvarname = "estimate", se = "se", true = "true",
                               methodvar = "method", by = c("n", "p"), ci.limits = c("conf.low", "conf.high"))

Names: rsimsum refuses the names ``stat``, ``est``, ``mcse``, ``lower`` and ``upper`` for the columns it is
given (they name its own output; rsimsum issue #49), so the estimate is ``estimate`` and the limits are
``conf.low`` / ``conf.high`` (as in rsimsum's own ``tt`` data). A design factor named like one of these
columns is refused here with one line. Missing values are written ``NA``; numbers as the shortest text that
reads back as the same double.

Units and conventions that differ from :meth:`StudyResult.summary` (which uses proportions and fractions,
:mod:`simstudy.engine.measures`):

* rsimsum's ``relerror`` is a percentage: 100 x simstudy's ``relerr_modse``;
* its ``relprec`` is a percentage gain: 100 x (simstudy's ``rel_efficiency`` - 1);
* its ``rbias`` is a fraction, as simstudy's ``relbias`` (which follows it);
* its ``power`` rejects when |estimate / se| exceeds the normal quantile at ``control$level`` (a Wald test of
  zero); simstudy's ``power`` is the rejection rate of the method's own p-value column at ``alpha``;
* without ``ci.limits`` rsimsum's coverage uses Wald intervals estimate +- z se; pass the limits to get
  simstudy's ``coverage``;
* rsimsum sets ``estimate`` to NA wherever ``se`` is NA (its ``na.pair``): for an estimand without standard
  errors call it without ``se``. With a standard error in every ok row its ``nsim`` is simstudy's ``n_used``,
  and its bias, empse, mse and modelse follow the formulas of :mod:`simstudy.engine.measures` (Morris, White and
  Crowther 2019, as rsimsum's);
* factor levels containing ``~`` are refused by rsimsum (its ``char.sep``); rows with a missing factor level
  (non-factorial designs) are dropped by R's ``split``: use ``by = "condition"`` there.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_write_text
from .design_columns import truth_column, truth_estimands, truth_frame
from .tidy import companion_columns

__all__ = ["RSIMSUM_COLUMNS", "RSIMSUM_FORBIDDEN", "rsimsum_frame", "write_rsimsum", "FORMATS"]

#: Export formats (``simstudy export --format``).
FORMATS = ("rsimsum",)
#: The columns of the rsimsum table before the factors, and after them.
RSIMSUM_COLUMNS = (("par", "estimate", "se", "conf.low", "conf.high", "true", "method"),
                   ("condition", "repno", "status"))
#: Column names rsimsum refuses in its input (its output's own names).
RSIMSUM_FORBIDDEN = ("stat", "est", "mcse", "lower", "upper")
_PARTS = {"se": "se", "conf.low": "ci_low", "conf.high": "ci_high"}


def rsimsum_frame(result) -> pd.DataFrame:
    """The long table of :func:`write_rsimsum` as a DataFrame.

    Parameters
    ----------
    result : StudyResult
        A study's results (complete or not).

    Returns
    -------
    DataFrame
        Columns ``par``, ``estimate``, ``se``, ``conf.low``, ``conf.high``, ``true``, ``method``, the factors,
        ``condition``, ``repno``, ``status`` (module docstring); one row per replicate x method x estimand
        whose condition has a truth for it, estimand by estimand in the order of the truths, then in the
        table's order (condition, replicate, method).

    Raises
    ------
    ValueError
        One line, if a design factor is named like a column of the table or a name rsimsum refuses.
    """
    head, tail = RSIMSUM_COLUMNS
    clash = [f for f in result.factors if f in head + tail + RSIMSUM_FORBIDDEN]
    if clash:
        raise ValueError(f"design factor {clash[0]!r} cannot be exported for rsimsum; allowed: factor names "
                         f"other than {list(head + tail + RSIMSUM_FORBIDDEN)} (rename the factor in the study)")
    table = result.table
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    estimands = [e for e in truth_estimands(result.truths) if e in numeric]
    cond = table["condition"].to_numpy(np.int64)  # (rows,)
    truths = truth_frame(cond, result.truths)
    ok = (table["status"] == "ok").to_numpy()  # (rows,)
    parts = []
    for e in estimands:
        true = truths[truth_column(e)].to_numpy()  # (rows,)
        keep = ~np.isnan(true)
        comp = companion_columns(e, numeric, len(estimands))
        cols = {"par": np.full(int(keep.sum()), e, dtype=object)}
        for name, source in (("estimate", e), *((k, comp.get(v)) for k, v in _PARTS.items())):
            values = table[source].to_numpy(np.float64) if source else np.full(len(table), np.nan)
            cols[name] = np.where(ok, values, np.nan)[keep]
        cols["true"] = true[keep]
        cols["method"] = table["method"].to_numpy()[keep]
        frame = pd.DataFrame(cols)
        for f in result.factors:
            frame[f] = table[f].to_numpy()[keep]
            frame[f] = frame[f].astype(table[f].dtype)
        frame["condition"] = cond[keep]
        frame["repno"] = table["replicate"].to_numpy(np.int64)[keep] + 1
        frame["status"] = table["status"].to_numpy()[keep]
        parts.append(frame)
    if not parts:  # no estimand with a truth, or no rows: the columns all the same
        dtypes = {"par": "str", "method": "str", "condition": "int64", "repno": "int64", "status": "str"}
        columns = head + tuple(result.factors) + tail
        return pd.DataFrame({c: (table[c].iloc[:0].reset_index(drop=True) if c in result.factors else
                                 pd.Series(dtype=dtypes.get(c, "float64"))) for c in columns})
    out = pd.concat(parts, ignore_index=True)
    for c in ("par", "method", "status"):
        out[c] = out[c].astype("str")
    return out


def write_rsimsum(result, path: str | os.PathLike) -> Path:
    """Write :func:`rsimsum_frame` of ``result`` to ``path`` as CSV (atomically; ``NA`` for missing values).

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    text = rsimsum_frame(result).to_csv(index=False, na_rep="NA", lineterminator="\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
