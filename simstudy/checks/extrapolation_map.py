"""Where learned perturbation helps: a map of the extrapolation gain over the factors that decide it
(DESIGN §4, §6.7; issue 11).

DESIGN §4 states a hypothesis: the out-of-support gain of the likelihood equations over mle needs
both a latent identified by shared observations (c = 2) and a perturbation that points out of the
support (the tangent direction), and its size depends on the world (the teacher's weight law). This
check tests it on a grid of cells, each a condition of one engine study:

* the teacher's weight law: ``scaled`` (rows of W1 rescaled to pre-activation SD ``steepness``, one cell
  per level of ``map_steepness``) and ``gaussian`` (W1 ~ N(0, w^2), b1 ~ N(0, b^2), b2 = 0);
* sigma* (``map_sigma``); observations per datum c (``map_observations``); the direction of A*
  (``map_directions``);
* everything else is the identified design (V = 41, L = 2, d = 3, q = 2, a 16-unit tanh teacher, entropy
  2 nats, a fresh teacher per replicate), and each cell has the same token budget: n = ``map_tokens`` / c
  prefixes (4000 tokens at full scale, to keep the map near 200 worker-minutes: 8 cells of 10 replicates;
  the two reference designs have 10 000 tokens; ``--set map_tokens=10000 map_sigma=0.3,0.6`` is the larger map).

In every replicate the likelihood equation (``map_method``, ps-mh (sgd) with B = 100 by default) and
mle (sgd) are fitted by the one early-stopping protocol of the extrapolation check
(:data:`~simstudy.checks.extrapolation_methods.PROTOCOL`) to the same data from the same initialisation.

Statistics per cell (DESIGN §7): the paired OOS KL difference (method minus mle) over replicates, its
MCSE (sd / sqrt(pairs)) and 95 % t-interval, with the paired ID difference, and the verdict "beats" /
"worse" / "no decisive difference" (:func:`~simstudy.checks.extrapolation_statistics.verdict`).

Decision rule (the hypothesis): PASS iff, in every world x sigma slice, the cell with c = 2 and the
tangent direction has its interval entirely below 0 and no cell with c = 1 or a random direction has;
FAIL otherwise; REPORTED when a cell has fewer than ``min_pairs`` pairs or the grid lacks c = 2 and
tangent. Figures: the heat map of the paired difference with its interval in each cell, and the
extrapolation curve and gain by distance of the identified cell.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import pandas as pd

from ..dgm import TEACHER_LAWS
from ..domain import make_generate
from ..engine import Study
from ..validation import check_choice
from .base import CheckContext, CheckResult, register
from .common import study_store
from .extrapolation import dgm_overrides
from .extrapolation_map_figures import map_figures
from .extrapolation_methods import METHODS, make_method, method_settings
from .extrapolation_statistics import bin_gains, capped_fits, curves, findings, paired_differences

__all__ = ["CLAIM", "NAME", "cells", "decide_map", "run"]

NAME = "extrapolation-map"
CLAIM = ("DESIGN §4's hypothesis: the likelihood equations beat mle out of support (paired, same protocol) "
         "exactly where the latent is identified by shared observations (c = 2) AND the perturbation points out "
         "of the support (tangent direction), in every teacher world and sigma* of the map.")
#: Bump when what a replicate computes changes.
STUDY_VERSION = 1
#: The cell factors, in the order of the map's rows and columns.
FACTORS = ("world", "sigma", "observations", "direction")


def cells(*, laws: list[str], steepness: list[float], sigmas: list[float], observations: list[int],
          directions: list[str], tokens: int) -> list[dict]:
    """The conditions of the map: one per (world, sigma*, c, direction), ``n = tokens // c``."""
    worlds = []
    for law in laws:
        check_choice("map_laws", law, TEACHER_LAWS)
        worlds += ([{"teacher_law": law, "steepness": float(s)} for s in steepness] if law == "scaled"
                   else [{"teacher_law": law}])
    out = []
    for world, sigma, c, direction in itertools.product(worlds, sigmas, observations, directions):
        check_choice("map_directions", direction, ("random", "tangent"))
        if int(c) < 1 or tokens // int(c) < 10:
            raise ValueError(f"map_observations={c!r} is invalid; allowed: integers >= 1 with map_tokens / c >= 10")
        out.append({**world, "sigma": float(sigma), "observations": int(c), "direction": direction,
                    "n": int(tokens // int(c))})
    return out


def world_label(row) -> str:
    """The teacher world of a condition: ``scaled (steepness 2)`` or ``gaussian``."""
    if row["teacher_law"] == "scaled":
        return f"scaled (steepness {float(row['steepness']):g})"
    return str(row["teacher_law"])


def decide_map(found: pd.DataFrame, *, min_pairs: int) -> tuple[str, str, list[str]]:
    """``(decision, headline, lines)`` of the hypothesis on the per-cell findings (one row per cell)."""
    if found.empty or (found["pairs"] < min_pairs).any():
        short = int((found["pairs"] < min_pairs).sum()) if not found.empty else 0
        return "reported", f"{short} cells with fewer than {min_pairs} pairs: not decided", []
    lines, holds, decided = [], True, False
    for (world, sigma), slice_ in found.groupby(["world", "sigma"], sort=False):
        target = slice_[(slice_["observations"] == 2) & (slice_["direction"] == "tangent")]
        others = slice_.drop(target.index)
        if target.empty:
            continue
        decided = True
        gain = bool((target["oos_verdict"] == "beats").all())
        spurious = others[others["oos_verdict"] == "beats"]
        holds &= gain and spurious.empty
        t = target.iloc[0]
        lines.append(f"{world}, sigma {sigma:g}: c=2 tangent {t['oos_difference']:+.3f} "
                     f"[{t['oos_ci_low']:+.3f}, {t['oos_ci_high']:+.3f}] ({t['oos_verdict']})"
                     + ("" if spurious.empty else "; also a gain in " + ", ".join(
                         f"c={int(r.observations)} {r.direction}" for r in spurious.itertuples())))
    if not decided:
        return "reported", "the map has no cell with c = 2 and the tangent direction", lines
    return ("pass" if holds else "fail"), "; ".join(lines), lines


@register(NAME, CLAIM)
def run(context: CheckContext) -> CheckResult:
    """The map of the extrapolation gain (module docstring: cells, statistics, decision rule)."""
    grid = cells(laws=list(context.param("map_laws", ["scaled", "gaussian"])),
                 steepness=[float(s) for s in context.param("map_steepness", [2.0])],
                 sigmas=[float(s) for s in context.param("map_sigma", [0.6])],
                 observations=[int(c) for c in context.param("map_observations", [1, 2])],
                 directions=list(context.param("map_directions", ["random", "tangent"])),
                 tokens=context.param("map_tokens", 1000, 4000))
    key = check_choice("map_method", context.param("map_method", "ps-mh-sgd"), METHODS, word="unknown")
    entries = [METHODS[key], METHODS["mle-sgd"]]
    settings = method_settings(context)
    replicates = context.param("replicates", 2, 10)
    seed = context.param("seed", 2611)
    min_pairs = context.param("min_pairs", 2, 10)
    dgm_options = {**dgm_overrides(context), "design": "identified"}
    generate = make_generate(dgm_options, fresh_teacher=True)
    fingerprint = json.dumps({"version": STUDY_VERSION, "dgm": dgm_options, "cells": grid,
                              "methods": [e.label for e in entries], "settings": settings.identity()},
                             sort_keys=True, default=str)
    study = Study(design=grid, generate=generate, analyse={e.label: make_method(e, settings) for e in entries},
                  replicates=replicates, seed=seed, name=NAME, copy_data=False, seed_torch=True,
                  fingerprint=fingerprint)
    folder = context.folder(NAME)
    result = context.record(study.run(n_jobs=context.n_jobs, store=study_store(folder, "store", study),
                                      progress=False))
    table = result.table.copy()
    table["world"] = [world_label(r) for _, r in table.iterrows()]
    table["cell"] = [" | ".join(f"{f}={r[f]}" for f in FACTORS) for _, r in table.iterrows()]
    pair = [(entries[0].label, entries[1].label)]
    found = findings(paired_differences(table, metric="kl_oos", pairs=pair, by="cell"),
                     paired_differences(table, metric="kl_id", pairs=pair, by="cell"), margin_fraction=0.10,
                     by="cell")
    factors = table.drop_duplicates("cell").set_index("cell")[list(FACTORS)]
    found = found.join(factors, on="cell")
    decision, head, lines = decide_map(found, min_pairs=min_pairs)
    identified = table[(table["observations"] == 2) & (table["direction"] == "tangent")
                       & (table["sigma"] == max(table["sigma"]))]
    curve = curves(identified, by="world")
    gains = bin_gains(identified, pair[0], by="world")
    recorded = {"cells": grid, "method": entries[0].label, "reference": entries[1].label, "replicates": replicates,
                "seed": seed, "min_pairs": min_pairs, "dgm": dgm_options, "method_settings": asdict(settings)}
    statistics = {"cells": found.to_dict(orient="records"), "lines": lines,
                  "fits_at_budget_cap": capped_fits(table)}
    rule = ("PASS iff in every world x sigma* slice the cell with c = 2 and the tangent direction has the paired "
            f"OOS KL difference {entries[0].label} minus {entries[1].label} with its 95% t-interval entirely "
            "below 0, and no cell with c = 1 or a random direction has; FAIL otherwise; REPORTED if a cell has "
            f"fewer than {min_pairs} pairs or the grid lacks c = 2 with the tangent direction.")
    return CheckResult(name=NAME, claim=CLAIM, decision_rule=rule, decision=decision, statistics=statistics,
                       summary=head, tables={"replicates": table, "cells": found, "curves": curve, "gains": gains},
                       figures=map_figures(folder, found, curve, gains), settings=recorded)
