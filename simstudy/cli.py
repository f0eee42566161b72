"""Command line: ``simstudy run | summarize | plot | report | export | merge | list | check`` (DESIGN §6, §7).

``simstudy run`` without argument runs the built-in default study
(:data:`simstudy.studies.spec.DEFAULT_STUDY`; the generic demo until the
domain's quick study is registered) into ``results/quick/``. Every output
directory is also the study's store, so re-running the same command resumes
an interrupted run. Malformed input gives one line on stderr and exit
status 2; Ctrl-C keeps every finished row and exits with status 130; a run
stopped at ``--max-time`` keeps them too and exits with status 75 (:mod:`.cli_run_control`).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .cli_inputs import (EXIT_USAGE, fail, figure_format, max_replicates, out_problem, positive, positive_or_all,
                         scheduler_problem, seconds, shard, target, target_mcse, write_failed)
from .cli_plot import add_plot_options

__all__ = ["main", "build_parser"]

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as the engine raises it (simstudy.engine.crashes)


class _OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"simstudy: error: {message}; see 'simstudy {self.prog.split()[-1]} --help'\n"
                  if " " in self.prog else f"simstudy: error: {message}; see 'simstudy --help'\n")


def build_parser(*, describe_default: bool = True) -> argparse.ArgumentParser:
    """The ``simstudy`` argument parser.

    ``describe_default=False`` builds it without importing the study registry (and with it torch and the
    domain): ``--version``, ``--help`` and every command but ``run`` need no plugin to parse, so they start fast.
    """
    default_text = "(see 'simstudy list')"
    if describe_default:
        from .studies import spec

        spec.load_plugins()
        default = spec.STUDIES.get(spec.DEFAULT_STUDY)
        default_text = (f"{spec.DEFAULT_STUDY!r} ({default.description}) into "
                        f"{default.out or 'results/' + spec.DEFAULT_STUDY}/" if default is not None
                        else repr(spec.DEFAULT_STUDY))
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("simstudy")
    except PackageNotFoundError:
        __version__ = "unknown"
    p = _OneLineParser(prog="simstudy", description="Monte Carlo simulation studies with MCSE (DESIGN §7).")
    p.add_argument("--version", action="version", version=f"simstudy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    r = sub.add_parser("run", help="run or resume a study",
                       description="Run (or resume) a study declared in a TOML file or built in. Without STUDY "
                                   f"it runs the built-in default study {default_text}. The output directory is "
                                   "also the study's store: running the same command again resumes it. A study "
                                   "file is code, like a Python script: its function paths are imported and "
                                   "called, so run only files you trust. The current directory is not on the "
                                   "import path; put your own modules' folder on PYTHONPATH.")
    r.add_argument("study", nargs="?", default=None, help="TOML study file, or a built-in study name (simstudy list)")
    r.add_argument("--out", default=None, help="output and store directory (default: [run] out, or results/NAME)")
    r.add_argument("--n-jobs", type=positive_or_all, default=None, help="worker processes (-1: all CPUs)")
    r.add_argument("--backend", choices=["loky", "dask"], default=None, help="execution backend")
    r.add_argument("--scheduler", default=None, help="dask scheduler address (default: a LocalCluster)")
    r.add_argument("--replicates", type=positive, default=None, help="override the file's replicates")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="TABLE.KEY=VALUE", dest="overrides",
                   help="override a key of the study file's tables (a TOML value, or a plain string), e.g. "
                        "dgm.teacher_law=gaussian design.sigma=[0.3,0.6]")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--repair", action="store_true",
                   help="move damaged store files to OUT/damaged/ and recompute exactly their rows (without it, "
                        "damage stops the run with one line naming the file)")
    r.add_argument("--target-mcse", nargs="+", type=target_mcse, default=None, metavar="MEASURE=MCSE",
                   help="run in rounds until every condition's MCSE of MEASURE is at most MCSE (the first round has "
                        "the study's replicates; simstudy.engine.precision), e.g. coverage=0.01")
    r.add_argument("--max-replicates", type=max_replicates, default=None, metavar="N",
                   help="with --target-mcse: at most N replicates per condition (default 100 x replicates)")
    r.add_argument("--shard", type=shard, default=None, metavar="i/N",
                   help="compute only shard i of N of the (condition, replicate) pairs into --out (an array job); "
                        "combine the shards with simstudy merge")
    r.add_argument("--max-time", type=seconds, default=None, metavar="SECONDS",
                   help="launch no replicate after SECONDS; what finished is kept, exit status 75, and the same "
                        "command continues")
    r.add_argument("--figure-format", action="append", type=figure_format, default=None, metavar="FORMATS",
                   help="figure formats, comma separated or repeated: png (default), svg, e.g. png,svg")
    for name, text in (("summarize", "print and write summary.csv of a results directory"),
                       ("plot", "write figures/*.png (and .svg) of a results directory"),
                       ("report", "write report.md, report.html (and figures) of a results directory")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("dir", help="results directory (written by simstudy run or StudyResult.save)")
        s.add_argument("--out", default=None, help="write there instead of into DIR (e.g. DIR is read-only)")
        if name != "summarize":
            s.add_argument("--figure-format", action="append", type=figure_format, default=None, metavar="FORMATS",
                           help="figure formats, comma separated or repeated: png (default), svg, e.g. png,svg")
        if name == "plot":
            add_plot_options(s)
        if name == "summarize":
            s.add_argument("--measures", nargs="+", default=[], metavar="NAME=MODULE:FUNCTION[@MCSE]",
                           help="add measures of your own without recomputing a replicate; MCSE: jackknife "
                                "(default), bootstrap or MODULE:FUNCTION (simstudy.engine.user_measures)")
    e = sub.add_parser("export", help="write a results directory's rows for other tools (rsimsum)",
                       description="Write the long table R's rsimsum::multisimsum reads: par, estimate, se, conf.low, "
                                   "conf.high, true, method, the design factors, condition, repno, status (one row per "
                                   "replicate x method x estimand). rsimsum reports relerror and relprec in percent "
                                   "(100 x relerr_modse, 100 x (rel_efficiency - 1)); see simstudy.engine.export.")
    e.add_argument("dir", help="results directory (written by simstudy run or StudyResult.save)")
    e.add_argument("--format", choices=["rsimsum"], default="rsimsum", help="table layout (default rsimsum)")
    e.add_argument("--out", default=None, help="CSV file to write (default: DIR/rsimsum.csv)")
    g = sub.add_parser("merge", help="combine the shard stores of an array job into one store",
                       description="Combine stores written by simstudy run --shard i/N (one study) into one store; "
                                   "refuses stores of different studies and rows held twice.")
    g.add_argument("dirs", nargs="+", metavar="DIR", help="shard store directories")
    g.add_argument("--out", required=True, help="new directory for the merged store")
    sub.add_parser("list", help="list study kinds, built-in studies, DGMs, methods, equations")
    c = sub.add_parser("check", help="run the paper checks of DESIGN §6 (one verdict line each)",
                       description="Run paper checks: each states a claim, runs a study and decides with a rule "
                                   "built on Monte Carlo standard errors. Exit 0 when every decided claim holds, "
                                   "1 when one fails, 2 for bad input.")
    c.add_argument("name", help="a check name, a comma list, or 'all' (see 'simstudy list')")
    c.add_argument("--scale", choices=["smoke", "full"], default="smoke", help="smoke (CI, minutes) or full")
    c.add_argument("--out", default="results/checks", help="folder for NAME.json, tables and figures")
    c.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override check parameters (vocab_size, latent_dim, teacher, seed, replicates, ...); "
                        "several after one --set or one per --set")
    c.add_argument("--n-jobs", type=positive_or_all, default=1, help="worker processes")
    c.add_argument("--page", default=None, help="also write the results page (e.g. paper_checks/RESULTS.md)")
    c.add_argument("--page-only", action="store_true",
                   help="write the results page from the NAME.json files already in --out, running nothing")
    return p


def _outputs(res, out: Path, *, write_figures: bool = True, write_report: bool = True, formats=None) -> dict:
    from .engine.report_html import write_reports as _write_report  # report.md and report.html
    from .engine.storage import atomic_write_text

    summary = res.summary()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    rates = res.rates() if len(res.table) else []
    figures = res.plot(out / "figures", formats=formats or "png") if (write_figures and len(res.table)) else []
    report = _write_report(res, out, figures=figures, summary=summary, rates=rates) if write_report else None
    return {"summary": summary, "rates": rates, "figures": figures, "report": report}


def _cmd_run(args) -> int:
    from .engine import StoreBusyError, StoreDamagedError, StoreMismatchError
    from .cli_run_control import figure_formats_of, format_precision, replicates_text, run_control, run_outcome
    from .engine.paired import format_comparisons
    from .engine.report import format_failures, format_summary
    from .studies.spec import SpecError, load_study_file

    # the command line first (cheap), then the study file, then what the file adds: nothing runs before all hold
    if args.scheduler is not None and args.backend not in (None, "dask"):
        return fail(f"--scheduler={args.scheduler!r} needs --backend dask; allowed: --backend dask --scheduler ADDR")
    if args.out is not None and (problem := out_problem(Path(args.out), "--out")):
        return fail(problem)
    if args.scheduler is not None and (problem := scheduler_problem(args.scheduler, "--scheduler", connect=False)):
        return fail(problem)
    try:
        sf, study, default_out = load_study_file(args.study, replicates=args.replicates, overrides=args.overrides)
    except SpecError as exc:
        return fail(str(exc))
    out = Path(args.out or sf.run.get("out") or default_out or f"results/{sf.name}")
    backend = args.backend or sf.run.get("backend", "loky")
    scheduler = args.scheduler or sf.run.get("scheduler")
    if scheduler is not None and backend != "dask":
        return fail(f"--scheduler={scheduler!r} needs --backend dask; allowed: --backend dask --scheduler ADDR")
    if args.out is None and (problem := out_problem(out, "run.out" if sf.run.get("out") else "output folder")):
        return fail(problem)
    label = "--scheduler" if args.scheduler is not None else "run.scheduler"
    if scheduler is not None and (problem := scheduler_problem(scheduler, label)):
        return fail(problem)
    n_jobs = args.n_jobs or sf.run.get("n_jobs")
    progress = False if args.no_progress else None
    control, problem = run_control(args, sf.run)
    if problem:
        return fail(problem)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(interrupted|stopped at max_time)", category=RuntimeWarning)
            res = study.run(n_jobs=n_jobs, backend=backend, scheduler=scheduler, store=out, progress=progress,
                            repair=args.repair, **control)  # the warnings are said below
    except (StoreMismatchError, StoreBusyError, StoreDamagedError, PermissionError) as exc:  # one line each
        return fail(str(exc))
    except ValueError as exc:  # a run-control value the study refuses (a --target-mcse measure it lacks)
        return fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:  # interrupted outside the replicate loop (setup, consolidation)
        print(f"simstudy: interrupted; finished rows are kept in {out}/ (run again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # SIGTERM (the engine stops its workers and keeps what finished)
        if exc.code != EXIT_TERMINATED:
            raise
        print(f"simstudy: terminated (SIGTERM); finished rows are kept in {out}/ (run the same command again to "
              "resume)", file=sys.stderr)
        return EXIT_TERMINATED
    if res.interrupted:
        print(f"simstudy: interrupted after {len(res.table)} of {res.expected_rows} rows; they are kept in {out}/ "
              "(run the same command again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if (status := run_outcome(res, args, out, control["max_time"])) is not None:  # stopped at max_time, or a shard
        return status
    try:
        o = _outputs(res, out, formats=figure_formats_of(args, sf.run))
    except OSError as exc:
        return fail(write_failed(out, exc))
    print(f"Study {res.name!r}: {len(study.conditions)} conditions x {len(study.methods)} methods x "
          f"{replicates_text(res)} replicates, seed {study.seed}; failures: {int((res.table['status'] != 'ok').sum())}")
    for line in format_failures(res):
        print(line)
    summary = o["summary"]
    headline = res.options.get("headline")
    if headline:  # the study names its headline metrics; the full table is in summary.csv and report.md
        summary = summary[summary["estimand"].isin(headline)]
    print(format_summary(summary, max_rows=200))
    for r in o["rates"]:
        print(r.summary())
    if res.precision is not None:
        print(format_precision(res.precision))
    if (compared := format_comparisons(res)) is not None:  # the study's declared paired comparisons, decided
        print(compared)
    kinds = ", ".join(sorted({p.suffix[1:] for p in getattr(o["figures"], "files", [])})) or "none"
    print(f"wrote {out}/replicates.parquet, summary.csv, report.md, report.html, figures/ ({len(o['figures'])} "
          f"figures: {kinds})")
    return 0


def _load(dir_: str):
    from .engine import StudyResult

    return StudyResult.load(dir_)


def _cmd_summarize(args) -> int:
    from .engine.paired import format_comparisons
    from .engine.report import format_summary
    from .engine.storage import atomic_write_text

    try:
        res = _load(args.dir)
    except ValueError as exc:  # also a damaged store file: one line naming it
        return fail(str(exc))
    out, problem = target(args)
    if problem and args.out is not None:
        return fail(problem)
    try:
        summary = res.summary(measures=_measures_option(args.measures))
    except ValueError as exc:  # a bad --measures item: one line
        return fail(str(exc).splitlines()[0])
    print(f"Study {res.name!r}: {len(res.table)} of {res.expected_rows} rows"
          + ("" if res.complete else " (incomplete)") + f"; failures: {int((res.table['status'] != 'ok').sum())}")
    print(format_summary(summary))
    for r in res.rates() if len(res.table) else []:
        print(r.summary())
    if (compared := format_comparisons(res)) is not None:
        print(compared)
    if problem:  # a read-only store is read all the same; only summary.csv is not written
        print(f"simstudy: note: summary.csv not written: {problem}", file=sys.stderr)
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    except OSError as exc:
        return fail(write_failed(out, exc))
    return 0


def _measures_option(items: list[str]) -> dict:
    """``--measures NAME=MODULE:FUNCTION[@MCSE]`` as the study file's ``[summary.measures.NAME]`` tables."""
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--measures {item!r} is invalid; allowed: NAME=MODULE:FUNCTION[@jackknife|@bootstrap|"
                             "@MODULE:FUNCTION]")
        function, _, mcse = spec.partition("@")
        out[name] = {"function": function, "mcse": mcse or "jackknife"}
    return out


def _cmd_plot(args) -> int:
    from .cli_plot import cmd_plot

    return cmd_plot(args)


def _cmd_report(args) -> int:
    try:
        res = _load(args.dir)
    except ValueError as exc:
        return fail(str(exc))
    out, problem = target(args)
    if problem:
        return fail(problem)
    try:
        o = _outputs(res, out, write_figures=bool(len(res.table)), formats=args.figure_format)
    except OSError as exc:
        return fail(write_failed(out, exc))
    print(o["report"])
    print(o["report"].with_name("report.html"))
    return 0


def _cmd_export(args) -> int:
    from .cli_export import cmd_export

    return cmd_export(args)


def _cmd_merge(args) -> int:
    from .cli_merge import cmd_merge

    return cmd_merge(args)


def _cmd_list(args) -> int:
    from .checks.base import listing
    from .studies.spec import listings

    sections = {**listings(), "paper checks (simstudy check NAME)": listing()}
    for title, items in sections.items():
        print(f"{title}:")
        if not items:
            print("  (none registered)")
        for name, text in items.items():
            print(f"  {name:<24} {text}".rstrip())
    return 0


def _cmd_check(args) -> int:
    from .checks.runner import main_check

    command = "simstudy check " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["check"] else None
    if args.page_only:
        from .checks.runner import write_results_page

        if args.page is None:
            return fail("--page-only needs --page PATH; allowed: e.g. --page paper_checks/RESULTS.md")
        write_results_page(Path(args.out), Path(args.page), command=command)
        print(f"wrote {args.page}")
        return 0
    try:
        return main_check(args.name, scale=args.scale, out=args.out, sets=args.set, n_jobs=args.n_jobs,
                          page=args.page, command=command)
    except KeyboardInterrupt:
        print(f"simstudy: interrupted; finished checks are kept in {args.out}/", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``simstudy`` console script; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(describe_default=command == "run")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or one-line usage error (2)
        return int(exc.code or 0)
    handler = {"check": _cmd_check, "run": _cmd_run, "summarize": _cmd_summarize, "plot": _cmd_plot, "report": _cmd_report,
               "list": _cmd_list, "export": _cmd_export, "merge": _cmd_merge}[args.command]
    return handler(args)


def _drop_implicit_path() -> None:
    """``python -m simstudy.cli`` puts the current directory first on ``sys.path``; a study file naming
    ``evil:f`` would then import ``evil.py`` from wherever the user stands. Drop that implicit entry (an explicit
    ``PYTHONPATH=.`` stays): the console script never has it."""
    explicit = {os.path.abspath(d) for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d}
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()) and os.getcwd() not in explicit:
        del sys.path[0]


if __name__ == "__main__":
    _drop_implicit_path()
    sys.exit(main())
