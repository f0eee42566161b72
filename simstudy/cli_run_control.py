"""``simstudy run``'s run control (issue 13): a precision target (``--target-mcse``, ``--max-replicates``), a
shard of an array job (``--shard i/N``) and a time budget (``--max-time``): the keyword arguments they give
:meth:`simstudy.engine.Study.run`, and what the command says and returns after such a run.

Exit status :data:`EXIT_OUT_OF_TIME` (75, ``EX_TEMPFAIL`` of sysexits.h: try again) says the run stopped at
``--max-time``: what finished is stored, and the same command continues it.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["EXIT_OUT_OF_TIME", "figure_formats_of", "format_precision", "replicates_text", "run_control",
           "run_outcome"]

#: Exit status of a run stopped at --max-time (sysexits.h EX_TEMPFAIL: the same command continues it).
EXIT_OUT_OF_TIME = 75


def run_control(args, file_run: dict | None = None) -> tuple[dict, str | None]:
    """(keyword arguments for ``Study.run``, None) or ({}, the one-line problem) from the parsed flags and the
    study file's ``[run]`` table (``file_run``: target_mcse, max_replicates, max_time; a flag overrides its key,
    ``--target-mcse`` the whole table)."""
    file_run = file_run or {}
    targets = dict(args.target_mcse) if args.target_mcse else dict(file_run.get("target_mcse") or {})
    if args.target_mcse and len(targets) < len(args.target_mcse):
        return {}, f"--target-mcse names a measure twice ({args.target_mcse}); allowed: each measure once"
    cap = args.max_replicates if args.max_replicates is not None else file_run.get("max_replicates")
    cap_label = "--max-replicates" if args.max_replicates is not None else "run.max_replicates"
    if cap is not None and not targets:
        return {}, (f"{cap_label}={cap} needs --target-mcse (or [run] target_mcse); allowed: --target-mcse "
                    "MEASURE=MCSE --max-replicates N, or --replicates N for a fixed count")
    if args.shard is not None and targets:
        source = "--target-mcse" if args.target_mcse else "run.target_mcse"
        return {}, (f"--shard={args.shard} is invalid with {source}; allowed: one or the other (a precision "
                    "target needs every replicate of a condition to decide)")
    max_time = args.max_time if args.max_time is not None else file_run.get("max_time")
    kwargs = {"max_time": max_time, "shard": args.shard}
    if targets:
        kwargs.update(target_mcse=targets, max_replicates=cap)
    return kwargs, None


def figure_formats_of(args, file_run: dict | None = None):
    """The figure formats of a run: ``--figure-format``, else ``[run] figure_format``, else PNG."""
    return args.figure_format or (file_run or {}).get("figure_format") or "png"


def replicates_text(res) -> str:
    """``"1000"``, or ``"184..709 (per condition)"`` after a precision target."""
    from .engine.plan import replicate_counts

    counts = replicate_counts(res.manifest)
    low, high = min(counts, default=0), max(counts, default=0)
    return str(high) if low == high else f"{low}..{high} (per condition)"


def format_precision(table) -> str:
    """The per-condition precision table, for the terminal."""
    shown = table.assign(mcse=table["mcse"].map(lambda v: f"{v:.4g}"))
    flag = shown["status"].where(shown["status"] != "reached", "")
    head = (f"precision target: {int(table['reached'].sum())} of {len(table)} (condition, measure) pairs at or "
            f"below the target; replicates per condition {int(table['replicates'].min())}.."
            f"{int(table['replicates'].max())}")
    return head + "\n" + shown.assign(status=flag).to_string(index=False)


def run_outcome(res, args, out: Path, max_time: float | None = None) -> int | None:
    """The exit status of a run stopped at --max-time (or ``[run] max_time``: ``max_time``) or of a shard, after
    saying so; None for a whole run."""
    if res.out_of_time:
        if res.precision is not None:
            print(format_precision(res.precision))
        limit = args.max_time if args.max_time is not None else max_time
        label = "--max-time" if args.max_time is not None else "run.max_time"
        print(f"simstudy: stopped at {label} {limit:g} s after {len(res.table)} of {res.expected_rows} "
              f"rows; they are kept in {out}/ (run the same command again to continue; exit status "
              f"{EXIT_OUT_OF_TIME})", file=sys.stderr)
        return EXIT_OUT_OF_TIME
    if args.shard is not None:
        print(f"shard {args.shard} of study {res.name!r}: {len(res.table)} of {res.expected_rows} rows in {out}/; "
              "when every shard has finished: simstudy merge SHARD_DIR... --out DIR")
        return 0
    return None
