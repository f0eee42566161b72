"""A replicate that kills its worker, and workers that outlive their parent (issue 12, DESIGN §7).

A crash is a recorded failure (status ``crashed``) and the study finishes; SIGTERM or the death of the
parent leaves no worker computing, keeps the finished rows, and a re-run resumes.
"""
import contextlib
import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simstudy.engine import Study, StudyResult, backends

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240613


def gen(cond, rng):
    return rng.normal(size=cond["n"])


def mean_method(x, cond):
    return {"estimate": float(x.mean())}


def first_or_crash(x, cond, threshold=math.inf):
    if x[0] > threshold:
        os._exit(3)  # the worker dies, as of a segfault or the OOM killer
    return {"estimate": float(x[0])}


def _study(threshold=math.inf, methods=("mean", "crashy")):
    fns = {"mean": mean_method, "crashy": functools.partial(first_or_crash, threshold=threshold)}
    return Study({"n": [5, 10]}, gen, {m: fns[m] for m in methods}, truth=lambda c: {"estimate": 0.0},
                 replicates=12, seed=SEED, name="crash")


def _one_crash_threshold(study):
    """A threshold exceeded by the first value of exactly one replicate: (threshold, condition, replicate)."""
    first = np.array([[study.rng(c, r).normal(size=cond["n"])[0] for r in range(study.replicates)]
                      for c, cond in enumerate(study.conditions)])
    c, r = np.unravel_index(np.argmax(first), first.shape)
    top = np.sort(first.ravel())
    return float((top[-1] + top[-2]) / 2), int(c), int(r)


@pytest.fixture(scope="module")
def crashed_store(tmp_path_factory):
    threshold, c, r = _one_crash_threshold(_study())
    store = tmp_path_factory.mktemp("crash") / "store"
    res = _study(threshold).run(n_jobs=2, store=store, progress=False)
    return res, store, threshold, c, r


def test_a_replicate_that_kills_its_worker_is_recorded_crashed_and_the_study_finishes(crashed_store):
    res, _, _, c, r = crashed_store
    t = res.table
    assert res.complete and len(t) == 2 * 12 * 2
    bad = (t["condition"] == c) & (t["replicate"] == r) & (t["method"] == "crashy")
    assert t.loc[bad, "status"].tolist() == ["crashed"]
    assert "exit code 3" in t.loc[bad, "message"].item() and "worker" in t.loc[bad, "message"].item()
    assert (t.loc[~bad, "status"] == "ok").all()  # the other method of that replicate, and every collateral item
    reference = _study().run(n_jobs=1).table       # the same study without the crash, in one process
    pd.testing.assert_frame_equal(t[~bad], reference[~bad], check_exact=True)
    s = res.summary().set_index(["condition", "method", "measure"])
    assert s.loc[(c, "crashy", "bias"), "failures"] == 1 and s.loc[(c, "crashy", "bias"), "n_used"] == 11
    assert s.loc[(c, "mean", "bias"), "failures"] == 0
    assert len(res.failures()) == 1


def test_a_re_run_of_the_store_is_finished_and_computes_nothing(crashed_store, monkeypatch):
    res, store, threshold, _, _ = crashed_store

    def no_run(*args, **kwargs):
        raise AssertionError("a finished store was computed again")

    monkeypatch.setattr(backends, "execute", no_run)
    again = _study(threshold).run(n_jobs=2, store=store, progress=False)
    assert again.complete
    pd.testing.assert_frame_equal(again.table, res.table, check_exact=True)
    pd.testing.assert_frame_equal(StudyResult.load(store).table, res.table, check_exact=True)


def test_a_crash_in_generate_records_every_method_of_the_replicate_crashed():
    study = _study()
    first = np.array([study.rng(0, r).normal(size=5)[0] for r in range(12)])
    r = int(np.argmax(first))
    threshold = float(np.sort(first)[-2] + np.sort(first)[-1]) / 2

    def gen_or_crash(cond, rng):
        x = rng.normal(size=cond["n"])
        if cond["n"] == 5 and x[0] > threshold:
            os._exit(139)
        return x

    crashy = Study({"n": [5]}, gen_or_crash, {"mean": mean_method, "first": first_or_crash}, replicates=12, seed=SEED)
    t = crashy.run(n_jobs=2, progress=False).table
    bad = t["replicate"] == r
    assert t.loc[bad, "status"].tolist() == ["crashed", "crashed"]
    assert (t.loc[~bad, "status"] == "ok").all()
    assert t.loc[bad, "message"].str.contains("exit code 139").all()


def test_dask_killed_workers_are_recorded_crashed_and_the_study_finishes():
    pytest.importorskip("distributed")
    threshold, c, r = _one_crash_threshold(_study())
    res = _study(threshold, methods=("crashy",)).run(n_jobs=2, backend="dask", progress=False)
    t = res.table
    bad = (t["condition"] == c) & (t["replicate"] == r)
    assert res.complete and t.loc[bad, "status"].tolist() == ["crashed"]
    assert "KilledWorker" in t.loc[bad, "message"].item()
    assert (t.loc[~bad, "status"] == "ok").all()
    reference = _study(methods=("crashy",)).run(n_jobs=1).table
    pd.testing.assert_frame_equal(t[~bad], reference[~bad], check_exact=True)


# -- the parent dies or is terminated ---------------------------------------------------------------------------
SLEEPMOD = '''
import os, time


def generate(cond, rng):
    return rng.normal(size=5)


def sleepy(data, cond):
    if cond["k"] >= 4 and os.environ.get("SIMSTUDY_TEST_SLEEP"):
        time.sleep(120)   # a long fit: without the fix its worker goes on after the parent is gone
    return {"estimate": float(data.mean())}


def make_study():
    from simstudy.engine import Study
    return Study(design={"k": list(range(10))}, generate=generate, analyse={"sleepy": sleepy},
                 truth=lambda c: {"estimate": 0.0}, replicates=1, seed=5, name="sleep")
'''


def _children(pid):
    try:
        import psutil
    except ImportError:  # pragma: no cover - /proc on Linux
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
        return out
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead but not yet reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(tmp_path):
    (tmp_path / "sleepmod.py").write_text(SLEEPMOD)
    store = tmp_path / "store"
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import sleepmod; "
              f"sleepmod.make_study().run(n_jobs=2, store={str(store)!r}, flush_seconds=0, batch_size=1, "
              "progress=False)")
    env = dict(os.environ, SIMSTUDY_TEST_SLEEP="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:  # the four fast replicates are stored, two slow ones are running
        if proc.poll() is not None:
            raise AssertionError(f"study process ended early: {proc.communicate()}")
        if len(list((store / "chunks").glob("part-*.parquet"))) >= 4:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the fast replicates were not stored in time")
    time.sleep(0.5)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    return proc, store, workers


def _assert_gone(workers, within=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        alive = [p for p in workers if _alive(p)]
        if not alive:
            return
        time.sleep(0.1)
    for p in alive:  # clean up what this test started, then fail
        os.kill(p, signal.SIGKILL)
    raise AssertionError(f"worker processes {alive} outlived their parent")


def _resumes(tmp_path, store):
    sys.path.insert(0, str(tmp_path))
    try:
        import sleepmod

        kept = StudyResult.load(store)
        assert sorted(kept.table["condition"]) == [0, 1, 2, 3]   # the finished rows are kept
        resumed = sleepmod.make_study().run(n_jobs=2, store=store, progress=False)   # no sleep now
        reference = sleepmod.make_study().run(n_jobs=1)
        assert resumed.complete
        pd.testing.assert_frame_equal(resumed.table, reference.table, check_exact=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("sleepmod", None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_worker_outlives_its_terminated_or_killed_parent_and_the_store_resumes(tmp_path, sig):
    proc, store, workers = _start(tmp_path)
    try:
        os.kill(proc.pid, sig)               # the parent only, not its process group
        proc.wait(timeout=30)                # not communicate(): an orphaned worker keeps the pipes open
        assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        _assert_gone(workers)
    finally:  # whatever happened, nothing this test started is left running (its own session)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _resumes(tmp_path, store)


# -- the command line ----------------------------------------------------------------------------------------------
CRASHMOD = '''
import os


def generate(cond, rng):
    return rng.normal(size=cond["n"])


def first(x, cond):
    if x[0] > THRESHOLD:
        os._exit(3)
    return {"estimate": float(x[0])}


def truth(cond):
    return {"estimate": 0.0}
'''

CRASH_TOML = '''
[study]
kind = "generic"
name = "crash"
replicates = 12
seed = 20240613
[design]
n = [5, 10]
[generate]
function = "crashmod:generate"
[truth]
function = "crashmod:truth"
[methods.first]
function = "crashmod:first"
'''


def test_the_cli_records_a_crashing_replicate_prints_the_failure_count_and_exits_0(tmp_path):
    threshold, c, r = _one_crash_threshold(_study())
    (tmp_path / "crashmod.py").write_text(CRASHMOD + f"\nTHRESHOLD = {threshold!r}\n")
    (tmp_path / "crash.toml").write_text(CRASH_TOML)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "simstudy.cli", "run", str(tmp_path / "crash.toml"), "--out", str(out),
           "--n-jobs", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "TerminatedWorkerError" not in done.stderr
    assert "failures: 1" in done.stdout
    t = StudyResult.load(out).table
    assert t.loc[(t["condition"] == c) & (t["replicate"] == r), "status"].tolist() == ["crashed"]
    assert (t["status"] == "ok").sum() == len(t) - 1
