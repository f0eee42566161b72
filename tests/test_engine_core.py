"""The generic study engine through its Python API (DESIGN §7; issue 3)."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import simstudy
from simstudy.engine import Diverged, FitFailure, Study, StudyResult, StoreMismatchError
from simstudy.engine.storage import Store


# -- the issue's snippet, exactly as written ------------------------------------------------------------------
def generate(cond, rng):
    return rng.binomial(1, cond["p"], cond["n"])


def wald(data, cond):
    p = data.mean(); se = np.sqrt(p * (1 - p) / len(data)); z = stats.norm.ppf(0.975)
    return {"estimate": p, "se": se, "ci_low": p - z * se, "ci_high": p + z * se}


def test_issue_snippet_runs_as_written_and_is_bitwise_equal_for_n_jobs_1_and_2():
    study = simstudy.Study(
        design={"n": [20, 50], "p": [0.1, 0.5]},   # full factorial grid of conditions
        generate=generate,
        analyse={"wald": wald},                   # one or more methods, same data per replicate
        truth=lambda cond: {"estimate": cond["p"]},
        replicates=1000, seed=1)
    res = study.run(n_jobs=2)
    assert list(res.table.columns) == ["condition", "n", "p", "replicate", "method", "status", "message",
                                       "estimate", "se", "ci_low", "ci_high"]
    assert len(res.table) == 4 * 1000 and (res.table["status"] == "ok").all()
    summ = res.summary()
    assert list(summ.columns) == ["condition", "n", "p", "method", "estimand", "measure", "value", "mcse",
                                  "n_used", "failures"]
    assert set(summ["measure"]) == {"mean", "bias", "relbias", "median_bias", "empse", "mse", "rmse", "mae",
                                    "coverage", "be_coverage", "miss_below", "miss_above", "ci_width", "modse",
                                    "relerr_modse"}
    # Wald at n=50, p=0.5 is close to nominal; at n=20, p=0.1 it under-covers (a classic result)
    cov = summ[summ["measure"] == "coverage"].set_index(["n", "p"])
    good = cov.loc[(50, 0.5)]
    assert abs(good["value"] - 0.95) < 4 * good["mcse"] + 0.02
    assert cov.loc[(20, 0.1), "value"] < 0.93
    seq = study.run(n_jobs=1)
    pd.testing.assert_frame_equal(seq.table, res.table, check_exact=True)
    assert seq.table.equals(res.table)


# -- bitwise equality with BLAS, torch and per-method streams -----------------------------------------------
def ls_generate(cond, rng):
    X = rng.standard_normal((cond["n"], 30))
    y = X @ np.linspace(-1, 1, 30) + rng.standard_normal(cond["n"])
    return X, y


def ls_fit(data, cond):
    X, y = data
    beta = np.linalg.solve(X.T @ X, X.T @ y)   # BLAS: reduction order depends on threads unless pinned
    return {"b0": beta[0], "rss": float(np.sum((y - X @ beta) ** 2))}


def ls_sketch(data, cond, rng):
    X, y = data
    rows = rng.choice(len(y), size=len(y) // 2, replace=False)
    beta = np.linalg.lstsq(X[rows], y[rows], rcond=None)[0]
    return {"b0": beta[0]}


def torch_fit(data, cond):
    import torch

    X, y = (torch.as_tensor(a) for a in data)
    w = 0.01 * torch.randn(X.shape[1], dtype=torch.float64)   # torch's global generator, seeded by the engine
    for _ in range(20):
        w = w - 0.1 * X.T @ (X @ w - y) / len(y)
    return {"b0": w[0], "noise": float(torch.rand(()))}


def ls_study(methods, replicates=12):
    return Study(design={"n": [60, 120]}, generate=ls_generate, analyse=methods, replicates=replicates, seed=7)


def test_bitwise_equal_tables_with_blas_and_method_rng_across_workers_and_store(tmp_path):
    study = ls_study({"ols": ls_fit, "sketch": ls_sketch}, replicates=30)
    a = study.run(n_jobs=1)
    b = study.run(n_jobs=2, batch_size=3)
    c = study.run(n_jobs=2, store=tmp_path / "s")
    d = StudyResult.load(tmp_path / "s")
    for other in (b, c, d):
        pd.testing.assert_frame_equal(a.table, other.table, check_exact=True)
    # a method's own stream does not depend on which other methods run (resume re-runs single methods)
    alone = Study(design={"n": [60, 120]}, generate=ls_generate, analyse={"ols": ls_fit, "sketch": ls_sketch},
                  replicates=30, seed=7).run_replicate(1, 4, methods=["sketch"])
    row = a.table[(a.table.condition == 1) & (a.table.replicate == 4) & (a.table.method == "sketch")]
    assert alone["b0"].iloc[0] == row["b0"].iloc[0]


def test_torch_is_seeded_per_replicate_and_method_identically_across_workers():
    study = ls_study({"gd": torch_fit}, replicates=6)
    a = study.run(n_jobs=1)
    b = study.run(n_jobs=2)
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    assert a.table["noise"].nunique() == len(a.table)    # a fresh stream per (condition, replicate)
    again = study.run_replicate(1, 3)
    assert again["noise"].iloc[0] == a.table.query("condition == 1 and replicate == 3")["noise"].iloc[0]


# -- failures ---------------------------------------------------------------------------------------------------
class Budget(Exception):
    status = "budget"   # any exception with a `status` attribute is recorded with that status


def flaky_generate(cond, rng):
    return {"u": rng.random(), "x": rng.standard_normal(cond["n"])}


def flaky(data, cond):
    u = data["u"]
    if u < 0.03:
        raise RuntimeError("injected")
    if u < 0.06:
        return {"estimate": float("nan"), "se": 1.0}
    if u < 0.08:
        raise Diverged("loss exploded")
    if u < 0.09:
        raise FitFailure("no root", status="no-root")
    if u < 0.10:
        raise Budget("out of steps")
    return {"estimate": float(data["x"].mean()), "se": 1 / math.sqrt(cond["n"])}


def steady(data, cond):
    return {"estimate": float(np.median(data["x"]))}


def test_injected_failures_are_recorded_and_counted_exactly():
    R, seed = 400, 11
    study = Study(design={"n": [5, 9]}, generate=flaky_generate, analyse={"flaky": flaky, "steady": steady},
                  truth=lambda c: {"estimate": 0.0}, replicates=R, seed=seed)
    res = study.run(n_jobs=2)
    # independent re-derivation of each replicate's first uniform draw
    expected = {"error": 0, "nan": 0, "diverged": 0, "no-root": 0, "budget": 0}
    for c in range(2):
        for r in range(R):
            u = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(c, r))).random()
            key = ("error" if u < 0.03 else "nan" if u < 0.06 else "diverged" if u < 0.08 else "no-root"
                   if u < 0.09 else "budget" if u < 0.10 else None)
            if key:
                expected[key] += 1
    got = res.table[res.table.method == "flaky"]["status"].value_counts().to_dict()
    assert {k: got.get(k, 0) for k in expected} == expected
    assert got["ok"] == 2 * R - sum(expected.values())
    assert 40 < sum(expected.values()) < 120   # about 10% injected
    assert (res.table[res.table.method == "steady"]["status"] == "ok").all()
    summ = res.summary()
    bias = summ[(summ.measure == "bias")].set_index(["n", "method"])
    for c, n in enumerate([5, 9]):
        n_fail = int((res.table.query("condition == @c and method == 'flaky'")["status"] != "ok").sum())
        assert bias.loc[(n, "flaky"), "failures"] == n_fail
        assert bias.loc[(n, "flaky"), "n_used"] == R - n_fail
        assert bias.loc[(n, "steady"), "failures"] == 0
    fails = res.failures()
    assert len(fails) == sum(expected.values())
    msg = fails.set_index("status")["message"]
    assert msg["error"].iloc[0].startswith("RuntimeError: injected (at test_engine_core.py:")
    assert msg["nan"].iloc[0] == "NaN in: estimate"
    assert msg["diverged"].iloc[0].startswith("Diverged: loss exploded")
    # the recorded seed information reproduces the failing replicate
    row = fails.iloc[0]
    rerun = study.run_replicate(int(row["condition"]), int(row["replicate"]), methods=["flaky"])
    assert rerun["status"].iloc[0] == row["status"] and row["spawn_key"] == f"({row['condition']}, {row['replicate']})"


def bad_generate(cond, rng):
    if rng.random() < 0.2:
        raise ValueError("cannot draw")
    return rng.standard_normal(4)


def test_generate_failure_is_recorded_for_every_method_and_bad_returns_are_errors():
    study = Study(design={"n": [4]}, generate=bad_generate,
                  analyse={"a": lambda d, c: {"m": d.mean()}, "b": lambda d, c: {"status": 1.0},
                           "c": lambda d, c: {"m": [1, 2]}, "d": lambda d, c: d.mean()},
                  replicates=50, seed=2)
    t = study.run().table
    gen_fail = t[t.message.str.startswith("generate: ValueError: cannot draw")]
    assert len(gen_fail) == 4 * gen_fail.replicate.nunique() and 0 < gen_fail.replicate.nunique() < 50
    ok_reps = set(range(50)) - set(gen_fail.replicate)
    a = t[(t.method == "a") & t.replicate.isin(ok_reps)]
    assert (a.status == "ok").all()
    assert (t[(t.method == "b") & t.replicate.isin(ok_reps)].status == "error").all()   # reserved key
    c = t[(t.method == "c") & t.replicate.isin(ok_reps)]
    assert (c.status == "error").all() and c.message.str.contains("unsupported").all()
    d = t[(t.method == "d") & t.replicate.isin(ok_reps)]
    assert (d.status == "ok").all() and d["value"].notna().all()   # a bare scalar becomes column "value"


# -- a classic study: the t interval ---------------------------------------------------------------------------
def normal_data(cond, rng):
    return rng.normal(cond["mu"], 2.0, cond["n"])


def t_interval(data, cond):
    n = len(data); m = data.mean(); se = data.std(ddof=1) / np.sqrt(n); q = stats.t.ppf(0.975, n - 1)
    return {"estimate": m, "se": se, "ci_low": m - q * se, "ci_high": m + q * se}


def z_interval_with_sample_sd(data, cond):
    n = len(data); m = data.mean(); se = data.std(ddof=1) / np.sqrt(n); q = stats.norm.ppf(0.975)
    return {"estimate": m, "se": se, "ci_low": m - q * se, "ci_high": m + q * se}


def test_t_interval_covers_at_95_percent_within_3_mcse_and_z_interval_does_not_at_small_n():
    res = Study(design=[{"n": 5, "mu": 1.5}, {"n": 30, "mu": 1.5}], generate=normal_data,
                analyse={"t": t_interval, "z": z_interval_with_sample_sd}, truth=lambda c: {"estimate": c["mu"]},
                replicates=2500, seed=2024).run(n_jobs=2)
    s = res.summary(reference="t").set_index(["n", "method", "measure"])
    for n in (5, 30):
        cov = s.loc[(n, "t", "coverage")]
        assert abs(cov["value"] - 0.95) <= 3 * cov["mcse"], (n, cov["value"], cov["mcse"])
        bias = s.loc[(n, "t", "bias")]
        assert abs(bias["value"]) <= 3 * bias["mcse"]
        # same estimator: relative efficiency exactly 1
        assert s.loc[(n, "z", "rel_efficiency"), "value"] == 1.0
    z5 = s.loc[(5, "z", "coverage")]
    assert z5["value"] < 0.95 - 5 * z5["mcse"]   # z quantile with estimated sd under-covers at n = 5 (~0.88)
    # empirical SE of the mean is sigma / sqrt(n) = 2 / sqrt(n) within 3 MCSE
    for n in (5, 30):
        e = s.loc[(n, "t", "empse")]
        assert abs(e["value"] - 2 / math.sqrt(n)) <= 3 * e["mcse"]


# -- rates --------------------------------------------------------------------------------------------------------
def sq_error_of_mean(data, cond):
    return {"sq": float(np.mean(data) - cond["mu"]) ** 2}


def test_rate_recovers_slope_minus_one_and_constant_sigma2_and_matches_hand_wls():
    ns = [10, 40, 160, 640]
    res = Study(design={"n": ns, "mu": [0.0]}, generate=normal_data, analyse={"mean": sq_error_of_mean},
                replicates=400, seed=5).run()
    rate = res.rate("sq", x="n", theory_slope=-1.0, theory_constant=4.0)
    fit = rate.fits.iloc[0]
    assert list(rate.by) == ["method"]
    assert fit["slope_low"] <= -1.0 <= fit["slope_high"] and fit["slope_ok"]
    # hand WLS: log mean on log n with weights (mean / mcse)^2
    g = res.table.groupby("n")["sq"]
    m, s = g.mean().to_numpy(), (g.std() / np.sqrt(g.count())).to_numpy()
    w = (m / s) ** 2
    X = np.column_stack([np.ones(4), np.log(ns)])
    beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * np.log(m)))
    se_slope = math.sqrt(np.linalg.inv(X.T @ (w[:, None] * X))[1, 1])
    assert fit["slope"] == pytest.approx(beta[1], rel=1e-10)
    assert fit["slope_se"] == pytest.approx(se_slope, rel=1e-8)
    assert fit["slope_high"] - fit["slope"] == pytest.approx(1.959963985 * se_slope, rel=1e-6)
    # the constant n E[sq] estimates sigma^2 = 4 at every n, within 3 MCSE
    pts = rate.points
    assert np.allclose(pts["constant"], pts["n"] * pts["mean"])
    assert (pts["constant_z"].abs() <= 3).all(), pts
    assert pts["constant_ok"].dtype == bool
    # grouping: a second varying factor must be named or is added by default
    res2 = Study(design={"n": [10, 40], "mu": [0.0, 1.0]}, generate=normal_data, analyse={"mean": sq_error_of_mean},
                 replicates=50, seed=5).run()
    assert list(res2.rate("sq").by) == ["method", "mu"]
    with pytest.raises(ValueError, match="vary and would be pooled"):
        res2.rate("sq", by=["method"])
    with pytest.raises(ValueError, match="metric='nope' is invalid"):
        res2.rate("nope")
    assert "theory slope" in rate.summary()


def test_rate_of_mse_of_an_estimand():
    res = Study(design={"n": [10, 40, 160], "mu": [0.0]}, generate=normal_data, analyse={"t": t_interval},
                truth=lambda c: {"estimate": c["mu"]}, replicates=300, seed=8).run()
    rate = res.rate("mse:estimate", theory_slope=-1)
    assert rate.fits.iloc[0]["slope_ok"]
    assert rate.points["constant"].between(2.5, 5.5).all()   # n MSE = sigma^2 = 4


# -- design, storage and validation ----------------------------------------------------------------------------
def test_non_factorial_design_and_save_load_round_trip(tmp_path):
    design = [{"n": 5, "mu": 0.0}, {"n": 8, "mu": 1.0}, {"n": 5, "mu": 2.0, "tag": "x"}]
    study = Study(design=design, generate=normal_data, analyse={"t": t_interval},
                  truth=lambda c: {"estimate": c["mu"]}, replicates=20, seed=3, name="nf")
    res = study.run()
    assert res.conditions.shape == (3, 4) and res.table["tag"].isna().sum() == 40
    res.save(tmp_path / "saved")
    back = StudyResult.load(tmp_path / "saved")
    pd.testing.assert_frame_equal(res.table, back.table, check_exact=True)
    pd.testing.assert_frame_equal(res.summary(), back.summary(), check_exact=True)
    assert back.complete and back.name == "nf"
    # a saved directory can be resumed (nothing left to run) by the same study
    again = study.run(store=tmp_path / "saved")
    pd.testing.assert_frame_equal(res.table, again.table, check_exact=True)


def test_store_resume_refusal_and_lock(tmp_path):
    study = Study(design={"n": [5, 8]}, generate=lambda c, rng: rng.normal(0, 1, c["n"]), analyse={"t": t_interval},
                  replicates=25, seed=4)
    full = study.run(store=tmp_path / "a")
    # simulate an interrupted run: keep a third of the rows as a chunk, no consolidated table
    raw = pd.read_parquet(tmp_path / "a" / "replicates.parquet")
    (tmp_path / "a" / "replicates.parquet").unlink()
    raw.iloc[::3].to_parquet(tmp_path / "a" / "chunks" / "part-1-000001-aaaa.parquet")
    calls = []
    import simstudy.engine.backends as backends
    orig = backends.execute

    def counting(payload, items, **kw):
        calls.append(len(items))
        return orig(payload, items, **kw)

    backends.execute = counting
    try:
        resumed = study.run(store=tmp_path / "a")
    finally:
        backends.execute = orig
    assert calls == [len(raw) - len(raw.iloc[::3])]
    pd.testing.assert_frame_equal(full.table, resumed.table, check_exact=True)
    assert not any((tmp_path / "a" / "chunks").glob("part-*"))
    # a different study on the same directory is refused in one line
    other = Study(design={"n": [5, 8]}, generate=lambda c, rng: rng.normal(0, 1, c["n"]), analyse={"t": t_interval},
                  replicates=25, seed=5)
    with pytest.raises(StoreMismatchError) as err:
        other.run(store=tmp_path / "a")
    assert "holds a different study" in str(err.value) and "\n" not in str(err.value)
    # a second live writer is refused
    from simstudy.engine import StoreBusyError

    with Store(tmp_path / "a", study.manifest()):
        with pytest.raises(StoreBusyError, match="in use"):
            study.run(store=tmp_path / "a")


def _count_items(monkeypatch):
    import simstudy.engine.backends as backends
    calls = []
    orig = backends.execute

    def counting(payload, items, **kw):
        calls.append(sum(len(todo) for _, _, todo in items))
        return orig(payload, items, **kw)

    monkeypatch.setattr(backends, "execute", counting)
    return calls


def test_a_study_rerun_with_more_replicates_computes_only_the_new_ones(tmp_path, monkeypatch):
    def make(replicates, seed=4):
        return Study(design={"n": [5, 8]}, generate=lambda c, rng: rng.normal(0, 1, c["n"]),
                     analyse={"t": t_interval}, replicates=replicates, seed=seed)

    make(10).run(store=tmp_path / "r10")
    make(10, seed=5).run(store=tmp_path / "other-seed")      # a different study: never imported
    calls = _count_items(monkeypatch)
    grown = make(25).run(store=tmp_path / "r25")
    assert calls == [2 * 15]                                   # replicates 10-24 of both conditions only
    assert grown.manifest["imported"] == [{"store": str(tmp_path / "r10"), "replicates": 10, "rows": 20}]
    fresh = make(25).run()                                     # the same rows computed from scratch
    pd.testing.assert_frame_equal(grown.table, fresh.table, check_exact=True)
    # a smaller study takes its rows from the larger ones and computes nothing
    calls.clear()
    shrunk = make(4).run(store=tmp_path / "r4")
    assert calls == [] and len(shrunk.table) == 2 * 4
    assert [d["store"] for d in shrunk.manifest["imported"]] == [str(tmp_path / "r10")]  # first sibling wins
    pd.testing.assert_frame_equal(shrunk.table, make(4).run().table, check_exact=True)
    assert StudyResult.load(tmp_path / "r25").manifest["imported"][0]["rows"] == 20
    # in place: the directory of the 10-replicate study is extended to 25, not refused
    calls.clear()
    extended = make(25).run(store=tmp_path / "r10")
    assert calls == [2 * 15] and extended.complete and extended.manifest["extended_from"] == 10
    pd.testing.assert_frame_equal(extended.table, fresh.table, check_exact=True)
    assert StudyResult.load(tmp_path / "r10").manifest["replicates"] == 25
    with pytest.raises(StoreMismatchError, match="holds a different study"):   # shrinking in place is refused
        make(12).run(store=tmp_path / "r10")


def mutating(data, cond):
    data[:] = 0.0
    return {"s": float(data.sum())}


def reading(data, cond):
    return {"s": float(data.sum())}


def test_methods_see_the_same_data_even_if_one_mutates_it():
    t = Study(design={"n": [6]}, generate=lambda c, rng: rng.normal(size=c["n"]),
              analyse={"mut": mutating, "read": reading}, replicates=5, seed=1).run().table
    assert (t[t.method == "mut"]["s"] == 0).all() and (t[t.method == "read"]["s"] != 0).all()


_interrupts = {"left": 1}


def interrupting(data, cond):
    if cond["n"] == 8 and _interrupts["left"]:
        _interrupts["left"] -= 1
        raise KeyboardInterrupt
    return {"m": float(np.mean(data))}


def test_keyboard_interrupt_keeps_finished_rows_and_resume_completes(tmp_path):
    study = Study(design={"n": [5, 8]}, generate=lambda c, rng: rng.normal(size=c["n"]),
                  analyse={"m": interrupting}, replicates=10, seed=1, fingerprint="interrupt-test")
    with pytest.warns(RuntimeWarning, match="interrupted: 10 of 20 rows"):
        part = study.run(store=tmp_path / "s", flush_seconds=0)
    assert part.interrupted and not part.complete and len(part.table) == 10
    assert len(StudyResult.load(tmp_path / "s").table) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = study.run(store=tmp_path / "s")
    assert full.complete and not full.interrupted
    ref = Study(design={"n": [5, 8]}, generate=lambda c, rng: rng.normal(size=c["n"]),
                analyse={"m": interrupting}, replicates=10, seed=1).run()
    pd.testing.assert_frame_equal(full.table, ref.table, check_exact=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"design": {}}, "design={} is invalid"),
    ({"design": {"n": []}}, r"design\['n'\]=\[\] is invalid"),
    ({"design": {"method": [1]}}, "factor name 'method' is reserved"),
    ({"design": {"n": [[1, 2]]}}, "allowed: a bool, int, float, str or None"),
    ({"design": [{"n": 1}, {"n": 1}]}, "repeats design"),
    ({"replicates": 0}, "replicates=0 is invalid"),
    ({"seed": -1}, "seed=-1 is invalid"),
    ({"analyse": {}}, "analyse={} is invalid"),
    ({"analyse": [lambda d, c: 1]}, "analyse item"),
    ({"generate": 3}, "generate=3 is invalid"),
    ({"truth": 1}, "truth=1 is invalid"),
])
def test_study_arguments_are_validated(kwargs, match):
    base = dict(design={"n": [3]}, generate=lambda c, rng: rng.random(c["n"]), analyse={"m": reading},
                replicates=2, seed=0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Study(**base)


def test_run_arguments_are_validated():
    study = Study(design={"n": [3]}, generate=lambda c, rng: rng.random(c["n"]), analyse={"m": reading},
                  replicates=2, seed=0, truth=lambda c: {"m": "x"})
    with pytest.raises(ValueError, match="backend='spark' is invalid"):
        study.run(backend="spark")
    with pytest.raises(ValueError, match="n_jobs=0 is invalid"):
        study.run(n_jobs=0)
    with pytest.raises(ValueError, match="scheduler='tcp://x:1' is invalid with backend='loky'"):
        study.run(scheduler="tcp://x:1")
    with pytest.raises(ValueError, match=r"truth\(condition 0\)\['m'\]='x' is invalid"):
        study.run()


def test_loky_warning_about_an_idle_worker_that_timed_out_is_silenced_and_no_other():
    """loky warns from its management thread when an idle worker times out while another still runs a long
    replicate; nothing is lost, so a loky run installs a filter for exactly that message."""
    import simstudy.engine.backends as backends

    Study(design={"n": [3]}, generate=lambda c, rng: rng.normal(size=c["n"]), analyse={"t": t_interval},
          replicates=4, seed=1).run(n_jobs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("A worker stopped while some jobs were given to the executor. This can be caused by a too "
                      "short worker timeout or by a memory leak.", UserWarning)
        warnings.warn("another loky warning", UserWarning)
    assert [str(w.message) for w in caught] == ["another loky warning"]
    assert backends._LOKY_IDLE_WORKER.startswith("A worker stopped")


def _slow_generate(cond, rng):
    import time

    time.sleep(0.4)
    return float(rng.normal())


def test_generation_time_is_charged_once_per_task_so_row_seconds_sum_to_the_compute_time():
    methods = {name: (lambda data, cond: {"estimate": data}) for name in ("a", "b", "c")}
    res = Study(design={"n": [1]}, generate=_slow_generate, analyse=methods, replicates=2, seed=1).run(n_jobs=1)
    seconds = res.timings.pivot(index="replicate", columns="method", values="seconds")  # (replicates, methods)
    assert (seconds["a"] >= 0.4).all()  # the first row of a task carries the generation
    assert (seconds[["b", "c"]] < 0.2).all().all()  # the others only their own (instant) call
    assert 0.8 <= float(res.timings["seconds"].sum()) < 1.2  # about 2 x 0.4 s, not 6 x 0.4 s
