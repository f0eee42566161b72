"""Write paper_checks/results/extrapolation.json from the stores of several extrapolation runs.

The full extrapolation check is hours of CPU (DESIGN §6.7); it was run in parts, each a
``simstudy check extrapolation --scale full --set ...`` run with its own store, and the
results page reports their rows together. Usage (the command that wrote the committed JSON is
recorded in its settings, ``command``):

    python paper_checks/extrapolation_from_stores.py --out paper_checks/results \\
        results/extrapolation_r20/extrapolation/store-XXXX \\
        "results/extrapolation_peer/extrapolation/store-YYYY=engression (peer)"

A store argument ``PATH=LABEL,LABEL`` takes only those methods from that store. Then
``simstudy check all --out paper_checks/results --page paper_checks/RESULTS.md --page-only``.
"""
from __future__ import annotations

import argparse
import sys

from simstudy.checks.extrapolation import report_from_stores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", help="store folders (OUT/extrapolation/store-*), optionally =LABELS")
    parser.add_argument("--out", default="paper_checks/results", help="folder of the check's JSON and tables")
    parser.add_argument("--note", action="append", default=[], help="a note for the results page")
    args = parser.parse_args(argv)
    stores = []
    for item in args.stores:
        path, _, labels = item.partition("=")
        stores.append((path, [s.strip() for s in labels.split(",")]) if labels else path)
    command = "python paper_checks/extrapolation_from_stores.py " + " ".join(
        f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = report_from_stores(stores, out=args.out, notes=args.note, command=command)
    except ValueError as exc:
        print(f"extrapolation_from_stores: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.name}: {result.decision.upper()} - {result.summary}")
    return 0 if result.decision != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
