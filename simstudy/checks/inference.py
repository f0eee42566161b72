"""Paper check 4 of DESIGN §6: ``inference``.

Claim (DESIGN §6.4): Wald intervals from the empirical sandwich A^+ B A^+ of the estimating
equation at its root cover identifiable functionals m(y0 | x0), in and out of support, at 95%.
The fits, the functionals (:func:`~simstudy.checks.asymptotic_study.select_functionals`) and
their intervals are the shared asymptotic study's. Decision rule: :data:`INFERENCE_RULE`.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd
from scipy import stats

from ..engine import StudyResult
from .asymptotic_figures import coverage_plot
from .asymptotic_statistics import ok_rows
from .asymptotic_study import (STUDY_METHODS, Functional, design_dgm, run_shared_study, select_functionals,
                               settings_record, theory_for)
from .base import CheckContext, CheckResult, register

__all__ = ["INFERENCE_CLAIM", "INFERENCE_RULE", "coverage_cells", "run_inference"]

INFERENCE_CLAIM = ("Wald intervals m-hat(y0|x0) +- 1.96 SE, SE from the empirical sandwich A^+ B A^+ of the estimating "
                   "equation at the root (pseudo-inverse on the identifiable subspace) by the delta method, cover "
                   "identifiable functionals m(y0 | x0), in and out of support, at 95% (DESIGN §6.4).")
INFERENCE_RULE = ("Per equation, over the n >= inference_n_min: (a) the coverage pooled over functionals and n, "
                  "with a fit as the cluster (MCSE = SD of the fits' mean covered indicators / sqrt(fits), floored at "
                  "sqrt(0.95 x 0.05 / (fits x functionals))), is within "
                  "2 MCSE of 0.95; (b) every (functional, n) cell's coverage is within z MCSE of 0.95, MCSE = "
                  "sqrt(0.95 x 0.05 / R) at the nominal level and z the Bonferroni quantile 1 - 0.05 / (2k) over "
                  "the k cells judged. Pass when (a) and (b) hold for both equations. Reported per cell: coverage, "
                  "MCSE and the 2-MCSE flag |coverage - 0.95| <= 2 MCSE of DESIGN §6.4.")


def _covered(rows: pd.DataFrame, f: Functional) -> np.ndarray:
    """1.0 where the fit's interval for ``f`` covers the truth, per row."""
    return ((rows[f"{f.name}_ci_low"] <= f.truth) & (f.truth <= rows[f"{f.name}_ci_high"])).to_numpy(float)


def coverage_cells(result: StudyResult, functionals: list[Functional], level: float = 0.95) -> pd.DataFrame:
    """Coverage of each (method, functional, n) with MCSEs (estimated and nominal)."""
    rows = []
    for (method, n), g in ok_rows(result).groupby(["method", "n"], sort=True):
        for f in functionals:
            covered = _covered(g, f)
            R = covered.size
            cov = float(covered.mean())
            est = g[f.name].to_numpy(float)
            se = g[f"{f.name}_se"].to_numpy(float)
            rows.append({"method": method, "functional": f.name, "region": f.region, "x0": str(f.x0), "y0": f.y0,
                         "n": int(n), "replicates": R, "coverage": cov, "mcse": math.sqrt(cov * (1 - cov) / R),
                         "mcse_nominal": math.sqrt(level * (1 - level) / R),
                         "within_2_mcse": abs(cov - level) <= 2 * math.sqrt(level * (1 - level) / R),
                         "bias": float(est.mean() - f.truth), "empse": float(est.std(ddof=1)),
                         "modse": float(np.sqrt(np.mean(se ** 2)))})
    return pd.DataFrame(rows)


@register("inference", INFERENCE_CLAIM)
def run_inference(context: CheckContext) -> CheckResult:
    """DESIGN §6.4: coverage of sandwich Wald intervals (rule: INFERENCE_RULE)."""
    name = "inference"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    n_min = context.param("inference_n_min", settings.n_grid[0], 4000)
    level = 0.95
    funcs = select_functionals(design_dgm(settings))
    cells = coverage_cells(result, funcs, level)
    judged = cells[cells["n"] >= n_min]
    if judged.empty:
        raise ValueError(f"--set inference_n_min={n_min} is invalid; allowed: at most the largest n "
                         f"({max(settings.n_grid)})")
    k = int(len(judged) / judged["method"].nunique())
    z_bonf = float(stats.norm.ppf(1 - 0.05 / (2 * k)))
    cells["judged"] = cells["n"] >= n_min
    cells["within_bonferroni"] = (cells["coverage"] - level).abs() <= z_bonf * cells["mcse_nominal"]
    ok = ok_rows(result)
    statistics: dict = {"functionals": [asdict(f) for f in funcs], "inference_n_min": n_min,
                        "bonferroni_z": z_bonf, "cells_per_equation": k}
    rows, problems = [], []
    for method in STUDY_METHODS:
        fits = ok[(ok["method"] == method) & (ok["n"] >= n_min)]
        per_fit = np.mean([_covered(fits, f) for f in funcs], axis=0)
        pooled = float(per_fit.mean())
        # a fit is the cluster; the floor (independent indicators at the nominal level) keeps a sample
        # in which every interval covers from having MCSE 0
        pooled_mcse = max(float(per_fit.std(ddof=1) / math.sqrt(per_fit.size)),
                          math.sqrt(level * (1 - level) / (per_fit.size * len(funcs))))
        pooled_ok = abs(pooled - level) <= 2 * pooled_mcse
        c = cells[(cells["method"] == method) & cells["judged"]]
        cells_ok = bool(c["within_bonferroni"].all())
        holds = pooled_ok and cells_ok
        if not holds:
            bad = c[~c["within_bonferroni"]]
            problems.append(f"{method}: pooled {pooled:.3f} +- {pooled_mcse:.3f}; cells outside: "
                            + ", ".join(f"{r.functional}@{r.n}={r.coverage:.2f}" for r in bad.itertuples()))
        rows.append({"method": method, "pooled_coverage": pooled, "pooled_mcse": pooled_mcse, "fits": int(per_fit.size),
                     "pooled_within_2_mcse": pooled_ok, "cells_within_bonferroni": cells_ok,
                     "cells_within_2_mcse": int(c["within_2_mcse"].sum()), "cells": int(len(c)), "holds": holds})
        statistics[method] = {
            "pooled_coverage": {"estimate": pooled, "mcse": pooled_mcse},
            "cells": {f"{r.functional}@n={r.n}": {"coverage": r.coverage, "mcse": r.mcse,
                                                  "within_2_mcse": bool(r.within_2_mcse)}
                      for r in cells[cells["method"] == method].itertuples()}, "holds": holds}
    verdicts = pd.DataFrame(rows)
    statistics["problems"] = problems
    decision = "pass" if verdicts["holds"].all() else "fail"
    figures = [coverage_plot(cells, context.folder(name) / "coverage.png", n_min)]
    summary = f"n >= {n_min}, R={settings.replicates}: " + "; ".join(
        f"{r.method} pooled coverage {r.pooled_coverage:.3f} +- {r.pooled_mcse:.3f}, {r.cells_within_2_mcse}/{r.cells} "
        f"cells within 2 MCSE" for r in verdicts.itertuples())
    return CheckResult(name=name, claim=INFERENCE_CLAIM, decision_rule=INFERENCE_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"verdicts": verdicts, "coverage": cells},
                       figures=figures,
                       settings=settings_record(settings, theory, context) | {"inference_n_min": n_min})
