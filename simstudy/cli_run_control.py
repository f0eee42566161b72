"""``simstudy run``'s run control (issue 13): a precision target (``--target-mcse``, ``--max-replicates``), a
shard of an array job (``--shard i/N``) and a time budget (``--max-time``): the keyword arguments they give
:meth:`simstudy.engine.Study.run`, and what the command says and returns after such a run.

Exit status :data:`EXIT_OUT_OF_TIME` (75, ``EX_TEMPFAIL`` of sysexits.h: try again) says the run stopped at
``--max-time``: what finished is stored, and the same command continues it.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["EXIT_OUT_OF_TIME", "format_precision", "replicates_text", "run_control", "run_outcome"]

#: Exit status of a run stopped at --max-time (sysexits.h EX_TEMPFAIL: the same command continues it).
EXIT_OUT_OF_TIME = 75


def run_control(args) -> tuple[dict, str | None]:
    """(keyword arguments for ``Study.run``, None) or ({}, the one-line problem) from the parsed flags."""
    if args.max_replicates is not None and not args.target_mcse:
        return {}, (f"--max-replicates={args.max_replicates} needs --target-mcse; allowed: --target-mcse "
                    "MEASURE=MCSE --max-replicates N, or --replicates N for a fixed count")
    if args.shard is not None and args.target_mcse:
        return {}, (f"--shard={args.shard} is invalid with --target-mcse; allowed: one or the other (a precision "
                    "target needs every replicate of a condition to decide)")
    kwargs = {"max_time": args.max_time, "shard": args.shard}
    if args.target_mcse:
        targets = dict(args.target_mcse)
        if len(targets) < len(args.target_mcse):
            return {}, f"--target-mcse names a measure twice ({args.target_mcse}); allowed: each measure once"
        kwargs.update(target_mcse=targets, max_replicates=args.max_replicates)
    return kwargs, None


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


def run_outcome(res, args, out: Path) -> int | None:
    """The exit status of a run stopped at --max-time or of a shard, after saying so; None for a whole run."""
    if res.out_of_time:
        if res.precision is not None:
            print(format_precision(res.precision))
        print(f"simstudy: stopped at --max-time {args.max_time:g} s after {len(res.table)} of {res.expected_rows} "
              f"rows; they are kept in {out}/ (run the same command again to continue; exit status "
              f"{EXIT_OUT_OF_TIME})", file=sys.stderr)
        return EXIT_OUT_OF_TIME
    if args.shard is not None:
        print(f"shard {args.shard} of study {res.name!r}: {len(res.table)} of {res.expected_rows} rows in {out}/; "
              "when every shard has finished: simstudy merge SHARD_DIR... --out DIR")
        return 0
    return None
