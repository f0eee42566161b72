"""Progress of a run: a tqdm bar on a terminal, plain lines in a log (DESIGN §7: a long run shows progress).

On a terminal (or with ``progress=True``) the bar is tqdm's. A run whose standard error is not a
terminal (a Slurm job's log, ``nohup``) gets no bar, whose carriage returns would garble the log,
but one plain line at most every ``interval`` seconds once a task finishes, for example::

    simstudy: llm_shift: 5 of 32 tasks done (16%), 1h02m elapsed, about 5h24m left

so a run of seconds prints nothing and a run of hours says where it is. ``progress=False`` is silent.
"""
from __future__ import annotations

import sys
import time

__all__ = ["LogProgress", "clock", "make_progress"]


def clock(seconds: float) -> str:
    """A duration as a short clock reading: ``42s``, ``3m05s``, ``11h50m``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LogProgress:
    """Plain progress lines for a log: ``update(n)`` after tasks finish, a line when ``interval`` has passed."""

    def __init__(self, total: int, name: str, *, interval: float = 60.0, stream=None, unit: str = "tasks"):
        self.total, self.name, self.interval, self.unit = int(total), name, float(interval), unit
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        text = (f"simstudy: {self.name}: {self.done} of {self.total} {self.unit} done "
                f"({100 * self.done / max(self.total, 1):.0f}%), {clock(elapsed)} elapsed")
        if 0 < self.done < self.total:
            text += f", about {clock(elapsed / self.done * (self.total - self.done))} left"
        return text

    def close(self) -> None:
        pass


def make_progress(total: int, name: str, progress: bool | None, *, unit: str = "rep"):
    """tqdm on a terminal or with ``progress=True``; :class:`LogProgress` when ``progress`` is None and standard
    error is not a terminal; a silent tqdm with ``progress=False``."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    if progress is None and not tty:
        return LogProgress(total, name, unit="tasks")
    return tqdm(total=total, disable=not (tty if progress is None else bool(progress)), unit=unit, desc=name,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
