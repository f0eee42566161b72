"""Failures inside replicates (issue 12, DESIGN §7): recorded, counted, never re-drawn, never stopping the study.

Non-finite returns, values missing in some replicates, a replicate past its time limit, and warnings (counted per row, or promoted to failures).
"""
import math
import threading
import time
import warnings

import numpy as np
import pytest

from simstudy.engine import Study
from simstudy.engine.worker import run_batch

SEED = 20240612


def gen(cond, rng):
    return rng.normal(size=cond["n"])


def mean_method(x, cond):
    return {"estimate": float(x.mean())}


# -- 1. inf and -inf ------------------------------------------------------------------------------------------
def sometimes_inf(x, cond):
    if x[0] > 1.0:
        return {"estimate": float(x.mean()), "kl": math.inf}
    if x[0] < -1.0:
        return {"estimate": -math.inf, "kl": 0.5}
    return {"estimate": float(x.mean()), "kl": 0.5}


def test_inf_and_minus_inf_are_recorded_as_nonfinite_failures_with_their_values_kept():
    study = Study({"n": [5]}, gen, {"m": sometimes_inf}, truth=lambda c: {"estimate": 0.0}, replicates=40, seed=SEED)
    res = study.run()
    first = np.array([study.rng(0, r).normal(size=5)[0] for r in range(40)])
    t = res.table
    expect_pos, expect_neg = first > 1.0, first < -1.0
    assert expect_pos.any() and expect_neg.any()
    status = t["status"].to_numpy()
    assert (status[expect_pos | expect_neg] == "nonfinite").all()
    assert (status[~(expect_pos | expect_neg)] == "ok").all()
    assert set(t.loc[expect_pos, "message"]) == {"non-finite: kl=inf"}
    assert set(t.loc[expect_neg, "message"]) == {"non-finite: estimate=-inf"}
    assert np.isinf(t.loc[expect_pos, "kl"]).all()  # the value is kept in the table (reported, not dropped)
    s = res.summary().set_index(["estimand", "measure"])
    n_bad = int((expect_pos | expect_neg).sum())
    assert s.loc[("kl", "mean"), "value"] == 0.5 and s.loc[("kl", "mean"), "failures"] == n_bad
    assert math.isfinite(s.loc[("estimate", "bias"), "value"]) and s.loc[("estimate", "bias"), "n_used"] == 40 - n_bad
    assert len(res.failures()) == n_bad


# -- 2. a key missing in some replicates ----------------------------------------------------------------------
def sometimes_lacks(x, cond):
    out = {"estimate": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(len(x)))}
    if x[0] > 0.5:
        del out["se"]
        out["extra"] = 1.0
    if x[0] < -0.8:
        del out["estimate"]
    return out


def test_a_value_missing_in_some_ok_rows_is_counted_in_summary_column_missing():
    study = Study({"n": [5]}, gen, {"m": sometimes_lacks, "full": mean_method}, truth=lambda c: {"estimate": 0.0},
                  replicates=30, seed=SEED)
    res = study.run()
    first = np.array([study.rng(0, r).normal(size=5)[0] for r in range(30)])
    lacks_se, lacks_est, has_extra = int((first > 0.5).sum()), int((first < -0.8).sum()), int((first > 0.5).sum())
    assert lacks_se and lacks_est
    s = res.summary()
    assert list(s.columns)[-3:] == ["n_used", "failures", "missing"]
    get = s.set_index(["method", "estimand", "measure"])
    assert get.loc[("m", "estimate", "bias"), "missing"] == lacks_est
    assert get.loc[("m", "estimate", "bias"), "n_used"] == 30 - lacks_est
    assert get.loc[("m", "estimate", "modse"), "missing"] == lacks_se + lacks_est
    assert get.loc[("m", "extra", "mean"), "missing"] == 30 - has_extra
    assert get.loc[("full", "estimate", "bias"), "missing"] == 0
    assert (get["n_used"] + get["missing"] == 30).all()  # every ok row is either used or counted
    assert "missing" in s.attrs["note"]


def test_summary_has_no_missing_column_when_nothing_is_missing():
    res = Study({"n": [5]}, gen, {"full": mean_method}, truth=lambda c: 0.0, replicates=5, seed=SEED).run()
    assert "missing" not in res.summary().columns


# -- 4. per-replicate time limit ------------------------------------------------------------------------------
def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0.005)


def slow_when_positive(x, cond):
    if x[0] > 0:
        busy(20.0)
    return {"estimate": float(x.mean())}


def _timeout_study(**kw):
    return Study({"n": [4]}, gen, {"slow": slow_when_positive, "after": mean_method}, truth=lambda c: 0.0,
                 replicates=6, seed=SEED, timeout=0.3, **kw)


def _check_timeouts(table, study):
    first = np.array([study.rng(0, r).normal(size=4)[0] for r in range(6)])
    assert (first > 0).any() and (first <= 0).any()
    slow = table[table["method"] == "slow"].reset_index(drop=True)
    after = table[table["method"] == "after"].reset_index(drop=True)
    assert list(slow["status"]) == ["timeout" if f > 0 else "ok" for f in first]
    assert list(after["status"]) == ["timeout" if f > 0 else "ok" for f in first]
    assert set(slow.loc[first > 0, "message"]) == {"exceeded the time limit of the replicate (timeout=0.3 s)"}
    assert set(after.loc[first > 0, "message"]) == {"not run: exceeded the time limit of the replicate "
                                                    "(timeout=0.3 s)"}


def test_timeout_records_the_replicate_and_the_study_goes_on_in_process():
    study = _timeout_study()
    t0 = time.perf_counter()
    res = study.run()
    assert time.perf_counter() - t0 < 10
    _check_timeouts(res.table, study)


def test_timeout_in_a_worker_thread_and_in_loky_workers_gives_the_same_rows():
    study = _timeout_study()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("rows", run_batch(study._payload(), [(0, 1, (0, 1))])))
    thread.start()
    thread.join(15)
    assert not thread.is_alive()
    in_process = study.run_replicate(0, 1)
    rows = box["rows"]
    assert [r["status"] for r in rows] == list(in_process["status"])
    res = study.run(n_jobs=2)
    _check_timeouts(res.table, study)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "5", True])
def test_invalid_timeout_is_one_line_error(bad):
    with pytest.raises(ValueError, match="timeout="):
        Study({"n": [4]}, gen, mean_method, timeout=bad)


# -- 5. warnings ----------------------------------------------------------------------------------------------
def warn_gen(cond, rng):
    x = rng.normal(size=cond["n"])
    if x[1] > 1.0:
        warnings.warn("unusual draw", UserWarning)
    return x


def warny(x, cond):
    if x[0] > 0:
        warnings.warn("small sample", UserWarning)
        warnings.warn("second", UserWarning)
    est = float(np.log(x[2]))  # RuntimeWarning (invalid value) and nan when x[2] < 0
    return {"estimate": float(x.mean()), "logx": est if math.isfinite(est) else 0.0}


def _expected_warnings(study, reps):
    out = []
    for r in range(reps):
        x = study.rng(0, r).normal(size=4)
        msgs = (["UserWarning: unusual draw"] if x[1] > 1.0 else [])
        msgs += (["UserWarning: small sample", "UserWarning: second"] if x[0] > 0 else [])
        msgs += (["RuntimeWarning: invalid value encountered in log"] if x[2] < 0 else [])
        out.append(msgs)
    return out


def test_warnings_are_counted_per_row_with_the_first_message_identically_across_workers():
    study = Study({"n": [4]}, warn_gen, {"w": warny}, truth=lambda c: 0.0, replicates=16, seed=SEED)
    res = study.run()
    expected = _expected_warnings(study, 16)
    assert any(expected) and not all(expected) and any(e and e[0].startswith("UserWarning: unusual") for e in expected)
    t = res.table
    assert list(t.columns[:8]) == ["condition", "n", "replicate", "method", "status", "message", "warnings",
                                   "warning_message"]
    assert list(t["warnings"]) == [len(e) for e in expected]
    assert list(t["warning_message"]) == [e[0] if e else "" for e in expected]
    assert (t["status"] == "ok").all()
    assert "warnings" not in set(res.summary()["estimand"])  # the count is not a metric
    assert res.table.equals(study.run(n_jobs=2).table)


def test_promoted_warnings_are_failures_by_class_or_name():
    expected = None
    for promote in ((RuntimeWarning,), "RuntimeWarning", ["builtins.RuntimeWarning"]):
        study = Study({"n": [4]}, warn_gen, {"w": warny}, truth=lambda c: 0.0, replicates=16, seed=SEED,
                      promote_warnings=promote)
        expected = expected or _expected_warnings(study, 16)
        t = study.run().table
        bad = [any(m.startswith("RuntimeWarning") for m in e) for e in expected]
        assert list(t["status"]) == ["warning" if b else "ok" for b in bad]
        assert all(m.startswith("RuntimeWarning: invalid value encountered in log") for m in t.loc[bad, "message"])
    plain = Study({"n": [4]}, warn_gen, {"w": warny}, replicates=16, seed=SEED)
    assert plain.config_hash != study.config_hash  # what counts as a failure is part of the study


def promoted_in_generate(cond, rng):
    warnings.warn("bad data", RuntimeWarning)
    return rng.normal(size=3)


def test_a_promoted_warning_in_generate_fails_every_method_and_bad_names_are_refused():
    study = Study({"n": [3]}, promoted_in_generate, {"a": mean_method, "b": mean_method}, replicates=2, seed=1,
                  promote_warnings=[RuntimeWarning])
    t = study.run().table
    assert set(t["status"]) == {"warning"} and all(m.startswith("generate: RuntimeWarning: bad data")
                                                   for m in t["message"])
    counted = Study({"n": [3]}, promoted_in_generate, {"a": mean_method, "b": mean_method}, replicates=2,
                    seed=1).run().table
    assert list(counted["warnings"]) == [1, 1, 1, 1] and set(counted["status"]) == {"ok"}
    for bad in ("NoSuchWarning", "os.path", ValueError, 3):
        with pytest.raises(ValueError, match="promote_warnings"):
            Study({"n": [3]}, gen, mean_method, promote_warnings=[bad])


def returns_reserved(x, cond):
    return {"warnings": 1.0}


def test_a_method_may_not_return_the_engine_warning_columns():
    t = Study({"n": [3]}, gen, {"r": returns_reserved}, replicates=1, seed=1).run().table
    assert t["status"].iloc[0] == "error" and "warnings" in t["message"].iloc[0]


# -- the terminal's failure lines ------------------------------------------------------------------------------
def test_format_failures_counts_by_method_and_status_and_lists_the_commonest_messages():
    from simstudy.engine.report import format_failures

    def flaky(x, cond):
        if x[0] > 0.5:
            raise KeyError("no estimate")
        return {"estimate": float(x.mean())}

    study = Study({"n": [5]}, gen, {"m": mean_method, "flaky": flaky}, truth=lambda c: {"estimate": 0.0},
                  replicates=30, seed=SEED)
    res = study.run()
    n_bad = sum(study.rng(0, r).normal(size=5)[0] > 0.5 for r in range(30))
    assert 0 < n_bad < 30
    lines = format_failures(res)
    assert lines[0] == f"failed rows: flaky error {n_bad}"
    assert lines[1].startswith(f"  {n_bad} x flaky: KeyError: 'no estimate'")
    ok = Study({"n": [5]}, gen, {"m": mean_method}, replicates=3, seed=SEED).run()
    assert format_failures(ok) == []
