"""Kill-safety and resume of stored studies: kill -9 and Ctrl-C of real processes (DESIGN §7; issue 3)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simstudy.engine import StudyResult
from simstudy.engine.storage import KEY, read_rows

ROOT = Path(__file__).resolve().parents[1]

KILLMOD = '''
import os, time
import numpy as np


def generate(cond, rng):
    return rng.normal(size=cond["n"])


def slow_mean(data, cond):
    if os.environ.get("SIMSTUDY_TEST_SLOW"):
        time.sleep(float(os.environ["SIMSTUDY_TEST_SLOW"]))
    return {"estimate": float(data.mean()), "se": float(data.std(ddof=1) / np.sqrt(len(data)))}


def slow_median(data, cond):
    if os.environ.get("SIMSTUDY_TEST_SLOW"):
        time.sleep(float(os.environ["SIMSTUDY_TEST_SLOW"]))
    return {"estimate": float(np.median(data))}


def truth(cond):
    return {"estimate": 0.0}


def make_study():
    from simstudy.engine import Study
    return Study(design={"n": [5, 10, 20]}, generate=generate, analyse={"mean": slow_mean, "median": slow_median},
                 truth=truth, replicates=150, seed=99, name="kill")
'''

TOML = '''
[study]
name = "kill"
replicates = 150
seed = 99
[design]
n = [5, 10, 20]
[generate]
function = "killmod:generate"
[truth]
function = "killmod:truth"
[methods.mean]
function = "killmod:slow_mean"
[methods.median]
function = "killmod:slow_median"
'''


@pytest.fixture()
def killmod(tmp_path, monkeypatch):
    (tmp_path / "killmod.py").write_text(KILLMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("killmod", None)
    import killmod

    yield killmod
    sys.modules.pop("killmod", None)


def _env(tmp_path):
    # 0.02 s a method call: the slowed run lasts at least 900 x 0.02 / 2 = 9 s, so a kill or a Ctrl-C
    # sent within a second of the first chunk (written within flush_seconds = 2 s) lands mid-run
    env = dict(os.environ, SIMSTUDY_TEST_SLOW="0.02", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _wait_for_chunk(store: Path, proc, timeout=90.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any((store / "chunks").glob("part-*.parquet")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"study process ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no chunk written in time")


def _stored_keys(store: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(f) for f in sorted((store / "chunks").glob("part-*.parquet"))]
    return pd.concat(frames, ignore_index=True)[KEY] if frames else pd.DataFrame(columns=KEY)


def test_kill_9_at_a_random_point_then_resume_loses_and_duplicates_nothing(tmp_path, killmod):
    store = tmp_path / "store"
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import killmod; "
              f"killmod.make_study().run(n_jobs=2, store={str(store)!r}, flush_seconds=0.05, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_chunk(store, proc)
        time.sleep(np.random.default_rng(20240601).uniform(0.0, 1.0))   # a random point, from a fixed seed
        os.killpg(proc.pid, signal.SIGKILL)                              # the run and its workers, at once
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    expected = 3 * 150 * 2
    keys = _stored_keys(store)                                          # every chunk is readable: none is torn
    assert 0 < len(keys) < expected, len(keys)
    assert not keys.duplicated().any()
    assert not (store / "replicates.parquet").exists()
    partial = StudyResult.load(store)
    assert not partial.complete and len(partial.table) == len(keys)

    resumed = killmod.make_study().run(n_jobs=2, store=store)           # same study: resumes
    reference = killmod.make_study().run(n_jobs=1)                      # uninterrupted, no store
    assert resumed.complete and len(resumed.table) == expected
    pd.testing.assert_frame_equal(resumed.table, reference.table, check_exact=True)
    on_disk = pd.read_parquet(store / "replicates.parquet")
    assert len(on_disk) == expected and not on_disk[KEY].duplicated().any()
    assert not any((store / "chunks").glob("part-*.parquet"))
    assert len(read_rows(store)) == expected


def test_ctrl_c_of_the_cli_keeps_rows_then_the_same_command_resumes(tmp_path, killmod):
    (tmp_path / "kill.toml").write_text(TOML)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "simstudy.cli", "run", str(tmp_path / "kill.toml"), "--out", str(out),
           "--n-jobs", "2", "--no-progress"]
    # A terminal's foreground process has SIGINT at its default; a test run started in the background
    # (`cmd &` in a script, nohup) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: restore the default in the child so the test sees what a user's Ctrl-C does.
    proc = subprocess.Popen(cmd, env=_env(tmp_path), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_chunk(out, proc)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in a terminal does: the whole foreground group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted after" in lines[0] and "resume" in lines[0], stderr
    kept = StudyResult.load(out)
    assert 0 < len(kept.table) < 900
    fast = {k: v for k, v in _env(tmp_path).items() if k != "SIMSTUDY_TEST_SLOW"}
    done = subprocess.run(cmd, env=fast, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    final = StudyResult.load(out)
    reference = killmod.make_study().run()
    pd.testing.assert_frame_equal(final.table, reference.table, check_exact=True)
    for name in ("replicates.parquet", "summary.csv", "report.md"):
        assert (out / name).is_file()
