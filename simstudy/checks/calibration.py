"""Paper check ``calibration`` (DESIGN §6.1; issue 4): is the unbiasedness decision calibrated?

The false-alarm rate of the audit's decision under the null (independent audits of an
unbiased equation, default q2-K2 at the perturbed point, with the same R and alpha as the
``unbiasedness`` check) and its power against aug and is-1, with binomial MCSEs. The
audits are those of :mod:`simstudy.checks.audits`, run as two engine studies
(``calibration-null``, ``calibration-power``; stored under ``OUT/calibration/store`` at full
scale or with ``--set store=true``).

Decision rule
-------------
Pass when the one-sided exact binomial test of H0: false-alarm rate <= alpha (n null
audits, alpha = 0.001) does not reject at level 0.05 (with n = 200: at most one false
alarm); with fewer than ``min_null_audits`` (200, issue 4) null audits the decision is
"reported" (smoke scale: 50 audits cannot judge a rate of 0.001). The rates at 0.01 and
0.05, a Kolmogorov-Smirnov test of the null p-values' uniformity, and the power against
aug and is-1 (each with MCSE and a Clopper-Pearson interval) are reported.

Figure: ``calibration/null_pvalues.png`` (histogram and -log10 QQ plot of null p-values).
Cost: 200 null q2 audits and 50 each against aug and is-1 at R = 4000, about 45 minutes CPU.
"""
from __future__ import annotations

import math

import pandas as pd
from scipy import stats as sps

from ..equations import parse_label
from .audit_figures import plot_calibration
from .audits import audit_points, audit_setup, failed_rows, problem_description, run_audits
from .base import CheckContext, CheckResult, register
from .common import comma_list, fmt
from .statistics import binomial_excess_pvalue, binomial_rate

__all__ = ["CALIBRATION_CLAIM", "CALIBRATION_RULE", "run_calibration"]

CALIBRATION_CLAIM = ("The unbiasedness decision (Hotelling audit at alpha = 0.001) has a false-alarm rate consistent "
                     "with alpha on an unbiased equation, and power against aug and is-1 (issue 4, Calibration).")

CALIBRATION_RULE = ("n independent null audits (default q2-K2 at the perturbed point, same R and alpha as the "
                    "unbiasedness check). Pass when the one-sided exact binomial test of H0: false-alarm rate <= "
                    "alpha does not reject at level 0.05 (P(Bin(n, alpha) >= observed alarms) >= 0.05); with fewer "
                    "than min_null_audits (200, issue 4) null audits the rates are reported without a verdict. "
                    "Reported: rates with binomial MCSE and Clopper-Pearson 95% intervals at alpha, 0.01 and 0.05, "
                    "a KS test of the null p-values against U(0, 1), and the power (reject rate) against aug and "
                    "is-1.")

RATE_KEYS = ("rate", "mcse", "ci_low", "ci_high", "k", "n", "binomial_p", "mcse_under_null", "ks_p", "ks_stat")


def rate_table(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Reject rates per (role, equation, point) of the finished audits in ``table`` (with a ``role`` column:
    "false-alarm" or "power"): at alpha for both roles, and at 0.01 and 0.05 for false alarms, with the
    binomial test of excess false alarms and the KS test of the null p-values' uniformity."""
    rows = []
    for (role, label, point), g in table.groupby(["role", "equation", "point"], sort=False):
        levels = sorted({alpha, 0.01, 0.05}) if role == "false-alarm" else [alpha]
        ks = sps.kstest(g["p_value"].to_numpy(float), "uniform") if role == "false-alarm" else None
        for level in levels:
            # the audit's own decision at alpha; at other levels the same rule (p < level or bias off the subspace)
            k = int((g["reject"] > 0.5).sum()) if level == alpha else \
                int(((g["p_value"] < level) | (g["residual_ok"] < 0.5)).sum())
            row = {"role": role, "equation": label, "point": point, "level": level, **binomial_rate(k, len(g))}
            if role == "false-alarm":
                row["binomial_p"] = binomial_excess_pvalue(k, len(g), level)
                row["mcse_under_null"] = math.sqrt(level * (1 - level) / len(g))
                row["ks_p"], row["ks_stat"] = float(ks.pvalue), float(ks.statistic)  # uniformity of all p-values
            rows.append(row)
    return pd.DataFrame(rows)


@register("calibration", CALIBRATION_CLAIM)
def run_calibration(context: CheckContext) -> CheckResult:
    """False-alarm rate and power of the unbiasedness decision (module docstring)."""
    name = "calibration"
    setup = audit_setup(context)
    points = audit_points(context, ["perturbed"])
    null_labels = comma_list(context.param("null_equations", ["q2-K2"]))
    power_labels = comma_list(context.param("power_equations", ["aug", "is-1"]))
    for label in null_labels + power_labels:
        parse_label(label)
    n_null = context.param("null_audits", 50, 200)
    n_power = context.param("power_audits", 10, 50)
    min_null = context.param("min_null_audits", 200)
    seed = context.param("study_seed", 20240602)
    store = context.folder(name) / "store" if context.scale == "full" or context.param("store", False) else None
    null = context.record(run_audits(f"{name}-null", [{"equation": e, "point": p} for p in points
                                                      for e in null_labels], setup,
                                     replicates=n_null, seed=seed, context=context, store=store)).table
    power = context.record(run_audits(f"{name}-power", [{"equation": e, "point": p} for p in points
                                                        for e in power_labels], setup,
                                      replicates=n_power, seed=seed + 1, context=context, store=store)).table
    table = pd.concat([null.assign(role="false-alarm"), power.assign(role="power")], ignore_index=True)
    failed = failed_rows(table)
    ok = table[table["status"] == "ok"]
    rates = rate_table(ok, setup.alpha)
    decisive = rates[(rates["role"] == "false-alarm") & (rates["level"] == setup.alpha)] if len(rates) else rates
    alarms = [f"{r.equation}@{r.point}: {r.k}/{r.n} false alarms at alpha={fmt(setup.alpha, 6)} "
              f"(binomial p = {fmt(r.binomial_p)})" for r in decisive.itertuples() if r.binomial_p < 0.05]
    errors = [f"{r['equation']}@{r['point']} replicate {r['replicate']}: audit failed ({r['message']})"
              for _, r in failed.iterrows()]
    folder = context.folder(name)
    figures = []
    null_ok = ok[ok["role"] == "false-alarm"]
    if not null_ok.empty:
        figures.append(plot_calibration(null_ok, folder / "null_pvalues.png", setup.alpha))
    statistics = {f"{r.role}:{r.equation}@{r.point}:level={fmt(r.level, 6)}": {
        k: getattr(r, k) for k in RATE_KEYS if hasattr(r, k) and pd.notna(getattr(r, k))}
        for r in rates.itertuples()}
    statistics["failures"] = int(len(failed))
    enough = len(decisive) > 0 and bool((decisive["n"] >= min_null).all())
    if errors or not len(decisive):
        decision, problems = "fail", errors or ["no null audit finished"]
    elif not enough:
        decision = "reported"
        problems = [f"NOT DECIDED: fewer than min_null_audits={min_null} null audits"
                    + (f" (the binomial test would reject: {'; '.join(alarms)})" if alarms else "")]
    else:
        decision, problems = ("fail" if alarms else "pass"), alarms
    audits = ok[["role", "equation", "point", "replicate", "p_value", "t2", "df", "reject", "residual_ok",
                 "bias_norm", "noise"]].reset_index(drop=True)
    summary = _calibration_summary(rates, setup.alpha, problems)
    settings = {**problem_description(setup), "points": points, "null_equations": null_labels,
                "power_equations": power_labels, "null_audits": n_null, "power_audits": n_power,
                "min_null_audits": min_null,
                "study_seed": seed, "n_jobs": context.n_jobs}
    return CheckResult(name=name, claim=CALIBRATION_CLAIM, decision_rule=CALIBRATION_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"rates": rates, "audits": audits},
                       figures=figures, settings=settings)


def _calibration_summary(rates: pd.DataFrame, alpha: float, problems: list[str]) -> str:
    if rates.empty:
        return "no audit finished; " + "; ".join(problems[:3])
    parts = []
    for r in rates[rates["level"] == alpha].itertuples():
        # At k = 0 or k = n the plug-in MCSE sqrt(p (1 - p) / n) is 0 and says nothing: quote the exact
        # (Clopper-Pearson) interval always, and for false alarms the MCSE a rate of alpha would have.
        interval = f" (95% CI {fmt(r.ci_low, 2)} to {fmt(r.ci_high, 2)})"
        if r.role == "false-alarm":
            parts.append(f"{r.equation}@{r.point} false alarms {r.k}/{r.n} = {fmt(r.rate)}{interval}, "
                         f"MCSE {fmt(r.mcse, 2)} (under alpha {fmt(r.mcse_under_null, 2)}), "
                         f"binomial p {fmt(r.binomial_p)}")
        else:
            parts.append(f"{r.equation}@{r.point} power {r.k}/{r.n} = {fmt(r.rate)}{interval}, MCSE {fmt(r.mcse, 2)}")
    ks = rates["ks_p"].dropna() if "ks_p" in rates else pd.Series(dtype=float)
    if len(ks):
        parts.append(f"KS p {fmt(ks.min())}")
    if problems:
        parts.append(("" if problems[0].startswith("NOT DECIDED") else "FAILED: ") + "; ".join(problems[:3]))
    return "; ".join(parts)
