"""Outputs that never fail for want of replicates, KL in log space, readable rate lines (issue 12)."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from simstudy.engine import Study  # noqa: E402


def _generate(cond, rng):
    return rng.normal(size=cond["n"])


def _fit(data, cond):
    return {"estimate": float(np.mean(data)), "kl": float(np.mean(data ** 2)) / len(data)}


def _one_replicate_study(**options):
    return Study(design={"n": [20, 80]}, generate=_generate, analyse={"a": _fit},
                 truth=lambda cond: {"estimate": 0.0}, replicates=1, seed=1, name="one-rep",
                 options={"rates": [{"metric": "kl", "x": "n", "theory_slope": -1.0}], **options})


def _broken_hook(result, outdir):
    raise RuntimeError("this hook always fails")


# -- 1. a figure that cannot be drawn is skipped with a note ------------------------------------------------
def test_one_replicate_rate_plot_is_skipped_with_a_note_not_a_traceback(tmp_path, capsys):
    """replicates=1: no MCSE, so the rate plot has nothing to put on a log axis (it raised 'Data cannot be
    log-scaled'); the other figures are written, the rate plot is skipped with one line on stderr and in
    report.md."""
    from simstudy.engine.report import write_report

    res = _one_replicate_study().run(n_jobs=1, progress=False)
    figs = res.plot(tmp_path / "figures")
    titles = [t for t, _ in figs]
    assert "Bias of estimate" in titles and "Mean of kl" in titles
    assert all(p.exists() for _, p in figs)
    assert len(figs.skipped) == 1 and figs.skipped[0].startswith("Rate of kl in n: not drawn")
    assert "at least 2 replicates" in figs.skipped[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "figure skipped: Rate of kl in n" in err[0]
    report = write_report(res, tmp_path, figures=figs).read_text()
    assert "- skipped: Rate of kl in n: not drawn" in report
    assert "![Bias of estimate](figures/bias_estimate.png)" in report


def test_a_failing_figure_hook_is_skipped_and_the_others_are_kept(tmp_path, capsys):
    from simstudy.engine.figures import make_figures

    study = Study(design={"n": [20, 80]}, generate=_generate, analyse={"a": _fit},
                  truth=lambda cond: {"estimate": 0.0}, replicates=3, seed=1,
                  options={"rates": [{"metric": "kl", "x": "n", "theory_slope": -1.0}]})
    res = study.run(n_jobs=1, progress=False)
    res.manifest = dict(res.manifest, options={**res.options, "figures": [_broken_hook]})
    figs = make_figures(res, tmp_path)
    assert "Rate of kl in n" in [t for t, _ in figs]  # three replicates: the rate plot is drawn
    assert len(figs.skipped) == 1 and "_broken_hook: not drawn (RuntimeError: this hook always fails)" in \
        figs.skipped[0]
    assert "figure skipped" in capsys.readouterr().err


def test_cli_report_of_a_one_replicate_store_exits_0(tmp_path, capsys):
    """`simstudy report DIR` on a store of one replicate: exit 0, report.md with the note."""
    from simstudy import cli

    store = tmp_path / "store"
    _one_replicate_study().run(n_jobs=1, progress=False, store=store)
    assert cli.main(["report", str(store)]) == 0
    report = (store / "report.md").read_text()
    assert "- skipped: Rate of kl in n: not drawn" in report
    assert "figure skipped: Rate of kl in n" in capsys.readouterr().err
    assert cli.main(["plot", str(store)]) == 0


# -- 2. KL from log-probabilities end to end ---------------------------------------------------------------
def _lm(perturbation, seed=0, head_scale=1.0):
    import torch

    from simstudy.models import PerturbedLM, make_network, make_perturbation

    torch.manual_seed(seed)
    E = torch.randn(4, 2, dtype=torch.float64)
    net = make_network("mlp", vocab_size=4, prefix_len=2, embed_dim=2, hidden=3).double()
    G = make_perturbation(perturbation, prefix_len=2, embed_dim=2, latent_dim=1).double()
    with torch.no_grad():
        net.head.weight.mul_(head_scale)
        net.head.bias.mul_(head_scale)
    return PerturbedLM(embedding=E, network=net, perturbation=G)


def _reference_kl(truth, fitted_model, x, method):
    """KL(m* || m-hat) with log m-hat by an independent logsumexp (Monte Carlo: same draws)."""
    import torch

    from simstudy import quadrature

    with torch.no_grad():
        if method == "none":
            log_m = fitted_model.log_probs(x, None, None)[:, 0, 0]
        else:
            rule = quadrature.refined(quadrature.default_rule(1))
            nodes = torch.as_tensor(rule.nodes, dtype=torch.float64)[None].expand(len(x), -1, -1)
            logp = fitted_model.log_probs(x, None, nodes)[:, :, 0]  # (N, M, V)
            log_m = torch.logsumexp(logp + torch.as_tensor(rule.log_weights)[None, :, None], dim=1)
    log_m = log_m.numpy()
    return np.sum(np.where(truth > 0, truth * (np.log(truth) - log_m), 0.0), axis=1)


@pytest.mark.parametrize("perturbation", ["none", "linear"])
def test_kl_is_finite_for_a_head_scaled_by_1e3(perturbation):
    """A fitted head scaled by 1e3 puts probabilities of exp(-1000) (0.0 in float64) on tokens the truth
    emits: the KL is about 1e3, not inf (it was inf from probabilities)."""
    import torch

    from simstudy import metrics

    truth_model = _lm(perturbation, seed=0)
    fitted = _lm(perturbation, seed=0, head_scale=1e3)
    prefixes = torch.cartesian_prod(torch.arange(4), torch.arange(4)).numpy()
    x = torch.as_tensor(prefixes)
    truth = truth_model.marginal(x).probs
    probs_kl = metrics.kl_divergence(truth, fitted.marginal(x).probs)
    assert np.isinf(probs_kl).any()  # the old path: inf from probabilities that underflowed
    ev = metrics.evaluate_marginals(fitted, prefixes=prefixes, truth=truth, distance=prefixes.max(1) * 0.1,
                                    in_support=prefixes.max(1) <= 1)
    kl = ev.table["kl"].to_numpy()
    assert np.isfinite(kl).all()
    expected = _reference_kl(truth, fitted, x, perturbation)
    np.testing.assert_allclose(kl, np.maximum(expected, 0.0), rtol=1e-9, atol=1e-9)
    assert 10 < ev.metrics()["kl_oos"] < 1e5 and math.isfinite(ev.metrics()["kl_id"])
    # an ordinary fit (head scaled by 2) keeps the probability path, bitwise
    ordinary = _lm(perturbation, seed=0, head_scale=2.0)
    ev2 = metrics.evaluate_marginals(ordinary, prefixes=prefixes, truth=truth, distance=prefixes.max(1) * 0.1,
                                     in_support=prefixes.max(1) <= 1)
    assert np.array_equal(ev2.table["kl"].to_numpy(), metrics.kl_divergence(truth, ordinary.marginal(x).probs))


def test_kl_from_log_probabilities_and_monte_carlo_replays_the_same_draws():
    import torch

    from simstudy import metrics

    p = np.array([[0.5, 0.5, 0.0]])
    log_q = np.array([[-1e3, np.log(0.5), -np.inf]])
    np.testing.assert_allclose(metrics.kl_divergence(p, log_p_hat=log_q),
                               [0.5 * (np.log(0.5) + 1e3) + 0.5 * (np.log(0.5) - np.log(0.5))])
    assert np.isinf(metrics.kl_divergence(p, np.exp(log_q)))[0]
    truth_model = _lm("linear", seed=0)
    fitted = _lm("linear", seed=0, head_scale=1e3)
    prefixes = torch.cartesian_prod(torch.arange(4), torch.arange(4)).numpy()
    truth = truth_model.marginal(torch.as_tensor(prefixes)).probs
    gen = torch.Generator().manual_seed(5)
    ev = metrics.evaluate_marginals(fitted, prefixes=prefixes, truth=truth, distance=prefixes.max(1) * 0.1,
                                    in_support=prefixes.max(1) <= 1, method="mc", num_draws=64, generator=gen)
    assert np.isfinite(ev.table["kl"]).all()
    # the generator is left where the probability path left it (the replay uses a copy)
    gen2 = torch.Generator().manual_seed(5)
    fitted.marginal(torch.as_tensor(prefixes), method="mc", num_draws=64, generator=gen2)
    assert torch.equal(gen.get_state(), gen2.get_state())


# -- 3. first-run friction -----------------------------------------------------------------------------------
def _rate(levels, reps=6, seed=0):
    from simstudy.engine.rates import fit_rate

    rng = np.random.default_rng(seed)
    rows = [{"n": n, "method": "mle", "kl": rng.exponential() / n ** 0.6} for n in levels for _ in range(reps)]
    return fit_rate(pd.DataFrame(rows), "kl", "n", by=["method"], theory_slope=-1.0)


def test_rate_line_with_two_levels_says_lack_of_fit_is_not_testable_in_words():
    text = _rate([500, 4000]).summary()
    line = [t for t in text.splitlines() if "method=mle" in t][0]
    assert "p=nan" not in text and "OUTSIDE" not in text
    assert "lack-of-fit: not testable with 2 levels" in line
    assert "; theory -1 " in line and " the 95% interval" in line
    assert ("inside" in line) != ("outside" in line)
    three = _rate([250, 1000, 4000]).summary()
    assert "lack-of-fit p=" in three and "(3 levels; small p: not a straight line)" in three


def test_rate_line_without_a_fit_says_why():
    text = _rate([500, 4000], reps=1).summary()
    assert "method=mle: no fit (0 usable level(s) of n" in text and "nan" not in text.split("note:")[0]


def _extrapolation_frame():
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"method": m, "distance": d, "kl_oos": 1.0 + d + 0.1 * rng.normal()}
                         for m in ("mle", "aug", "is-K") for d in (0.6, 0.9, 1.2) for _ in range(5)])


def test_extrapolation_plot_offsets_the_methods_horizontally():
    """The methods' points at one distance no longer sit on top of each other; they are centred on it."""
    from simstudy.engine.plots import extrapolation_plot

    fig = extrapolation_plot(_extrapolation_frame(), "kl_oos")
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert len(lines) == 3
    xs = np.array([ln.get_xdata() for ln in lines], dtype=float)  # (methods, distances)
    assert all(len(set(col)) == 3 for col in xs.T)  # distinct per method at every distance
    np.testing.assert_allclose(xs.mean(0), [0.6, 0.9, 1.2])
    assert np.all(np.diff(xs, axis=1) > 0) and np.ptp(xs, axis=0).max() < 0.3  # order kept, within the gap
    flat = extrapolation_plot(_extrapolation_frame(), "kl_oos", dodge=0)
    xs0 = np.array([ln.get_xdata() for ln in flat.axes[0].get_lines() if ln.get_marker() == "o"], dtype=float)
    assert np.array_equal(xs0, np.tile([0.6, 0.9, 1.2], (3, 1)))
