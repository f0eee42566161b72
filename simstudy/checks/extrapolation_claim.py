"""The claim of the extrapolation check and its decision rule (DESIGN §6.7).

The rule is applied to one row of the paired findings
(:func:`simstudy.checks.extrapolation_statistics.findings`): the primary pair in the
identified design. PASS when its paired OOS KL difference's 95 % interval lies entirely
below 0 and its paired ID difference's upper 95 % limit is below the margin
(``margin_fraction`` of the reference's mean ID KL); FAIL otherwise; REPORTED when the
identified design or the primary pair was not run.
"""
from __future__ import annotations

import math

import pandas as pd

from .common import fmt

__all__ = ["CLAIM", "NAME", "REFERENCE_DESIGNS", "decide", "decision_rule"]

NAME = "extrapolation"
CLAIM = ("In the identified design, learned perturbation fitted by the likelihood equations (ps) has a lower "
         "out-of-support KL than mle on the same data (paired), with in-support KL within a stated margin; the "
         "fixed Gaussian, NEFTune and discrete perturbations, q2, aug, the weakly identified design and the "
         "engression peer are reported (DESIGN §6.7).")
#: The reference designs of DESIGN §4 the check runs (``--set designs=``), in report order.
REFERENCE_DESIGNS = ("identified", "weakly-identified")


def decision_rule(primary: tuple[str, str], margin_fraction: float, *, min_pairs: int = 20,
                  preregistered: tuple[str, str] | None = None) -> str:
    """The rule's text for the primary pair ``(method, reference)`` (labels); with ``preregistered``, the
    pair stated before the first full run and why it was replaced (issue 11)."""
    text = (f"PASS iff in the identified design the paired OOS KL difference {primary[0]} minus {primary[1]} "
            f"(both fitted by the one early-stopping protocol, paired on the same data, at least {min_pairs} pairs) "
            f"has its 95% t-interval (mean +- t_(R-1) MCSE over replicate pairs) entirely below 0 AND the "
            f"paired ID KL difference's upper 95% limit is below {margin_fraction:g} x {primary[1]}'s mean ID KL; "
            f"FAIL otherwise; REPORTED if that pair was not run or has fewer than {min_pairs} pairs. Other "
            "comparisons are findings.")
    if preregistered and tuple(preregistered) != tuple(primary):
        text += (f" Pre-registered form (before issue 11): the same rule on {preregistered[0]} minus "
                 f"{preregistered[1]}. Changed because those two are unregularised exact solves (empirical "
                 "roots) whose OOS KL depends on the solver's iteration cap, so that pair decided on the solver, "
                 "not on the method (paper_checks/FINDINGS.md); they stay in the tables, labelled as roots.")
    return text


def decide(found: pd.DataFrame, primary: tuple[str, str], *, min_pairs: int = 2) -> tuple[str, str]:
    """``(decision, headline)`` of the rule on the findings table ``found``."""
    row = found[(found["design"] == "identified") & (found["method"] == primary[0]) &
                (found["reference"] == primary[1])]
    if row.empty or not math.isfinite(float(row["oos_ci_high"].iloc[0])):
        return "reported", f"primary pair {primary[0]} vs {primary[1]} not available in the identified design"
    r = row.iloc[0]
    ok_oos = float(r["oos_ci_high"]) < 0
    ok_id = bool(r["id_within_margin"])
    head = (f"identified: {primary[0]} - {primary[1]} OOS KL {_f(r['oos_difference'])} "
            f"[{_f(r['oos_ci_low'])}, {_f(r['oos_ci_high'])}] (R={int(r['pairs'])}; "
            f"{_f(r['oos_method'])} vs {_f(r['oos_reference'])}), ID diff upper {_f(r['id_ci_high'])} "
            f"vs margin {_f(r['id_margin'])}")
    if int(r["pairs"]) < min_pairs:
        return "reported", head + f" (fewer than {min_pairs} pairs: not decided)"
    return ("pass" if ok_oos and ok_id else "fail"), head


def _f(x: float) -> str:
    """A number of the summary: three decimals."""
    return fmt(x, 3, fixed=True)
