"""Replicate until a precision target: every condition runs until the Monte Carlo standard error of the named
measures is at or below the target, or a cap is reached (DESIGN §7; none of SimDesign, rsimsum, benchopt has it).

``Study.run(target_mcse={"coverage": 0.01}, max_replicates=20000)`` (``simstudy run STUDY --target-mcse
coverage=0.01 --max-replicates 20000``) runs in rounds:

1. Round 1 runs every condition with the study's ``replicates`` (the minimum R, at least
   :data:`MIN_REPLICATES`).
2. After each round the summary (:meth:`StudyResult.summary`, built-in measures and your own) gives, per
   condition, the largest MCSE of each target measure over its cells (methods x estimands). A condition
   whose MCSEs are all at or below their targets stops; one at the cap stops, flagged ``"capped"``.
3. Every other condition grows from ``R`` to the count its MCSE projects (``R (mcse / target)^2``: an MCSE
   falls like ``1 / sqrt(R)``), but by a factor of at least :data:`MIN_GROWTH` and at most ``growth``
   (default 2), and never beyond the cap. Each round extends the store (:mod:`.extension`): the stored study
   grows to the largest count, conditions that stopped keep theirs (``replicates_per_condition`` in the
   manifest, :mod:`.plan`), and since every replicate is keyed by its position the final table equals a
   fixed-R run's rows for those replicates.

The result's ``precision`` (also ``DIR/precision.csv``): one row per condition x measure with the target,
the MCSE reached, the method and estimand of the cell that sets it, the replicates used, the rounds and the
status (``"reached"``, ``"capped"``, or ``"stopped"`` by ``max_time`` or Ctrl-C). Re-running the same call
resumes from the stored counts.

A stopping rule on the measured MCSE biases it slightly. The MCSE is itself estimated, so stopping at the
first round whose estimate falls below the target selects estimates that happen to be low (the reported
MCSE is a little optimistic), and for measures whose MCSE depends on the estimate (coverage:
``sqrt(p (1 - p) / R)``) the stopping time depends on the estimate, which can bias it too. The
implementation limits both: a minimum R, so the MCSE estimate is stable before it is first used (its
relative error is about ``1 / sqrt(2 R)``); rounds that grow geometrically, so a condition is looked at only
``O(log(cap / R))`` times (a rule looking after every replicate selects far more); and every look uses all
replicates so far. The remaining selection is of the order of the MCSE's own sampling error; when it
matters, run the final counts again with another seed, or use the counts as a fixed R. An MCSE measured as
0 (a coverage observed as exactly 0 or 1: with a true coverage of 0.97 that happens in 54% of runs of 20
replicates) says nothing of the precision, so it never stops a condition: it grows by ``growth`` until an
MCSE above 0 is measured, or to the cap (where a measured 0 counts as reached).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .measures import MEASURES
from .plan import replicate_counts
from .result import StudyResult
from .runner import RunOptions, run_study
from .storage import PRECISION, atomic_write_text, read_manifest

__all__ = ["MIN_GROWTH", "MIN_REPLICATES", "PRECISION_FILE", "PrecisionTarget", "run_to_precision"]

#: Fewest replicates per condition before the first look (the study's ``replicates`` must be at least this).
MIN_REPLICATES = 10
#: Least factor by which a condition that has not reached its target grows in a round.
MIN_GROWTH = 1.25
#: The per-condition table, written to the store.
PRECISION_FILE = PRECISION  # the store file, named once in .storage


@dataclass(frozen=True)
class PrecisionTarget:
    """A precision target (see the module docstring); checked on construction, one line if bad."""

    targets: Mapping[str, float]  # measure -> MCSE at or below which a condition stops
    max_replicates: int  # cap on the replicates of one condition
    growth: float = 2.0  # largest factor by which a condition grows in one round
    methods: tuple[str, ...] | None = None  # cells that count: these methods (default every method)
    estimands: tuple[str, ...] | None = None  # and these estimands (default every estimand)

    def __post_init__(self):
        if not isinstance(self.targets, Mapping) or not self.targets:
            raise ValueError(f"target_mcse={self.targets!r} is invalid; allowed: a dict measure -> MCSE, e.g. "
                             "{'coverage': 0.01}")
        for name, value in self.targets.items():
            if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):
                raise ValueError(f"target_mcse[{name!r}]={value!r} is invalid; allowed: a measure name and an MCSE "
                                 "> 0, e.g. {'coverage': 0.01}")
        m = self.max_replicates
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < MIN_REPLICATES:
            raise ValueError(f"max_replicates={m!r} is invalid; allowed: an integer >= {MIN_REPLICATES}")
        if not (isinstance(self.growth, (int, float)) and MIN_GROWTH <= self.growth <= 100):
            raise ValueError(f"growth={self.growth!r} is invalid; allowed: a number from {MIN_GROWTH} to 100")

    def check(self, study) -> None:
        """Names against the study: measures it reports, its methods; its first round against the cap."""
        known = [*MEASURES, *study.measures, *(study.options.get("measures") or {})]
        for name in self.targets:
            if name not in known:
                raise ValueError(f"target_mcse measure {name!r} is invalid; allowed: one of {known}")
        for m in self.methods or ():
            if m not in study.methods:
                raise ValueError(f"methods={list(self.methods)!r} is invalid; allowed: methods of {list(study.methods)}")
        if study.replicates < MIN_REPLICATES:
            raise ValueError(f"replicates={study.replicates} is invalid with target_mcse; allowed: a first round of "
                             f">= {MIN_REPLICATES} replicates (a stable MCSE before the first look)")
        if self.max_replicates < study.replicates:
            raise ValueError(f"max_replicates={self.max_replicates} is invalid; allowed: an integer >= the first "
                             f"round's replicates ({study.replicates})")

    def next_count(self, replicates: int, ratio: float) -> int:
        """The replicates of the next round of a condition whose MCSE is ``ratio`` times its target."""
        want = replicates * ratio**2 if math.isfinite(ratio) else math.inf
        low, high = math.ceil(replicates * MIN_GROWTH), math.ceil(replicates * self.growth)
        want = math.ceil(want - 1e-9) if math.isfinite(want) else high  # 1e-9: 100 x 1.3**2 is 169, not 170
        return int(min(self.max_replicates, max(low, min(high, want))))


def _start_counts(study, store) -> list[int]:
    """Round 1: the study's replicates, or what the store already holds of this study (a resumed run)."""
    first = [int(study.replicates)] * len(study.conditions)
    if store is None:
        return first
    try:
        old = read_manifest(store)
        held = replicate_counts(old)
    except (ValueError, KeyError, TypeError):  # no store yet (or damaged: the run says so)
        return first
    if old.get("config_hash") != study._at_count(int(old["replicates"])) or len(held) != len(first):
        return first  # another study: the run refuses it
    return [max(a, b) for a, b in zip(first, held)]


def _worst(summary: pd.DataFrame, target: PrecisionTarget, n_conditions: int, strict: bool = True) -> pd.DataFrame:
    """Per condition x target measure: the largest MCSE over the cells, and the cell (method, estimand).

    ``strict``: a measure without any cell is an error (else its MCSEs are NaN: a run stopped early)."""
    cells = summary[summary["measure"].isin(list(target.targets))]
    if target.methods is not None:
        cells = cells[cells["method"].isin(target.methods)]
    if target.estimands is not None:
        cells = cells[cells["estimand"].isin(target.estimands)]
    rows = []
    for name, goal in target.targets.items():
        mine = cells[cells["measure"] == name]
        if not len(mine) and strict:
            raise ValueError(f"target_mcse measure {name!r} has no cells in this study's summary (no method and "
                             f"estimand report it); allowed: one of {sorted(set(summary['measure']))}")
        for c in range(n_conditions):
            part = mine[mine["condition"] == c]
            mcse = part["mcse"].to_numpy(np.float64)
            if not len(part) or np.isnan(mcse).any():  # a cell without an MCSE has not reached any target
                at = int(np.flatnonzero(np.isnan(mcse))[0]) if len(part) else None
                rows.append((c, name, goal, math.nan, *(part.iloc[at][["method", "estimand"]] if at is not None
                                                        else ("", ""))))
                continue
            at = int(np.argmax(mcse))
            rows.append((c, name, goal, float(mcse[at]), part.iloc[at]["method"], part.iloc[at]["estimand"]))
    return pd.DataFrame(rows, columns=["condition", "measure", "target", "mcse", "method", "estimand"])


def run_to_precision(study, opts: RunOptions, target: PrecisionTarget) -> StudyResult:
    """Run ``study`` in rounds until every condition reaches ``target`` (see the module docstring).

    Returns
    -------
    StudyResult
        The table at the final counts; ``precision`` holds the per-condition table (also written to the
        store as ``precision.csv``); ``interrupted`` / ``out_of_time`` as for a plain run.
    """
    target.check(study)
    if opts.shard is not None:
        raise ValueError(f"shard={str(opts.shard)!r} is invalid with target_mcse; allowed: one or the other (a "
                         "precision target needs every replicate of a condition to decide)")
    deadline = opts.deadline()
    counts = _start_counts(study, opts.store)
    n = len(counts)
    status, rounds = ["running"] * n, [0] * n
    known = None
    while True:
        res = run_study(study, opts, counts=counts, known=known, deadline=deadline, stacklevel=4)
        for c in range(n):
            rounds[c] += status[c] == "running"
        if opts.store is None:  # earlier rounds live in memory only: handed to the next round as done
            known = res.table.drop(columns=res.factors).assign(_seconds=res.timings["seconds"].to_numpy())
        stopped = res.interrupted or res.out_of_time
        worst = _worst(res.summary(), target, n, strict=not stopped)
        if stopped:
            status = ["stopped" if s == "running" else s for s in status]
            break
        ratio = (worst["mcse"] / worst["target"]).to_numpy(np.float64).reshape(len(target.targets), n)
        zero = (ratio == 0).any(axis=0)  # an MCSE measured as 0 says nothing of the precision (see above)
        ratio = np.where(np.isnan(ratio), np.inf, ratio).max(axis=0)  # NaN: no MCSE yet
        for c in range(n):
            if status[c] != "running":
                continue
            if ratio[c] <= 1.0 and not zero[c]:
                status[c] = "reached"
            elif counts[c] >= target.max_replicates:
                status[c] = "reached" if ratio[c] <= 1.0 else "capped"
            else:
                counts[c] = target.next_count(counts[c], float(ratio[c]) if not zero[c] else math.inf)
        if "running" not in status:
            break
    table = _table(res, worst, rounds, status)
    res.precision = table
    if opts.store is not None:
        atomic_write_text(Path(opts.store) / PRECISION_FILE, table.to_csv(index=False))
    return res


def _table(res: StudyResult, worst: pd.DataFrame, rounds: Sequence[int], status: Sequence[str]) -> pd.DataFrame:
    """The tidy per condition x measure table (see the module docstring)."""
    out = res.conditions.merge(worst, on="condition", how="right", sort=False)
    done = res.table.groupby("condition")["replicate"].nunique()  # finished replicates (fewer if stopped)
    out["replicates"] = [int(done.get(c, 0)) for c in out["condition"]]
    out["rounds"] = [int(rounds[c]) for c in out["condition"]]
    out["reached"] = out["mcse"].to_numpy(np.float64) <= out["target"].to_numpy(np.float64)
    out["status"] = [status[c] for c in out["condition"]]
    return out.sort_values(["condition", "measure"], kind="mergesort").reset_index(drop=True)
