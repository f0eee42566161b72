"""Execution backends: in-process, loky processes, dask.distributed (DESIGN §7).

All backends run the same pure task, :func:`simstudy.engine.worker.run_batch`,
on chunks of items ``(condition, replicate, method indices)`` and hand the
finished rows back to the calling process, which stores them. Results never
depend on the backend, the worker count or the chunking: every item draws
from its own positional stream and runs with one thread
(:mod:`simstudy.engine.seeds`).

Chunks are sized adaptively: the first chunks hold one replicate, later ones
as many as take about ``target_seconds`` (default 0.5 s) by the running mean
duration, so fast replicates do not drown in dispatch overhead while slow ones
are returned (and stored) one by one. At most ``2 x workers`` chunks are in
flight, so Ctrl-C (or SIGTERM) loses at most the chunks running at that moment.
A replicate that kills its worker is traced and recorded as ``"crashed"``,
and workers whose parent has died end themselves (:mod:`simstudy.engine.crashes`).

Dask: ``backend="dask"`` connects to ``scheduler`` or starts a LocalCluster
(processes, one thread each) for the run. A script that starts a
LocalCluster must guard its entry point with ``if __name__ == "__main__":``
(dask starts workers by spawning, which re-imports the main module). On
Slurm, start the cluster with dask-jobqueue and pass its address::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=1, processes=1, memory="4GB", walltime="02:00:00")
    cluster.scale(jobs=32)
    result = study.run(backend="dask", scheduler=cluster.scheduler_address, store="results/big")
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, wait

from .crashes import Crashed, Pool, drive, loky_detail, terminate_as_exit, watch_parent
from .worker import run_batch

__all__ = ["execute"]

#: Environment of loky workers: one BLAS/OpenMP thread from the start (see seeds.single_threaded).
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}

_CACHE: dict[str, object] = {}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _run_chunk(key: str, blob: bytes, items: Sequence[tuple], sys_path: Sequence[str] = ()) -> tuple[list, float]:
    """Worker side: unpickle the payload once per process, run the chunk, return (rows, seconds).

    ``sys_path`` is the parent's import path: a reused worker started before
    the parent added a folder to ``sys.path`` must still find the study's modules.
    """
    import sys


    payload = _CACHE.get(key)
    if payload is None:
        cloudpickle = _cloudpickle()
        missing = [p for p in sys_path if p not in sys.path]
        if missing:
            sys.path[:0] = missing
        _CACHE.clear()
        payload = _CACHE[key] = cloudpickle.loads(blob)
    t0 = time.perf_counter()
    rows = run_batch(payload, items)
    return rows, time.perf_counter() - t0


def _same(payload):
    return payload


def _run_chunk_dask(payload, items: Sequence[tuple]) -> tuple[list, float]:

    t0 = time.perf_counter()
    rows = run_batch(payload, items)
    return rows, time.perf_counter() - t0


class _Chunker:
    """Hands out consecutive chunks of items sized to take about ``target`` seconds."""

    def __init__(self, items: Sequence, target: float, fixed: int | None = None, max_size: int = 1000,
                 deadline: float | None = None):
        self.items, self.target, self.fixed, self.max_size = items, target, fixed, max_size
        self.deadline = deadline  # time.monotonic() after which no chunk is handed out (a run's max_time)
        self.pos = 0
        self.seconds = 0.0
        self.count = 0

    def update(self, n: int, seconds: float) -> None:
        self.count += n
        self.seconds += seconds

    def next(self) -> list | None:
        if self.pos >= len(self.items) or (self.deadline is not None and time.monotonic() >= self.deadline):
            return None
        if self.fixed is not None:
            size = self.fixed
        elif self.count == 0:
            size = 1
        else:
            per = self.seconds / self.count
            size = int(max(1, min(self.max_size, self.target / per if per > 0 else self.max_size)))
        chunk = list(self.items[self.pos:self.pos + size])
        self.pos += len(chunk)
        return chunk


def execute(payload, items: Sequence[tuple], *, n_jobs: int | None, backend: str, scheduler: str | None,
            batch_size: int | None, on_rows: Callable[[list], None], on_items: Callable[[int], None],
            target_seconds: float = 0.5, deadline: float | None = None) -> None:
    """Run every item and report rows as they finish.

    Parameters
    ----------
    payload : simstudy.engine.worker.Payload
        Callables, conditions and seed.
    items : sequence of (int, int, tuple of int)
        (condition, replicate, method indices) to run.
    n_jobs : int or None
        Worker count (see :meth:`simstudy.engine.Study.run`).
    backend : {"loky", "dask"}
    scheduler : str or None
        Dask scheduler address.
    batch_size : int or None
        Fixed items per chunk (default: adaptive).
    on_rows : callable
        Called in this process with each finished list of rows.
    on_items : callable
        Called with the number of items just finished (progress).
    target_seconds : float
        Target duration of an adaptive chunk.
    deadline : float, optional
        ``time.monotonic()`` after which no new item is launched (those running finish and are reported);
        the caller tells a finished run from a stopped one by the items reported.

    Raises
    ------
    KeyboardInterrupt
        Propagated after the workers have been stopped; every chunk that had
        finished is reported through ``on_rows`` first.
    SystemExit
        Status 143 on SIGTERM (where its action is the default), after the
        same clean-up as for Ctrl-C.

    Notes
    -----
    A replicate that kills its worker is recorded ``"crashed"`` and the run
    goes on (:mod:`simstudy.engine.crashes`). With one worker the replicates
    run in this process, so such a replicate ends the process itself; the
    rows stored before it are kept, but a re-run reaches it again: use two or more workers.
    """

    with terminate_as_exit():
        if backend == "dask":
            _execute_dask(payload, items, n_jobs=n_jobs, scheduler=scheduler, batch_size=batch_size,
                          on_rows=on_rows, on_items=on_items, target_seconds=target_seconds, deadline=deadline)
            return
        workers = _cpu_count() if n_jobs == -1 else (n_jobs or 1)
        if workers == 1:  # in this process: a replicate that kills its process ends the run (kept rows resume)
            for item in items:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                on_rows(run_batch(payload, [item]))
                on_items(1)
            return
        _execute_loky(payload, items, workers=workers, batch_size=batch_size, on_rows=on_rows, on_items=on_items,
                      target_seconds=target_seconds, deadline=deadline)


def _cloudpickle():
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - joblib vendors a copy
        from joblib.externals import cloudpickle
    return cloudpickle


#: loky warns when an idle worker times out while another still runs a long replicate (the tail of a
#: study of slow fits). Nothing is lost: loky starts a new worker if one is needed, and rows are keyed
#: by position. The warning is raised in loky's management thread, so only a process-wide filter,
#: narrowed to this one message, silences it.
_LOKY_IDLE_WORKER = "A worker stopped while some jobs were given to the executor"
#: Seconds an idle loky worker waits for work before it exits (then restarted on demand).
_WORKER_IDLE_TIMEOUT = 120


def _ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C in a terminal signals the whole process group, workers included; the parent
    alone handles it (keeps what finished, stops the workers), so a worker never dies of it mid-wait. A worker
    also ends itself once its parent is gone (:func:`simstudy.engine.crashes.watch_parent`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent()


class _LokyPool(Pool):
    """loky's reusable executor; a dying worker breaks it (every future in flight fails), then a fresh one."""

    breaks_all = True

    def __init__(self, payload, workers: int):
        cloudpickle = _cloudpickle()
        import sys

        self.blob = cloudpickle.dumps(payload)
        self.key = hashlib.sha256(self.blob).hexdigest()
        self.sys_path = list(sys.path)
        self.workers = workers
        self.executor, self.size = None, 0

    def renew(self) -> None:
        self.executor = None  # started by the next submit, at the size it needs
        self.generation += 1

    def _executor(self, size: int):
        from joblib.externals.loky import get_reusable_executor

        if self.executor is None or size != self.size:  # a broken executor is replaced, a healthy one resized
            self.executor = get_reusable_executor(max_workers=size, env=_WORKER_ENV, timeout=_WORKER_IDLE_TIMEOUT,
                                                  initializer=_ignore_interrupts)
            self.size = size
        return self.executor

    def submit(self, items: list, alone: bool = False):
        from joblib.externals.loky.process_executor import BrokenProcessPool

        size = 1 if alone else self.workers  # one worker starts faster than many, after each crash
        try:
            return self._executor(size).submit(_run_chunk, self.key, self.blob, items, self.sys_path)
        except BrokenProcessPool:  # broken since the last look: its futures say so; this task goes to a new pool
            self.renew()
            return self._executor(size).submit(_run_chunk, self.key, self.blob, items, self.sys_path)

    def wait(self, futures: list, first: bool = True) -> set:
        return wait(futures, return_when=FIRST_COMPLETED if first else ALL_COMPLETED)[0]

    def outcome(self, fut) -> tuple[list, float]:
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        try:
            return fut.result()
        except TerminatedWorkerError as exc:
            raise Crashed(loky_detail(exc)) from None

    def abort(self, futures: list) -> None:
        for fut in futures:
            fut.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, kill_workers=True)


def _execute_loky(payload, items, *, workers, batch_size, on_rows, on_items, target_seconds, deadline) -> None:
    warnings.filterwarnings("ignore", message=_LOKY_IDLE_WORKER, category=UserWarning)
    drive(_LokyPool(payload, workers), payload, _Chunker(items, target_seconds, batch_size, deadline=deadline),
          workers, on_rows, on_items)


class _DaskPool(Pool):
    """A dask.distributed client; its nannies restart dead workers, the scheduler reports KilledWorker."""

    def __init__(self, client, payload):
        self.client = client
        # A task, not scattered data: the scheduler can compute it again when every worker holding it has died.
        self.remote = client.submit(_same, payload, pure=False)

    def submit(self, items: list, alone: bool = False):
        return self.client.submit(_run_chunk_dask, self.remote, items, pure=False)

    def wait(self, futures: list, first: bool = True) -> set:
        from distributed import wait as dask_wait

        return set(dask_wait(futures, return_when="FIRST_COMPLETED" if first else "ALL_COMPLETED").done)

    def outcome(self, fut) -> tuple[list, float]:
        from distributed import KilledWorker

        try:
            return fut.result()
        except KilledWorker:
            raise Crashed("dask reported KilledWorker") from None

    def release(self, fut) -> None:
        fut.release()

    def abort(self, futures: list) -> None:
        self.client.cancel(futures)


def _execute_dask(payload, items, *, n_jobs, scheduler, batch_size, on_rows, on_items, target_seconds,
                  deadline) -> None:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ValueError("backend='dask' is unavailable: install the 'dist' extra (dask, distributed)") from exc

    cluster = None
    if scheduler is None:
        workers = _cpu_count() if n_jobs == -1 else (n_jobs or 2)
        # allowed_failures=0: a task whose worker dies fails at once; drive() finds the replicate that killed it
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR, env=dict(_WORKER_ENV),
                               scheduler_kwargs={"allowed_failures": 0})
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        drive(_DaskPool(client, payload), payload, _Chunker(items, target_seconds, batch_size, deadline=deadline),
              workers, on_rows, on_items)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
