"""The map of the extrapolation gain (issue 11): cells, the hypothesis' decision rule, a tiny run."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from simstudy.checks import CheckContext, run_check
from simstudy.checks.extrapolation_map import cells, decide_map


def _cell(world, sigma, c, direction, diff, lo, hi, pairs=10):
    verdict = "beats" if hi < 0 else ("worse" if lo > 0 else "no decisive difference")
    return {"cell": f"{world}|{sigma}|{c}|{direction}", "world": world, "sigma": sigma, "observations": c,
            "direction": direction, "pairs": pairs, "oos_difference": diff, "oos_ci_low": lo, "oos_ci_high": hi,
            "oos_verdict": verdict}


def _grid(target=(-0.08, -0.12, -0.04), other=(0.0, -0.02, 0.02), pairs=10):
    rows = []
    for world in ("scaled (steepness 2)", "gaussian"):
        for c in (1, 2):
            for direction in ("random", "tangent"):
                values = target if (c, direction) == (2, "tangent") else other
                rows.append(_cell(world, 0.6, c, direction, *values, pairs=pairs))
    return pd.DataFrame(rows)


def test_the_hypothesis_passes_when_only_the_identified_cells_gain():
    decision, head, lines = decide_map(_grid(), min_pairs=10)
    assert decision == "pass" and len(lines) == 2 and "c=2 tangent -0.080" in head


def test_a_gain_elsewhere_or_none_in_the_identified_cell_fails():
    found = _grid()
    found.loc[(found["observations"] == 1) & (found["direction"] == "tangent"), ["oos_ci_high", "oos_verdict"]] = \
        [-0.01, "beats"]
    decision, head, _ = decide_map(found, min_pairs=10)
    assert decision == "fail" and "also a gain in c=1 tangent" in head
    assert decide_map(_grid(target=(-0.01, -0.05, 0.03)), min_pairs=10)[0] == "fail"


def test_too_few_pairs_or_no_identified_cell_is_reported():
    assert decide_map(_grid(pairs=3), min_pairs=10)[0] == "reported"
    no_target = _grid()
    no_target = no_target[no_target["direction"] == "random"]
    assert decide_map(no_target, min_pairs=10)[0] == "reported"


def test_cells_share_a_token_budget_and_refuse_bad_levels():
    grid = cells(laws=["scaled", "gaussian"], steepness=[1.0, 2.0], sigmas=[0.6], observations=[1, 2],
                 directions=["random", "tangent"], tokens=1000)
    assert len(grid) == 3 * 2 * 2  # two scaled worlds and one gaussian
    assert {(g["observations"], g["n"]) for g in grid} == {(1, 1000), (2, 500)}
    with pytest.raises(ValueError, match="map_laws='uniform'"):
        cells(laws=["uniform"], steepness=[2.0], sigmas=[0.6], observations=[1], directions=["random"], tokens=100)
    with pytest.raises(ValueError, match="map_directions='sideways'"):
        cells(laws=["gaussian"], steepness=[2.0], sigmas=[0.6], observations=[1], directions=["sideways"],
              tokens=100)


def test_a_tiny_map_runs_end_to_end(tmp_path):
    overrides = {"map_laws": "gaussian", "map_observations": "2", "map_directions": "random,tangent",
                 "map_tokens": "400", "replicates": "2", "ps_mh_steps": "5", "sgd_max_passes": "8"}
    res = run_check("extrapolation-map", CheckContext(scale="smoke", out=tmp_path, overrides=overrides))
    found = res.tables["cells"]
    assert len(found) == 2 and (found["pairs"] == 2).all()
    assert found["oos_mcse"].map(math.isfinite).all()
    assert res.decision in ("pass", "fail")
    assert (tmp_path / "extrapolation-map" / "gain_map.png").exists()
    assert (tmp_path / "extrapolation-map" / "identified_cell_curves.png").exists()
    table = res.tables["replicates"]
    assert set(table["method"]) == {"ps-mh (sgd)", "mle (sgd)"} and (table["status"] == "ok").all()


def test_capped_fits_count_per_method():
    from simstudy.checks.extrapolation_statistics import capped_fits
    table = pd.DataFrame({"method": ["a", "a", "b", "c"], "fit_hit_cap": [1.0, 0.0, 1.0, float("nan")]})
    assert capped_fits(table) == {"a": 1, "b": 1}
    assert capped_fits(table.drop(columns="fit_hit_cap")) == {}
