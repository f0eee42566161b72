"""The replicate runner behind :meth:`Study.run` (DESIGN §7): which replicates to compute, into which store,
within how much time.

:func:`run_study` computes the (condition, replicate) pairs of a plan (:mod:`.plan`: every pair, a shard's
share, or a number of replicates per condition) that the store does not hold yet, stores them as they
finish, and returns the tidy result. A run with ``max_time`` launches no replicate once that many seconds
have passed since it started: the replicates running then finish and are stored, the result says
``out_of_time``, and a re-run continues where it stopped. Ctrl-C and SIGTERM keep what finished likewise.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import backends
from .progress import make_progress
from .artifacts import ARTIFACTS, remove_temporaries
from .extension import import_other_counts, smaller_versions
from .plan import Shard, parse_shard, planned_pairs
from .repair import repair_store
from .result import StudyResult
from .shards import check_store_shard
from .storage import Store
from .tidy import finalise, raw_frame

__all__ = ["RunOptions", "run_study"]


@dataclass(frozen=True)
class RunOptions:
    """How to run a study (the arguments of :meth:`Study.run`; each checked here, one line if bad)."""

    n_jobs: int | None = None  # worker processes; None/1: this process; -1: all CPUs
    backend: str = "loky"  # "loky" or "dask"
    scheduler: str | None = None  # dask scheduler address (only with backend="dask")
    store: str | os.PathLike | None = None  # kill-safe store directory (resume, extension)
    progress: bool | None = None  # tqdm bar; None: when stderr is a terminal
    flush_seconds: float = 2.0  # with a store: write finished rows at least this often
    batch_size: int | None = None  # replicates per task; None: adaptive
    repair: bool = False  # move damaged store files aside, recompute their rows
    max_time: float | None = None  # seconds after which no replicate is launched
    shard: Shard | str | tuple | None = None  # compute only this share of the pairs ("i/N")

    def __post_init__(self):
        if self.backend not in ("loky", "dask"):
            raise ValueError(f"backend={self.backend!r} is invalid; allowed: 'loky' or 'dask'")
        if self.scheduler is not None and self.backend != "dask":
            raise ValueError(f"scheduler={self.scheduler!r} is invalid with backend={self.backend!r}; allowed: "
                             "only with backend='dask'")
        n = self.n_jobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n == 0 or n < -1):
            raise ValueError(f"n_jobs={n!r} is invalid; allowed: None, -1 or an integer >= 1")
        if not (isinstance(self.flush_seconds, (int, float)) and self.flush_seconds >= 0):
            raise ValueError(f"flush_seconds={self.flush_seconds!r} is invalid; allowed: a number >= 0")
        b = self.batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1):
            raise ValueError(f"batch_size={b!r} is invalid; allowed: None or an integer >= 1")
        t = self.max_time
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not t >= 0
                              or not np.isfinite(t)):
            raise ValueError(f"max_time={t!r} is invalid; allowed: None or a number of seconds >= 0")
        object.__setattr__(self, "shard", parse_shard(self.shard))
        if self.shard is not None and self.store is None:
            raise ValueError(f"shard={str(self.shard)!r} needs a store; allowed: Study.run(shard=..., store=DIR), "
                             "one directory per shard, combined by simstudy merge")

    def deadline(self) -> float | None:
        """``time.monotonic()`` at which no more replicates are launched (``max_time`` from now)."""
        return None if self.max_time is None else time.monotonic() + float(self.max_time)


def _at(study, replicates: int):
    """``study`` with another replicate count (same design, methods, seed: its rows are a subset or superset)."""
    if replicates == study.replicates:
        return study
    other = copy.copy(study)
    other.replicates = int(replicates)
    return other


def run_study(study, opts: RunOptions, *, counts: Sequence[int] | None = None, known: pd.DataFrame | None = None,
              deadline: float | None = None, stacklevel: int = 3) -> StudyResult:
    """Run (or resume) the pairs of ``study`` that a plan asks for; see :meth:`Study.run`.

    Parameters
    ----------
    study : Study
    opts : RunOptions
    counts : sequence of int, optional
        Replicates per condition (default ``study.replicates`` for each); the store holds the study at
        ``max(counts)`` replicates and records the counts when they differ (:mod:`.plan`).
    known : DataFrame, optional
        Raw rows computed before without a store (a precision target's earlier rounds): not recomputed.
    deadline : float, optional
        ``time.monotonic()`` after which no replicate is launched (default: from ``opts.max_time``).
    stacklevel : int
        Of the warnings of an interrupted or stopped run.
    """
    deadline = opts.deadline() if deadline is None else deadline
    counts = [int(study.replicates)] * len(study.conditions) if counts is None else [int(n) for n in counts]
    study = _at(study, max(counts))
    names = list(study.methods)
    store, shard = opts.store, opts.shard
    manifest = study.manifest()
    if len(set(counts)) > 1:
        manifest["replicates_per_condition"] = counts
    if shard is not None:
        manifest["shard"] = str(shard)
    if opts.repair and store is not None:
        repair_store(store, study)
    old = check_store_shard(store, shard) if store is not None else None  # the manifest stored there, if any
    st = Store(store, manifest, extends=smaller_versions(store, study.replicates, study._at_count)).open() \
        if store is not None else None
    try:
        if st is not None and shard is None:  # a shard takes no rows from siblings: they would lie outside its share
            import_other_counts(st, study.replicates, study._at_count)
        if st is not None and not st.read_only and old is not None and old.get("replicates_per_condition") != \
                manifest.get("replicates_per_condition"):  # the same study, another plan: say so before it runs
            st.manifest["complete"] = False
            st.write_manifest()
        stored = st.rows() if st is not None else None
        if known is not None and len(known):
            stored = known if stored is None or not len(stored) else pd.concat([stored, known], ignore_index=True)
        done: dict[tuple[int, int], set] = {}
        if stored is not None and len(stored):
            for c, r, m in zip(stored["condition"].to_numpy(), stored["replicate"].to_numpy(),
                               stored["method"].to_numpy()):
                done.setdefault((int(c), int(r)), set()).add(str(m))
        pairs = list(planned_pairs(counts, shard))
        items = []
        for c, r in pairs:
            have = done.get((c, r), ())
            todo = tuple(i for i, m in enumerate(names) if m not in have)
            if todo and getattr(study, "task_per_method", False):
                items.extend((c, r, (i,)) for i in todo)  # long methods: one task each (rows are the same)
            elif todo:
                items.append((c, r, todo))
        if st is not None:  # a read-only store: refused before anything runs
            st.require_writable(len(items))
        payload = study._payload()
        if st is not None and not st.read_only:
            remove_temporaries(st.path / ARTIFACTS)
            payload = dataclasses.replace(payload, artifacts=str(st.path.resolve() / ARTIFACTS))  # workers: any cwd
        new_rows: list[dict] = []
        buffer: list[dict] = []
        last_flush = [time.monotonic()]

        def flush() -> None:
            if st is not None and buffer:
                st.write_chunk(raw_frame(buffer))
                buffer.clear()
            last_flush[0] = time.monotonic()

        def on_rows(rows: list[dict]) -> None:
            new_rows.extend(rows)
            if st is not None:
                buffer.extend(rows)
                if time.monotonic() - last_flush[0] >= opts.flush_seconds:
                    flush()

        interrupted = False
        if items:
            bar = make_progress(len(items), study.name, opts.progress)  # tqdm on a terminal, lines in a log
            try:
                backends.execute(payload, items, n_jobs=opts.n_jobs, backend=opts.backend, scheduler=opts.scheduler,
                                 batch_size=opts.batch_size, on_rows=on_rows, on_items=bar.update, deadline=deadline)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                bar.close()
                flush()
        raw = [stored] if stored is not None and len(stored) else []
        if new_rows:
            raw.append(raw_frame(new_rows))
        all_rows = (pd.concat(raw, ignore_index=True, sort=False) if len(raw) > 1 else
                    raw[0] if raw else raw_frame([]))
        if shard is not None or len(set(counts)) > 1:  # rows of the store outside the plan are not this run's
            keep = pd.MultiIndex.from_tuples(pairs, names=["condition", "replicate"]) if pairs else None
            mask = (pd.MultiIndex.from_arrays([all_rows["condition"].astype("int64"),
                                               all_rows["replicate"].astype("int64")]).isin(keep)
                    if keep is not None and len(all_rows) else np.zeros(len(all_rows), dtype=bool))
            all_rows = all_rows[mask]
        fin = finalise(all_rows, study.conditions, names, study.truths())
        expected = len(pairs) * len(names)
        complete = len(fin.table) == expected
        out_of_time = not complete and not interrupted and deadline is not None and time.monotonic() >= deadline
        if st is not None and complete and (items or not st.manifest.get("complete")):
            st.consolidate(fin.raw)
        if st is not None:
            manifest["complete"] = bool(st.manifest.get("complete"))
            for key in ("imported", "extended_from"):  # where the rows not computed by this run came from
                if key in st.manifest:
                    manifest[key] = st.manifest[key]
        where = (f" and stored in {str(store)!r}; run again to " if st is not None
                 else "; pass store= to keep them across runs")
        if interrupted:
            warnings.warn(f"study {study.name!r} interrupted: {len(fin.table)} of {expected} rows finished"
                          + (where + "resume" if st is not None else where), RuntimeWarning, stacklevel=stacklevel)
        elif out_of_time:
            warnings.warn(f"study {study.name!r} stopped at max_time={opts.max_time:g} s: {len(fin.table)} of "
                          f"{expected} rows finished" + (where + "continue" if st is not None else where),
                          RuntimeWarning, stacklevel=stacklevel)
        result = StudyResult(fin.table, manifest=manifest, timings=fin.timings, interrupted=interrupted)
        result.out_of_time = out_of_time
        result.measures = study.measures  # callables: summary() adds them (simstudy.engine.user_measures)
        return result
    finally:
        if st is not None:
            st.close()
