"""Replicate until a precision target (issue 13): on the Wald binomial example every condition ends with its
MCSE at or below the target (or at the cap, flagged), conditions stop at different counts, and the table
equals a fixed-R run's rows for those replicates (simstudy.engine.precision)."""
import warnings

import numpy as np
import pandas as pd
import pytest

from simstudy.cli import main
from simstudy.engine import Study, StudyResult
from simstudy.engine.precision import MIN_GROWTH, PRECISION_FILE, PrecisionTarget
from simstudy.studies.examples import binomial_data, binomial_truth, wald_interval, wilson_interval

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.02  # MCSE of coverage: sqrt(p(1-p)/R) <= 0.02 needs up to 625 replicates (p = 0.5)


def _study(replicates: int = 50, seed: int = 3) -> Study:
    return Study(design={"n": [10, 50], "p": [0.1, 0.5]}, generate=binomial_data,
                 analyse={"wald": wald_interval, "wilson": wilson_interval}, truth=binomial_truth,
                 replicates=replicates, seed=seed, name="wald")


def _first(table: pd.DataFrame, counts: dict) -> pd.DataFrame:
    """The rows of ``table`` with replicate < counts[condition]."""
    keep = table["replicate"].to_numpy() < table["condition"].map(counts).to_numpy()
    return table[keep].reset_index(drop=True)


@pytest.fixture(scope="module")
def reached(tmp_path_factory):
    store = tmp_path_factory.mktemp("precision") / "store"
    return _study().run(target_mcse={"coverage": TARGET}, max_replicates=2000, store=store), store


def test_every_condition_reaches_the_target_and_the_table_equals_a_fixed_run(reached):
    res, store = reached
    prec = res.precision
    assert list(prec["condition"]) == [0, 1, 2, 3] and set(prec["measure"]) == {"coverage"}
    assert (prec["status"] == "reached").all() and prec["reached"].all()
    assert (prec["mcse"] <= TARGET).all()
    # the summary agrees: every method's coverage MCSE in every condition is at or below the target
    summ = res.summary()
    cov = summ[summ["measure"] == "coverage"]
    assert len(cov) == 8 and (cov["mcse"] <= TARGET).all()
    counts = dict(zip(prec["condition"], prec["replicates"]))
    assert min(counts.values()) >= 50 and len(set(counts.values())) > 1  # conditions stop at different counts
    assert res.table.groupby("condition")["replicate"].nunique().to_dict() == counts
    fixed = _study(replicates=max(counts.values())).run()
    pd.testing.assert_frame_equal(res.table.reset_index(drop=True), _first(fixed.table, counts), check_exact=True)
    # stored: the manifest records the counts, the store is complete, the table and precision.csv read back
    back = StudyResult.load(store)
    assert back.complete and back.manifest["replicates_per_condition"] == [counts[c] for c in range(4)]
    pd.testing.assert_frame_equal(back.table, res.table, check_exact=True)
    csv = pd.read_csv(store / PRECISION_FILE)
    assert list(csv["replicates"]) == list(prec["replicates"]) and np.allclose(csv["mcse"], prec["mcse"])


def test_rounds_grow_geometrically_and_stop_near_the_projection(reached):
    res, _ = reached
    prec = res.precision
    for _, row in prec.iterrows():  # at most log(R / 50) / log(MIN_GROWTH) + 1 looks
        assert row["rounds"] <= int(np.log(row["replicates"] / 50) / np.log(MIN_GROWTH)) + 1
    # the projection R (mcse/target)^2 stops close to the target: no condition ran twice the replicates it needed
    assert (prec["mcse"] >= TARGET / np.sqrt(2)).all(), prec[["replicates", "mcse"]]


def test_a_re_run_resumes_from_the_store_and_computes_nothing(reached, monkeypatch):
    res, store = reached
    import simstudy.engine.backends as backends

    calls = []
    monkeypatch.setattr(backends, "execute", lambda *a, **k: calls.append(1))
    again = _study().run(target_mcse={"coverage": TARGET}, max_replicates=2000, store=store)
    assert calls == [] and (again.precision["rounds"] == 1).all()
    pd.testing.assert_frame_equal(again.table, res.table, check_exact=True)
    pd.testing.assert_frame_equal(again.precision.drop(columns="rounds"), res.precision.drop(columns="rounds"))


def test_without_a_store_the_rounds_give_the_same_table(reached):
    res, _ = reached
    mem = _study().run(target_mcse={"coverage": TARGET}, max_replicates=2000)
    pd.testing.assert_frame_equal(mem.table, res.table, check_exact=True)
    pd.testing.assert_frame_equal(mem.precision, res.precision)


def test_conditions_at_the_cap_are_flagged(tmp_path):
    res = _study(replicates=20).run(target_mcse={"coverage": 0.001, "bias": 0.5}, max_replicates=60,
                                    store=tmp_path / "s")
    prec = res.precision
    assert len(prec) == 8 and set(prec["measure"]) == {"coverage", "bias"}
    cov = prec[prec["measure"] == "coverage"]
    assert (cov["status"] == "capped").all() and not cov["reached"].any() and (cov["mcse"] > 0.001).all()
    assert (prec["replicates"] == 60).all()
    bias = prec[prec["measure"] == "bias"]  # reached, yet its condition goes on for the other measure
    assert bias["reached"].all() and (bias["status"] == "capped").all()


def test_a_run_stopped_by_max_time_continues_to_the_same_result(tmp_path, reached):
    res, _ = reached
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = _study().run(target_mcse={"coverage": TARGET}, max_replicates=2000, store=tmp_path / "s", max_time=0)
    assert part.out_of_time and len(part.table) == 0 and (part.precision["status"] == "stopped").all()
    assert any("stopped at max_time" in str(w.message) for w in caught)
    done = _study().run(target_mcse={"coverage": TARGET}, max_replicates=2000, store=tmp_path / "s")
    pd.testing.assert_frame_equal(done.table, res.table, check_exact=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_mcse": {"nope": 0.1}}, "target_mcse measure 'nope' is invalid; allowed: one of"),
    ({"target_mcse": {"coverage": -1}}, r"target_mcse\['coverage'\]=-1 is invalid"),
    ({"target_mcse": {}}, "target_mcse={} is invalid"),
    ({"target_mcse": {"coverage": 0.1}, "max_replicates": 5}, "max_replicates=5 is invalid"),
    ({"target_mcse": {"coverage": 0.1}, "max_replicates": 30}, r"max_replicates=30 is invalid; allowed: .*\(50\)"),
    ({"max_replicates": 100}, "max_replicates=100 is invalid without target_mcse"),
    ({"target_mcse": {"coverage": 0.1}, "shard": "1/2", "store": "x"}, "invalid with target_mcse"),
])
def test_bad_precision_arguments_give_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _study().run(**kwargs)
    assert "\n" not in str(info.value)


def test_a_measure_no_cell_reports_is_refused_in_one_line():
    with pytest.raises(ValueError, match="'power' has no cells") as info:
        _study(replicates=10).run(target_mcse={"power": 0.05})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="first round of >= 10"):
        _study(replicates=5).run(target_mcse={"coverage": 0.05})


def test_next_count_is_the_projection_within_the_growth_bounds():
    t = PrecisionTarget(targets={"coverage": 0.01}, max_replicates=1000)
    assert t.next_count(100, 1.1) == 125         # projection 121 < 1.25 x: the least growth
    assert t.next_count(100, 1.3) == 169         # the projection R (mcse/target)^2
    assert t.next_count(100, 5.0) == 200         # at most growth = 2 x
    assert t.next_count(800, 5.0) == 1000        # never beyond the cap
    assert t.next_count(100, float("inf")) == 200  # no MCSE yet: the largest step


def test_the_command_line_runs_to_a_precision_target(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["run", str(ROOT / "experiments" / "example_generic.toml"), "--replicates", "20", "--set",
            "design.n=[10,50]", "design.p=[0.1,0.5]", "--target-mcse", "coverage=0.04", "--max-replicates", "400",
            "--out", str(out), "--n-jobs", "1", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "precision target: 4 of 4 (condition, measure) pairs at or below the target" in text
    assert "conditions x 2 methods x " in text and " (per condition) replicates" in text
    prec = pd.read_csv(out / PRECISION_FILE)
    assert (prec["mcse"] <= 0.04).all() and (prec["status"] == "reached").all()
    assert StudyResult.load(out).complete
    for bad, match in ((["--target-mcse", "coverage"], "--target-mcse='coverage' is invalid"),
                       (["--max-replicates", "50"], "--max-replicates=50 needs --target-mcse"),
                       (["--target-mcse", "nope=0.1"], "target_mcse measure 'nope' is invalid")):
        assert main(args[:7] + ["--out", str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err


def test_a_loaded_store_keeps_its_precision_table_until_its_rows_change(tmp_path):
    """``StudyResult.load`` (and so ``simstudy report DIR``) restores the precision table of a run to a target;
    once a later run changes the replicates per condition the stale table is dropped."""
    from simstudy.engine import StudyResult

    store = tmp_path / "s"
    res = _study(replicates=20).run(target_mcse={"coverage": 0.001}, max_replicates=40, store=store)
    loaded = StudyResult.load(store)
    assert loaded.precision is not None
    pd.testing.assert_frame_equal(loaded.precision, res.precision, check_dtype=False)
    loaded.report(tmp_path / "out")
    assert "## Precision target" in (tmp_path / "out" / "report.md").read_text()
    _study(replicates=60).run(store=store)  # a plain run extends the store: the table no longer describes it
    assert StudyResult.load(store).precision is None
