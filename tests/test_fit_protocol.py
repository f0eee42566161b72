"""The one fitting protocol of the extrapolation check (issue 11, DESIGN §4) and ps-exact's fallback.

* early stopping in passes fires inside the budget on a small design, and every fit records where it
  stopped, whether it stopped early or hit its cap, and its validation curve;
* ps-exact (sgd) with ``fallback="importance"`` records the fraction of data that fell back; the strict
  variant still raises; the streaming importance resampling picks a proposal with probability proportional
  to its weight among all of a datum's proposals (checked against the exact probabilities, tolerance from
  the binomial standard error).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simstudy.dgm import PerturbedNextToken
from simstudy.equations import PosteriorExact, PosteriorMH, make_equation
from simstudy.equations.posterior import RejectionBudgetExceeded
from simstudy.fit import SGDConfig, fit_sgd


@pytest.fixture(scope="module")
def small():
    dgm = PerturbedNextToken.reference("five-token", seed=3, observations=2)
    x, y = dgm.sample(400, np.random.default_rng(0)).tensors()
    return dgm, x, y


def test_evaluation_schedule_converts_passes_to_steps():
    config = SGDConfig(batch_size=50, eval_every_passes=2.0, patience_passes=10.0)
    assert config.steps_per_pass(500) == 10.0
    assert config.evaluation_schedule(500) == (20, 5)
    assert SGDConfig(eval_every=7, patience=3).evaluation_schedule(500) == (7, 3)  # step-based unchanged
    with pytest.raises(ValueError, match="patience_passes"):
        SGDConfig(patience_passes=0.0)


def test_early_stopping_fires_inside_the_budget(small):
    dgm, x, y = small
    config = SGDConfig(lr=0.05, schedule="constant", batch_size=60, passes=300.0, min_steps=1, max_steps=10**6,
                       eval_every_passes=1.0, patience_passes=5.0)
    fit = fit_sgd(dgm.make_student(seed=1, perturbation="none"), make_equation("mle"), x, y, config=config,
                  generator=torch.Generator().manual_seed(0))
    s = fit.stats
    assert s["stopped_early"] and not s["hit_cap"]
    assert s["steps"] < s["budget"] and s["best_step"] < s["steps"]
    assert s["passes_run"] == pytest.approx(s["steps"] / (360 / 60))  # 10 % held out: 360 training data
    assert s["patience"] == 5 and s["eval_every"] == 6
    curve = fit.history.dropna(subset=["validation"])
    assert len(curve) == s["steps"] // 6
    assert int(curve.loc[curve["validation"].idxmax(), "step"]) == s["best_step"]


def test_a_capped_fit_is_flagged(small):
    dgm, x, y = small
    config = SGDConfig(lr=0.01, batch_size=60, passes=3.0, min_steps=1, eval_every_passes=1.0, patience_passes=5.0)
    fit = fit_sgd(dgm.make_student(seed=1), PosteriorMH(steps=5), x, y, config=config,
                  generator=torch.Generator().manual_seed(0))
    assert fit.stats["hit_cap"] and not fit.stats["stopped_early"]
    assert fit.stats["steps"] == fit.stats["budget"]


def _sharp_student(dgm):
    student = dgm.make_student(seed=2)
    with torch.no_grad():
        student.network.logit_scale.fill_(6.0)  # sharp: some observed data are very unlikely
    return student


def test_fallback_fraction_is_recorded_and_the_strict_variant_raises(small):
    dgm, x, y = small
    student = _sharp_student(dgm)
    with pytest.raises(RejectionBudgetExceeded):
        PosteriorExact(max_proposals=8).sample_posterior(student, x, y, generator=torch.Generator().manual_seed(0))
    draws = PosteriorExact(max_proposals=8, fallback="importance").sample_posterior(
        student, x, y, generator=torch.Generator().manual_seed(0))
    s = draws.stats
    assert 0 < s["fallback"] < len(x) and s["fallback_fraction"] == pytest.approx(s["fallback"] / len(x))
    assert bool((draws.accepted == 1).all())  # every datum has its one draw
    generous = PosteriorExact(max_proposals=10**6, fallback="importance").sample_posterior(
        student, x, y, generator=torch.Generator().manual_seed(0))
    assert generous.stats["fallback"] == 0.0
    with pytest.raises(ValueError, match="fallback"):
        PosteriorExact(fallback="drop")


def test_fallback_fraction_reaches_the_fit_statistics(small):
    dgm, x, y = small
    config = SGDConfig(lr=0.01, batch_size=100, steps=5, validation_fraction=0.0)
    fit = fit_sgd(_sharp_student(dgm), PosteriorExact(max_proposals=8, fallback="importance"), x, y,
                  config=config, generator=torch.Generator().manual_seed(0))
    assert 0 < fit.stats["eq_fallback_fraction"] < 1


def test_streaming_resampling_picks_in_proportion_to_the_weights():
    """Two rounds of proposals for each of B identical data: the candidate after both is proposal k with
    probability w_k / sum(w) (weights of both rounds), within 4.5 binomial standard errors."""
    B = 20000
    log_w1 = torch.log(torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    log_w2 = torch.log(torch.tensor([0.5, 1.5], dtype=torch.float64))
    rows1, rows2 = torch.arange(B).repeat_interleave(3), torch.arange(B).repeat_interleave(2)
    z1 = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64).repeat(B, 1)  # (3B, 1) proposal ids as values
    z2 = torch.tensor([[3.0], [4.0]], dtype=torch.float64).repeat(B, 1)
    gen = torch.Generator().manual_seed(5)
    log_mass = torch.full((B,), -math.inf, dtype=torch.float64)
    cand, log_mass = PosteriorExact._resample_round(None, log_mass, z1, log_w1.repeat(B), rows1, B, gen)
    cand, log_mass = PosteriorExact._resample_round(cand, log_mass, z2, log_w2.repeat(B), rows2, B, gen)
    assert torch.allclose(log_mass, torch.full((B,), math.log(3.0), dtype=torch.float64))
    counts = torch.bincount(cand[:, 0].long(), minlength=5).double() / B
    p = torch.tensor([0.1, 0.3, 0.6, 0.5, 1.5], dtype=torch.float64) / 3.0
    se = (p * (1 - p) / B).sqrt()
    assert bool(((counts - p).abs() < 4.5 * se).all()), (counts, p)


@pytest.mark.parametrize("chain_dtype", ["model", "float32"])
def test_batched_independence_chain_targets_the_posterior(small, chain_dtype):
    """The independence chain, its B proposals scored in one pass (in the model's dtype or float32), ends
    at posterior draws: over 6000 chains of one datum, the mean of the final state is the quadrature
    posterior mean within 4.5 standard errors (the chains are independent)."""
    dgm, x, y = small
    student = dgm.make_student(seed=2)
    with torch.no_grad():
        student.perturbation.A.mul_(40.0)  # a posterior far from the prior
    from simstudy.equations import quadrature_posterior_mean
    xi, yi = x[:1].repeat(6000, 1), y[:1].repeat(6000, 1)
    exact = quadrature_posterior_mean(student, xi[:1], yi[:1])[0]
    z, stats = PosteriorMH(steps=60, chain_dtype=chain_dtype).run_chains(
        student, xi, yi, generator=torch.Generator().manual_seed(1))
    assert z.dtype == torch.float64 and z.shape == (6000, 1, 1)
    draws = z[:, 0, 0]
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - float(exact[0])) < 4.5 * se, (float(draws.mean()), float(exact[0]), se)
    assert abs(float(exact[0])) > 10 * se  # the test can tell the posterior from the prior
    assert 0.05 < stats["acceptance_rate"] < 0.95


@pytest.mark.parametrize("design, options", [("identified", {}), ("weakly-identified", {}),
                                             ("five-token", {"observations": 3, "continuation": "autoregressive"})])
def test_held_out_score_is_the_mean_quadrature_log_likelihood(design, options):
    """The validation score (the blocked likelihood objective where prefixes are shared) equals the mean of
    ``quadrature_log_lik`` with the same rule, to rounding, for a perturbation far from its initial scale."""
    from simstudy import quadrature
    from simstudy.fit import held_out_score

    dgm = PerturbedNextToken.reference(design, seed=1, **options)
    x, y = dgm.sample(300, np.random.default_rng(2)).tensors()
    student = dgm.make_student(seed=4)
    with torch.no_grad():
        student.perturbation.A.mul_(20.0)
    q = student.perturbation.latent_dim
    rule = quadrature.trapezoid(61 if q == 1 else 25, q)
    expected = float(student.quadrature_log_lik(x, y, rule).mean().detach())
    assert held_out_score(student, x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("score_dtype", ["model", "float32"])
def test_rejection_draws_target_the_posterior_in_either_score_dtype(small, score_dtype):
    """ps-exact's rejection draws, proposals scored in the model's dtype or float32: over 6000 draws for one
    datum, the mean is the quadrature posterior mean within 4.5 standard errors; the draws and the gradient
    pass stay in the model's dtype, and the float32 copy is refreshed, not rebuilt, at the next call."""
    dgm, x, y = small
    student = dgm.make_student(seed=2)
    with torch.no_grad():
        student.perturbation.A.mul_(40.0)
    from simstudy.equations import quadrature_posterior_mean
    xi, yi = x[:1].repeat(6000, 1), y[:1].repeat(6000, 1)
    exact = quadrature_posterior_mean(student, xi[:1], yi[:1])[0]
    eq = PosteriorExact(max_proposals=10_000_000, score_dtype=score_dtype)
    got = eq.sample_posterior(student, xi, yi, generator=torch.Generator().manual_seed(1))
    assert got.latent.dtype == torch.float64 and bool((got.accepted == 1).all())
    draws = got.latent[:, 0, 0]
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - float(exact[0])) < 4.5 * se, (float(draws.mean()), float(exact[0]), se)
    assert abs(float(exact[0])) > 10 * se
    if score_dtype == "float32":
        first = eq._scorer(student)
        with torch.no_grad():
            student.perturbation.A.mul_(0.5)
        again = eq._scorer(student)
        assert again is first and torch.equal(again.perturbation.A, student.perturbation.A.float())
    clone = type(eq)(**eq.get_params())  # caches are state, not parameters
    assert clone.score_dtype == score_dtype
    with pytest.raises(ValueError, match="score_dtype"):
        PosteriorExact(score_dtype="float16")
