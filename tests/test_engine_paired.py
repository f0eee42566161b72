"""Paired comparisons of methods declared by a study (simstudy.engine.paired; DESIGN §7: methods of a replicate see
the same data): the interval equals scipy's paired t interval, the verdict reads its side of 0 in the declared
direction, and the report states the rule and the primary comparison."""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
from scipy import stats

from simstudy.engine import Study
from simstudy.engine.paired import check_comparisons, comparison_table, verdict


def normal_sample(cond, rng):
    return rng.standard_normal(cond["n"]) + 0.5


def mean_error(data, cond):
    return {"sqerr": float((data.mean() - 0.5) ** 2), "estimate": float(data.mean())}


def median_error(data, cond):
    return {"sqerr": float((np.median(data) - 0.5) ** 2), "estimate": float(np.median(data))}


COMPARISONS = [{"method": "median", "reference": "mean", "metric": "sqerr", "primary": True},
               {"method": "median", "reference": "mean", "metric": "estimate", "lower_is_better": False,
                "level": 0.9}]


@pytest.fixture(scope="module")
def result():
    study = Study(design={"n": [15, 60]}, generate=normal_sample, analyse={"mean": mean_error, "median": median_error},
                  replicates=40, seed=3, options={"comparisons": COMPARISONS})
    return study.run(n_jobs=1, progress=False)


def test_the_interval_is_the_paired_t_interval_and_the_verdict_its_side(result):
    table = result.comparisons()
    assert len(table) == 4 and list(table["primary"]) == [True, True, False, False]
    t = result.table
    for _, row in table.iterrows():
        sub = t[t["condition"] == row["condition"]].pivot(index="replicate", columns="method", values=row["metric"])
        d = sub["median"] - sub["mean"]
        ci = stats.ttest_rel(sub["median"], sub["mean"]).confidence_interval(row["level"])
        assert row["pairs"] == 40 and math.isclose(row["difference"], d.mean(), rel_tol=1e-12)
        assert math.isclose(row["ci_low"], ci.low, rel_tol=1e-9) and math.isclose(row["ci_high"], ci.high, rel_tol=1e-9)
        assert row["verdict"] == verdict(row["ci_low"], row["ci_high"], lower_is_better=row["lower_is_better"])
    # the median is less efficient than the mean under normal data: its squared error is larger
    assert set(table.loc[table["metric"] == "sqerr", "verdict"]) <= {"worse", "no decisive difference"}
    assert "worse" in set(table.loc[table["metric"] == "sqerr", "verdict"])


def test_verdicts_follow_the_declared_direction():
    assert verdict(-2.0, -1.0) == "beats" and verdict(1.0, 2.0) == "worse"
    assert verdict(-2.0, -1.0, lower_is_better=False) == "worse" and verdict(1.0, 2.0, lower_is_better=False) == "beats"
    assert verdict(-1.0, 1.0) == "no decisive difference" and verdict(math.nan, 1.0) == "undefined"


def test_the_report_states_the_rule_and_the_primary_comparison(result, tmp_path):
    result.report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Paired comparisons" in text and "declared in the study before it runs" in text
    assert text.count("- **Primary comparison** (n=") == 2  # one sentence per condition, named by its factors
    assert "median - mean in sqerr:" in text and "95% paired t interval" in text
    page = (tmp_path / "report.html").read_text()
    assert 'id="comparisons"' in page and "<strong>Primary comparison</strong>" in page
    assert '<a href="#comparisons">Comparisons</a>' in page
    assert len(comparison_table(result)) == 4


@pytest.mark.parametrize("bad, message", [
    ([{"method": "a", "reference": "b"}], "comparisons[0].metric=None is invalid; allowed: a non-empty string"),
    ([{"method": "a", "reference": "b", "metric": "m", "side": 1}], "comparisons[0].side is an unknown key"),
    ([{"method": "a", "reference": "b", "metric": "m", "level": 1.5}], "comparisons[0].level=1.5 is invalid"),
    ([{"method": "a", "reference": "b", "metric": "m", "primary": True}] * 2, "declares 2 primary comparisons"),
    ({"method": "a"}, "comparisons={'method': 'a'} is invalid; allowed: a list of tables"),
])
def test_bad_declarations_are_one_line(bad, message):
    with pytest.raises(ValueError) as err:
        check_comparisons(bad)
    assert "\n" not in str(err.value) and message in str(err.value)


STUDY = """
[study]
kind = "generic"
replicates = 3
seed = 1
[design]
n = [10]
[generate]
function = "simstudy.studies.examples:binomial_data"
[methods.wald]
function = "simstudy.studies.examples:wald_interval"
[methods.wilson]
function = "simstudy.studies.examples:wilson_interval"
[summary]
comparisons = [{ method = "wilson", reference = "METHOD", metric = "ci_high", primary = true }]
"""


def test_a_study_file_declares_comparisons_and_names_a_missing_method_in_one_line():
    from simstudy.studies import spec

    sf = spec.parse_study_text(textwrap.dedent(STUDY.replace("METHOD", "wald")).replace("n = [10]", "n = [10]\np = [0.3]"))
    assert sf.options()["comparisons"][0] == {"method": "wilson", "reference": "wald", "metric": "ci_high",
                                              "lower_is_better": True, "primary": True, "level": 0.95}
    spec.build_study(sf)
    bad = spec.parse_study_text(textwrap.dedent(STUDY.replace("METHOD", "agresti")).replace("n = [10]",
                                                                                           "n = [10]\np = [0.3]"))
    with pytest.raises(spec.SpecError) as err:
        spec.build_study(bad)
    assert str(err.value) == ("summary.comparisons[0].reference='agresti' is not a method of the study; allowed: "
                              "wald, wilson")


def test_one_task_per_method_gives_the_same_rows_and_resumes_by_method(tmp_path):
    """``Study(task_per_method=True)``: every (condition, replicate, method) its own task; the table is bitwise
    the default's, and a store holding some methods of a replicate runs only the others."""
    kwargs = dict(design={"n": [15, 60]}, generate=normal_sample, analyse={"mean": mean_error, "median": median_error},
                  replicates=5, seed=3)
    default = Study(**kwargs).run(n_jobs=1, progress=False).table
    split = Study(**kwargs, task_per_method=True)
    assert split.run(n_jobs=2, progress=False).table.drop(columns=["seconds"], errors="ignore").equals(
        default.drop(columns=["seconds"], errors="ignore"))
    with pytest.raises(ValueError, match="task_per_method=1 is invalid; allowed: true or false"):
        Study(**kwargs, task_per_method=1)


def test_one_task_per_method_hands_the_backend_one_item_per_method(monkeypatch):
    from simstudy.engine import backends

    seen = []
    real = backends.execute

    def spy(payload, items, **kw):
        seen.extend(items)
        return real(payload, items, **kw)

    monkeypatch.setattr(backends, "execute", spy)
    Study(design={"n": [15]}, generate=normal_sample, analyse={"mean": mean_error, "median": median_error},
          replicates=2, seed=3, task_per_method=True).run(n_jobs=1, progress=False)
    assert sorted(seen) == [(0, 0, (0,)), (0, 0, (1,)), (0, 1, (0,)), (0, 1, (1,))]


def test_a_run_logs_plain_progress_lines_when_not_on_a_terminal():
    """In a log (no terminal) a run prints one plain line at most every ``interval`` seconds, none before."""
    import io

    from simstudy.engine.progress import LogProgress

    out = io.StringIO()
    quiet = LogProgress(32, "llm_shift", interval=3600.0, stream=out)
    quiet.update(5)
    assert out.getvalue() == ""  # nothing before the interval has passed: short runs stay silent
    chatty = LogProgress(32, "llm_shift", interval=0.0, stream=out)
    chatty.update(8)
    line = out.getvalue().strip()
    assert line.startswith("simstudy: llm_shift: 8 of 32 tasks done (25%), ") and "elapsed, about " in line
    assert "\r" not in out.getvalue() and line.endswith("left")


def test_a_reports_compute_time_reads_as_a_clock_past_a_minute():
    """The report's header gives a long run's summed compute time as a clock too (42610 s: 11h50m)."""
    from types import SimpleNamespace

    import pandas as pd

    from simstudy.engine.progress import clock
    from simstudy.engine.report import report_facts

    assert [clock(s) for s in (42, 185, 42610.3)] == ["42s", "3m05s", "11h50m"]

    def facts(seconds):
        return report_facts(SimpleNamespace(
            manifest={"conditions": [{}], "replicates": 1, "seed": 0}, table=pd.DataFrame({"status": ["ok"]}),
            expected_rows=1, methods=["m"], timings=pd.DataFrame({"seconds": [seconds]})))[2]

    assert facts(42610.3) == "compute time (sum over rows): 42610.3 s (11h50m)"
    assert facts(12.5) == "compute time (sum over rows): 12.5 s"


def test_the_command_line_prints_the_decided_comparisons(tmp_path, capsys):
    from simstudy.cli import main

    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(STUDY.replace("METHOD", "wald")).replace("n = [10]", "n = [10]\np = [0.3]"))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert main(["summarize", str(tmp_path / "o")]) == 0
    again = capsys.readouterr().out
    for out in (first, again):
        assert "Primary comparison: wilson - wald in ci_high: " in out and " over 3 replicates " in out
        assert "Paired comparisons (1; report.md says how they are decided):" in out
