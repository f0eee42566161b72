"""Checks of the command line's own inputs, before anything runs: counts, output folders, scheduler addresses.

Each returns (or raises, for argparse types) one line naming the flag, the value and what is allowed;
:func:`fail` prints such a line and gives the exit status of bad input.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import socket
import sys
from pathlib import Path

__all__ = ["EXIT_USAGE", "SCHEDULER_TIMEOUT", "fail", "figure_format", "max_replicates", "out_problem", "positive", "positive_or_all",
           "scheduler_problem", "seconds", "shard", "target", "target_mcse", "write_failed"]

EXIT_USAGE = 2  # the exit status of bad input (argparse's own)
SCHEDULER_TIMEOUT = 3.0  # seconds to wait for a dask scheduler before saying it is unreachable
_ADDRESS = re.compile(r"^(?:(tcp|tls|ws|wss|ucx)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):([0-9]+)/?$")


def fail(message: str) -> int:
    """Print ``simstudy: error: MESSAGE`` (one line) on stderr; return :data:`EXIT_USAGE`."""
    print(f"simstudy: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def positive_or_all(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n-jobs={text!r} is invalid; allowed: an integer >= 1 or -1") from None
    if v < 1 and v != -1:
        raise argparse.ArgumentTypeError(f"--n-jobs={text!r} is invalid; allowed: an integer >= 1 or -1")
    return v


def positive(text: str, flag: str = "--replicates") -> int:
    from .studies.tables import MAX_REPLICATES

    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= MAX_REPLICATES:
        raise argparse.ArgumentTypeError(f"{flag}={text!r} is invalid; allowed: an integer >= 1 and <= {MAX_REPLICATES}")
    return v


def max_replicates(text: str) -> int:
    """``--max-replicates N``: the cap of a precision target."""
    return positive(text, "--max-replicates")


def target_mcse(text: str) -> tuple[str, float]:
    """``--target-mcse MEASURE=MCSE`` -> (measure, MCSE > 0); the measure is checked against the study later."""
    name, sep, value = text.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not sep or not name.strip() or not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"--target-mcse={text!r} is invalid; allowed: MEASURE=MCSE with an MCSE "
                                         "> 0, e.g. coverage=0.01")
    return name.strip(), v


def shard(text: str):
    """``--shard i/N`` (1 <= i <= N) -> :class:`simstudy.engine.plan.Shard`."""
    from .engine.plan import parse_shard

    try:
        return parse_shard(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard={text!r} is invalid; allowed: i/N with 1 <= i <= N, e.g. "
                                         "--shard 3/8 (Slurm: --shard ${SLURM_ARRAY_TASK_ID}/8 with --array=1-8)") from None


def figure_format(text: str) -> str:
    """``--figure-format png,svg`` (or given twice): the text, once its formats are known ones
    (:func:`simstudy.engine.figures.figure_formats`)."""
    from .engine.figures import figure_formats

    try:
        figure_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # argparse names the flag
    return text


def seconds(text: str) -> float:
    """``--max-time SECONDS`` -> a number of seconds >= 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"--max-time={text!r} is invalid; allowed: a number of seconds >= 0, "
                                         "e.g. --max-time 3600")
    return v


def scheduler_problem(address: str, label: str, *, connect: bool = True) -> str | None:
    """None when ``address`` is a well-formed dask scheduler address that accepts a connection within
    :data:`SCHEDULER_TIMEOUT` seconds; else the one-line reason."""
    m = _ADDRESS.match(address.strip()) if isinstance(address, str) else None
    if m is None or not 1 <= int(m.group(3)) <= 65535:
        return (f"{label}={address!r} is not a scheduler address; allowed: tcp://HOST:PORT (PORT in 1..65535), "
                "e.g. tcp://127.0.0.1:8786")
    if not connect or (m.group(1) or "tcp") not in ("tcp", "tls", "ws", "wss"):
        return None
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=SCHEDULER_TIMEOUT).close()
    except OSError as exc:
        return (f"{label}={address!r} is unreachable ({type(exc).__name__}: {exc.strerror or exc} within "
                f"{SCHEDULER_TIMEOUT:g} s); allowed: the address of a running dask scheduler")
    return None


def out_problem(out: Path, label: str) -> str | None:
    """None when ``out`` is (or can be created as) a writable directory; else the one-line reason."""
    text = str(out)
    if out.exists():
        if not out.is_dir():
            return f"{label}={text!r} is an existing file; allowed: a directory (existing or new)"
        from .engine.atomic import write_problem

        if why := write_problem(out):  # a probe, not os.access: right for root and read-only mounts too
            hint = (f"; the study stored there can be read: simstudy summarize {text}, or simstudy report {text} "
                    "--out OTHER" if (out / "manifest.json").is_file() else "")
            return f"{label}={text!r} is not writable ({why}); allowed: a directory you can write to{hint}"
        return None
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{label}={text!r} lies under the file {str(parent)!r}; allowed: a directory path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{label}={text!r} cannot be created: {str(parent)!r} is not writable; allowed: a writable path"
    return None


def write_failed(out: Path, exc: OSError) -> str:
    return (f"cannot write to {str(out)!r} ({type(exc).__name__}: {exc.strerror or exc}); allowed: a folder you "
            "can write to (simstudy report DIR --out OTHER writes a study's outputs elsewhere)")


def target(args) -> tuple[Path, str | None]:
    """Where summarize/plot/report write (``--out``, else DIR) and, if it cannot be written, the one line."""
    from .engine.atomic import write_problem

    if args.out is not None:
        return Path(args.out), out_problem(Path(args.out), "--out")
    why = write_problem(Path(args.dir))
    return Path(args.dir), (f"results directory {args.dir!r} is read-only ({why}); allowed: --out OTHER, a folder "
                            "you can write to (reading it needs no write access: simstudy summarize DIR)"
                            if why else None)
