"""Paper check ``unbiasedness`` (DESIGN §6.1; issue 4).

For every estimating equation of DESIGN §3, at the truth and at a perturbed parameter of
the "five-token" reference model, the Monte Carlo mean of g is compared with the exact
quadrature gradient of the equation's population objective by the Hotelling-type test of
:func:`simstudy.equations.gradient_audit` (identifiable subspace, alpha = 0.001). The
population, the points and one audit: :mod:`simstudy.checks.audits`; the exact means
beside the Monte Carlo ones: :mod:`simstudy.equations.exact_means`; the figures:
:mod:`simstudy.checks.audit_figures`.

Equations (labels, :func:`simstudy.equations.parse_label`): ``ps-exact``; ``q2-K<k>``
(q2 with k draws); ``ps-mh-B<b>`` (fresh independence chains of b steps); ``is-<K>``;
``aug``; ``sumo`` (power tail alpha = 2.5, finite mean, infinite variance: spread only).

Decision rules (stated in the result)
-------------------------------------
The expected verdict of each audit derives from its equation's ``audit_expectation``
(:class:`simstudy.equations.Equation`); the check passes when every expected verdict holds
at every point:

1. "unbiased" (ps-exact and every q2 variant): the audit does not reject (p >= alpha and
   the bias off the identifiable subspace within its noise).
2. "mixing" (ps-mh): at the largest B of the grid (default 100) the audit does not reject;
   at every smaller B where the audit has power >= ``power_threshold`` (0.9) against the
   exact chain bias, it rejects (where the power is lower, the verdict is reported as "no
   power", not judged; without an exact chain mean, i.e. q > 1, the smallest B must be
   rejected).
3. "biased" (is-K, aug): the audit rejects. For is-K also "K x bias roughly constant":
   with s_K = <K b_K, u> / |u|^2 the bias's projection on u = -grad chi2 / 2 in units of u
   (the leading term gives s_K -> 1), every s_K is positive and the weighted least-squares
   slope of log s_K on log K (weights from the delta-method MCSE) has its 95% interval
   inside (-1/2, 1/2): K b_K changes across the grid by less than a K^(+-1/2) power law,
   so the bias is closer to order 1/K than to K^(-1/2) or K^(-3/2). s_K at the largest K
   against 1 is reported. For aug at the truth the reference is 0: |mean g| vs 0.
4. "spread" (sumo): reported (spread of g over independent batches); no Hotelling verdict.

Figures: ``bias_audit.png``, ``is_k_bias.png``, ``ps_mh_bias.png``. The study is one engine
study (conditions = equation x point, one replicate each); at full scale (or with ``--set
store=true``) it stores to ``OUT/unbiasedness/store/unbiasedness-<config hash>`` and resumes.

Cost (1 core, five-token, per audit replicate): ps-exact 23-26 ms, ps-mh 1.6 + 0.36 B ms, q2 1.4-2.6
ms, is-K 0.8-2.6 ms, aug 0.7-1 ms, sumo 2-3 ms per batch. Full scale (R = 4000): about 13 minutes CPU.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ..equations import EQUATIONS, Augmentation, ImportanceSampling, PosteriorMH, equations_with, parse_label
from .audit_figures import plot_bias, plot_isk, plot_mh
from .audits import (POINTS, audit_points, audit_setup, failed_rows, label_parameter, problem_description,
                     run_audits)
from .base import CheckContext, CheckResult, register
from .common import comma_list, fmt
from .statistics import loglog_slope

__all__ = ["UNBIASEDNESS_CLAIM", "UNBIASEDNESS_RULE", "expected_verdict", "run_unbiasedness", "unbiasedness_labels"]

UNBIASEDNESS_CLAIM = ("At the truth and at a perturbed parameter of the five-token model, the Monte Carlo mean of g "
                      "equals the exact quadrature gradient of its population objective for ps-exact and q2 "
                      "(unbiased); ps-mh is biased at small B and not at large B; is-K is biased with K x bias "
                      "roughly constant (towards -grad chi2 / 2); aug is biased; sumo's spread is reported "
                      "(DESIGN §3, §6.1).")

UNBIASEDNESS_RULE = (
    "Hotelling-type audit on the identifiable subspace at alpha (default 0.001), R replicates per audit. Pass when, "
    "at every point: ps-exact and every q2 variant are not rejected; ps-mh at the largest B is not rejected and is "
    "rejected at every smaller B where the audit has power >= power_threshold (0.9) against the exact quadrature-"
    "chain bias (lower power: reported, not judged; no exact chain: the smallest B must be rejected); is-K is "
    "rejected at every K, s_K = <K bias, u>/|u|^2 (u = -grad chi2/2) is positive at every K and the WLS slope of "
    "log s_K on log K has its 95% interval inside (-1/2, 1/2) ('K x bias roughly constant': closer to order 1/K "
    "than to K^-1/2 or K^-3/2); aug is rejected. sumo: spread over batches reported, no verdict.")

#: The equations the check audits by default, in the study's condition order, and the ``--set`` grid of
#: each equation with a label option: (parameter, default values, sorted).
DEFAULT_EQUATIONS = ("ps-exact", "q2", "ps-mh", "is-K", "aug", "sumo")
GRIDS = {"q2": ("q2_draws", [2, 8], False), "ps-mh": ("mh_steps", [1, 5, 20, 100], True),
         "is-K": ("is_draws", [1, 2, 4, 8, 16, 32], True)}
AUDIT_COLUMNS = ["point", "equation", "p_value", "t2", "df", "reject", "residual_ok", "bias_norm", "bias_norm_mcse",
                 "noise", "mean_norm", "mean_norm_mcse", "reference_norm", "expected_bias_norm", "power",
                 "p_vs_expected", "s", "s_mcse", "proj", "proj_mcse", "u_norm", "num_replicates",
                 "seconds_per_replicate"]


def unbiasedness_labels(context: CheckContext) -> dict[str, list[str]]:
    """``{registry name: [labels]}`` of the audited equations (``--set equations=...`` and the grids
    ``q2_draws``, ``mh_steps``, ``is_draws``), in :data:`DEFAULT_EQUATIONS` order."""
    grids = {}
    for name, (key, default, ordered) in GRIDS.items():
        values = [int(v) for v in comma_list(context.param(key, default))]
        grids[name] = sorted(values) if ordered else values
    if not all(grids.values()):
        raise ValueError("--set q2_draws, mh_steps and is_draws need at least one value each; allowed: comma lists")
    equations = comma_list(context.param("equations", list(DEFAULT_EQUATIONS)))
    for e in equations:
        if e not in DEFAULT_EQUATIONS:
            raise ValueError(f"--set equations={','.join(equations)} is invalid; allowed: a comma list of "
                             f"{', '.join(DEFAULT_EQUATIONS)}")

    def labels(name: str) -> list[str]:  # e.g. q2 with K in (2, 8) -> ["q2-K2", "q2-K8"]
        cls = EQUATIONS[name]
        return [cls.label_of(**{cls.label_option: v}) for v in grids[name]] if name in grids else [cls.label_of()]

    return {e: labels(e) for e in DEFAULT_EQUATIONS if e in equations}


def expected_verdict(label: str, families: dict, power: float, power_threshold: float) -> str:
    """The verdict an audit of ``label`` should reach, from its equation's ``audit_expectation``:
    "no bias detected", "biased", "not judged (...)" or "reported" (module docstring, rules 1-4)."""
    name = parse_label(label)[0]
    expectation = EQUATIONS[name].audit_expectation
    if expectation == "unbiased":
        return "no bias detected"
    if expectation == "biased":
        return "biased"
    if expectation == "mixing":  # biased at small steps, not once mixed
        grid = families.get(name, [])
        if label == grid[-1]:
            return "no bias detected"
        if np.isfinite(power):
            return "biased" if power >= power_threshold else "not judged (no power)"
        return "biased" if label == grid[0] else "not judged (no exact chain)"
    return "reported"


def _verdicts(frame: pd.DataFrame, families: dict, power_threshold: float, points: list[str]) -> tuple[
        pd.DataFrame, pd.DataFrame, list[str]]:
    """Expected vs observed verdict per audit; is-K constancy per point; failure messages."""
    rows, problems = [], []
    for point in points:
        at = frame[frame["point"] == point].set_index("equation")
        for label in at.index:
            r = at.loc[label]
            got = "biased" if bool(r["reject"]) else "no bias detected"
            power = r.get("power", math.nan)
            expected = expected_verdict(label, families, power, power_threshold)
            judged = expected in ("biased", "no bias detected")
            ok = (got == expected) if judged else True
            rows.append({"point": point, "equation": label, "family": parse_label(label)[0], "expected": expected,
                         "observed": got, "holds": ok if judged else None, "p_value": r["p_value"], "power": power})
            if judged and not ok:
                problems.append(f"{label}@{point}: expected {expected}, observed {got} (p={fmt(r['p_value'])})")
    slopes = []
    for point in points:
        fit = _isk_slope(frame, families.get(ImportanceSampling.name, []), point)
        if fit is None:
            continue
        slopes.append(fit)
        if not fit["roughly_constant"]:
            problems.append(f"is-K@{point}: K x bias not roughly constant (s_K > 0: {fit['all_positive']}; slope "
                            f"{fmt(fit['slope'])} [{fmt(fit['slope_low'])}, {fmt(fit['slope_high'])}])")
    return pd.DataFrame(rows), pd.DataFrame(slopes), problems


def _isk_slope(frame: pd.DataFrame, labels: list[str], point: str) -> dict | None:
    """"K x bias roughly constant" at ``point`` (rule 3): the log-log slope of s_K on K; None without is-K audits."""
    at = frame[(frame["point"] == point) & frame["equation"].isin(labels)].copy()
    if at.empty:
        return None
    at["K"] = [label_parameter(e) for e in at["equation"]]
    at = at.sort_values("K")
    fit = loglog_slope(at["K"], at["s"], at["s_mcse"])
    positive = bool(np.all(at["s"] > 0))
    inside = bool(np.isfinite(fit["slope"]) and -0.5 < fit["slope_low"] and fit["slope_high"] < 0.5)
    last = at.iloc[-1]
    return {"point": point, **fit, "all_positive": positive, "roughly_constant": positive and inside,
            "s_min": float(at["s"].min()), "s_max": float(at["s"].max()), "K_max": int(last["K"]),
            "s_at_K_max": float(last["s"]), "s_at_K_max_mcse": float(last["s_mcse"])}


@register("unbiasedness", UNBIASEDNESS_CLAIM)
def run_unbiasedness(context: CheckContext) -> CheckResult:
    """Check DESIGN §6.1 (see the module docstring for the rules, :mod:`.audits` for the problem)."""
    name = "unbiasedness"
    setup = audit_setup(context)
    points = audit_points(context, list(POINTS))
    families = unbiasedness_labels(context)
    power_threshold = context.param("power_threshold", 0.9)
    seed = context.param("study_seed", 20240601)
    design = [{"equation": label, "point": p} for p in points for labels in families.values() for label in labels]
    store = context.folder(name) / "store" if context.scale == "full" or context.param("store", False) else None
    res = context.record(run_audits(name, design, setup, replicates=1, seed=seed, context=context, store=store))
    table = res.table
    failed = failed_rows(table)
    frame = table[table["status"] == "ok"].copy()
    folder = context.folder(name)
    settings = {**problem_description(setup), "points": points, "families": families,
                "power_threshold": power_threshold, "study_seed": seed, "n_jobs": context.n_jobs}
    verdicts, slopes, problems = _verdicts(frame, families, power_threshold, points)
    for _, r in failed.iterrows():
        problems.append(f"{r['equation']}@{r['point']}: audit failed ({r['message']})")
    figures = []
    isk, mh = families.get(ImportanceSampling.name), families.get(PosteriorMH.name)
    if not frame.empty:
        figures.append(plot_bias(frame, folder / "bias_audit.png", setup))
        if isk:
            figures.append(plot_isk(frame, isk, folder / "is_k_bias.png"))
        if mh and "expected_bias_norm" in frame:
            figures.append(plot_mh(frame, mh, folder / "ps_mh_bias.png"))
    audits = frame[[c for c in AUDIT_COLUMNS if c in frame]].reset_index(drop=True)
    tables = {"audits": audits, "verdicts": verdicts}
    if not slopes.empty:
        tables["is_k_slope"] = slopes
    statistics: dict = {"audits": {f"{r['equation']}@{r['point']}": {c: r[c] for c in audits.columns
                                                                       if c not in ("point", "equation")
                                                                       and pd.notna(r[c])}
                                   for _, r in audits.iterrows()}}
    if not slopes.empty:
        statistics["is_k_slope"] = slopes.set_index("point").to_dict(orient="index")
    spread_labels = [e for e in dict.fromkeys(frame["equation"]) if EQUATIONS[parse_label(e)[0]].audit_expectation
                     == "spread"]
    spread_rows = frame[frame["equation"].isin(spread_labels)]
    if not spread_rows.empty:
        spread_cols = [c for c in spread_rows.columns if re.fullmatch(r"(sd|max_dev|log_m_sd)_b\d+", c)]
        spread = spread_rows[["point", *spread_cols, "bias_norm", "bias_norm_mcse", "truncated"]
                             ].reset_index(drop=True)
        tables["sumo_spread"] = spread
        statistics["sumo_spread"] = spread.set_index("point").to_dict(orient="index")
    statistics["failures"] = int(len(failed))
    judged = verdicts[verdicts["holds"].notna()] if not verdicts.empty else verdicts
    decision = "pass" if not problems and len(judged) else "fail"
    summary = _unbiasedness_summary(frame, verdicts, slopes, problems)
    return CheckResult(name=name, claim=UNBIASEDNESS_CLAIM, decision_rule=UNBIASEDNESS_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables=tables, figures=figures, settings=settings)


def _unbiasedness_summary(frame, verdicts, slopes, problems) -> str:
    if frame.empty:
        return "no audit finished; " + "; ".join(problems[:3])
    parts = []
    unbiased = equations_with(audit_expectation="unbiased")
    null = frame[frame["equation"].map(lambda e: parse_label(e)[0] in unbiased)]
    if not null.empty:
        parts.append(f"{'/'.join(unbiased)} min p {fmt(null['p_value'].min())}")
    for family in equations_with(audit_expectation="mixing"):
        mh = verdicts[verdicts["family"] == family] if not verdicts.empty else verdicts
        if not mh.empty:
            flagged = [f"{e}@{p}" for e, p, o in zip(mh["equation"], mh["point"], mh["observed"]) if o == "biased"]
            parts.append(f"{family} flagged at " + (",".join(flagged) or "none"))
    if not slopes.empty:
        parts.append("is-K slope " + ", ".join(f"{fmt(r.slope, 2, fixed=True)}+-{fmt(r.slope_se, 2, fixed=True)} "
                                               f"({r.point})" for r in slopes.itertuples()))
    aug = frame[(frame["equation"] == Augmentation.name) & (frame["point"] == "truth")]
    if not aug.empty:
        parts.append(f"aug |mean g| at truth {fmt(aug['mean_norm'].iloc[0])}+-{fmt(aug['mean_norm_mcse'].iloc[0], 2)}")
    if problems:
        parts.append(("" if problems[0].startswith("NOT DECIDED") else "FAILED: ") + "; ".join(problems[:3]))
    return "; ".join(parts)
