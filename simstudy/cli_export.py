"""``simstudy export DIR --format rsimsum [--out FILE]``: a study's rows as the long table of R's
``rsimsum::multisimsum`` (:mod:`simstudy.engine.export`, which documents the columns and the units)."""
from __future__ import annotations

from pathlib import Path

from .cli_inputs import fail, out_problem, write_failed

__all__ = ["cmd_export", "DEFAULT_NAMES"]

#: File written into DIR when --out is not given, per format.
DEFAULT_NAMES = {"rsimsum": "rsimsum.csv"}


def cmd_export(args) -> int:
    """Run the command; 0 on success, 2 with one line on stderr for bad input or an unwritable target."""
    from .engine import StudyResult
    from .engine.atomic import write_problem
    from .engine.export import write_rsimsum

    try:
        res = StudyResult.load(args.dir)
    except ValueError as exc:  # no store, or a damaged store file: one line naming it
        return fail(str(exc))
    if args.out is None:
        out = Path(args.dir) / DEFAULT_NAMES[args.format]
        if why := write_problem(Path(args.dir)):
            return fail(f"results directory {args.dir!r} is read-only ({why}); allowed: --out FILE elsewhere")
    else:
        out = Path(args.out)
        if out.is_dir():
            return fail(f"--out={args.out!r} is a directory; allowed: a file path (e.g. {DEFAULT_NAMES[args.format]})")
        if problem := out_problem(out.parent, "--out folder"):
            return fail(problem)
    try:
        path = write_rsimsum(res, out)
    except ValueError as exc:  # a design factor named like a column of the table
        return fail(str(exc))
    except OSError as exc:
        return fail(write_failed(out.parent, exc))
    rows = path.read_text(encoding="utf-8").count("\n") - 1
    print(f"wrote {path} ({rows} rows: replicate x method x estimand; read it with rsimsum::multisimsum, see "
          "'simstudy export --help')")
    return 0
