"""The dask.distributed backend gives the same table bit for bit (DESIGN §7; issue 3)."""
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from simstudy.engine import Study, StudyResult  # noqa: E402


def generate(cond, rng):
    X = rng.standard_normal((cond["n"], 8))
    return X, X @ np.arange(8.0) + rng.standard_normal(cond["n"])


def ols(data, cond):
    X, y = data
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    return {"estimate": beta[1], "se": float(np.sqrt(np.linalg.inv(X.T @ X)[1, 1]))}


def ridge(data, cond, rng):
    X, y = data
    lam = rng.uniform(0.5, 1.5)
    beta = np.linalg.solve(X.T @ X + lam * np.eye(8), X.T @ y)
    return {"estimate": beta[1]}


def test_dask_local_cluster_matches_loky_and_in_process_bitwise(tmp_path):
    study = Study(design={"n": [20, 80]}, generate=generate, analyse={"ols": ols, "ridge": ridge},
                  truth=lambda c: {"estimate": 1.0}, replicates=60, seed=123)
    seq = study.run(n_jobs=1)
    dask = study.run(backend="dask", n_jobs=2, store=tmp_path / "d")   # LocalCluster: 2 processes, 1 thread each
    loky = study.run(n_jobs=2)
    pd.testing.assert_frame_equal(seq.table, dask.table, check_exact=True)
    pd.testing.assert_frame_equal(seq.table, loky.table, check_exact=True)
    pd.testing.assert_frame_equal(seq.table, StudyResult.load(tmp_path / "d").table, check_exact=True)
    assert dask.complete and (tmp_path / "d" / "replicates.parquet").is_file()
