"""Tests of the extrapolation check (DESIGN §6.7): its statistics and, at smoke scale, its machinery."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from simstudy import quadrature
from simstudy.checks import CheckContext, run_check
from simstudy.checks import extrapolation as ex
from simstudy.checks import peers


# ---- paired differences -------------------------------------------------------------------------------
def _table(values: dict[str, list[float]], design: str = "identified", status: dict | None = None) -> pd.DataFrame:
    rows = []
    for method, vals in values.items():
        for r, v in enumerate(vals):
            rows.append({"design": design, "replicate": r, "method": method, "kl_oos": v,
                         "status": (status or {}).get((method, r), "ok")})
    return pd.DataFrame(rows)


def test_paired_differences_match_hand_computation():
    a = [0.10, 0.20, 0.15, 0.30, 0.25]
    b = [0.20, 0.22, 0.30, 0.35, 0.40]
    out = ex.paired_differences(_table({"ps": a, "mle": b}), metric="kl_oos", pairs=[("ps", "mle")])
    row = out.iloc[0]
    d = np.array(a) - np.array(b)
    se = d.std(ddof=1) / math.sqrt(5)
    tq = stats.t.ppf(0.975, 4)
    assert row["pairs"] == 5
    assert row["difference"] == pytest.approx(d.mean())
    assert row["mcse"] == pytest.approx(se)
    assert row["ci_low"] == pytest.approx(d.mean() - tq * se)
    assert row["ci_high"] == pytest.approx(d.mean() + tq * se)
    assert row["mean_method"] == pytest.approx(np.mean(a)) and row["mean_reference"] == pytest.approx(np.mean(b))
    assert ex.verdict(row["ci_low"], row["ci_high"]) == "beats"


def test_paired_differences_use_only_replicates_where_both_are_ok():
    a = [0.1, 0.2, 0.3, 0.4]
    b = [0.2, 0.1, 0.5, 0.9]
    t = _table({"ps": a, "mle": b}, status={("ps", 3): "error"})
    row = ex.paired_differences(t, metric="kl_oos", pairs=[("ps", "mle")]).iloc[0]
    assert row["pairs"] == 3
    assert row["difference"] == pytest.approx(np.mean(np.array(a[:3]) - np.array(b[:3])))


def test_infinite_kl_is_reported_not_dropped():
    t = _table({"q2": [0.1, math.inf, 0.3], "mle": [0.2, 0.2, 0.2]})
    row = ex.paired_differences(t, metric="kl_oos", pairs=[("q2", "mle")]).iloc[0]
    assert row["pairs"] == 3 and row["infinite"] == 1
    assert math.isinf(row["difference"]) and math.isnan(row["ci_high"])
    assert ex.verdict(row["ci_low"], row["ci_high"]) == "undefined"


def test_verdicts():
    assert ex.verdict(-0.3, -0.1) == "beats"
    assert ex.verdict(0.1, 0.3) == "worse"
    assert ex.verdict(-0.1, 0.1) == "no decisive difference"


# ---- KL of Monte Carlo marginals -----------------------------------------------------------------------
def test_multinomial_kl_removes_the_monte_carlo_bias_and_its_se_is_calibrated():
    rng = np.random.default_rng(0)
    V, S, reps = 12, 400, 2000
    m = rng.dirichlet(np.full(V, 2.0), size=1)  # (1, V) truth
    p = rng.dirichlet(np.full(V, 2.0), size=1)  # (1, V) the model whose frequencies are observed
    exact = float(np.sum(m * np.log(m / p)))
    freq = rng.multinomial(S, p[0], size=reps) / S  # (reps, V)
    res = peers.multinomial_kl(np.repeat(m, reps, 0), freq, S)
    corrected, plugin = res["kl"], res["kl_plugin"]
    mcse = corrected.std(ddof=1) / math.sqrt(reps)
    assert abs(corrected.mean() - exact) < 4 * mcse  # unbiased within Monte Carlo error
    assert plugin.mean() - exact > 4 * mcse  # while the plug-in is visibly biased upwards
    ratio = res["mc_se"].mean() / corrected.std(ddof=1)  # the delta-method SE against the spread
    assert 0.85 < ratio < 1.15


def test_mc_marginal_kl_correction_and_se():
    rng = np.random.default_rng(1)
    V, reps = 10, 4000
    m = rng.dirichlet(np.full(V, 3.0), size=1)
    p = rng.dirichlet(np.full(V, 3.0), size=1)
    exact = float(np.sum(m * np.log(m / p)))
    err = 0.04 * p  # 4 % relative Monte Carlo error per class
    noisy = p * (1 + 0.04 * rng.standard_normal((reps, V)))
    res = ex.mc_marginal_kl(np.repeat(m, reps, 0), noisy, np.repeat(err, reps, 0))
    mcse = res["kl"].std(ddof=1) / math.sqrt(reps)
    assert abs(res["kl"].mean() - exact) < 4 * mcse
    assert res["kl_plugin"].mean() - exact > 4 * mcse
    assert 0.85 < res["mc_se"].mean() / res["kl"].std(ddof=1) < 1.15


def test_multinomial_kl_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes|frequencies"):
        peers.multinomial_kl(np.ones((2, 3)) / 3, np.ones((2, 4)) / 4, 10)


def test_pruned_trapezoid_keeps_the_integral():
    full = quadrature.trapezoid(31, 2)
    pruned = quadrature.pruned_trapezoid(31, 2)
    assert pruned.size < 0.6 * full.size
    f = lambda z: np.tanh(1.5 * z[:, 0] - 0.5 * z[:, 1]) ** 2 + 0.1 * z[:, 1] ** 2  # noqa: E731
    assert np.dot(np.exp(pruned.log_weights), f(pruned.nodes)) == pytest.approx(
        np.dot(np.exp(full.log_weights), f(full.nodes)), abs=1e-10)


# ---- the check at smoke scale --------------------------------------------------------------------------
def test_unknown_method_is_refused(tmp_path):
    ctx = CheckContext(scale="smoke", out=tmp_path, overrides={"methods": "mle-exact,bogus"})
    with pytest.raises(ValueError, match="methods='bogus' is unknown"):
        run_check("extrapolation", ctx)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("extrapolation")
    return out, run_check("extrapolation", CheckContext(scale="smoke", out=out, n_jobs=1))


def test_smoke_result_is_complete_and_consistent(smoke):
    out, res = smoke
    saved = json.loads((out / "extrapolation.json").read_text())
    assert saved["decision"] == res.decision and res.decision in ("pass", "fail", "reported")
    table = res.tables["replicates"]
    assert (table["status"] == "ok").all(), table[table["status"] != "ok"][["method", "message"]]
    assert set(table["design"]) == {"identified", "weakly-identified"}
    # paired: every method of each design against mle, ps against the fixed Gaussian
    paired = res.tables["paired"]
    have = set(zip(paired["design"], paired["method"], paired["reference"]))
    for design in ("identified", "weakly-identified"):
        assert (design, "likelihood (empirical root)", "mle (empirical root)") in have  # the roots, reported
        assert (design, "ps-mh (sgd)", "mle (sgd)") in have
        assert (design, "ps-exact (sgd)", "mle (sgd)") in have  # the small second study, paired on the same data
        assert (design, "ps-mh (sgd)", "gaussian (sgd)") in have
    # the decision is the stated rule applied to the primary row: both fits under the one protocol
    row = paired[(paired["design"] == "identified") & (paired["method"] == "ps-mh (sgd)")
                 & (paired["reference"] == "mle (sgd)")].iloc[0]
    expected = "pass" if (row["oos_ci_high"] < 0 and row["id_ci_high"] < 0.1 * row["id_reference"]) else "fail"
    assert res.decision == expected
    key = "identified | ps-mh (sgd) - mle (sgd)"
    assert res.statistics[key]["oos_mcse"] > 0 and len(res.statistics[key]["oos_ci"]) == 2
    assert "Pre-registered form" in res.decision_rule and "likelihood (empirical root)" in res.decision_rule
    # every sgd fit records where it stopped and whether it hit the cap; ps-exact (sgd) its fallback fraction
    sgd = table[table["method"].str.endswith("(sgd)")]
    assert sgd["fit_best_pass"].notna().all() and sgd["fit_hit_cap"].isin([0.0, 1.0]).all()
    assert (sgd["fit_stopped_early"] + sgd["fit_hit_cap"] == 1).all()
    assert sgd["fit_validation_curve"].str.contains(":").all()
    assert table.loc[table["method"] == "ps-exact (sgd)", "fit_eq_fallback_fraction"].between(0, 1).all()
    per = res.tables["per_method"]
    assert {"fit_best_pass", "fit_hit_cap", "fit_hit_cap_mcse"} <= set(per.columns)
    # extrapolation curves with MCSE per design, method and distance bin
    curves = res.tables["curves"]
    assert curves["mcse"].notna().any() and curves["bin"].max() >= 2
    assert all((out / "extrapolation" / name).exists() for name in
               ("paired_differences.png", "extrapolation_curves.png", "gain_by_distance.png"))
    if not peers.engression_available():
        assert peers.ENGRESSION_HINT in res.summary


def test_smoke_rerun_resumes_from_the_store(smoke):
    out, res = smoke
    again = run_check("extrapolation", CheckContext(scale="smoke", out=out, n_jobs=1))
    assert again.seconds < max(0.5 * res.seconds, 10.0)
    pd.testing.assert_frame_equal(again.tables["paired"], res.tables["paired"])


def test_report_from_stores_matches_the_run_and_refuses_duplicates(smoke, tmp_path):
    """The results of the runs' stores, read back and reported together, give the run's own paired
    table; a method taken twice for the same replicate is refused with a one-line error."""
    from simstudy.checks.extrapolation import report_from_stores

    out, res = smoke
    stores = sorted((out / "extrapolation").glob("store-*"))
    assert len(stores) == 2  # the main and the small (ps-exact sgd) study
    combined = report_from_stores(stores, out=tmp_path, min_pairs=2)  # the smoke scale's rule
    assert combined.decision == res.decision
    cols = ["design", "method", "reference", "pairs", "oos_difference", "oos_mcse", "id_difference"]
    def tidy(frame):
        return frame[cols].sort_values(cols[:3]).reset_index(drop=True)

    pd.testing.assert_frame_equal(tidy(combined.tables["paired"]), tidy(res.tables["paired"]))
    assert (tmp_path / "extrapolation.json").exists()
    with pytest.raises(ValueError, match="more than one store"):
        report_from_stores([stores[0], stores[0]], out=tmp_path)
    with pytest.raises(ValueError, match="not in store"):
        report_from_stores([(stores[0], ["no such method"])], out=tmp_path)
