"""Figures for many conditions (issue 13, DESIGN §7): the nested loop plot, the heat map, the rule that puts
them among a study's figures, and figures as PNG and SVG (``--figure-format``)."""
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import AxesImage
from matplotlib.patches import StepPatch

from simstudy.cli import main
from simstudy.engine import Study
from simstudy.engine.figures import DOT_PLOT_MAX_CONDITIONS, figure_formats, make_figures
from simstudy.engine.heatmap import cell_text, heatmap
from simstudy.engine.loop_plot import factor_levels, loop_plot, nested_order
from simstudy.studies.examples import binomial_data, binomial_truth, wald_interval, wilson_interval

DESIGN = {"n": [10, 20, 40, 80], "p": [0.1, 0.5], "q": ["b", "a"]}  # 16 conditions > 12; q's levels unsorted
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    store = tmp_path_factory.mktemp("figs") / "store"
    study = Study(design=DESIGN, generate=binomial_data, analyse={"wald": wald_interval, "wilson": wilson_interval},
                  truth=binomial_truth, replicates=25, seed=11, name="many")
    res = study.run(n_jobs=1, progress=False, store=store)
    return res, res.summary(), store


def _main_patches(ax):
    return [p for p in ax.patches if isinstance(p, StepPatch)]


# -- the nested loop plot ----------------------------------------------------------------------------------
def test_nested_order_is_lexicographic_with_the_first_factor_outermost():
    conds = pd.DataFrame({"condition": range(8), "n": [40, 40, 10, 10, 40, 40, 10, 10],
                          "q": ["b", "a", "b", "a", "b", "a", "b", "a"], "p": [1, 1, 1, 1, 2, 2, 2, 2]})
    out = nested_order(conds, ["n", "p", "q"])
    assert factor_levels(conds["q"]) == ["b", "a"] and factor_levels(conds["n"]) == [10, 40]
    assert out["condition"].tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
    assert out["_level_q"].tolist() == [0, 1] * 4


def test_loop_plot_draws_one_line_and_one_mcse_band_per_method_over_every_factor(stored):
    _, summary, _ = stored
    fig = loop_plot(summary, "bias", "estimate", reference_line=0.0)
    axes = fig.axes
    assert len(axes) == 1 + len(DESIGN)  # the measure, then one panel per varying factor
    assert [a.get_ylabel() for a in axes[1:]] == list(DESIGN)
    patches = _main_patches(axes[0])
    assert len(patches) == 2 * 2  # band and line for each of 2 methods
    s = summary[(summary["measure"] == "bias") & (summary["estimand"] == "estimate")]
    order = nested_order(s.drop_duplicates("condition")[["condition", *DESIGN]], list(DESIGN))["condition"]
    for j, m in enumerate(["wald", "wilson"]):
        band, line = patches[2 * j], patches[2 * j + 1]
        sm = s[s["method"] == m].set_index("condition").loc[order]
        v, e = sm["value"].to_numpy(float), sm["mcse"].to_numpy(float)
        assert np.all(e > 0)  # the bands are real bands, not lines
        np.testing.assert_allclose(line.get_data().values, v)
        np.testing.assert_allclose(band.get_data().values, v + 1.96 * e)
        np.testing.assert_allclose(band.get_data().baseline, v - 1.96 * e)
        assert band.get_fill() and not line.get_fill()
        assert len(line.get_data().edges) == 16 + 1
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["wald", "wilson"]
    # the factor panels: the outer loop n changes 3 times, the inner q every condition
    levels = [_main_patches(a)[0].get_data().values for a in axes[1:]]
    assert [int(np.count_nonzero(np.diff(lv))) for lv in levels] == [3, 7, 15]
    lo, hi = axes[0].get_ylim()
    assert lo <= float(np.min(s["value"] - 1.96 * s["mcse"])) and hi >= float(np.max(s["value"] + 1.96 * s["mcse"]))


def test_loop_plot_order_and_bad_input(stored):
    _, summary, _ = stored
    fig = loop_plot(summary, "bias", order=["q", "p", "n"], methods=["wilson"])
    assert [a.get_ylabel() for a in fig.axes[1:]] == ["q", "p", "n"]
    assert len(_main_patches(fig.axes[0])) == 2
    with pytest.raises(ValueError, match="order=.*allowed: design factors"):
        loop_plot(summary, "bias", order=["sigma"])
    with pytest.raises(ValueError, match="measure='nope' is invalid; allowed"):
        loop_plot(summary, "nope")
    with pytest.raises(ValueError, match="methods=.*allowed"):
        loop_plot(summary, "bias", methods=["exact"])


# -- the heat map ------------------------------------------------------------------------------------------
def test_heatmap_has_a_panel_per_method_and_other_level_and_a_cell_per_condition(stored):
    _, summary, _ = stored
    fig = heatmap(summary, "coverage", "estimate", x="n", y="p", center=0.95)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2 * 2 and len(fig.axes) == len(panels) + 1  # (wald, wilson) x (q=b, q=a), colour bar
    s = summary[(summary["measure"] == "coverage") & (summary["estimand"] == "estimate")]
    for ax in panels:
        (image,) = [i for i in ax.images if isinstance(i, AxesImage)]
        values = np.ma.filled(image.get_array(), np.nan)
        assert values.shape == (2, 4)  # (levels of p, levels of n)
        assert len(ax.texts) == 8
        method, q = ax.get_title().split(" | q=")
        cell = s[(s["method"] == method) & (s["q"] == q) & (s["n"] == 40) & (s["p"] == 0.5)].iloc[0]
        assert values[1, 2] == pytest.approx(cell["value"])
        texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
        assert texts[(2, 1)] == cell_text(cell["value"], cell["mcse"]) and "(" in texts[(2, 1)]


def test_heatmap_defaults_where_and_refusals(stored):
    _, summary, _ = stored
    fig = heatmap(summary, "bias", where={"q": "a"}, center=0.0)  # x, y: the factors with most levels
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2 and panels[0].get_xlabel() == "n" and panels[0].get_ylabel() == "p"
    with pytest.raises(ValueError, match="panels .*allowed: fix factors with where="):
        heatmap(summary, "bias", x="n", y="p", max_panels=3)
    with pytest.raises(ValueError, match="where=.*allowed: design factors"):
        heatmap(summary, "bias", where={"sigma": 1})
    with pytest.raises(ValueError, match="two varying design factors"):
        heatmap(summary[summary["n"] == 10], "bias", where={"q": "a"})


def test_cell_text_rounds_to_the_mcse():
    assert cell_text(6.94e-18, 0.0064) == "0.0000\n(0.0064)"
    assert cell_text(-1e-9, 0.0064) == "0.0000\n(0.0064)"  # never "-0.0000"
    assert cell_text(0.42, 0.049) == "0.420\n(0.049)"
    assert cell_text(1234.5, 50.0) == "1234\n(50)"
    assert cell_text(0.5, float("nan")) == "0.5\n(-)"


# -- which figures a study writes, in which formats --------------------------------------------------------
def test_many_conditions_give_loop_plots_and_heat_maps_in_png_and_svg(stored, tmp_path):
    res, summary, _ = stored
    assert DOT_PLOT_MAX_CONDITIONS == 12 and len(res.conditions) == 16
    figs = make_figures(res, tmp_path, summary=summary, rates=[], formats="png,svg")
    titles = [t for t, _ in figs]
    assert titles == ["Bias of estimate (nested loop plot)", "Coverage of estimate (nested loop plot)",
                      "Zip plot of estimate", "Coverage of estimate (heat map)"], titles
    assert [p.name for _, p in figs] == ["loop_bias_estimate.png", "loop_coverage_estimate.png",
                                         "zip_estimate.png", "heatmap_coverage_estimate.png"]
    assert len(figs.files) == 2 * len(figs) and figs.skipped == []
    for path in figs.files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG
        else:
            assert ET.parse(path).getroot().tag.endswith("svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in figs.files)  # nothing else


def test_few_conditions_keep_the_dot_plots_and_svg_alone(stored, tmp_path):
    res, summary, _ = stored
    figs = make_figures(res, tmp_path, summary=summary, rates=[], formats=["svg"], many_conditions=16)
    assert [p.name for _, p in figs] == ["bias_estimate.svg", "coverage_estimate.svg", "zip_estimate.svg"]
    assert not list(tmp_path.glob("*.png"))


def test_a_heat_map_that_needs_too_many_panels_is_skipped_with_a_note(stored, tmp_path, monkeypatch):
    import functools

    import simstudy.engine.figures as figures_module

    res, summary, _ = stored
    monkeypatch.setattr(figures_module, "heatmap", functools.partial(heatmap, max_panels=3))  # 4 are needed
    figs = make_figures(res, tmp_path, summary=summary, rates=[], stderr=False)
    assert "Coverage of estimate (heat map)" not in [t for t, _ in figs]
    assert len(figs.skipped) == 1 and "heat map): not drawn (ValueError" in figs.skipped[0]


def test_figure_formats_parse_and_refuse():
    assert figure_formats("png,svg") == ("png", "svg")
    assert figure_formats(["svg", "png, svg", "PNG"]) == ("svg", "png")
    with pytest.raises(ValueError, match=r"figure format 'jpg' is invalid; allowed: one or more of png, svg"):
        figure_formats("jpg")
    with pytest.raises(ValueError, match=r"'pdf' \(in 'png,pdf'\) is invalid"):
        figure_formats("png,pdf")


def test_cli_plot_writes_each_format_and_refuses_an_unknown_one(stored, tmp_path, capsys):
    _, _, store = stored
    out = tmp_path / "out"
    assert main(["plot", str(store), "--out", str(out), "--figure-format", "png", "--figure-format", "svg"]) == 0
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert "loop_bias_estimate.png" in names and "loop_bias_estimate.svg" in names and len(names) == 8
    capsys.readouterr()
    assert main(["plot", str(store), "--out", str(out), "--figure-format", "png,gif"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--figure-format" in err[0] and "'gif'" in err[0] and "allowed: one or more of png, svg" \
        in err[0]


def test_svg_files_carry_no_date_and_a_cut_zip_plot_says_which_conditions_it_shows(stored, tmp_path):
    res, summary, _ = stored
    for _, path in make_figures(res, tmp_path, summary=summary, rates=[], formats="svg"):
        assert b"<dc:date>" not in path.read_bytes() and b"<dc:title>" in path.read_bytes()
    from simstudy.engine.plots import zip_plot

    assert zip_plot(res, "estimate").get_suptitle().endswith("\n4 of 16 conditions shown (0, 1, 2, 3)")
    assert "shown" not in zip_plot(res, "estimate", max_conditions=16).get_suptitle()
    assert "\u00b11.96 MCSE" in loop_plot(summary, "bias").axes[0].get_title()
