"""More built-in performance measures and measures of your own (issue 13, "Performance measures"; DESIGN §7).

Each new built-in measure against a hand computation (value and MCSE), its MCSE against a brute-force Monte
Carlo of its sampling SD, and user-defined measures (``UserMeasure``) with each MCSE route: a formula, the
jackknife (equal to sd / sqrt(n) for the mean, exactly) and the seeded bootstrap.
"""
import math
import textwrap

import numpy as np
import pandas as pd
import pytest

import simstudy
from simstudy.engine import performance as perf
from simstudy.engine.result import StudyResult
from simstudy.engine.user_measures import UserMeasure, bootstrap_se, jackknife_se
from simstudy.studies.spec import SpecError, load_study_file, parse_study_text

T = [1.0, 2.0, 3.0, 4.0, 5.0]  # tbar = 3, sum (t - tbar)^2 = 10
THETA = 2.5
Z = 1.959963984540054


# -- built-in measures by hand ------------------------------------------------------------------------------
def test_relbias_and_mae_by_hand():
    r = perf.relbias(T, THETA)
    assert r.value == pytest.approx(0.5 / 2.5, abs=1e-12)  # (3 - 2.5) / 2.5, a fraction (rsimsum's rbias)
    assert r.mcse == pytest.approx(math.sqrt(0.5) / 2.5, abs=1e-12)  # mcse(bias) / |theta|
    assert all(math.isnan(v) for v in perf.relbias(T, 0.0))
    # |t - 2.5| = [1.5, .5, .5, 1.5, 2.5]: mean 1.3; deviations [.2, -.8, -.8, .2, 1.2], squares sum 2.8
    m = perf.mae(T, THETA)
    assert m.value == pytest.approx(1.3, abs=1e-12)
    assert m.mcse == pytest.approx(math.sqrt(2.8 / 4 / 5), abs=1e-12)


def test_median_bias_by_hand():
    # n = 5: c = round(3 - 1.96 sqrt(5) / 2) = round(0.809) = 1 -> (t_(5) - t_(1)) / (2 z) = 4 / (2 z)
    m = perf.median_bias(T, THETA)
    assert m.value == 0.5
    assert m.mcse == pytest.approx(4 / (2 * Z), abs=1e-12)
    # n = 16, t = 1..16: c = round(8.5 - 1.96 * 2) = round(4.58) = 5 -> (t_(12) - t_(5)) / (2 z) = 7 / (2 z)
    t16 = np.arange(1.0, 17.0)
    m = perf.median_bias(t16, 8.0)
    assert m.value == 0.5
    assert m.mcse == pytest.approx(7 / (2 * Z), abs=1e-12)
    assert perf.median_bias([2.0, 2.0, 2.0], 1.0) == (1.0, 0.0)  # constant estimates: exact
    assert math.isnan(perf.median_bias([0, 1, 1, 1, 1, 1, 1, 1, 1, 2], 1.0).mcse)  # tied order statistics


def test_interval_tail_misses_and_width_by_hand():
    lo = [t - 1.0 for t in T]
    hi = [t + 1.0 for t in T]
    # theta = 2.5 is covered for t = 2, 3; below the lower limit for t = 4, 5; above the upper for t = 1
    assert perf.coverage(lo, hi, THETA).value == 0.4
    b, a = perf.miss_below(lo, THETA), perf.miss_above(hi, THETA)
    assert (b.value, a.value) == (0.4, 0.2)
    assert b.mcse == pytest.approx(math.sqrt(0.4 * 0.6 / 5), abs=1e-12)
    assert a.mcse == pytest.approx(math.sqrt(0.2 * 0.8 / 5), abs=1e-12)
    w = [1.0, 1.0, 2.0, 2.0, 4.0]  # widths 2w = [2, 2, 4, 4, 8]: mean 4, deviations squared sum 24
    c = perf.ci_width([t - x for t, x in zip(T, w)], [t + x for t, x in zip(T, w)])
    assert c.value == 4.0
    assert c.mcse == pytest.approx(math.sqrt(24 / 4 / 5), abs=1e-12)


def _table(est, lo, hi, method="A", condition=0):
    n = len(est)
    return pd.DataFrame({"condition": condition, "n": 10, "replicate": range(n), "method": method, "status": "ok",
                         "message": "", "estimate": est, "se": 1.0, "ci_low": lo, "ci_high": hi})


def test_summarise_lists_the_new_measures_in_the_one_measures_table():
    tab = _table(T, [t - 1 for t in T], [t + 1 for t in T])
    s = perf.summarise(tab, factors=["n"], methods=["A"], truths=[{"estimate": THETA}])
    got = s.set_index("measure")
    for name, fn_value in [("relbias", 0.2), ("median_bias", 0.5), ("mae", 1.3), ("miss_below", 0.4),
                           ("miss_above", 0.2), ("ci_width", 2.0)]:
        assert got.loc[name, "value"] == pytest.approx(fn_value, abs=1e-12)
        assert got.loc[name, "n_used"] == 5 and got.loc[name, "failures"] == 0
    assert list(s["measure"]) == [m for m in perf.MEASURES if m in set(s["measure"])]  # in MEASURES order
    s0 = perf.summarise(tab, factors=["n"], methods=["A"], truths=[{"estimate": 0.0}])
    assert "relbias" not in set(s0["measure"])  # undefined for a true value of 0: no row


@pytest.mark.parametrize("name", ["relbias", "mae", "median_bias", "ci_width", "miss_below", "miss_above"])
def test_mcse_matches_the_monte_carlo_sd_of_the_measure(name):
    """Brute force: K = 1000 studies of n = 200 replicates; the SD of the measure over the studies (relative
    MC error 1/sqrt(2K) = 2.2%) against the mean of its MCSE: within 10% (12% for the median's
    order-statistic SE, which is noisier)."""
    rng = np.random.default_rng(20240613)
    K, n, theta = 1000, 200, 2.0
    values, mcses = [], []
    for _ in range(K):
        t = theta + rng.standard_normal(n)
        half = 1.645 * np.exp(0.3 * rng.standard_normal(n))  # interval half-widths that vary
        args = {"relbias": (t, theta), "mae": (t, theta), "median_bias": (t, theta), "ci_width": (t - half, t + half),
                "miss_below": (t - half, theta), "miss_above": (t + half, theta)}[name]
        m = getattr(perf, name)(*args)
        values.append(m.value)
        mcses.append(m.mcse)
    sd = float(np.std(values, ddof=1))
    assert float(np.mean(mcses)) == pytest.approx(sd, rel=0.12 if name == "median_bias" else 0.10)


# -- user-defined measures ----------------------------------------------------------------------------------
def _mean(x, truth):
    return float(np.mean(x))


def test_jackknife_of_the_mean_is_the_mean_formula_exactly_and_bootstrap_is_close():
    x = np.random.default_rng(3).normal(size=200)
    formula = perf.mean(x).mcse  # sd / sqrt(n)
    assert jackknife_se(_mean, x, None) == pytest.approx(formula, rel=1e-12)
    # bootstrap: plug-in variance, sqrt((n-1)/n) below the formula; 2000 resamples: relative error ~1/sqrt(4000)
    boot = bootstrap_se(_mean, x, None, np.random.default_rng(0), 2000)
    assert boot == pytest.approx(formula * math.sqrt(199 / 200), rel=0.06)


def _user_table():
    rng = np.random.default_rng(11)
    parts = []
    for c in (0, 1):
        for m in ("A", "B"):
            t = 1.0 + rng.standard_normal(40)
            tab = _table(t, t - 1.96, t + 1.96, method=m, condition=c)
            tab["kl"] = rng.exponential(size=40)
            parts.append(tab)
    tab = pd.concat(parts, ignore_index=True)
    tab.loc[3, ["status", "estimate", "kl"]] = ["error", np.nan, np.nan]  # one failure: not used, counted
    return tab


def _summ(measures, seed=5, tab=None):
    return perf.summarise(_user_table() if tab is None else tab, factors=["n"], methods=["A", "B"],
                          truths=[{"estimate": 1.0}, {"estimate": 1.0}], measures=measures, seed=seed)


def test_user_measures_appear_like_built_in_ones_with_each_mcse_route():
    tab = _user_table()
    s = _summ({"jk": UserMeasure(_mean), "boot": UserMeasure(_mean, mcse="bootstrap"),
               "formula": UserMeasure(lambda x, th: x.mean() - th, mcse=lambda x, th: 0.125, needs_truth=True),
               "bare": lambda x, th: float(np.max(x))}, tab=tab)
    assert list(s.columns) == ["condition", "n", "method", "estimand", "measure", "value", "mcse", "n_used",
                               "failures"]
    get = s.set_index(["condition", "method", "estimand", "measure"])
    builtin = get.loc[(0, "A", "estimate", "mean")]
    jk = get.loc[(0, "A", "estimate", "jk")]
    assert jk["value"] == builtin["value"] and jk["mcse"] == pytest.approx(builtin["mcse"], rel=1e-12)
    assert (jk["n_used"], jk["failures"]) == (39, 1)  # the failed replicate is counted, not used
    boot = get.loc[(0, "A", "estimate", "boot")]
    assert boot["mcse"] == pytest.approx(builtin["mcse"], rel=0.08)
    f = get.loc[(1, "B", "estimate", "formula")]
    assert f["value"] == pytest.approx(get.loc[(1, "B", "estimate", "bias"), "value"]) and f["mcse"] == 0.125
    # needs_truth=False: metrics too (truth None); needs_truth=True: estimands only
    assert (0, "A", "kl", "jk") in get.index and (0, "A", "kl", "formula") not in get.index
    assert math.isfinite(get.loc[(0, "A", "kl", "bare"), "mcse"])  # a bare function: jackknife
    only = _summ({"jk": UserMeasure(_mean, columns=("kl",))})
    assert set(only.loc[only["measure"] == "jk", "estimand"]) == {"kl"}


def test_bootstrap_mcse_is_deterministic_keyed_by_seed_and_name_not_order():
    a = _summ({"boot": UserMeasure(_mean, mcse="bootstrap"), "jk": UserMeasure(_mean)})
    b = _summ({"jk": UserMeasure(_mean), "boot": UserMeasure(_mean, mcse="bootstrap")})
    key = ["condition", "method", "estimand", "measure"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True),
                                  check_exact=True)
    c = _summ({"boot": UserMeasure(_mean, mcse="bootstrap")}, seed=6)
    sel = lambda s: s.loc[s["measure"] == "boot", "mcse"].to_numpy()  # noqa: E731
    assert not np.array_equal(sel(a), sel(c))  # another study seed, other resamples
    cells = sel(a)
    assert len(set(cells.tolist())) == len(cells)  # each cell has its own stream


BAD = [
    (lambda: UserMeasure(_mean, mcse="bootstrapp"), r"^UserMeasure\.mcse='bootstrapp' is invalid; allowed: "
                                                    r"'jackknife', 'bootstrap'"),
    (lambda: UserMeasure(3.0), r"^UserMeasure\.function=3\.0 is invalid; allowed: a function"),
    (lambda: UserMeasure(lambda x: x.mean()), r"^UserMeasure\.function=.* does not take two positional"),
    (lambda: UserMeasure(_mean, n_resamples=1), r"^UserMeasure\.n_resamples=1 is invalid; allowed: an integer"),
    (lambda: UserMeasure(_mean, columns=[]), r"^UserMeasure\.columns=\[\] is invalid"),
    (lambda: UserMeasure("no_such_module_xyz:fn"), r"^UserMeasure\.function='no_such_module_xyz:fn' is invalid"),
    (lambda: _summ({"bias": _mean}), r"^measures\['bias'\] has the name of a built-in measure"),
    (lambda: _summ({"my measure": _mean}), r"^measures\['my measure'\] has an invalid name"),
    (lambda: _summ({"m": {"function": _mean, "mcse": "jackknife", "level": 1}}), r"^measures\['m'\]\.level is an "
                                                                                r"unknown key; allowed: function"),
    (lambda: _summ({"m": UserMeasure(_mean, columns=("nope",))}), r"^measures\['m'\]\.columns names 'nope', not a "
                                                                  r"numeric column"),
    (lambda: _summ({"m": lambda x, t: x[:2]}), r"^measures\['m'\] on condition 0, method 'A', column 'estimate' "
                                               r"returned a value of shape \(2,\); allowed: one number"),
    (lambda: _summ({"m": lambda x, t: 1 / 0}), r"^measures\['m'\] on condition 0, method 'A', column 'estimate' "
                                               r"raised ZeroDivisionError: division by zero"),
    (lambda: Study_with({"m": 5}), r"^measures\['m'\]=5 is invalid; allowed: a UserMeasure"),
]


def Study_with(measures):
    return simstudy.Study(design={"n": [5]}, generate=lambda c, rng: rng.normal(size=c["n"]),
                          analyse={"mean": lambda x, c: {"estimate": float(x.mean())}}, replicates=3, seed=1,
                          measures=measures)


@pytest.mark.parametrize("make, match", BAD)
def test_bad_specs_give_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


# -- Study(measures=) and the study file ----------------------------------------------------------------------
def _gen(cond, rng):
    return rng.normal(cond["mu"], 1.0, cond["n"])


def _analyse(x, cond):
    return {"estimate": float(x.mean())}


def _truth(cond):
    return {"estimate": float(cond["mu"])}


def test_study_measures_reach_the_summary():
    study = simstudy.Study(design={"n": [10], "mu": [0.5]}, generate=_gen, analyse={"mean": _analyse}, truth=_truth,
                           replicates=30, seed=2, measures={"med": UserMeasure(lambda x, th: float(np.median(x)) - th,
                                                                               mcse="bootstrap", needs_truth=True)})
    res = study.run()
    s = res.summary().set_index(["estimand", "measure"])
    assert s.loc[("estimate", "med"), "value"] == pytest.approx(s.loc[("estimate", "median_bias"), "value"])
    assert s.loc[("estimate", "med"), "n_used"] == 30
    again = res.summary(measures={"jk": _mean}).set_index(["estimand", "measure"])  # added to the study's own
    assert {("estimate", "med"), ("estimate", "jk")} <= set(again.index)


MOD = textwrap.dedent("""
    import numpy as np

    def gen(cond, rng):
        return rng.normal(cond["mu"], 1.0, cond["n"])

    def mean(x, cond):
        return {"estimate": float(x.mean())}

    def truth(cond):
        return {"estimate": float(cond["mu"])}

    def sq_bias(values, truth):
        return float((values.mean() - truth) ** 2)

    def sq_bias_se(values, truth):
        return float(2 * abs(values.mean() - truth) * values.std(ddof=1) / np.sqrt(values.size))
""")


def _file(tmp_path, monkeypatch, measures: str) -> str:
    (tmp_path / "um_helpers.py").write_text(MOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return textwrap.dedent("""
        [study]
        kind = "generic"
        name = "um"
        replicates = 20
        seed = 3
        [design]
        n = [8]
        mu = [1.0]
        [generate]
        function = "um_helpers:gen"
        [truth]
        function = "um_helpers:truth"
        [methods.mean]
        function = "um_helpers:mean"
    """) + textwrap.dedent(measures)


def test_study_file_measures_are_stored_and_re_summarise_a_store(tmp_path, monkeypatch):
    text = _file(tmp_path, monkeypatch, """
        [summary.measures.sqbias]
        function = "um_helpers:sq_bias"
        mcse = "um_helpers:sq_bias_se"
        needs_truth = true
        [summary.measures.jk]
        function = "um_helpers:sq_bias"
        columns = ["estimate"]
    """)
    path = tmp_path / "um.toml"
    path.write_text(text)
    sf, study, _ = load_study_file(path)
    assert sf.options()["measures"]["sqbias"] == {"function": "um_helpers:sq_bias", "mcse": "um_helpers:sq_bias_se",
                                                  "needs_truth": True}
    res = study.run(store=tmp_path / "store")
    back = StudyResult.load(tmp_path / "store")  # a store read back: the measures come from its manifest
    for r in (res, back):
        s = r.summary().set_index(["estimand", "measure"])
        bias = s.loc[("estimate", "bias"), "value"]
        assert s.loc[("estimate", "sqbias"), "value"] == pytest.approx(bias**2)
        assert math.isfinite(s.loc[("estimate", "jk"), "mcse"])


@pytest.mark.parametrize("measures, match", [
    ('[summary.measures.m]\nfunction = "um_helpers:sq_bias"\nmcse = "bootstrapp"\n',
     r"^summary\.measures\.m\.mcse='bootstrapp' is invalid; allowed: 'jackknife', 'bootstrap'"),
    ('[summary.measures.m]\nfunction = "um_helpers:sq_bias"\nlevel = 0.9\n',
     r"^summary\.measures\.m\.level is an unknown key; allowed: function, mcse"),
    ('[summary.measures.m]\nmcse = "jackknife"\n', r"^summary\.measures\.m\.function is missing"),
    ('[summary.measures.coverage]\nfunction = "um_helpers:sq_bias"\n',
     r"^summary\.measures\.coverage has the name of a built-in measure"),
    ('[summary]\nmeasures = 3\n', r"^summary\.measures=3 has the wrong type; allowed: a table"),
    ('[summary.measures]\nm = "um_helpers:sq_bias"\n', r"^summary\.measures\.m='um_helpers:sq_bias' has the wrong "
                                                       r"type; allowed: a table"),
    ('[summary.measures.m]\nfunction = "um_helpers:nope"\n', r"^summary\.measures\.m\.function='um_helpers:nope' is "
                                                             r"invalid: 'um_helpers' has no attribute"),
])
def test_bad_study_file_measures_give_one_line_spec_errors(tmp_path, monkeypatch, measures, match):
    with pytest.raises(SpecError, match=match) as info:
        parse_study_text(_file(tmp_path, monkeypatch, measures))
    assert "\n" not in str(info.value)


def test_summarize_measures_option_adds_a_measure_to_a_finished_store_without_recomputing(tmp_path, monkeypatch):
    from simstudy.cli import main

    (tmp_path / "own_measures.py").write_text("import numpy as np\n"
                                              "def p90(values, truth):\n    return float(np.quantile(values, 0.9))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = tmp_path / "store"
    assert main(["run", "demo", "--out", str(store), "--replicates", "12", "--no-progress"]) == 0
    before = (store / "replicates.parquet").read_bytes()
    assert main(["summarize", str(store), "--measures", "p90=own_measures:p90@jackknife"]) == 0
    import pandas as pd

    summary = pd.read_csv(store / "summary.csv")
    assert "p90" in set(summary["measure"]) and summary.loc[summary["measure"] == "p90", "mcse"].notna().all()
    assert (store / "replicates.parquet").read_bytes() == before
    assert main(["summarize", str(store), "--measures", "p90"]) == 2
