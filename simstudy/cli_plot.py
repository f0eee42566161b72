"""``simstudy plot DIR``: the standard figures, or the nested loop plots and heat maps asked for (DESIGN §7).

Without options, ``simstudy plot`` writes the standard figures of :func:`simstudy.engine.figures.make_figures`.
``--loop-plot MEASURE[:ESTIMAND]`` and ``--heatmap MEASURE[:ESTIMAND]`` (each repeatable) write instead a nested
loop plot (:func:`simstudy.engine.loop_plot.loop_plot`) or a heat map (:func:`simstudy.engine.heatmap.heatmap`)
of any measure of the summary, a measure of your own included, whatever the number of conditions:
``--order`` sets the loop plot's nesting (outer factor first), ``--axes X,Y`` the heat map's factors and
``--methods`` the methods drawn. Bias is drawn against 0 and coverage against the study's level. An unknown
measure, estimand, factor or method gives one line naming what is allowed, and exit status 2.
"""
from __future__ import annotations

import argparse

from .cli_inputs import fail, target, write_failed

__all__ = ["add_plot_options", "cmd_plot", "requested_figures"]


def _names(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def add_plot_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``simstudy plot`` beyond DIR, --out and --figure-format."""
    parser.add_argument("--loop-plot", action="extend", nargs="+", default=[], metavar="MEASURE[:ESTIMAND]",
                        help="write a nested loop plot of this measure (bias, coverage, mean, a measure of your own) "
                             "instead of the standard figures; ESTIMAND defaults to the first with the measure")
    parser.add_argument("--heatmap", action="extend", nargs="+", default=[], metavar="MEASURE[:ESTIMAND]",
                        help="write a heat map of this measure over two design factors (estimate and MCSE per cell)")
    parser.add_argument("--order", type=_names, default=None, metavar="F1,F2,...",
                        help="loop plot: nesting order of the design factors, outer loop first")
    parser.add_argument("--axes", type=_names, default=None, metavar="X,Y",
                        help="heat map: the design factors on the x and y axes (default: the two with most levels)")
    parser.add_argument("--methods", type=_names, default=None, metavar="M1,M2,...", help="methods to draw")


def requested_figures(res, args) -> list[tuple[str, object, str]]:
    """``(title, build, stem)`` of each figure asked for by --loop-plot / --heatmap; ValueError (one line) for a
    bad option. ``build()`` draws the figure."""
    from .engine.figures import file_stem
    from .engine.heatmap import heatmap
    from .engine.loop_plot import loop_plot

    if args.axes is not None and len(args.axes) != 2:
        raise ValueError(f"--axes={','.join(args.axes)!r} is invalid; allowed: two design factors X,Y of "
                         f"{list(res.factors)}")
    summary = res.summary()
    level = float(res.options.get("level", 0.95))
    reference = {"bias": 0.0, "coverage": level}
    x, y = args.axes if args.axes else (None, None)
    found = []
    for kind, items in (("loop", args.loop_plot), ("heatmap", args.heatmap)):
        for item in items:
            measure, _, estimand = item.partition(":")
            measure, estimand = measure.strip(), estimand.strip() or None
            if kind == "loop":
                fig = loop_plot(summary, measure, estimand, factors=res.factors, order=args.order,
                                methods=args.methods, reference_line=reference.get(measure))
            else:
                fig = heatmap(summary, measure, estimand, x=x, y=y, factors=res.factors, methods=args.methods,
                              center=reference.get(measure))
            name = estimand or _first_estimand(summary, measure)
            found.append((f"{'Nested loop plot' if kind == 'loop' else 'Heat map'} of {measure} of {name}", fig,
                          f"{kind}_{file_stem(measure)}_{file_stem(name)}"))
    return found


def _first_estimand(summary, measure: str) -> str:
    rows = summary.loc[summary["measure"] == measure, "estimand"]
    return str(rows.iloc[0]) if len(rows) else "none"


def cmd_plot(args) -> int:
    """``simstudy plot``: exit 0, or 2 with one line on stderr."""
    from .engine import StudyResult
    from .engine.figures import figure_formats
    from .engine.plots import save_figure

    try:
        res = StudyResult.load(args.dir)
    except ValueError as exc:
        return fail(str(exc))
    if not len(res.table):
        return fail(f"dir={args.dir!r} holds no finished rows; allowed: a directory with results")
    out, problem = target(args)
    if problem:
        return fail(problem)
    formats = args.figure_format or "png"
    asked = bool(args.loop_plot or args.heatmap)
    lone = [flag for flag, value in (("--order", args.order), ("--axes", args.axes), ("--methods", args.methods))
            if value is not None and not asked]
    if lone:
        return fail(f"{lone[0]} is invalid without --loop-plot or --heatmap; allowed: --loop-plot MEASURE "
                    f"and/or --heatmap MEASURE with it")
    try:
        drawn = requested_figures(res, args) if asked else []
    except ValueError as exc:
        return fail(str(exc).splitlines()[0])
    try:
        if not asked:
            figs = res.plot(out / "figures", formats=formats)
        else:
            (out / "figures").mkdir(parents=True, exist_ok=True)
            figs = []  # (title, the first format's file), as res.plot lists them
            for title, fig, stem in drawn:
                paths = [save_figure(fig, out / "figures" / f"{stem}.{fmt}") for fmt in figure_formats(formats)]
                figs.append((title, paths[0]))
    except OSError as exc:
        return fail(write_failed(out, exc))
    for title, path in figs:
        print(f"{path}  ({title})")
    return 0
