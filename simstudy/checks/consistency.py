"""Paper check 2 of DESIGN §6: ``consistency``.

Claim (DESIGN §6.2): the ID and OOS KL(m* || m-hat) of the root of each consistent estimating
equation fall as n grows. The fits are the shared asymptotic study's
(:mod:`simstudy.checks.asymptotic_study`: exact roots of ps-exact and q2 on the five-token
model, paired data, a grid of n). Decision rule: :data:`CONSISTENCY_RULE`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .asymptotic_figures import rate_theory_plot
from .asymptotic_statistics import mean_table
from .asymptotic_study import STUDY_METHODS, run_shared_study, settings_record, theory_for
from .base import CheckContext, CheckResult, register
from .common import fmt

__all__ = ["CONSISTENCY_CLAIM", "CONSISTENCY_RULE", "run_consistency"]

CONSISTENCY_CLAIM = ("ID and OOS KL(m* || m-hat) of the root of each consistent estimating equation (ps-exact: the "
                     "likelihood equations; q2: the Brier equations) fall as n grows (DESIGN §6.2).")
CONSISTENCY_RULE = ("For each equation and region (ID, OOS): (a) the WLS slope of log mean KL on log n over every n "
                    "with a finite mean (weights from replicate-level MCSEs; StudyResult.rate) has its 95% upper "
                    "limit below 0, and (b) the mean KL at the largest n is below the mean at the smallest n by more "
                    "than 2 standard errors of the difference (independent replicates: sqrt(MCSE_1^2 + MCSE_2^2); "
                    "an infinite mean at the smallest n, a fit giving zero mass to a possible token, counts as "
                    "above). Pass when (a) and (b) hold for both equations and both regions.")


def _fell(first: pd.Series, last: pd.Series) -> tuple[float, float, bool]:
    """The difference of mean KL, largest minus smallest n, its standard error, and whether it fell (rule (b))."""
    if math.isinf(first["mean"]) and np.isfinite(last["mean"]):
        return -math.inf, math.nan, True
    diff = float(last["mean"] - first["mean"])
    diff_se = float(math.hypot(first["mcse"], last["mcse"]))
    return diff, diff_se, bool(np.isfinite(diff) and diff < -2 * diff_se)


@register("consistency", CONSISTENCY_CLAIM)
def run_consistency(context: CheckContext) -> CheckResult:
    """DESIGN §6.2: ID and OOS KL of the exact roots fall with n (rule: CONSISTENCY_RULE)."""
    name = "consistency"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    folder = context.folder(name)
    rows, statistics, figures, problems = [], {}, [], []
    for metric, region in (("kl_id", "ID"), ("kl_oos", "OOS")):
        means = mean_table(result, metric)
        rate = result.rate(metric, x="n", by=["method"])
        figures.append(rate_theory_plot(means, rate.fits, None, 0, folder / f"{metric}_rate.png",
                                        f"{region} KL of the exact roots: WLS over the finite levels (bars +-2 MCSE)"))
        for method in STUDY_METHODS:
            m = means[means["method"] == method].sort_values("n")
            fit = rate.fits[rate.fits["method"] == method].iloc[0]
            first, last = m.iloc[0], m.iloc[-1]
            diff, diff_se, fell = _fell(first, last)
            slope_ok = bool(np.isfinite(fit["slope_high"]) and fit["slope_high"] < 0)
            holds = slope_ok and fell
            if not holds:
                problems.append(f"{method} {region}: slope upper {fmt(fit['slope_high'])}, "
                                f"difference {fmt(diff)} +- {fmt(diff_se)}")
            rows.append({"method": method, "region": region, "slope": fit["slope"], "slope_se": fit["slope_se"],
                         "slope_low": fit["slope_low"], "slope_high": fit["slope_high"], "levels": int(fit["k"]),
                         "n_small": int(first["n"]), "kl_small": first["mean"], "kl_small_mcse": first["mcse"],
                         "n_large": int(last["n"]), "kl_large": last["mean"], "kl_large_mcse": last["mcse"],
                         "difference": diff, "difference_se": diff_se, "slope_below_0": slope_ok, "fell": fell,
                         "holds": holds})
            statistics[f"{method}/{region}"] = {
                "slope": {"estimate": fit["slope"], "se": fit["slope_se"],
                          "ci95": [fit["slope_low"], fit["slope_high"]]},
                "mean_kl_by_n": {int(r.n): {"estimate": r.mean, "mcse": r.mcse, "infinite": r.infinite,
                                            "converged_fraction": r.converged} for r in m.itertuples()},
                "difference_largest_minus_smallest": {"estimate": diff, "se": diff_se}, "holds": holds}
    verdicts = pd.DataFrame(rows)
    means = pd.concat([mean_table(result, mt).assign(metric=mt) for mt in ("kl_id", "kl_oos")], ignore_index=True)
    decision = "pass" if verdicts["holds"].all() else "fail"
    statistics.update(failures=int((result.table["status"] != "ok").sum()), fisher_rank=theory.rank,
                      problems=problems)
    parts = [f"{r.method} {r.region} slope {fmt(r.slope)} [{fmt(r.slope_low)}, {fmt(r.slope_high)}], "
             f"KL {fmt(r.kl_small)}->{fmt(r.kl_large)}" for r in verdicts.itertuples()]
    summary = f"n {settings.n_grid[0]}..{settings.n_grid[-1]}, R={settings.replicates}: " + "; ".join(parts)
    return CheckResult(name=name, claim=CONSISTENCY_CLAIM, decision_rule=CONSISTENCY_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"verdicts": verdicts, "mean_kl": means,
                                                                        "replicates": result.table},
                       figures=figures, settings=settings_record(settings, theory, context))
