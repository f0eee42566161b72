"""Metrics of DESIGN §5 against values computed by hand."""
import numpy as np
import pandas as pd
import pytest
import torch

from simstudy import metrics
from simstudy.models import PerturbedLM, make_network, make_perturbation


def test_kl_and_tv_by_hand():
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]])
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(metrics.kl_divergence(p, q), [expected, 0.0], atol=1e-15)
    np.testing.assert_allclose(metrics.tv_distance(p, q), [0.25, 0.0])


def test_kl_is_infinite_when_the_fit_misses_a_token():
    kl = metrics.kl_divergence(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    assert np.isinf(kl[0])


def test_kl_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.kl_divergence(np.ones((2, 3)) / 3, np.ones((2, 4)) / 4)


def test_extrapolation_curve_bins_means_and_standard_errors():
    table = pd.DataFrame({"distance": [0.1, 0.1, 0.4, 0.5], "kl": [1.0, 3.0, 2.0, 4.0]})
    curve = metrics.extrapolation_curve(table, bins=np.array([0.0, 0.25, 0.5]))
    assert list(curve["count"]) == [2, 2]
    np.testing.assert_allclose(curve["kl"], [2.0, 3.0])
    np.testing.assert_allclose(curve["kl_se"], [np.std([1, 3], ddof=1) / np.sqrt(2), np.std([2, 4], ddof=1) / np.sqrt(2)])


def _model(perturbation="linear", seed=0):
    torch.manual_seed(seed)
    E = torch.randn(4, 2, dtype=torch.float64)
    net = make_network("mlp", vocab_size=4, prefix_len=2, embed_dim=2, hidden=3).double()
    G = make_perturbation(perturbation, prefix_len=2, embed_dim=2, latent_dim=1).double()
    return PerturbedLM(embedding=E, network=net, perturbation=G)


def test_evaluate_marginals_is_zero_against_itself_and_regions_split():
    model = _model()
    prefixes = torch.cartesian_prod(torch.arange(4), torch.arange(4)).numpy()
    truth = model.marginal(torch.as_tensor(prefixes)).probs
    in_support = prefixes.max(1) <= 1
    ev = metrics.evaluate_marginals(model, prefixes=prefixes, truth=truth, distance=prefixes.max(1) * 0.1,
                                    in_support=in_support)
    m = ev.metrics()
    assert m["kl_id"] == pytest.approx(0.0, abs=1e-12) and m["kl_oos"] == pytest.approx(0.0, abs=1e-12)
    assert (ev.table.region == "ID").sum() == in_support.sum()


def test_perturbation_recovery_is_exact_for_identical_models_and_scales():
    teacher = _model()
    student = _model()
    r = metrics.perturbation_recovery(student, teacher)
    assert r["cov_error"] == pytest.approx(0.0, abs=1e-14) and r["scale_ratio"] == pytest.approx(1.0)
    with torch.no_grad():
        student.perturbation.A.mul_(2.0)
    assert metrics.perturbation_recovery(student, teacher)["scale_ratio"] == pytest.approx(2.0)


def test_iwae_bound_is_below_the_quadrature_log_marginal_and_tightens():
    from simstudy import quadrature
    model = _model(seed=3)
    with torch.no_grad():
        model.perturbation.A.mul_(40.0)
    x = torch.tensor([[0, 1], [2, 3]]).repeat(500, 1)
    y = torch.tensor([[1], [0]]).repeat(500, 1)
    exact = model.quadrature_log_lik(x[:2], y[:2], quadrature.trapezoid(201, 1)).detach()
    gen = torch.Generator().manual_seed(0)
    means = []
    for k in (1, 16):
        est = metrics.iwae_log_marginal(model, x, y, num_draws=k, generator=gen).view(500, 2)
        mean, se = est.mean(0), est.std(0) / np.sqrt(500)
        assert torch.all(mean <= exact + 4 * se)
        means.append(mean)
    assert torch.all(means[1] > means[0])  # the bound tightens with K


def test_perplexity_reports_k_and_matches_exact_for_unperturbed():
    model = _model(perturbation="none")
    x = torch.tensor([[0, 1], [2, 3]])
    y = torch.tensor([[1], [0]])
    out = metrics.perplexity(model, x, y, num_draws=4)
    exact = float(torch.exp(-model.log_lik(x, y, None).mean().detach()))
    assert out["perplexity"] == pytest.approx(exact) and out["num_draws"] == 4
