"""Replicates that kill their worker, and workers that outlive their parent (DESIGN §7, issue 12).

A replicate may end its worker process (a segfault, ``os._exit``, the OOM
killer). That is a failure of the replicate like any other: it is recorded,
counted and never re-drawn, and the study goes on. :func:`drive` runs the
chunks of a study on a pool of workers and, when a worker dies, finds the
replicate that killed it:

* loky loses every chunk in flight when one worker dies (the pool breaks);
  dask loses the task, after its scheduler's ``allowed-failures`` retries,
  as ``KilledWorker``. The items of a lost chunk are run again one by one
  on a fresh pool, next to each other; an item lost once more is run again
  alone (nothing else in flight), and then, if it still kills its worker,
  method by method, alone.
* The item, or the method, that kills its worker while alone is recorded
  with status ``"crashed"``, one row per method, with a message naming the
  crash (the worker's exit code or signal, where the backend reports it);
  as for every failure its seed is the row's position (condition,
  replicate; :mod:`simstudy.engine.seeds`).
* Items that were only lost next to a crashing one finish normally and,
  since every stream is keyed by position, give the very rows of a run
  without the crash.

Workers and their parent: :func:`watch_parent` (installed in each loky
worker) ends a worker within a second of its parent's death, even a
SIGKILL, so that no worker goes on computing for nobody;
:func:`terminate_as_exit` turns SIGTERM of the parent into ``SystemExit``
(status 143) while a study runs, so that the finished rows are stored and
the workers stopped exactly as on Ctrl-C; a re-run resumes.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .worker import make_row

__all__ = ["CRASHED", "Crashed", "Pool", "drive", "loky_detail", "terminate_as_exit", "watch_parent"]

#: Status of the rows of a replicate (or method) that killed its worker.
CRASHED = "crashed"
#: Exit status of a process ended by SIGTERM (128 + 15), as a shell reports it.
_EXIT_SIGTERM = 128 + signal.SIGTERM


class Crashed(Exception):
    """A chunk was lost because a worker died; ``detail`` says how, as far as the backend knows."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def loky_detail(exc: BaseException) -> str:
    """``"exit code 3"`` or ``"signal SIGSEGV"`` from loky's TerminatedWorkerError message."""
    codes = re.findall(r"([A-Z]+)\((-?\d+)\)", str(exc).partition("exit codes of the workers are")[2])
    if not codes:
        return "the worker process died"
    return ", ".join(f"signal {name}" if int(code) < 0 else f"exit code {code}" for name, code in codes)


@dataclass
class _Unit:
    items: list  # [(condition, replicate, method indices), ...]
    level: int   # 0: a chunk; 1: one item among others; 2: one item alone; 3: one method alone
    count: int   # items to count as finished (progress) when this unit is done


class Pool:
    """What :func:`drive` needs of a backend (loky and dask implement it in :mod:`simstudy.engine.backends`).

    ``breaks_all``: a dying worker loses every task in flight (loky), or only its own (dask).
    ``generation``: bumped by :meth:`renew`; futures remember the one they were submitted to.
    """

    breaks_all = False
    generation = 0

    def submit(self, items: list, alone: bool = False):  # -> future; ``alone``: nothing else will be in flight
        raise NotImplementedError

    def wait(self, futures: list, first: bool = True) -> set:
        raise NotImplementedError

    def outcome(self, fut) -> tuple[list, float]:
        """(rows, seconds) of a finished future; :class:`Crashed` if its worker died; other errors raise."""
        raise NotImplementedError

    def renew(self) -> None:
        """A fresh set of workers after a crash (loky); nothing where the backend restarts its own (dask)."""

    def release(self, fut) -> None:
        """Forget a harvested future."""

    def abort(self, futures: list) -> None:
        """Stop everything in flight now (Ctrl-C, SIGTERM, an error)."""


def _crash_message(detail: str, what: str) -> str:
    return f"worker crashed: its process died while running this {what} alone ({detail})"


def drive(pool: Pool, payload, chunker, workers: int, on_rows: Callable[[list], None],
          on_items: Callable[[int], None]) -> None:
    """Run every chunk of ``chunker`` on ``pool``, isolating and recording replicates that kill their worker.

    At most ``2 x workers`` tasks are in flight. See the module docstring for
    how a crash is traced to its replicate and method; on any other exception
    (Ctrl-C included) the finished tasks are reported first and the workers stopped.
    """
    pending: dict = {}  # future -> (unit, pool generation)
    retry: deque = deque()  # level-1 units: run next to each other
    alone: deque = deque()  # level-2/3 units: run with nothing else in flight

    def submit(unit: _Unit) -> None:
        fut = pool.submit(unit.items, alone=unit.level >= 2)  # may renew a pool found broken: generation after
        pending[fut] = (unit, pool.generation)

    def fill() -> None:
        if alone:
            if not pending:
                submit(alone.popleft())
            return
        while len(pending) < 2 * workers:
            if retry:
                submit(retry.popleft())
                continue
            chunk = chunker.next()
            if chunk is None:
                return
            submit(_Unit(chunk, 0, len(chunk)))

    def finish(fut, lost: list) -> None:
        unit, gen = pending.pop(fut)
        try:
            rows, seconds = pool.outcome(fut)
        except Crashed as exc:
            lost.append((unit, gen, exc.detail))
            return
        pool.release(fut)
        chunker.update(len(unit.items), seconds)
        on_rows(rows)
        on_items(unit.count)

    def isolate(unit: _Unit, detail: str) -> None:
        if unit.level == 0 and len(unit.items) > 1:
            retry.extend(_Unit([item], 1, 1) for item in unit.items)
        elif unit.level < 2:
            alone.append(_Unit(unit.items, 2, unit.count))
        elif unit.level == 2 and len(unit.items[0][2]) > 1:
            c, r, ms = unit.items[0]
            alone.extendleft(reversed([_Unit([(c, r, (m,))], 3, int(i == len(ms) - 1)) for i, m in enumerate(ms)]))
        else:
            c, r, ms = unit.items[0]
            message = _crash_message(detail, "replicate" if unit.level == 2 else "method")
            on_rows([make_row(c, r, payload.methods[m][0], CRASHED, message) for m in ms])
            on_items(unit.count)

    try:
        fill()
        while pending:
            lost: list = []
            for fut in pool.wait(list(pending)):
                finish(fut, lost)
            if lost and pool.breaks_all:
                # That pool went down whole: wait for its other futures (failed or finished by now), then renew.
                broken = {gen for _, gen, _ in lost}
                for fut in pool.wait([f for f, (_, gen) in pending.items() if gen in broken], first=False):
                    finish(fut, lost)
                if pool.generation in broken:
                    pool.renew()
            for unit, _, detail in lost:
                isolate(unit, detail)
            fill()
    except BaseException:
        # Keep what finished (Ctrl-C), then stop the workers without waiting for running chunks.
        try:
            for fut in [f for f in pending if _done_ok(pool, f)]:
                finish(fut, [])
        finally:
            pool.abort(list(pending))
        raise


def _done_ok(pool: Pool, fut) -> bool:
    if not fut.done():
        return False
    try:
        pool.outcome(fut)
    except BaseException:  # noqa: BLE001 - only the finished, successful ones are harvested
        return False
    return True


# -- parent and workers -----------------------------------------------------------------------------------------
def watch_parent(interval: float = 0.5) -> None:
    """In a worker: a daemon thread that ends this process when its parent has died (re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="simstudy-parent-watch", daemon=True).start()


def _exit_on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise SystemExit(_EXIT_SIGTERM)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit(143)`` in the main thread.

    Only where SIGTERM has its default action (a handler of the caller's, or
    an ignored SIGTERM, is left alone) and only in the main thread; the
    previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM") \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
