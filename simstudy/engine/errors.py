"""Typed errors of the study engine (DESIGN §7).

A method signals a failed fit by raising :class:`FitFailure` (or a subclass
such as :class:`Diverged`); the engine records the exception's ``status``
attribute in the results table instead of the generic ``"error"``. Any
exception class with a string attribute ``status`` is treated the same way,
so domain code need not import the engine to report a typed failure.
"""
from __future__ import annotations

__all__ = ["FitFailure", "Diverged", "StoreMismatchError", "StoreBusyError", "TruthError", "StoreDamagedError",
           "StoreReadOnlyError"]


class FitFailure(Exception):
    """A method could not produce a valid result for one replicate.

    Raised inside an ``analyse`` function; the engine records the row with
    ``status=self.status`` and ``message=str(self)``, counts it as a failure
    and never re-draws the data (DESIGN §7).

    Parameters
    ----------
    message : str
        Human-readable reason, stored in the ``message`` column.
    status : str, optional
        Status recorded in the table. Defaults to the class attribute
        (``"failed"`` here, ``"diverged"`` for :class:`Diverged`).
    """

    status = "failed"

    def __init__(self, message: str = "", *, status: str | None = None):
        super().__init__(message)
        if status is not None:
            if not isinstance(status, str) or not status or status == "ok":
                raise ValueError(f"status={status!r} is invalid; allowed: a non-empty string other than 'ok'")
            self.status = status


class Diverged(FitFailure):
    """The fit diverged (non-finite loss, exploding parameters, ...)."""

    status = "diverged"


class StoreMismatchError(ValueError):
    """The store directory holds a different study (config hash differs)."""


class StoreBusyError(RuntimeError):
    """Another process is writing to the same store directory."""


class TruthError(ValueError):
    """The study's ``truth`` function raised or returned a non-number; one line naming the condition."""


class StoreDamagedError(ValueError):
    """A file of the store is truncated, empty or garbled (DESIGN §7: nothing stored is lost).

    The message is one line naming the file and what to do (``--repair``, or ``Study.run(...,
    repair=True)``, which moves the file to ``DIR/damaged/`` and recomputes exactly the missing rows);
    ``file`` is the damaged file's path, ``reason`` what is wrong with it.
    """

    def __init__(self, message: str, *, file=None, reason: str = ""):
        super().__init__(message)
        self.file = file
        self.reason = reason


class StoreReadOnlyError(PermissionError):
    """The store folder cannot be written and the command needs to write there; one line naming the folder."""
