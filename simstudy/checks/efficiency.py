"""Paper check 5 of DESIGN §6: ``efficiency``.

Claim (DESIGN §6.5): the likelihood root (ps-exact) attains the Cramér-Rao limit,
n E[KL_ID] -> r/2, and q2 is less efficient, its n E[KL_ID] over ps-exact's tending to the
sandwich ratio tr(I A^+ B A^+) / r. The fits are the shared asymptotic study's
(:mod:`simstudy.checks.asymptotic_study`, paired data); the constants and the functionals'
asymptotic variances come from :func:`simstudy.checks.fisher.asymptotic_theory`.
Decision rule: :data:`EFFICIENCY_RULE`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .asymptotic_figures import efficiency_plot
from .asymptotic_statistics import ok_rows, paired_ratio, paired_values
from .asymptotic_study import (STUDY_METHODS, design_dgm, root_objective, run_shared_study, select_functionals,
                               settings_record, theory_for)
from .base import CheckContext, CheckResult, register
from .common import fmt

__all__ = ["EFFICIENCY_CLAIM", "EFFICIENCY_RULE", "run_efficiency"]

EFFICIENCY_CLAIM = ("The likelihood root (ps-exact) attains the Cramer-Rao limit, n E[KL_ID] -> r/2, and q2 is less "
                    "efficient: its n E[KL_ID] over ps-exact's tends to the sandwich ratio tr(I A^+ B A^+) / r "
                    "(DESIGN §6.5).")
EFFICIENCY_RULE = ("At the largest n: (a) ps-exact's n mean KL_ID / (r/2) is within 2 MCSE of 1; (b) the paired ratio "
                   "of mean ID KL, q2 over ps-exact (same data in each replicate; delta-method MCSE of a ratio of "
                   "means), is within 2 MCSE of the theoretical ratio. Pass when both hold. Reported at every n: both "
                   "ratios, and n Var of each functional's estimate over replicates against its asymptotic variance "
                   "g^T Sigma g (ratio with MCSE ratio x sqrt(2 / (R - 1))).")


def _cramer_rao_ratio(kl: np.ndarray, n: int, cr: float) -> tuple[float, float]:
    """n mean KL / (r/2) over replicates with its MCSE (inf and nan when a KL is infinite)."""
    finite = np.isfinite(kl)
    ratio = float(n * kl.mean() / cr) if kl.size and finite.all() else math.inf
    mcse = float(n * kl.std(ddof=1) / math.sqrt(kl.size) / cr) if finite.all() and kl.size > 1 else math.nan
    return ratio, mcse


@register("efficiency", EFFICIENCY_CLAIM)
def run_efficiency(context: CheckContext) -> CheckResult:
    """DESIGN §6.5: ps-exact at the Cramer-Rao limit, q2 against ps-exact (rule: EFFICIENCY_RULE)."""
    name = "efficiency"
    settings, result = run_shared_study(context)
    theory, grads = theory_for(settings)
    funcs = select_functionals(design_dgm(settings))
    cr = theory.constants["likelihood"]["id"]
    ratio_theory = theory.efficiency_ratio("id")
    ok = ok_rows(result)
    rows, var_rows = [], []
    for n in settings.n_grid:
        q2, ps = paired_values(result, "kl_id", n, "q2", "ps-exact")
        ps_all = ok[(ok["method"] == "ps-exact") & (ok["n"] == n)]["kl_id"].to_numpy(float)
        ps_ratio, ps_ratio_mcse = _cramer_rao_ratio(ps_all, n, cr)
        ratio, ratio_mcse = paired_ratio(q2, ps)
        rows.append({"n": int(n), "ps_ratio_to_cr": ps_ratio, "ps_ratio_to_cr_mcse": ps_ratio_mcse,
                     "q2_over_ps": ratio, "q2_over_ps_mcse": ratio_mcse, "pairs": int(q2.size),
                     "theory_ratio": ratio_theory})
        for method in STUDY_METHODS:
            g = ok[(ok["method"] == method) & (ok["n"] == n)]
            avar = theory.functional_variance(grads, root_objective(method))
            for f, v in zip(funcs, avar):
                est = g[f.name].to_numpy(float)
                R = est.size
                r = float(n * est.var(ddof=1) / v) if R > 1 else math.nan
                var_rows.append({"method": method, "functional": f.name, "region": f.region, "n": int(n),
                                 "n_var": float(n * est.var(ddof=1)) if R > 1 else math.nan, "asymptotic_var": float(v),
                                 "ratio": r, "ratio_mcse": r * math.sqrt(2 / (R - 1)) if R > 1 else math.nan})
    frame = pd.DataFrame(rows)
    variances = pd.DataFrame(var_rows)
    last = frame.sort_values("n").iloc[-1]
    a_ok = bool(abs(last["ps_ratio_to_cr"] - 1) <= 2 * last["ps_ratio_to_cr_mcse"])
    b_ok = bool(abs(last["q2_over_ps"] - ratio_theory) <= 2 * last["q2_over_ps_mcse"])
    decision = "pass" if a_ok and b_ok else "fail"
    statistics = {
        "fisher_rank": theory.rank, "cramer_rao_constant": cr, "theory_ratio_q2_over_ps": ratio_theory,
        "by_n": {int(r.n): {"ps_over_cramer_rao": {"estimate": r.ps_ratio_to_cr, "mcse": r.ps_ratio_to_cr_mcse},
                            "q2_over_ps": {"estimate": r.q2_over_ps, "mcse": r.q2_over_ps_mcse}}
                 for r in frame.itertuples()},
        "at_n_max": {"n": int(last["n"]), "ps_at_cramer_rao": a_ok, "q2_ratio_matches_theory": b_ok},
        "functional_variance_ratios_at_n_max": {
            f"{r.method}/{r.functional}": {"estimate": r.ratio, "mcse": r.ratio_mcse}
            for r in variances[variances["n"] == last["n"]].itertuples()}}
    figures = [efficiency_plot(frame, ratio_theory, context.folder(name) / "efficiency.png")]
    summary = (f"n={int(last['n'])}: ps-exact n E[KL]/(r/2) = {fmt(last['ps_ratio_to_cr'], 4)} +- "
               f"{fmt(last['ps_ratio_to_cr_mcse'], 2)} (r={theory.rank}); q2/ps-exact = {fmt(last['q2_over_ps'], 4)} "
               f"+- {fmt(last['q2_over_ps_mcse'], 2)} vs theory {ratio_theory:.4g}")
    return CheckResult(name=name, claim=EFFICIENCY_CLAIM, decision_rule=EFFICIENCY_RULE, decision=decision,
                       statistics=statistics, summary=summary,
                       tables={"ratios": frame, "functional_variances": variances}, figures=figures,
                       settings=settings_record(settings, theory, context))
