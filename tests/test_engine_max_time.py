"""A wall-time budget (issue 13): ``max_time`` / ``--max-time`` stops launching replicates, keeps what
finished, says so (exit status 75 on the command line), and a re-run continues to the table of one run."""
import sys
import time
import warnings

import pandas as pd
import pytest

from simstudy.cli import main
from simstudy.cli_run_control import EXIT_OUT_OF_TIME
from simstudy.engine import Study, StudyResult

SLOW = 0.02  # seconds of each replicate's generate


def _generate(cond, rng):
    time.sleep(SLOW)
    return rng.normal(size=cond["n"])


def _mean(data, cond):
    return {"estimate": float(data.mean()), "se": float(data.std(ddof=1) / len(data) ** 0.5)}


def _study(replicates: int = 60) -> Study:
    return Study(design={"n": [5, 20]}, generate=_generate, analyse={"mean": _mean}, truth=lambda c: 0.0,
                 replicates=replicates, seed=5, name="timed")


def _stopped_run(**kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        res = _study().run(**kwargs)
        seconds = time.monotonic() - t0
    return res, seconds, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("n_jobs", [None, 2])
def test_a_run_stops_at_max_time_keeps_what_finished_and_a_re_run_continues(tmp_path, n_jobs, monkeypatch):
    store = tmp_path / "s"
    # 120 x 0.02 s = 2.4 s of work; one replicate a task, so what is launched before the deadline does not
    # depend on how the adaptive chunks happen to be sized on a warm or a cold worker pool
    res, seconds, said = _stopped_run(store=store, max_time=0.5, n_jobs=n_jobs, batch_size=1)
    assert res.out_of_time and not res.interrupted and not res.complete
    assert 0 < len(res.table) < res.expected_rows == 120
    assert said == [f"study 'timed' stopped at max_time=0.5 s: {len(res.table)} of 120 rows finished and stored in "
                    f"{str(store)!r}; run again to continue"]
    assert seconds < 0.5 + 5.0  # launching stopped (the workers' start-up and the replicates running then: slack)
    kept = StudyResult.load(store)
    assert len(kept.table) == len(res.table) and not kept.complete
    import simstudy.engine.backends as backends

    computed, orig = [], backends.execute
    monkeypatch.setattr(backends, "execute", lambda p, items, **kw: (computed.extend(items), orig(p, items, **kw)))
    done = _study().run(store=store)
    assert len(computed) == 120 - len(res.table) and done.complete and not done.out_of_time
    pd.testing.assert_frame_equal(done.table, _study().run().table, check_exact=True)


def test_max_time_zero_launches_nothing_and_a_finished_run_is_not_out_of_time(tmp_path):
    res, _, said = _stopped_run(max_time=0)
    assert res.out_of_time and len(res.table) == 0 and "pass store= to keep them across runs" in said[0]
    full = _study(replicates=3).run(max_time=60)
    assert full.complete and not full.out_of_time


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "10", True])
def test_bad_max_time_gives_one_line(value):
    with pytest.raises(ValueError, match="max_time=.* is invalid; allowed: None or a number of seconds >= 0"):
        _study().run(max_time=value)


def test_the_command_line_exits_75_at_max_time_and_continues(tmp_path, capsys, monkeypatch):
    (tmp_path / "timedmod.py").write_text(
        "import time\n"
        "def generate(cond, rng):\n    time.sleep(0.02)\n    return rng.normal(size=cond['n'])\n"
        "def mean(data, cond):\n    return {'estimate': float(data.mean())}\n"
        "def truth(cond):\n    return {'estimate': 0.0}\n")
    (tmp_path / "timed.toml").write_text(
        '[study]\nname = "timed"\nreplicates = 40\nseed = 2\n[design]\nn = [5, 10]\n'
        '[generate]\nfunction = "timedmod:generate"\n[truth]\nfunction = "timedmod:truth"\n'
        '[methods.mean]\nfunction = "timedmod:mean"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("timedmod", None)
    argv = ["run", str(tmp_path / "timed.toml"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert EXIT_OUT_OF_TIME == 75
    assert main(argv + ["--max-time", "0.3"]) == 75
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("simstudy: stopped at --max-time 0.3 s after ")
    assert "(run the same command again to continue; exit status 75)" in err[0]
    assert not (tmp_path / "out" / "summary.csv").exists()  # no outputs of a partial study
    assert main(argv) == 0 and StudyResult.load(tmp_path / "out").complete
    capsys.readouterr()
    assert main(argv + ["--max-time", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--max-time='-1' is invalid; allowed: a number of seconds >= 0" in err and err.count("\n") == 1
