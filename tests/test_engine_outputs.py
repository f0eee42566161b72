"""Issue 13 "Outputs", data side: the stored table is tidy by itself (factors and truths as columns), the long
table rsimsum::multisimsum reads (``simstudy export``), and the readable ``StudyResult.summary()`` object.

Small studies (the Wald/Wilson binomial example of :mod:`simstudy.studies.examples`, fixed seeds), run in this
process; every comparison is exact unless stated.
"""
from __future__ import annotations

import html.parser
import math
import pickle

import numpy as np
import pandas as pd
import pytest

from simstudy.cli import main
from simstudy.engine import Study, StudyResult
from simstudy.engine.export import rsimsum_frame
from simstudy.engine.storage import TABLE, atomic_write_parquet
from simstudy.engine.summary_view import StudySummary
from simstudy.studies.examples import binomial_data, binomial_truth, wald_interval, wilson_interval

SEED = 20261202
DESIGN = {"n": [20, 50], "p": [0.1, 0.5]}
METHODS = {"wald": wald_interval, "wilson": wilson_interval}


def _binomial(replicates: int = 30) -> Study:
    return Study(design=DESIGN, generate=binomial_data, analyse=METHODS, truth=binomial_truth,
                 replicates=replicates, seed=SEED, name="bin")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The binomial study run into a store: (study, result, store)."""
    store = tmp_path_factory.mktemp("outputs") / "bin"
    study = _binomial()
    return study, study.run(store=store), store


# -- 1. the stored table is tidy by itself ----------------------------------------------------------------------
def test_stored_table_holds_factors_and_truths_and_answers_without_the_manifest(stored):
    study, res, store = stored
    on_disk = pd.read_parquet(store / TABLE)
    assert list(on_disk.columns[:6]) == ["condition", "n", "p", "true_estimate", "replicate", "method"]
    assert on_disk["n"].dtype == np.int64 and on_disk["p"].dtype == np.float64
    assert on_disk["true_estimate"].dtype == np.float64
    cond = on_disk["condition"].to_numpy()
    for f in ("n", "p"):
        assert (on_disk[f].to_numpy() == np.array([c[f] for c in study.conditions])[cond]).all()
    assert (on_disk["true_estimate"].to_numpy() == on_disk["p"].to_numpy()).all()  # the truth is p
    # an R user's bias, from the file alone, is the summary's (to rounding: mean(t - p) vs mean(t) - p)
    ok = on_disk[on_disk["status"] == "ok"]
    mine = (ok["estimate"] - ok["true_estimate"]).groupby([ok["n"], ok["p"], ok["method"]]).mean()
    s = res.summary().query("measure == 'bias'").set_index(["n", "p", "method"])["value"]
    assert len(mine) == len(s) == 8
    np.testing.assert_allclose(mine.sort_index().to_numpy(), s.sort_index().to_numpy(), rtol=0, atol=1e-15)
    # read back, the in-memory table is unchanged: factors from the manifest, no truth columns
    back = StudyResult.load(store)
    pd.testing.assert_frame_equal(back.table, res.table, check_exact=True)
    assert "true_estimate" not in res.table.columns


def test_old_store_without_the_columns_loads_resumes_and_is_extended(stored, tmp_path):
    study, res, store = stored
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_bytes((store / "manifest.json").read_bytes())
    on_disk = pd.read_parquet(store / TABLE)
    atomic_write_parquet(on_disk.drop(columns=["n", "p", "true_estimate"]), old / TABLE)  # as stores were written
    pd.testing.assert_frame_equal(StudyResult.load(old).table, res.table, check_exact=True)
    again = study.run(store=old)  # complete: nothing runs, the table is not rewritten
    pd.testing.assert_frame_equal(again.table, res.table, check_exact=True)
    assert "n" not in pd.read_parquet(old / TABLE).columns
    # a chunk cut from a new table (design columns and all) resumes like any chunk
    part = tmp_path / "part"
    (part / "chunks").mkdir(parents=True)
    (part / "manifest.json").write_bytes((store / "manifest.json").read_bytes())
    atomic_write_parquet(on_disk.iloc[::3].reset_index(drop=True), part / "chunks" / "part-1-000001-0123abcd.parquet")
    resumed = study.run(store=part)
    pd.testing.assert_frame_equal(resumed.table, res.table, check_exact=True)
    # extension of the old store to more replicates: the new table has the columns and is the fixed-R table
    longer = _binomial(replicates=36)
    extended = longer.run(store=old)
    fixed = longer.run()
    pd.testing.assert_frame_equal(extended.table, fixed.table, check_exact=True)
    assert list(pd.read_parquet(old / TABLE).columns[:4]) == ["condition", "n", "p", "true_estimate"]


def test_save_writes_the_columns_and_mixed_level_factors_are_stored_as_text(stored, tmp_path):
    _, res, _ = stored
    res.save(tmp_path / "saved")
    assert "true_estimate" in pd.read_parquet(tmp_path / "saved" / TABLE).columns
    pd.testing.assert_frame_equal(StudyResult.load(tmp_path / "saved").table, res.table, check_exact=True)
    # levels of several types have no single parquet type: text on disk, their own types in memory
    study = Study(design=[{"k": 1, "tag": None}, {"k": "a", "tag": "x"}], generate=lambda c, rng: rng.normal(size=4),
                  analyse={"m": lambda x, c: {"estimate": float(x.mean())}}, truth=lambda c: {"estimate": 0.0},
                  replicates=3, seed=SEED)
    mixed = study.run(store=tmp_path / "mixed")
    on_disk = pd.read_parquet(tmp_path / "mixed" / TABLE)
    assert list(on_disk["k"]) == ["1"] * 3 + ["a"] * 3 and on_disk["tag"].isna().sum() == 3
    back = StudyResult.load(tmp_path / "mixed").table
    pd.testing.assert_frame_equal(back, mixed.table, check_exact=True)
    assert list(back["k"]) == [1] * 3 + ["a"] * 3


def test_a_method_may_not_return_a_truth_column_name():
    study = Study(design={"n": [5]}, generate=lambda c, rng: rng.normal(size=c["n"]),
                  analyse={"m": lambda x, c: {"estimate": float(x.mean()), "true_estimate": 0.0}},
                  truth=lambda c: {"estimate": 0.0}, replicates=2, seed=SEED)
    t = study.run().table
    assert (t["status"] == "error").all() and t["message"].str.contains("true_ESTIMAND").all()


# -- 2. the rsimsum table ---------------------------------------------------------------------------------------
def _two_estimands(x, cond):
    """A location and a scale estimate (no SE for the scale) and a metric without a truth; an error where the
    first draw is above 1.2 (about half the replicates)."""
    if x[0] > 1.2:
        raise RuntimeError("an unlucky replicate")
    m, s = float(x.mean()), float(x.std(ddof=1))
    se = s / math.sqrt(len(x))
    return {"mu": m, "mu_se": se, "mu_ci_low": m - 1.96 * se, "mu_ci_high": m + 1.96 * se, "sd": s, "kl": 0.1}


def test_rsimsum_table_contract_and_values_match_the_store(stored, tmp_path):
    _, res, store = stored
    rc = main(["export", str(store), "--format", "rsimsum"])
    assert rc == 0
    frame = rsimsum_frame(res)
    csv = pd.read_csv(store / "rsimsum.csv")
    columns = ["par", "estimate", "se", "conf.low", "conf.high", "true", "method", "n", "p", "condition", "repno",
               "status"]
    assert list(frame.columns) == list(csv.columns) == columns
    kinds = dict(zip(columns, "O f f f f f O i f i i O".split()))
    for c in columns:
        assert frame[c].dtype.kind == csv[c].dtype.kind == kinds[c] or (kinds[c] == "O" and frame[c].dtype == "str"
                                                                           and csv[c].dtype == "str"), c
    assert len(frame) == 4 * 30 * 2  # conditions x replicates x methods x 1 estimand
    pd.testing.assert_frame_equal(csv, frame, check_exact=True)  # the CSV reads back bitwise
    on_disk = pd.read_parquet(store / TABLE)
    merged = frame.merge(on_disk.assign(repno=on_disk["replicate"] + 1), on=["condition", "repno", "method"],
                         validate="one_to_one")
    assert len(merged) == len(frame)
    assert (merged["estimate_x"] == merged["estimate_y"]).all() and (merged["true"] == merged["true_estimate"]).all()
    assert (merged["se_x"] == merged["se_y"]).all() and (merged["conf.low"] == merged["ci_low"]).all()
    assert (merged["n_x"] == merged["n_y"]).all() and (merged["par"] == "estimate").all()


def test_rsimsum_table_with_two_estimands_failures_and_a_metric(tmp_path):
    study = Study(design={"n": [8, 16]}, generate=lambda c, rng: rng.normal(1.0, 2.0, c["n"]),
                  analyse={"a": _two_estimands}, truth=lambda c: {"mu": 1.0, "sd": 2.0}, replicates=40, seed=SEED)
    res = study.run(store=tmp_path / "two")
    frame = rsimsum_frame(res)
    t = res.table
    assert len(frame) == len(t) * 2 and list(dict.fromkeys(frame["par"])) == ["mu", "sd"]  # kl has no truth
    bad = t["status"] != "ok"
    assert 0 < bad.sum() < len(t)
    for par in ("mu", "sd"):
        part = frame[frame["par"] == par].reset_index(drop=True)
        assert (part["status"].to_numpy() == t["status"].to_numpy()).all()
        assert part.loc[bad.to_numpy(), "estimate"].isna().all()  # failed rows carry no estimate
        assert (part.loc[~bad.to_numpy(), "estimate"].to_numpy() == t.loc[~bad, par].to_numpy()).all()
    assert frame.loc[frame["par"] == "sd", ["se", "conf.low", "conf.high"]].isna().all().all()
    assert frame.loc[(frame["par"] == "mu") & (frame["status"] == "ok"), "se"].notna().all()
    # what rsimsum computes from the file (means over non-missing estimates) is simstudy's summary
    s = res.summary().set_index(["n", "estimand", "measure"])
    for (n, par), g in frame.groupby(["n", "par"]):
        est = g["estimate"].dropna()
        assert len(est) == s.loc[(n, par, "bias"), "n_used"]
        assert math.isclose(float((est - g.loc[est.index, "true"]).mean()), s.loc[(n, par, "bias"), "value"],
                            rel_tol=0, abs_tol=1e-14)
        assert math.isclose(float(est.std(ddof=1)), s.loc[(n, par, "empse"), "value"], rel_tol=1e-13)
    # the command line: --out into a new folder; a factor named like a column is refused with one line
    assert main(["export", str(tmp_path / "two"), "--out", str(tmp_path / "new" / "r.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "new" / "r.csv"), frame, check_exact=True)


def test_export_refusals_are_one_line(tmp_path, capsys):
    study = Study(design={"se": [1, 2]}, generate=lambda c, rng: rng.normal(size=3),
                  analyse={"m": lambda x, c: {"estimate": float(x.mean())}}, truth=lambda c: {"estimate": 0.0},
                  replicates=2, seed=SEED)
    study.run(store=tmp_path / "clash")
    capsys.readouterr()
    for argv, needle in ((["export", str(tmp_path / "clash")], "design factor 'se' cannot be exported"),
                         (["export", str(tmp_path / "none")], "has no manifest.json"),
                         (["export", str(tmp_path / "clash"), "--out", str(tmp_path)], "is a directory"),
                         (["export", str(tmp_path / "clash"), "--format", "stata"], "invalid choice")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


# -- 3. the summary object --------------------------------------------------------------------------------------
class _Tables(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.cells, self.open = 0, [], []

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, tag  # well nested

    def handle_data(self, data):
        if self.open and self.open[-1] in ("td", "th"):
            self.cells.append(data.strip())


def test_summary_is_the_tidy_frame_and_prints_as_a_readable_summary(stored):
    _, res, _ = stored
    s = res.summary()
    assert isinstance(s, StudySummary) and isinstance(s, pd.DataFrame)
    assert type(s.query("measure == 'bias'")) is pd.DataFrame and type(s.copy()) is pd.DataFrame
    pd.testing.assert_frame_equal(pd.DataFrame(s), pd.DataFrame(StudyResult.load(stored[2]).summary()),
                                  check_exact=True)
    text = str(s)
    assert text == repr(s) == s.as_text()
    for needle in ("Simulation study: bin", "Replicates per condition: 30", "Rows finished:            240 of 240",
                   "Design", "true_estimate", "30 of 30", "Performance of estimate: value (MCSE)", "Failures",
                   "None: all 240 finished rows are ok.", "not shown: relbias"):
        assert needle in text, needle
    row = s[(s["n"] == 20) & (s["p"] == 0.1) & (s["method"] == "wilson") & (s["measure"] == "coverage")].iloc[0]
    cell = f"{row['value']:.4g} ({row['mcse']:.4g})"
    assert cell in text
    assert " mae" not in text.split("not shown")[0] and " mae" in s.as_text(measures="all")
    only = s.as_text(measures=["coverage"])
    assert "bias" not in only.split("Performance")[1].split("Failures")[0] and cell in only
    with pytest.raises(ValueError, match="measures="):
        s.as_text(measures="coverage")
    page = s._repr_html_()
    assert page == s.as_html() and page.startswith('<div class="simstudy-summary">')
    parsed = _Tables()
    parsed.feed(page)
    assert parsed.tables == 3 and not parsed.open  # header, design, performance (no failures table)
    assert cell in parsed.cells and "30 of 30" in parsed.cells and "240 of 240" in parsed.cells
    assert str(pickle.loads(pickle.dumps(s))) == pd.DataFrame(s).to_string()  # no result: prints as its frame


def test_summary_lists_failures_and_an_incomplete_table(tmp_path):
    study = Study(design={"n": [8]}, generate=lambda c, rng: rng.normal(1.0, 2.0, c["n"]),
                  analyse={"a": _two_estimands}, truth=lambda c: {"mu": 1.0, "sd": 2.0}, replicates=40, seed=SEED)
    res = study.run()
    s = res.summary()
    text = str(s)
    n_bad = int((res.table["status"] != "ok").sum())
    assert f"failed rows: a error {n_bad}" in text and "an unlucky replicate" in text
    assert "Performance of mu" in text and "Performance of sd" in text and "Performance of kl" in text
    parsed = _Tables()
    parsed.feed(s.as_html())
    assert parsed.tables == 6 and "error" in parsed.cells  # header, design, mu, sd, kl, failures
    part = StudyResult(res.table.iloc[:10].reset_index(drop=True), manifest=res.manifest)
    text = str(part.summary())
    assert "10 of 40 (INCOMPLETE)" in text and "10 of 40" in text.split("Design")[1]
