"""Paper check 3 of DESIGN §6: ``rates``.

Claim (DESIGN §6.3): for a well-specified parametric student E[KL] falls as n^-1, and n E[KL_ID]
tends to r/2 for the likelihood equations (r = rank of the Fisher information) and to the
sandwich constant (1/2) tr(I A^+ B A^+) for q2. The fits are the shared asymptotic study's
(:mod:`simstudy.checks.asymptotic_study`); the constants are computed by quadrature
(:func:`simstudy.checks.fisher.asymptotic_theory`). Decision rule: :data:`RATES_RULE`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..engine import StudyResult
from .asymptotic_figures import constant_plot, rate_theory_plot
from .asymptotic_statistics import asymptotic_start, subset_result
from .asymptotic_study import STUDY_METHODS, run_shared_study, settings_record, theory_constants, theory_for
from .base import CheckContext, CheckResult, register
from .common import fmt

__all__ = ["RATES_CLAIM", "RATES_RULE", "run_rates", "slope_over"]

RATES_CLAIM = ("For a well-specified parametric student, E[KL] falls as n^-1 and n E[KL_ID] tends to r/2 for the "
               "likelihood equations (r = rank of the Fisher information) and to the sandwich constant "
               "(1/2) tr(I A^+ B A^+) for q2 (DESIGN §6.3).")
RATES_RULE = ("Per equation: (a) the 95% interval of the WLS slope of log mean ID KL on log n, over n >= rate_n_min, "
              "contains -1; (b) the asymptotic regime starts inside the grid: n0, the smallest n such that the "
              "constants C_n' = n' mean KL_ID at every n' >= n are jointly consistent with theory (sum of "
              "((C_n' - theory) / MCSE_n')^2 at most the 0.95 quantile of chi-square with as many degrees of freedom "
              "as levels), exists and is below the largest n (at least two levels in the regime). Pass when (a) "
              "and (b) hold for both equations. Reported: each n's 2-MCSE flag, the slope over n >= n0, OOS slopes "
              "and constants.")


def slope_over(result: StudyResult, metric: str, method: str, n_from: float) -> dict:
    """The WLS slope of one method over n >= n_from (nan when fewer than two finite levels)."""
    empty = {"slope": math.nan, "slope_se": math.nan, "slope_low": math.nan, "slope_high": math.nan}
    if not np.isfinite(n_from):
        return empty
    sub = subset_result(result, (result.table["n"] >= n_from) & (result.table["method"] == method))
    if sub.table["n"].nunique() < 2:
        return empty
    fit = sub.rate(metric, x="n", by=["method"], theory_slope=-1.0).fits.iloc[0]
    return {k: float(fit[k]) for k in empty}


def _interval(fit) -> dict:
    return {"estimate": fit["slope"], "se": fit["slope_se"], "ci95": [fit["slope_low"], fit["slope_high"]]}


@register("rates", RATES_CLAIM)
def run_rates(context: CheckContext) -> CheckResult:
    """DESIGN §6.3: slope -1 and the constants r/2 and sandwich (rule: RATES_RULE)."""
    name = "rates"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    n_min = context.param("rate_n_min", settings.n_grid[0], 4000)
    folder = context.folder(name)
    upper = subset_result(result, result.table["n"] >= n_min)
    if upper.table["n"].nunique() < 2:
        raise ValueError(f"--set rate_n_min={n_min} is invalid; allowed: at most the second-largest n "
                         f"({sorted(settings.n_grid)[-2]})")
    consts_id, consts_oos = theory_constants(theory, "id"), theory_constants(theory, "oos")
    statistics = {"theory": theory.statistics(), "rate_n_min": n_min}
    rows, points_all, problems, starts = [], [], [], {}
    figures = []
    for metric, consts in (("kl_id", consts_id), ("kl_oos", consts_oos)):
        rate = upper.rate(metric, x="n", by=["method"], theory_slope=-1.0)
        full = result.rate(metric, x="n", by=["method"], theory_slope=-1.0)
        region = "ID" if metric == "kl_id" else "OOS"
        figures.append(rate_theory_plot(full.points, rate.fits, consts, n_min, folder / f"{metric}_rate.png",
                                        f"{region} KL of the exact roots: WLS over n >= {n_min}, theory C/n "
                                        f"(bars +-2 MCSE)"))
        for method in STUDY_METHODS:
            fit = rate.fits[rate.fits["method"] == method].iloc[0]
            fit_all = full.fits[full.fits["method"] == method].iloc[0]
            pts = full.points[full.points["method"] == method].copy()
            pts["theory"] = consts[method]
            pts["z"] = (pts["constant"] - consts[method]) / pts["constant_mcse"]
            pts["within_2_mcse"] = pts["z"].abs() <= 2
            pts["metric"] = metric
            start = asymptotic_start(pts["n"].to_numpy(float), pts["constant"].to_numpy(float),
                                     pts["constant_mcse"].to_numpy(float), consts[method])
            slope_ok = bool(fit["slope_low"] <= -1.0 <= fit["slope_high"])
            start_ok = bool(np.isfinite(start) and start < max(settings.n_grid))
            from_start = slope_over(result, metric, method, start)  # reported: the slope inside the regime
            judged = metric == "kl_id"
            if judged:
                starts[method] = start
                if not (slope_ok and start_ok):
                    problems.append(f"{method}: slope {fmt(fit['slope'])} [{fmt(fit['slope_low'])}, "
                                    f"{fmt(fit['slope_high'])}], asymptotic start {fmt(start)}")
            last = pts.sort_values("n").iloc[-1]
            rows.append({"method": method, "metric": metric, "judged": judged, "slope": fit["slope"],
                         "slope_se": fit["slope_se"], "slope_low": fit["slope_low"], "slope_high": fit["slope_high"],
                         "slope_contains_-1": slope_ok, "lack_of_fit_p": fit["lack_of_fit_p"],
                         "slope_all_n": fit_all["slope"], "slope_all_n_low": fit_all["slope_low"],
                         "slope_all_n_high": fit_all["slope_high"], "theory_constant": consts[method],
                         "constant_at_n_max": last["constant"], "constant_at_n_max_mcse": last["constant_mcse"],
                         "asymptotic_start": start, "start_inside_grid": start_ok,
                         "slope_from_start": from_start["slope"], "slope_from_start_low": from_start["slope_low"],
                         "slope_from_start_high": from_start["slope_high"],
                         "holds": (slope_ok and start_ok) if judged else np.nan})
            statistics[f"{method}/{metric}"] = {
                "slope": _interval(fit) | {"n_min": n_min},
                "slope_all_n": _interval(fit_all),
                "slope_from_asymptotic_start": _interval(from_start),
                "theory_constant": consts[method],
                "constant_by_n": {int(p.n): {"estimate": p.constant, "mcse": p.constant_mcse,
                                             "within_2_mcse": bool(p.within_2_mcse)} for p in pts.itertuples()},
                "asymptotic_start": start}
            points_all.append(pts)
    points = pd.concat(points_all, ignore_index=True)
    figures.append(constant_plot(points[points["metric"] == "kl_id"], consts_id, folder / "constant_id.png",
                                 "n E[KL_ID] with the theory lines r/2 (ps-exact) and sandwich (q2)", starts))
    figures.append(constant_plot(points[points["metric"] == "kl_oos"], consts_oos, folder / "constant_oos.png",
                                 "n E[KL_OOS] against its theory (reported, not judged)", {}))
    verdicts = pd.DataFrame(rows)
    statistics["problems"] = problems
    decision = "pass" if verdicts.loc[verdicts["judged"], "holds"].astype(bool).all() else "fail"
    ids = verdicts[verdicts["judged"]]
    summary = (f"r = {theory.rank}; " + "; ".join(
        f"{r.method}: slope {fmt(r.slope)} [{fmt(r.slope_low)}, {fmt(r.slope_high)}], n E[KL] at "
        f"n={max(settings.n_grid)} {fmt(r.constant_at_n_max, 4)} +- {fmt(r.constant_at_n_max_mcse, 2)} vs "
        f"{fmt(r.theory_constant, 4)}, asymptotic from n={fmt(r.asymptotic_start)}" for r in ids.itertuples()))
    return CheckResult(name=name, claim=RATES_CLAIM, decision_rule=RATES_RULE, decision=decision,
                       statistics=statistics, summary=summary,
                       tables={"verdicts": verdicts, "constants": points,
                               "eigenvalues": pd.DataFrame({"eigenvalue": theory.subspace.eigenvalues,
                                                            "kept": np.arange(theory.num_parameters) < theory.rank})},
                       figures=figures, settings=settings_record(settings, theory, context) | {"rate_n_min": n_min})
