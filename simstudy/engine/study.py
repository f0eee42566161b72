"""Study definition and the replicate runner (DESIGN §7).

A study is a design grid (conditions) times methods times replicates. For
each (condition, replicate) the engine draws one data set with
``generate(cond, rng)`` and hands the same data to every method
``analyse[name](data, cond)``; each method returns a dict of named scalars
(estimates, standard errors, interval limits, metrics). The engine records a
tidy row per (condition, replicate, method) with its status, so that
performance measures with Monte Carlo standard errors can be computed by
:meth:`StudyResult.summary` (ADEMP: Morris, White and Crowther 2019).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import seeds as _seeds
from .callables import normalise_methods
from .design import expand_design, factor_names
from .design_columns import reserved_names
from .errors import TruthError
from .result import StudyResult
from .limits import check_limits
from .performance import user_measures
from .storage import callable_fingerprint, config_hash
from .tidy import finalise
from .worker import Payload, check_truth_value, run_batch, wants_rng

__all__ = ["Study"]


# ------------------------------------------------------------------------------------------------------------
# Study
# ------------------------------------------------------------------------------------------------------------
def _package_version() -> str:
    """The installed distribution's version (the engine imports nothing above itself)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simstudy")
    except PackageNotFoundError:
        return "unknown"


class Study:
    """A Monte Carlo simulation study: design x methods x replicates (DESIGN §7).

    Parameters
    ----------
    design : mapping, list of dict or DataFrame
        Conditions: ``{"n": [20, 50], "p": [0.1, 0.5]}`` is a full factorial
        grid (4 conditions); a list of dicts is used as given (non-factorial).
        See :func:`simstudy.engine.design.expand_design`.
    generate : callable
        ``generate(cond, rng) -> data``: draws one data set for condition
        ``cond`` (a dict) from ``rng`` (a :class:`numpy.random.Generator`
        keyed by the replicate's position; see :mod:`simstudy.engine.seeds`).
    analyse : dict, list or callable
        Methods, ``name -> fn(data, cond) -> dict`` of named scalars. A method
        whose signature has an ``rng`` parameter is also passed its own
        Generator, one with a ``ctx`` parameter its position and a folder
        for files (:mod:`simstudy.engine.artifacts`). Raise :class:`~simstudy.engine.FitFailure` (or any
        exception with a ``status`` attribute) to record a typed failure.
        Returned names ``est``, ``est_se``, ``est_ci_low``, ``est_ci_high``,
        ``est_pvalue`` attach a standard error, interval and p-value to the
        estimand ``est``; with a single estimand (or one called
        ``"estimate"``) the bare names ``se``, ``ci_low``, ``ci_high``,
        ``pvalue`` do too.
    truth : callable, optional
        ``truth(cond) -> dict`` estimand name -> true value (a scalar is the
        estimand ``"estimate"``). Evaluated once per condition in the calling
        process. Without it, :meth:`StudyResult.summary` reports the mean of
        each returned metric.
    replicates : int
        Replicates per condition (>= 1).
    seed : int, optional
        Root seed. ``None`` draws one from the OS and records it.
    name : str, optional
        Study name for reports.
    fingerprint : str, optional
        Text identifying the code of the study for the store's config hash;
        by default derived from the source of ``generate``, the methods and
        ``truth``.
    copy_data : bool
        Deep-copy the data for every method but the last of a replicate, so a
        method that mutates its input cannot affect another.
    seed_torch : bool or None
        ``None``: seed torch from the replicate stream if the calling process
        or the worker has imported it; ``True``: import and seed it always;
        ``False``: never. Torch is seeded before ``generate`` and again before
        each method, from streams keyed by position.
    options : dict, optional
        Reporting options stored with the results (not hashed):
        ``reference`` (method for relative efficiency), ``rates`` (list of
        keyword dicts for :meth:`StudyResult.rate`), ``level`` (nominal
        coverage, default 0.95), ``description``, ``figures`` (list of
        ``"module:function"`` hooks ``fn(result, figdir) -> [(title, path)]``).
    timeout : float, optional
        Seconds one replicate (generate + methods) may run; beyond, its rows
        are recorded ``"timeout"`` and the study goes on. ``promote_warnings``:
        warning classes (or names) recorded as failures (status ``"warning"``);
        other warnings are counted per row. See :mod:`simstudy.engine.limits`.
    measures : mapping, optional
        Performance measures of your own, name -> spec, added to :meth:`StudyResult.summary` (kept in
        memory, not stored): see :mod:`simstudy.engine.user_measures`.
    task_per_method : bool
        Run each (condition, replicate, method) as its own task instead of each (condition, replicate):
        for methods that take minutes each (an LLM fine-tune), progress, resume after a kill and the load
        of the workers then move by method; each task generates the replicate's data again from the same
        stream, so the rows are identical either way (not hashed: a store resumes with either setting).

    Examples
    --------
    >>> study = Study(design={"n": [20, 50]}, generate=lambda c, rng: rng.normal(size=c["n"]),
    ...               analyse={"mean": lambda x, c: {"estimate": x.mean()}},
    ...               truth=lambda c: {"estimate": 0.0}, replicates=10, seed=1)
    >>> study.run().summary().query("measure == 'bias'")  # doctest: +SKIP
    """

    def __init__(self, design, generate: Callable, analyse, truth: Callable | None = None, replicates: int = 100,
                 seed: int | None = None, *, name: str | None = None, fingerprint: str | None = None,
                 copy_data: bool = True, seed_torch: bool | None = None, options: Mapping | None = None,
                 timeout: float | None = None, promote_warnings=(), measures: Mapping | None = None,
                 task_per_method: bool = False):
        self.timeout, self.promote_warnings = check_limits(timeout, promote_warnings)
        self.conditions = expand_design(design)
        self.factors = factor_names(self.conditions)
        if not callable(generate):
            raise ValueError(f"generate={generate!r} is invalid; allowed: a callable (cond, rng) -> data")
        self.generate = generate
        self.methods = normalise_methods(analyse)
        for m in self.methods:
            if m in self.factors:
                raise ValueError(f"method name {m!r} is invalid; allowed: a name that is not a design factor")
        if truth is not None and not callable(truth):
            raise ValueError(f"truth={truth!r} is invalid; allowed: a callable cond -> dict, or None")
        self.truth = truth
        if isinstance(replicates, np.integer):
            replicates = int(replicates)
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates={replicates!r} is invalid; allowed: an integer >= 1")
        self.replicates = replicates
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = _seeds.check_seed(seed)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name={name!r} is invalid; allowed: a string")
        self.name = name or "study"
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"fingerprint={fingerprint!r} is invalid; allowed: a string or None")
        self.fingerprint = fingerprint if fingerprint is not None else self._derive_fingerprint()
        if seed_torch not in (None, True, False):
            raise ValueError(f"seed_torch={seed_torch!r} is invalid; allowed: None, True or False")
        self.copy_data = bool(copy_data)
        self.seed_torch = seed_torch
        self.options = dict(options or {})
        self.measures = user_measures(measures)
        if not isinstance(task_per_method, bool):
            raise ValueError(f"task_per_method={task_per_method!r} is invalid; allowed: true or false")
        self.task_per_method = task_per_method
        self._truths: list[dict] | None = None

    # -- identity ------------------------------------------------------------------------------------------
    def _derive_fingerprint(self) -> str:
        parts = [callable_fingerprint(self.generate), callable_fingerprint(self.truth)]
        parts += [f"{k}={callable_fingerprint(f)}" for k, f in self.methods.items()]
        return "\n".join(parts)

    @property
    def config_hash(self) -> str:
        """SHA-256 of design, methods, replicates, seed and fingerprint (see storage)."""
        return self._at_count(self.replicates)

    def truths(self) -> list[dict]:
        """True estimand values, one dict per condition (evaluated once, cached)."""
        if self._truths is None:
            out = []
            for i, cond in enumerate(self.conditions):
                if self.truth is None:
                    out.append({})
                    continue
                try:
                    t = self.truth(dict(cond))
                except Exception as exc:  # noqa: BLE001 - the user's code: name the condition, keep one line
                    msg = str(exc).splitlines()[0] if str(exc) else ""
                    raise TruthError(f"truth raised {type(exc).__name__}{(': ' + msg) if msg else ''} for condition "
                                     f"{i} {dict(cond)!r}; allowed: a truth function cond -> {{estimand: number}} "
                                     "defined for every condition") from exc
                if not isinstance(t, Mapping):
                    t = {"estimate": t}
                out.append({str(k): check_truth_value(str(k), v, i) for k, v in t.items()})
            self._truths = out
        return self._truths

    def manifest(self) -> dict:
        """The JSON description stored with the results."""
        return {"format": 1, "simstudy_version": _package_version(), "name": self.name, "config_hash": self.config_hash,
                "seed": self.seed, "replicates": self.replicates, "methods": list(self.methods),
                "factors": self.factors, "conditions": self.conditions, "truths": self.truths(),
                "options": self.options}

    def _at_count(self, replicates: int) -> str:
        return config_hash(conditions=self.conditions, methods=list(self.methods), replicates=replicates,
                           seed=self.seed,  # promoted warnings change what a failure is: part of the study
                           fingerprint=self.fingerprint + "".join(f"\n{w}" for w in self.promote_warnings))

    def __repr__(self) -> str:
        return (f"Study(name={self.name!r}, conditions={len(self.conditions)}, methods={list(self.methods)}, "
                f"replicates={self.replicates}, seed={self.seed})")

    def _payload(self) -> Payload:
        # seed_torch=None: if this process has loaded torch the study very likely uses it, so make every worker
        # import and seed it before the first replicate (a lazy import inside a method would otherwise leave the
        # first replicate of each worker unseeded); otherwise workers seed torch only if they have loaded it.
        seed_torch = self.seed_torch
        if seed_torch is None and "torch" in sys.modules:
            seed_torch = True
        return Payload(generate=self.generate,
                        methods=tuple((k, f, wants_rng(f)) for k, f in self.methods.items()),
                        conditions=tuple(self.conditions), seed=self.seed,
                        factors=frozenset(self.factors) | frozenset(reserved_names(self.truths())),  # + true_EST
                        seed_torch=seed_torch, copy_data=self.copy_data, timeout=self.timeout,
                        promote=self.promote_warnings)

    # -- single replicates ---------------------------------------------------------------------------------
    def rng(self, condition: int, replicate: int) -> np.random.Generator:
        """The Generator that ``generate`` receives for (condition, replicate)."""
        return _seeds.replicate_rng(self.seed, condition, replicate)

    def run_replicate(self, condition: int, replicate: int, methods: Sequence[str] | None = None) -> pd.DataFrame:
        """Re-run one replicate in this process (e.g. to debug a recorded failure).

        Parameters
        ----------
        condition, replicate : int
            Positions as in the results table.
        methods : list of str, optional
            Methods to run (default all).

        Returns
        -------
        DataFrame
            The replicate's rows, identical to those of :meth:`run`.
        """
        self._check_position(condition, replicate)
        names = list(self.methods)
        chosen = names if methods is None else list(methods)
        for m in chosen:
            if m not in self.methods:
                raise ValueError(f"method={m!r} is invalid; allowed: one of {names}")
        rows = run_batch(self._payload(), [(condition, replicate, tuple(names.index(m) for m in chosen))])
        return finalise(pd.DataFrame(rows), self.conditions, names, self.truths()).table

    def _check_position(self, condition: int, replicate: int) -> None:
        if not (isinstance(condition, (int, np.integer)) and 0 <= condition < len(self.conditions)):
            raise ValueError(f"condition={condition!r} is invalid; allowed: 0..{len(self.conditions) - 1}")
        if not (isinstance(replicate, (int, np.integer)) and 0 <= replicate < self.replicates):
            raise ValueError(f"replicate={replicate!r} is invalid; allowed: 0..{self.replicates - 1}")

    # -- running -------------------------------------------------------------------------------------------
    def run(self, n_jobs: int | None = None, *, backend: str = "loky", scheduler: str | None = None,
            store: str | os.PathLike | None = None, progress: bool | None = None, flush_seconds: float = 2.0,
            batch_size: int | None = None, repair: bool = False, max_time: float | None = None,
            shard: str | tuple | None = None, target_mcse: Mapping[str, float] | None = None,
            max_replicates: int | None = None) -> "StudyResult":
        """Run (or resume) the study (the runner: :mod:`simstudy.engine.runner`).

        Parameters
        ----------
        n_jobs : int, optional
            Worker processes. ``None`` or 1 with ``backend="loky"`` runs in this
            process; -1 uses all CPUs. With ``backend="dask"`` and no scheduler,
            the number of LocalCluster workers (default 2).
        backend : {"loky", "dask"}
            joblib's loky process pool, or a dask.distributed cluster.
        scheduler : str, optional
            Address of a running dask scheduler (``"tcp://host:8786"``); without
            it a LocalCluster (processes, one thread each) is started and
            stopped for the run. Only with ``backend="dask"``.
        store : path, optional
            Directory for kill-safe storage and resume (see
            :mod:`simstudy.engine.storage`). Rows already stored are skipped;
            a directory holding another study is refused. Methods with a ``ctx``
            parameter keep files there (:mod:`simstudy.engine.artifacts`).
        progress : bool, optional
            Show a tqdm progress bar; default: when stderr is a terminal.
        flush_seconds : float
            With a store, write finished rows at least this often.
        batch_size : int, optional
            Replicates per task sent to a worker; default adaptive (one at
            first, then as many as take about 0.5 s; see
            :mod:`simstudy.engine.backends`).
        repair : bool
            Move damaged store files aside, recompute their rows (:mod:`simstudy.engine.repair`).
        max_time : float, optional
            Seconds after which no replicate is launched; those running finish and are stored, the result
            has ``out_of_time=True``, and a re-run continues.
        shard : str or (int, int), optional
            ``"i/N"``: compute only shard i of N of the (condition, replicate) pairs into ``store``; combine
            the shard stores with :func:`simstudy.engine.shards.merge_stores` (``simstudy merge``).
        target_mcse : dict, optional
            Measure -> MCSE: run in rounds until every condition's MCSE of each measure is at or below it
            (the first round has ``replicates``); see :mod:`simstudy.engine.precision`.
        max_replicates : int, optional
            With ``target_mcse``: the cap per condition (default 100 x ``replicates``).

        Returns
        -------
        StudyResult
            The tidy table and performance measures. After Ctrl-C the run
            stops cleanly, keeps (and stores) every finished row, warns, and
            returns a partial result with ``interrupted=True``; with a precision
            target, ``precision`` holds the replicates used and MCSE reached per condition.
        """
        from .runner import RunOptions, run_study

        opts = RunOptions(n_jobs=n_jobs, backend=backend, scheduler=scheduler, store=store, progress=progress,
                          flush_seconds=flush_seconds, batch_size=batch_size, repair=repair, max_time=max_time,
                          shard=shard)
        if target_mcse is None:
            if max_replicates is not None:
                raise ValueError(f"max_replicates={max_replicates!r} is invalid without target_mcse; allowed: "
                                 "target_mcse={'MEASURE': MCSE} with it, or replicates= for a fixed count")
            return run_study(self, opts)
        from .precision import PrecisionTarget, run_to_precision

        cap = 100 * self.replicates if max_replicates is None else max_replicates
        return run_to_precision(self, opts, PrecisionTarget(targets=target_mcse, max_replicates=cap))
