"""``simstudy merge DIR... --out DIR``: combine the shard stores of an array job into one store
(:func:`simstudy.engine.shards.merge_stores`); one line and exit status 2 for stores that cannot be merged."""
from __future__ import annotations

import sys
from pathlib import Path

from .cli_inputs import out_problem

__all__ = ["cmd_merge"]


def cmd_merge(args) -> int:
    from .engine import StoreBusyError, StoreDamagedError, StoreMismatchError
    from .engine.shards import merge_stores

    if problem := out_problem(Path(args.out), "--out"):
        print(f"simstudy: error: {problem}", file=sys.stderr)
        return 2
    try:
        done = merge_stores(args.dirs, args.out)
    except (ValueError, StoreMismatchError, StoreBusyError, StoreDamagedError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"simstudy: error: {text}", file=sys.stderr)
        return 2
    shards = ", ".join(str(s["shard"] or "whole") for s in done["stores"])
    state = "complete" if done["complete"] else ("incomplete: run the study with --out " + str(args.out)
                                                 + " to compute the missing rows")
    print(f"merged {len(done['stores'])} stores (shards {shards}): {done['rows']} of {done['expected']} rows into "
          f"{args.out}/ ({state}); then: simstudy report {args.out}")
    return 0
