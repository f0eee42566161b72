"""Performance measures and their MCSE against values computed by hand (Morris et al. 2019, Table 6; DESIGN §7)."""
import math

import numpy as np
import pandas as pd
import pytest

from simstudy.engine import performance as perf

# Hand computations for t = [1, 2, 3, 4, 5], theta = 2.5, n = 5:
#   tbar = 3, sum (t - tbar)^2 = 10, sample variance 10/4 = 2.5
T = [1.0, 2.0, 3.0, 4.0, 5.0]
THETA = 2.5


def test_mean_and_bias_by_hand():
    m = perf.mean(T)
    assert m.value == 3.0
    assert m.mcse == pytest.approx(math.sqrt(0.5), abs=1e-12)  # sqrt(10 / (5 * 4))
    b = perf.bias(T, THETA)
    assert b.value == 0.5
    assert b.mcse == pytest.approx(0.7071067811865476, abs=1e-12)


def test_empse_by_hand():
    e = perf.empse(T)
    assert e.value == pytest.approx(1.5811388300841898, abs=1e-12)  # sqrt(2.5)
    assert e.mcse == pytest.approx(0.5590169943749475, abs=1e-12)  # sqrt(2.5) / sqrt(2 * 4)


def test_mse_rmse_by_hand():
    # (t - theta)^2 = [2.25, .25, .25, 2.25, 6.25], mean 2.25; deviations [0, -2, -2, 0, 4], squares sum 24
    m = perf.mse(T, THETA)
    assert m.value == 2.25
    assert m.mcse == pytest.approx(math.sqrt(24 / 20), abs=1e-12)  # 1.0954451150103321
    r = perf.rmse(T, THETA)
    assert r.value == 1.5
    assert r.mcse == pytest.approx(1.0954451150103321 / 3.0, abs=1e-12)  # mcse(mse) / (2 rmse)


def test_coverage_and_bias_eliminated_coverage_by_hand():
    lo = [t - 1.5 for t in T]
    hi = [t + 1.5 for t in T]
    # covers 2.5 when |t - 2.5| <= 1.5: t = 1, 2, 3, 4 -> 4/5 (closed interval: the endpoint 1 counts)
    c = perf.coverage(lo, hi, THETA)
    assert c.value == 0.8
    assert c.mcse == pytest.approx(math.sqrt(0.8 * 0.2 / 5), abs=1e-12)  # 0.17888543819998318
    # covers tbar = 3 when |t - 3| <= 1.5: t = 2, 3, 4 -> 3/5
    b = perf.be_coverage(lo, hi, T)
    assert b.value == 0.6
    assert b.mcse == pytest.approx(0.21908902300206645, abs=1e-12)


def test_modse_and_relative_error_by_hand():
    se = [1.0, 2.0, 1.0, 2.0, 1.0]
    # s^2 = [1, 4, 1, 4, 1], mean 2.2; Var(s^2) = (3 * 1.44 + 2 * 3.24) / 4 = 2.7
    m = perf.modse(se)
    assert m.value == pytest.approx(math.sqrt(2.2), abs=1e-12)
    assert m.mcse == pytest.approx(math.sqrt(2.7 / (4 * 5 * 2.2)), abs=1e-12)  # 0.24771677...
    r = perf.relerr_modse(se, T)
    ratio = math.sqrt(2.2 / 2.5)  # modse / empse = 0.93808315...
    assert r.value == pytest.approx(ratio - 1, abs=1e-12)
    assert r.mcse == pytest.approx(ratio * math.sqrt(2.7 / (4 * 5 * 2.2**2) + 1 / 8), abs=1e-12)
    assert r.mcse == pytest.approx(0.36680438, abs=1e-7)  # 0.93808315 * sqrt(0.15289256)


def test_relative_efficiency_by_hand():
    ref = T
    b = [1.5, 2.0, 3.0, 3.5, 5.0]
    # var(ref) = 2.5, var(b) = 7.5 / 4 = 1.875, ratio 4/3; cov = 8.5 / 4 = 2.125, rho^2 = 2.125^2 / (2.5 * 1.875)
    rho2 = 2.125**2 / 4.6875  # = 0.963333...
    r = perf.rel_efficiency(ref, b)
    assert r.value == pytest.approx(4 / 3, abs=1e-12)
    assert r.mcse == pytest.approx(2 * (4 / 3) * math.sqrt((1 - rho2) / 4), abs=1e-12)
    assert r.mcse == pytest.approx(0.2553139, abs=1e-7)  # (8/3) * sqrt((11/300) / 4)
    assert perf.rel_efficiency(ref, ref) == (1.0, 0.0)
    with pytest.raises(ValueError, match="paired"):
        perf.rel_efficiency(ref, b[:3])


def test_power_by_hand():
    p = perf.power([0.01, 0.2, 0.04, 0.5, 0.05], alpha=0.05)
    assert p.value == 0.6
    assert p.mcse == pytest.approx(math.sqrt(0.24 / 5), abs=1e-12)


def test_degenerate_inputs_give_nan_not_errors():
    assert all(math.isnan(v) for v in perf.mean([]))
    assert math.isnan(perf.empse([1.0]).value)
    assert math.isnan(perf.mean([2.0]).mcse)
    assert perf.mean([2.0]).value == 2.0
    assert math.isnan(perf.rel_efficiency([1, 2], [1, 3]).value)
    # infinite metrics (e.g. KL = inf) are reported, never dropped
    assert perf.mean([1.0, math.inf]).value == math.inf


def _table(rows):
    return pd.DataFrame(rows, columns=["condition", "n", "replicate", "method", "status", "message", "estimate",
                                       "se", "ci_low", "ci_high", "kl"])


def test_summarise_uses_ok_rows_counts_failures_and_pairs_reference():
    rows = []
    b = [1.5, 2.0, 3.0, 3.5, 5.0]
    for r in range(5):
        rows.append([0, 10, r, "A", "ok", "", T[r], 1.0, T[r] - 1.5, T[r] + 1.5, 0.1 * r])
        rows.append([0, 10, r, "B", "ok", "", b[r], 1.0, b[r] - 1.5, b[r] + 1.5, np.nan])
    rows.append([0, 10, 5, "A", "error", "boom", np.nan, np.nan, np.nan, np.nan, np.nan])
    rows.append([0, 10, 5, "B", "nan", "NaN in: estimate", np.nan, 1.0, 0.0, 1.0, np.nan])
    rows.append([0, 10, 6, "A", "diverged", "x", np.nan, np.nan, np.nan, np.nan, np.nan])
    s = perf.summarise(_table(rows), factors=["n"], methods=["A", "B"], truths=[{"estimate": THETA}],
                       reference="A")
    get = s.set_index(["method", "estimand", "measure"])
    assert get.loc[("A", "estimate", "bias"), "value"] == 0.5
    assert get.loc[("A", "estimate", "bias"), "mcse"] == pytest.approx(math.sqrt(0.5))
    assert get.loc[("A", "estimate", "coverage"), "value"] == 0.8
    assert get.loc[("B", "estimate", "rel_efficiency"), "value"] == pytest.approx(4 / 3)
    assert get.loc[("A", "estimate", "bias"), "n_used"] == 5
    assert get.loc[("A", "estimate", "bias"), "failures"] == 2
    assert get.loc[("B", "estimate", "bias"), "failures"] == 1
    # a metric without a truth gets its mean with MCSE sd / sqrt(n): kl = [0, .1, .2, .3, .4]
    kl = get.loc[("A", "kl", "mean")]
    assert kl["value"] == pytest.approx(0.2)
    assert kl["mcse"] == pytest.approx(np.std([0, .1, .2, .3, .4], ddof=1) / math.sqrt(5))
    assert ("B", "kl", "mean") not in get.index
    assert "status 'ok'" in s.attrs["note"]
    with pytest.raises(ValueError, match="reference='C' is invalid"):
        perf.summarise(_table(rows), factors=["n"], methods=["A", "B"], truths=[{"estimate": THETA}],
                       reference="C")


def test_rate_plot_draws_lines_only_over_the_fitted_levels():
    """A level whose mean is infinite (one runaway fit) is left out of the fit, and the fitted line
    and error bars span only the levels used; the dropped level is marked and named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    from simstudy.engine.plots import rate_plot
    from simstudy.engine.rates import fit_rate

    rng = np.random.default_rng(0)
    rows = [{"n": n, "method": "a", "kl": (math.inf if (n == 800 and r == 3) else rng.exponential() / n)}
            for n in (100, 200, 400, 800) for r in range(20)]
    rate = fit_rate(pd.DataFrame(rows), "kl", "n", by=["method"], theory_slope=-1.0)
    assert int(rate.fits["k"].iloc[0]) == 3
    fig = rate_plot(rate)
    ax = fig.axes[0]
    fitted = [line for line in ax.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata()) > 2]
    assert fitted and max(float(np.max(line.get_xdata())) for line in fitted) == pytest.approx(400.0)
    assert any("not fitted" in t.get_text() for t in ax.get_legend().get_texts())
