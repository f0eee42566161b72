"""Per-replicate artifacts (issue 13): a method with a ``ctx`` parameter writes files into ``ctx.artifact_dir``,
kept beside the store and keyed by (condition, replicate, method); whole after a resume, merged with shards
(simstudy.engine.artifacts)."""
import json

import numpy as np
import pandas as pd
import pytest

from simstudy.engine import Study, StudyResult
from simstudy.engine.artifacts import ARTIFACTS, artifact_path, artifact_table
from simstudy.engine.shards import merge_stores


def _generate(cond, rng):
    return rng.normal(cond["mu"], 1.0, size=8)


def fit(data, cond, ctx):
    """Writes its 'model' (the data's mean and the position it was given) and returns the mean."""
    (ctx.artifact_dir / "model.json").write_text(json.dumps({"mean": float(data.mean()), "condition": ctx.condition,
                                                             "replicate": ctx.replicate, "method": ctx.method}))
    return {"estimate": float(data.mean())}


def plain(data, cond):
    return {"estimate": float(np.median(data))}


def broken(data, cond, ctx):
    (ctx.artifact_dir / "trace.txt").write_text("went wrong here")
    raise RuntimeError("fit failed")


def _study(replicates: int = 6, analyse=None) -> Study:
    return Study(design={"mu": [0.0, 1.0]}, generate=_generate, truth=lambda c: c["mu"], replicates=replicates,
                 seed=8, name="art", analyse=analyse or {"fit": fit, "median": plain, "odd/name": fit})


def test_each_replicate_and_method_gets_its_own_folder(tmp_path):
    store = tmp_path / "s"
    res = _study().run(store=store, n_jobs=2)
    listed = artifact_table(store)
    assert listed[["condition", "replicate", "method"]].values.tolist() == [
        [c, r, m] for c in range(2) for r in range(6) for m in ("fit", "odd/name")]  # "median" takes no ctx
    assert (listed["files"] == 1).all()
    ok = res.table.set_index(["condition", "replicate", "method"])["estimate"]
    for row in listed.itertuples():
        folder = artifact_path(store / ARTIFACTS, row.condition, row.replicate, row.method)
        assert str(folder) == row.path and folder.parent.parent.name == f"condition={row.condition}"
        model = json.loads((folder / "model.json").read_text())
        assert model == {"mean": ok[(row.condition, row.replicate, row.method)], "condition": row.condition,
                         "replicate": row.replicate, "method": row.method}
    assert (store / ARTIFACTS / "condition=0" / "replicate=0" / "method=odd%2Fname").is_dir()
    assert not list((store / ARTIFACTS).rglob(".tmp-*"))


def test_a_failing_method_keeps_what_it_wrote_and_without_a_store_the_row_says_why(tmp_path):
    res = _study(analyse={"broken": broken}).run(store=tmp_path / "s")
    assert (res.table["status"] == "error").all() and res.table["message"].str.contains("fit failed").all()
    assert (artifact_table(tmp_path / "s")["files"] == 1).all()
    free = _study(analyse={"fit": fit, "median": plain}).run()
    bad = free.table[free.table["method"] == "fit"]
    assert (bad["status"] == "error").all()
    assert bad["message"].str.contains("ctx.artifact_dir needs a store; allowed: Study.run").all()
    assert (free.table[free.table["method"] == "median"]["status"] == "ok").all()


def test_a_resumed_replicate_replaces_what_a_killed_run_left(tmp_path):
    store = tmp_path / "s"
    _study(replicates=4).run(store=store)
    stale = artifact_path(store / ARTIFACTS, 1, 5, "fit")  # replicate 5: written, its row never stored (a kill)
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("from a killed run")
    torn = stale.parent / ".tmp-method=fit-abc"
    torn.mkdir()
    (torn / "half.json").write_text("{")
    kept = (artifact_path(store / ARTIFACTS, 0, 1, "fit") / "model.json").read_text()
    _study(replicates=6).run(store=store)  # extended: replicates 4 and 5 computed
    assert sorted(p.name for p in stale.iterdir()) == ["model.json"] and not torn.exists()
    assert (artifact_path(store / ARTIFACTS, 0, 1, "fit") / "model.json").read_text() == kept  # not recomputed
    assert len(artifact_table(store)) == 2 * 6 * 2


def test_merged_shards_carry_their_artifacts(tmp_path):
    one = tmp_path / "one"
    _study().run(store=one)
    for i in (1, 2):
        _study().run(shard=f"{i}/2", store=tmp_path / f"s{i}")
    merge_stores([tmp_path / "s1", tmp_path / "s2"], tmp_path / "m")
    a, b = artifact_table(one), artifact_table(tmp_path / "m")
    pd.testing.assert_frame_equal(a.drop(columns="path"), b.drop(columns="path"))
    for pa, pb in zip(a["path"], b["path"]):  # the same key, the same file
        assert pa.split(f"/{ARTIFACTS}/")[1] == pb.split(f"/{ARTIFACTS}/")[1]
        assert (one / ARTIFACTS / pa.split(f"/{ARTIFACTS}/")[1] / "model.json").read_text() == \
            (tmp_path / "m" / ARTIFACTS / pb.split(f"/{ARTIFACTS}/")[1] / "model.json").read_text()
    assert StudyResult.load(tmp_path / "m").complete


def test_an_empty_store_lists_no_artifacts(tmp_path):
    listed = artifact_table(tmp_path)
    assert list(listed.columns) == ["condition", "replicate", "method", "path", "files"] and len(listed) == 0
    assert listed["condition"].dtype == np.int64


@pytest.mark.parametrize("name, part", [("fit", "method=fit"), ("a/b", "method=a%2Fb"), ("..", "method=%2E.")])
def test_method_names_map_to_one_folder_each(tmp_path, name, part):
    assert artifact_path(tmp_path, 2, 3, name) == tmp_path / "condition=2" / "replicate=3" / part
