"""``simstudy plot DIR --loop-plot/--heatmap``: the figures asked for, and one line for a bad option (DESIGN §7)."""
from pathlib import Path

import pytest
from matplotlib.image import imread
from study_texts import binomial_study

from simstudy.cli import main


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plot")
    study = root / "bin.toml"
    study.write_text(binomial_study(replicates=6, n=(10, 40), p=(0.1, 0.3, 0.5), methods=("wald", "wilson")))
    assert main(["run", str(study), "--out", str(root / "res"), "--no-progress"]) == 0
    return root / "res"


def test_loop_plot_and_heatmap_of_chosen_measures(results, tmp_path, capsys):
    out = tmp_path / "figs"
    code = main(["plot", str(results), "--out", str(out), "--loop-plot", "coverage", "ci_width:estimate",
                 "--heatmap", "bias", "--axes", "p,n", "--order", "p,n", "--methods", "wilson",
                 "--figure-format", "png,svg"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and "Nested loop plot of coverage of estimate" in printed[0]
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == sorted(f"{stem}.{fmt}" for stem in ("loop_coverage_estimate", "loop_ci_width_estimate",
                                                          "heatmap_bias_estimate") for fmt in ("png", "svg"))
    image = imread(out / "figures" / "heatmap_bias_estimate.png")  # (rows, cols, 4): a drawn picture
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05


@pytest.mark.parametrize("argv, words", [
    (["--loop-plot", "nosuch"], "measure='nosuch' is invalid; allowed"),
    (["--loop-plot", "coverage:nosuch"], "estimand='nosuch'"),
    (["--heatmap", "coverage", "--axes", "n"], "--axes='n' is invalid; allowed: two design factors"),
    (["--heatmap", "coverage", "--axes", "n,q"], "'q'"),
    (["--loop-plot", "coverage", "--order", "n,q"], "order=['n', 'q'] is invalid"),
    (["--loop-plot", "coverage", "--methods", "wald,zzz"], "methods=['wald', 'zzz'] is invalid"),
    (["--order", "n,p"], "--order is invalid without --loop-plot or --heatmap"),
])
def test_bad_plot_option_is_one_line(results, tmp_path, capsys, argv, words):
    out = tmp_path / "figs"
    assert main(["plot", str(results), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("simstudy: error:") and words in err, err
    assert not (out / "figures").exists() or not any((out / "figures").iterdir())
