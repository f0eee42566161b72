"""Array jobs (issue 13): ``--shard i/N`` stores hold disjoint shares of the (condition, replicate) pairs, and
``simstudy merge`` combines them into the bitwise table of one run; stores of other studies and rows held
twice are refused in one line (simstudy.engine.plan, simstudy.engine.shards)."""
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from simstudy.cli import main
from simstudy.engine import StoreBusyError, StoreMismatchError, Study, StudyResult
from simstudy.engine.plan import Shard, parse_shard, planned_pairs
from simstudy.engine.shards import merge_stores
from simstudy.engine.storage import TABLE, Store, read_manifest
from simstudy.studies.examples import binomial_data, binomial_truth, wald_interval, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def _study(replicates: int = 25, seed: int = 11) -> Study:
    return Study(design={"n": [10, 40], "p": [0.1, 0.5]}, generate=binomial_data,
                 analyse={"wald": wald_interval, "wilson": wilson_interval}, truth=binomial_truth,
                 replicates=replicates, seed=seed, name="shards")


def _parquet_without_seconds(path: Path):
    table = pq.read_table(path / TABLE)
    return table.drop_columns(["_seconds"]).replace_schema_metadata(None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    store = tmp_path_factory.mktemp("single") / "one"
    return _study().run(store=store), store


def test_each_pair_is_in_exactly_one_shard_and_shares_are_balanced():
    counts = [25, 25, 7, 1]
    shards = [Shard(i, 4) for i in range(1, 5)]
    seen = [pair for s in shards for pair in planned_pairs(counts, s)]
    assert sorted(seen) == list(planned_pairs(counts)) and len(seen) == len(set(seen))
    for c, n in enumerate(counts):
        sizes = [s.size(c, n) for s in shards]
        assert sizes == [sum(1 for cc, _ in planned_pairs(counts, s) if cc == c) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert parse_shard("2/8") == Shard(2, 8) and parse_shard((1, 1)) == Shard(1, 1) and str(Shard(3, 8)) == "3/8"
    for bad in ("0/4", "5/4", "1/0", "a/b", "1-4", (2, 1)):
        with pytest.raises(ValueError, match="is invalid; allowed: i/N with 1 <= i <= N"):
            parse_shard(bad)


def test_merged_shards_are_bitwise_one_run(single, tmp_path):
    one, one_store = single
    for i in (1, 2, 3):
        part = _study().run(shard=f"{i}/3", store=tmp_path / f"s{i}", n_jobs=2 if i == 2 else None)
        assert part.complete and len(part.table) == part.expected_rows < len(one.table)
        assert read_manifest(tmp_path / f"s{i}")["shard"] == f"{i}/3"
    done = merge_stores([tmp_path / f"s{i}" for i in (3, 1, 2)], tmp_path / "merged")  # any order
    assert done["complete"] and done["rows"] == len(one.table) == done["expected"]
    merged = StudyResult.load(tmp_path / "merged")
    assert merged.complete and "shard" not in merged.manifest
    assert [s["shard"] for s in merged.manifest["merged_from"]] == ["3/3", "1/3", "2/3"]
    pd.testing.assert_frame_equal(merged.table, one.table, check_exact=True)
    assert pd.util.hash_pandas_object(merged.table).equals(pd.util.hash_pandas_object(one.table))
    # the stored tables themselves: equal column for column but the timings
    assert _parquet_without_seconds(tmp_path / "merged").equals(_parquet_without_seconds(one_store))
    pd.testing.assert_frame_equal(merged.summary(), one.summary(), check_exact=True)


def test_an_incomplete_merge_is_finished_by_running_the_study_into_it(single, tmp_path, monkeypatch):
    one, _ = single
    for i in (1, 3):
        _study().run(shard=f"{i}/3", store=tmp_path / f"s{i}")
    done = merge_stores([tmp_path / "s1", tmp_path / "s3"], tmp_path / "m")
    assert not done["complete"] and done["rows"] < done["expected"]
    assert not StudyResult.load(tmp_path / "m").complete
    import simstudy.engine.backends as backends

    computed, orig = [], backends.execute
    monkeypatch.setattr(backends, "execute", lambda p, items, **kw: (computed.extend(items), orig(p, items, **kw)))
    full = _study().run(store=tmp_path / "m")
    assert sorted((c, r) for c, r, _ in computed) == list(planned_pairs([25] * 4, Shard(2, 3)))  # shard 2's only
    pd.testing.assert_frame_equal(full.table, one.table, check_exact=True)


def test_a_shard_store_extended_with_more_replicates_stays_a_shard(tmp_path):
    for i in (1, 2):
        _study(replicates=10).run(shard=f"{i}/2", store=tmp_path / f"s{i}")
        _study(replicates=25).run(shard=f"{i}/2", store=tmp_path / f"s{i}")  # extended in place
    merge_stores([tmp_path / "s1", tmp_path / "s2"], tmp_path / "m")
    pd.testing.assert_frame_equal(StudyResult.load(tmp_path / "m").table, _study(replicates=25).run().table,
                                  check_exact=True)


def test_merges_that_cannot_be_are_refused_in_one_line_and_write_nothing(tmp_path):
    _study().run(shard="1/2", store=tmp_path / "a1")
    _study().run(shard="2/2", store=tmp_path / "a2")
    _study().run(shard="1/3", store=tmp_path / "b1")
    _study(seed=12).run(shard="2/2", store=tmp_path / "other")
    (tmp_path / "plain").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ([tmp_path / "a1", tmp_path / "other"], r"hold different studies \(config hash", StoreMismatchError),
        ([tmp_path / "a1", tmp_path / "b1"], "is in both", StoreMismatchError),
        ([tmp_path / "a1", tmp_path / "a1"], "is given twice", ValueError),
        ([tmp_path / "a1", tmp_path / "plain"], "a directory written by a simstudy run", ValueError),
    ]
    for stores, match, kind in cases:
        with pytest.raises(kind, match=match) as info:
            merge_stores(stores, tmp_path / "out")
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="exists and is not empty"):
        merge_stores([tmp_path / "a1", tmp_path / "a2"], tmp_path / "full")
    with pytest.raises(ValueError, match="is one of the stores merged"):
        merge_stores([tmp_path / "a1", tmp_path / "a2"], tmp_path / "a2")
    with Store(tmp_path / "a2", read_manifest(tmp_path / "a2")):  # a shard still running: its lock is held
        with pytest.raises(StoreBusyError, match="in use by another running study"):
            merge_stores([tmp_path / "a1", tmp_path / "a2"], tmp_path / "out")


def test_a_store_holds_one_shard_or_the_whole_study(tmp_path):
    _study().run(shard="1/2", store=tmp_path / "s1")
    _study().run(store=tmp_path / "whole")
    for kwargs, match in (({"shard": "2/2", "store": tmp_path / "s1"}, "holds shard 1/2 of a study"),
                          ({"store": tmp_path / "s1"}, "holds shard 1/2 of a study"),
                          ({"shard": "1/2", "store": tmp_path / "whole"}, "holds a whole study")):
        with pytest.raises(StoreMismatchError, match=match):
            _study().run(**kwargs)
    with pytest.raises(ValueError, match="needs a store"):
        _study().run(shard="1/2")


def test_the_command_line_runs_shards_and_merges_them(tmp_path, capsys):
    study = str(ROOT / "experiments" / "example_generic.toml")
    common = ["--replicates", "12", "--set", "design.n=[10,30]", "design.p=[0.2]", "--n-jobs", "1", "--no-progress"]
    assert main(["run", study, *common, "--out", str(tmp_path / "one")]) == 0
    for i in (1, 2):
        assert main(["run", study, *common, "--shard", f"{i}/2", "--out", str(tmp_path / f"shard-{i}")]) == 0
        assert f"shard {i}/2 of study 'binomial-ci': 24 of 24 rows" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "shard-1"), str(tmp_path / "shard-2"), "--out", str(tmp_path / "all")]) == 0
    assert "merged 2 stores (shards 1/2, 2/2): 48 of 48 rows" in capsys.readouterr().out
    pd.testing.assert_frame_equal(StudyResult.load(tmp_path / "all").table, StudyResult.load(tmp_path / "one").table,
                                  check_exact=True)
    assert main(["report", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    bad = [(["run", study, *common, "--shard", "3/2", "--out", str(tmp_path / "x")], "--shard='3/2' is invalid"),
           (["merge", str(tmp_path / "shard-1"), str(tmp_path / "one"), "--out", str(tmp_path / "y")], "is in both"),
           (["merge", str(tmp_path / "shard-1"), "--out", str(tmp_path / "all")], "exists and is not empty")]
    for argv, match in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
