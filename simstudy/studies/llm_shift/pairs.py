"""The evaluation set's own error in a paired comparison of two methods (DESIGN §5, §7; issue 14).

The evaluation pairs of a split are the same in every replicate and method, so their sampling error
does not show in the spread over replicates: the replicates' paired t interval is conditional on that
evaluation set. Each method of a stored run keeps its per-pair NLL per token of every split as an
artifact (``DIR/artifacts/condition=C/replicate=R/method=M/nll_<split>.npy``); for two methods,
:func:`evaluation_error` gives per replicate the mean per-pair difference and its standard error over the
evaluation pairs, sd(d_i) / sqrt(n_eval): how far another evaluation set of the same size could move
that replicate's difference. An evaluation set is large enough for a comparison when this error is
small next to the difference (and next to the replicates' MCSE of it).

:func:`checkpoint_sensitivity` asks a different question of the same comparison: how much of a paired
difference goes with the checkpoint early stopping kept (``fit_best_step``) rather than with the
method. It regresses d_r on the difference of the two methods' kept steps (ordinary least squares,
statsmodels): the intercept is the difference at equal checkpoints, the slope the change per step of
difference. A post-hoc reading of a run (the checkpoint is an outcome of the fit, not a design factor),
reported beside the pre-stated verdict, never in its place.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from ...engine.artifacts import artifact_path
from ...engine.storage import read_manifest
from .analysis import PAIR_NLL_PREFIX

__all__ = ["checkpoint_sensitivity", "evaluation_error"]


def evaluation_error(store: str | os.PathLike, *, method: str, reference: str, split: str,
                     condition: int = 0) -> pd.DataFrame:
    """Per replicate where both methods kept their per-pair NLLs of ``split``: ``replicate``, ``pairs``,
    ``difference`` (mean of d_i = nll_i(method) - nll_i(reference), nats per token) and ``se``
    (sd(d_i) / sqrt(pairs)). Replicates computed before per-pair NLLs were kept are left out."""
    manifest = read_manifest(store)
    for name in (method, reference):
        if name not in manifest["methods"]:
            raise ValueError(f"method={name!r} is not a method of the study in {store}; allowed: "
                             f"{', '.join(manifest['methods'])}")
    root = os.path.join(store, "artifacts")
    rows = []
    for r in range(int(manifest["replicates"])):
        files = [artifact_path(root, condition, r, m) / f"{PAIR_NLL_PREFIX}{split}.npy" for m in (method, reference)]
        if not all(f.is_file() for f in files):
            continue
        a, b = (np.load(f) for f in files)
        d = a - b  # (n_eval,)
        rows.append({"replicate": r, "pairs": len(d), "difference": float(d.mean()),
                     "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan})
    return pd.DataFrame(rows, columns=["replicate", "pairs", "difference", "se"])


def checkpoint_sensitivity(table: pd.DataFrame, *, method: str, reference: str, metric: str,
                           step: str = "fit_best_step", level: float = 0.95, condition: int = 0) -> dict:
    """Paired differences d_r = metric(method, r) - metric(reference, r) against the kept checkpoints' gap.

    ``table``: a run's tidy table (``replicate``, ``method``, ``status``, ``metric``, ``step``; the rows of
    ``condition`` when it has a ``condition`` column). Returns ``pairs``; ``same`` / ``same_difference`` / ``same_mcse`` (replicates where both
    kept the same step: their count, mean d and its MCSE); and the least-squares fit
    d_r = a + b (step_method - step_reference): ``intercept``, ``intercept_se``, ``intercept_low``,
    ``intercept_high``, ``slope``, ``slope_se``, ``slope_low``, ``slope_high`` (t intervals with pairs - 2
    degrees of freedom; NaN when the gaps do not vary or there are fewer than 3 pairs).
    """
    import statsmodels.api as sm  # lazily: only this reading needs it

    ok = table[table["status"] == "ok"] if "status" in table else table
    if "condition" in ok:
        ok = ok[ok["condition"] == condition]
    wide = ok.pivot_table(index="replicate", columns="method", values=[metric, step], aggfunc="first")
    for name in (method, reference):
        if name not in wide[metric]:
            raise ValueError(f"method={name!r} has no ok rows of {metric!r}; allowed: "
                             f"{', '.join(map(str, wide[metric].columns))}")
    both = pd.DataFrame({"d": wide[metric][method] - wide[metric][reference],
                         "gap": wide[step][method] - wide[step][reference]}).dropna()
    d, gap = both["d"].to_numpy(float), both["gap"].to_numpy(float)
    same = d[gap == 0]
    out = {"method": method, "reference": reference, "metric": metric, "pairs": len(d), "same": len(same),
           "same_difference": float(same.mean()) if len(same) else math.nan,
           "same_mcse": float(same.std(ddof=1) / math.sqrt(len(same))) if len(same) > 1 else math.nan}
    names = ("intercept", "slope")
    if len(d) < 3 or np.ptp(gap) == 0:
        return out | {f"{n}{s}": math.nan for n in names for s in ("", "_se", "_low", "_high")}
    fit = sm.OLS(d, sm.add_constant(gap)).fit()
    ci = fit.conf_int(alpha=1 - level)  # (2, 2): rows intercept, slope
    for k, n in enumerate(names):
        out |= {n: float(fit.params[k]), f"{n}_se": float(fit.bse[k]), f"{n}_low": float(ci[k, 0]),
                f"{n}_high": float(ci[k, 1])}
    return out
