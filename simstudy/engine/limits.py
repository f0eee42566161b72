"""Guards around one call inside a replicate: warnings and the time limit (DESIGN §7, issue 12).

* Warnings. Every warning raised while ``generate`` or a method runs is
  recorded, whatever the process's filters and whatever was shown before
  (``"always"`` inside the call, so a row never depends on which worker ran
  which replicate first). A row carries the count in column ``warnings`` and
  the first one, ``"Category: text"``, in ``warning_message`` (both present
  in the table as soon as any row of the study warned). Warning classes named
  in ``Study(promote_warnings=...)`` are raised as errors at the point of the
  warning, in the manner of SimDesign's ``manageWarnings(warning2error=...)``:
  the row gets status ``"warning"``. The filters are process-wide, so a
  worker runs one replicate at a time (as all backends of the engine do).
* Time limit. ``Study(timeout=SECONDS)`` bounds the wall time of one
  replicate (``generate`` plus its methods). When it runs out, the call in
  progress is interrupted with :class:`ReplicateTimeout`, its row gets
  status ``"timeout"``, and methods of the replicate not yet started are
  recorded ``"timeout"`` too ("not run"). In the main thread on POSIX this
  uses ``SIGALRM`` (``signal.setitimer``), elsewhere (dask worker threads,
  Windows) an asynchronous exception set on the running thread. Either way
  Python code is interrupted between bytecodes: one long call into compiled
  code (a single BLAS or torch kernel) ends before the limit takes effect.
  :class:`ReplicateTimeout` derives from BaseException, so a method's own
  ``except Exception`` does not swallow it.
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import importlib
import math
import numbers
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["ReplicateTimeout", "check_limits", "guarded", "resolve_warnings", "time_limit"]


class ReplicateTimeout(BaseException):
    """Raised inside a call of a replicate when its time limit has run out."""


def _warning_name(cls: Any) -> str:
    if isinstance(cls, type) and issubclass(cls, Warning):
        return cls.__name__ if getattr(builtins, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"
    raise TypeError


def resolve_warnings(names) -> tuple:
    """Warning classes for names ``"RuntimeWarning"`` (builtins) or ``"package.module.Class"``."""
    out = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module) if module else builtins, attr)
        except (ImportError, AttributeError, ValueError):
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Warning)):
            raise ValueError(f"promote_warnings item {name!r} is invalid; allowed: a Warning subclass or its name "
                             "('RuntimeWarning', 'package.module.Class')")
        out.append(cls)
    return tuple(out)


def check_limits(timeout: Any, promote_warnings: Any) -> tuple[float | None, tuple[str, ...]]:
    """Validate ``Study(timeout=, promote_warnings=)``; return (seconds or None, warning class names)."""
    if timeout is not None:
        ok = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) and math.isfinite(timeout) \
            and timeout > 0
        if not ok:
            raise ValueError(f"timeout={timeout!r} is invalid; allowed: None or seconds per replicate > 0")
        timeout = float(timeout)
    items = (promote_warnings,) if isinstance(promote_warnings, (str, type)) else promote_warnings
    try:
        items = tuple(items or ())
    except TypeError:
        items = (promote_warnings,)
    names = []
    for item in items:
        try:
            name = item if isinstance(item, str) else _warning_name(item)
        except TypeError:
            raise ValueError(f"promote_warnings item {item!r} is invalid; allowed: a Warning subclass or its name "
                             "('RuntimeWarning', 'package.module.Class')") from None
        resolve_warnings([name])
        if name not in names:
            names.append(name)
    return timeout, tuple(names)


def _raise_timeout(signum, frame):
    raise ReplicateTimeout


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`ReplicateTimeout` inside the block once ``seconds`` have passed (None: no limit)."""
    if seconds is None:
        yield
        return
    seconds = max(float(seconds), 1e-6)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        old = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
        return
    tid = threading.get_ident()
    lock = threading.Lock()
    state = {"armed": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["armed"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(ReplicateTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["armed"] = False
            fired = state["fired"]
        timer.cancel()
        if fired:  # clear an exception not yet delivered, and raise it here, inside the guarded block
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
            raise ReplicateTimeout


def guarded(call: Callable[[], Any], promote: tuple, seconds: float | None) -> tuple[Any, list]:
    """Run ``call()`` recording every warning (``promote`` classes raised) under the time limit.

    Returns ``(result, warning messages)``; the messages are ``warnings.WarningMessage`` objects.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cls in promote:
            warnings.filterwarnings("error", category=cls)
        with time_limit(seconds):
            out = call()
    return out, list(caught)
