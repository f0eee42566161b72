"""Paper checks 2-6 (DESIGN §6.2-§6.6) and their statistics (Fisher rank, sandwich, KL constants).

The checks run at a reduced smoke scale through ``run_check`` (machinery and the
clear-cut verdicts); the quadrature theory is checked against independent
computations (analytic formulas from the marginal's Jacobian, finite differences,
plain autograd loops).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simstudy import quadrature
from simstudy.checks import CheckContext, run_check
from simstudy.checks import overparameterised  # noqa: F401  (registers the check)
from simstudy.checks import consistency
from simstudy.checks import asymptotic_study as asy
from simstudy.checks import fisher
from simstudy.checks import fisher_linalg as linalg
from simstudy.checks.asymptotic_statistics import asymptotic_start, paired_ratio
from simstudy.dgm import PerturbedNextToken

SMALL = {"n": "4000,16000", "replicates": "3"}  # the shared study at test size


@pytest.fixture(scope="module")
def dgm():
    return PerturbedNextToken.reference("five-token", seed=0)


@pytest.fixture(scope="module")
def truth_student(dgm):
    return asy.make_student(dgm, trainable="head+perturbation", init="truth")


@pytest.fixture(scope="module")
def population(dgm, truth_student):
    return fisher.population_matrices(truth_student, dgm.prefixes("in"))


# ---- students and functionals ---------------------------------------------------------------
def test_truth_student_reproduces_the_teacher_and_freezes_the_first_layer(dgm, truth_student):
    x = torch.as_tensor(dgm.prefixes("all"))
    rule = quadrature.default_rule(1)
    with torch.no_grad():
        m_student = truth_student.log_marginal_nodes(x, None, rule).exp()[:, 0].numpy()
    np.testing.assert_allclose(m_student, dgm.exact_marginal(dgm.prefixes("all")), atol=1e-12)
    trainable = {k for k, p in truth_student.named_parameters() if p.requires_grad}
    assert trainable == {"network.head.weight", "network.head.bias", "perturbation.A"}
    assert sum(p.numel() for p in truth_student.parameters() if p.requires_grad) == 31
    random = asy.make_student(dgm, init="random", seed=3)
    assert torch.equal(random.network.hidden.weight, truth_student.network.hidden.weight)
    assert not torch.equal(random.network.head.weight, truth_student.network.head.weight)
    full = asy.make_student(dgm, trainable="all")
    assert all(p.requires_grad for p in full.parameters())


def test_functionals_of_the_five_token_model(dgm):
    funcs = asy.select_functionals(dgm)
    assert [f.x0 for f in funcs] == [(0, 0), (3, 3), (0, 4), (4, 4)]
    assert [f.region for f in funcs] == ["ID", "ID", "OOS", "OOS"]
    for f in funcs:
        m = dgm.exact_marginal(np.asarray([f.x0]))[0]
        assert f.y0 == int(np.argmax(m)) and f.truth == pytest.approx(m[f.y0], abs=1e-15)


def test_bad_settings_raise_one_line_value_errors():
    for key, value in (("trainable", "head"), ("init", "zero"), ("latent_dim", "3"), ("teacher", "transformer"),
                       ("design", "nope"), ("replicates", "2"), ("n", "1000")):
        with pytest.raises(ValueError, match=key):
            asy.asymptotic_settings(CheckContext(overrides={key: value}))
    with pytest.raises(ValueError, match="trainable"):
        asy.make_student(PerturbedNextToken.reference("five-token"), trainable="none")


# ---- Fisher information and sandwich by quadrature -------------------------------------------
def test_fisher_rank_and_constants_of_the_five_token_sub_model(dgm, truth_student):
    theory = fisher.asymptotic_theory(truth_student, dgm.prefixes("in"), dgm.prefixes("oos"))
    # DESIGN §6.3: the 5-token sub-model has r = 24; the 7 dropped directions are the 5 softmax
    # shifts of the head and the 2 directions of A that W1 (4 x 6) ignores
    assert theory.rank == 24 and theory.num_parameters == 31
    assert theory.subspace.gap > 1e8  # the cut is clear-cut
    assert theory.constants["likelihood"]["id"] == pytest.approx(12.0, rel=1e-9)  # r / 2
    assert theory.constants["brier"]["id"] > 12.0  # Cramer-Rao: no equation beats the likelihood
    assert theory.null_leak_oos < 1e-12  # what ID data cannot identify does not move OOS predictions
    assert max(theory.mean_psi.values()) < 1e-12  # both equations are unbiased at the truth


def test_information_equality_and_brier_matrices_match_the_jacobian_formulas(dgm, truth_student, population):
    """I = -A_likelihood (information equality), and for c = 1 the Brier matrices are
    A = -2 sum_x w J^T J and B = 4 sum_x w sum_y m_y (J_y - Jbar)(J_y - Jbar)^T with J = dm/dtheta."""
    I = population.information
    np.testing.assert_allclose(population.A["likelihood"], -I, atol=1e-10 * np.abs(I).max())
    np.testing.assert_allclose(population.B["likelihood"], I, atol=1e-10 * np.abs(I).max())
    x = torch.as_tensor(dgm.prefixes("in"))
    V = dgm.vocab_size
    m, J = fisher.marginal_gradient(truth_student, x.repeat_interleave(V, 0), torch.arange(V).repeat(len(x)))
    m, J = m.view(len(x), V).numpy(), J.view(len(x), V, -1).numpy()  # (N, V), (N, V, P)
    w = 1.0 / len(x)
    I_formula = w * np.einsum("nvp,nv,nvq->pq", J, 1 / m, J)
    A_formula = -2 * w * np.einsum("nvp,nvq->pq", J, J)
    Jbar = np.einsum("nv,nvp->np", m, J)
    D = J - Jbar[:, None]
    B_formula = 4 * w * np.einsum("nv,nvp,nvq->pq", m, D, D)
    scale = np.abs(I_formula).max()
    np.testing.assert_allclose(I, I_formula, atol=1e-10 * scale)
    np.testing.assert_allclose(population.A["brier"], A_formula, atol=1e-10 * np.abs(A_formula).max())
    np.testing.assert_allclose(population.B["brier"], B_formula, atol=1e-10 * np.abs(B_formula).max())


def test_marginal_gradient_matches_finite_differences(dgm, truth_student):
    x0, y0 = torch.tensor([[0, 0], [4, 4]]), torch.tensor([1, 2])
    m, G = fisher.marginal_gradient(truth_student, x0, y0)
    flat = linalg.FlatParameters.of(truth_student)
    theta = flat.theta()
    rule = quadrature.default_rule(1)
    fn = lambda t: flat.call(lambda mod, a: mod.quadrature_token_log_marginals(a, None, rule), t, x0)[  # noqa: E731
        torch.arange(2), 0, y0].exp()
    h = 1e-6
    for j in (0, 7, 30):
        e = torch.zeros_like(theta)
        e[j] = h
        fd = (fn(theta + e) - fn(theta - e)) / (2 * h)
        np.testing.assert_allclose(G[:, j].numpy(), fd.detach().numpy(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(m.numpy(), [dgm.exact_marginal(np.array([[0, 0]]))[0, 1],
                                           dgm.exact_marginal(np.array([[4, 4]]))[0, 2]], atol=1e-12)


def test_empirical_sandwich_matches_plain_autograd(dgm, truth_student):
    """The torch.func sandwich against per-row autograd gradients and autograd.functional.hessian."""
    data = dgm.sample(300, np.random.default_rng(5))
    x, y = data.tensors()
    rule = quadrature.trapezoid(41, 1)
    for objective in ("likelihood", "brier"):
        sigma = fisher.empirical_sandwich(truth_student, x, y, objective, rule)
        xu, yu, w = fisher.group_data(x, y)
        params = [p for p in truth_student.parameters() if p.requires_grad]
        rows = []
        for i in range(len(xu)):
            t = fisher.objective_terms(truth_student, xu[i:i + 1], yu[i:i + 1], objective, rule)[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(t, params)]))
        psi = torch.stack(rows).numpy()
        mean = w.numpy() @ psi
        B = ((psi - mean).T * w.numpy()) @ (psi - mean)
        flat = linalg.FlatParameters.of(truth_student)
        total = lambda t: (flat.call(lambda mod, a, b: fisher.objective_terms(mod, a, b, objective, rule),  # noqa
                                     t, xu, yu) * w).sum()
        A = torch.autograd.functional.hessian(total, flat.theta()).numpy()
        expected = linalg.sandwich_covariance(A, B, None)
        np.testing.assert_allclose(sigma, expected, atol=1e-7 * np.abs(expected).max())


def test_identifiable_subspace_and_sandwich_algebra():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    I = Q @ np.diag([3.0, 1.0, 0.5, 0.0, 0.0]) @ Q.T
    sub = linalg.identifiable_subspace(I, 1e-10)
    assert sub.rank == 3 and sub.condition == pytest.approx(6.0)
    # likelihood: A = -I, B = I gives Sigma = I^+ and the constant r / 2
    sigma = linalg.sandwich_covariance(-I, I, sub.basis)
    np.testing.assert_allclose(sigma, np.linalg.pinv(I, rcond=1e-10), atol=1e-12)
    assert linalg.kl_constant(I, sigma) == pytest.approx(1.5)
    # a non-symmetric-looking B on the subspace: the basis and the pseudo-inverse routes agree
    B = Q @ np.diag([2.0, 1.0, 4.0, 0.0, 0.0]) @ Q.T
    np.testing.assert_allclose(linalg.sandwich_covariance(-I, B, sub.basis), linalg.sandwich_covariance(-I, B),
                               atol=1e-12)
    with pytest.raises(ValueError, match="rtol"):
        linalg.identifiable_subspace(I, 2.0)


def test_enumeration_guard():
    with pytest.raises(ValueError, match="too many"):
        fisher.enumerate_outcomes(np.zeros((50_000, 2), dtype=int), 41, 1)


# ---- decision helpers -------------------------------------------------------------------------------
def test_asymptotic_start():
    n = np.array([500, 1000, 2000, 4000, 8000])
    # pre-asymptotic at 500 and 1000, on theory from 2000 on
    assert asymptotic_start(n, np.array([30.0, 16.0, 12.2, 11.9, 12.1]), np.full(5, 0.3), 12.0) == 2000
    assert math.isnan(asymptotic_start(n, np.array([30.0, 16.0, 12.2, 11.9, 14.0]), np.full(5, 0.3), 12.0))
    assert asymptotic_start(n, np.full(5, 12.0), np.full(5, 0.3), 12.0) == 500


def test_paired_ratio_delta_method_against_simulation():
    rng = np.random.default_rng(1)
    b = rng.chisquare(24, size=(4000, 50)) / 2
    a = 1.5 * b + rng.chisquare(4, size=b.shape)
    ratios = a.mean(1) / b.mean(1)
    ses = np.array([paired_ratio(ai, bi)[1] for ai, bi in zip(a, b)])
    # the delta-method MCSE (root mean square over samples) against the ratio's sampling spread:
    # with 4000 samples both are known to about 2%
    assert np.sqrt(np.mean(ses ** 2)) == pytest.approx(ratios.std(), rel=0.1)
    assert paired_ratio(2 * b[0], b[0]) == pytest.approx((2.0, 0.0), abs=1e-12)


# ---- the checks at a reduced smoke scale ----------------------------------------------------------
@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("asymptotics")


def _context(out, **extra):
    return CheckContext(scale="smoke", out=out, n_jobs=1, overrides={**SMALL, **extra})


def test_consistency_check(shared_out):
    res = run_check("consistency", _context(shared_out))
    # clear-cut at n = 4000 vs 16000: ID KL falls by a factor of about 4
    ids = res.tables["verdicts"][res.tables["verdicts"]["region"] == "ID"]
    assert ids["fell"].all() and (ids["slope_high"] < 0).all()
    saved = json.loads((shared_out / "consistency.json").read_text())
    assert saved["decision"] in ("pass", "fail") and saved["decision_rule"] == consistency.CONSISTENCY_RULE
    assert set(saved["statistics"]) >= {"ps-exact/ID", "q2/ID", "ps-exact/OOS", "q2/OOS"}
    table = res.tables["replicates"]
    assert len(table) == 2 * 3 * 2 and (table["status"] == "ok").all()
    for fig in res.figures:
        assert (shared_out / "consistency" / fig.split("/")[-1]).exists()
    # the shared study was stored once, under its config hash
    assert len(list((shared_out / "studies").glob("asymptotics-*"))) == 1


def test_rates_check(shared_out):
    res = run_check("rates", _context(shared_out))
    stats = res.statistics
    assert stats["theory"]["rank"] == 24
    assert stats["theory"]["constants"]["likelihood"]["id"] == pytest.approx(12.0)
    v = res.tables["verdicts"]
    assert set(v.loc[v["judged"], "method"]) == {"ps-exact", "q2"}
    for method in ("ps-exact", "q2"):
        slope = stats[f"{method}/kl_id"]["slope"]
        assert slope["ci95"][0] < slope["estimate"] < slope["ci95"][1]
        for point in stats[f"{method}/kl_id"]["constant_by_n"].values():
            assert point["mcse"] > 0
    assert res.decision in ("pass", "fail") and len(res.figures) == 4
    # reuses the stored study: no second one
    assert len(list((shared_out / "studies").glob("asymptotics-*"))) == 1


def test_inference_and_efficiency_checks(shared_out):
    inf = run_check("inference", _context(shared_out))
    cells = inf.tables["coverage"]
    assert set(cells["functional"]) == {"m_id_first", "m_id_last", "m_oos_near", "m_oos_far"}
    assert ((cells["coverage"] >= 0) & (cells["coverage"] <= 1)).all()
    assert (cells["modse"] > 0).all()
    eff = run_check("efficiency", _context(shared_out))
    ratios = eff.tables["ratios"]
    assert list(ratios["n"]) == [4000, 16000]
    assert (ratios["q2_over_ps_mcse"] > 0).all() and (ratios["theory_ratio"] > 1).all()
    assert eff.decision in ("pass", "fail") and inf.decision in ("pass", "fail")


def test_overparameterised_check(tmp_path):
    overrides = {"n": "100,1000", "replicates": "2", "n_embd": "32", "n_layer": "1", "min_steps": "40",
                 "passes": "10", "eval_every": "20"}
    res = run_check("overparameterised", CheckContext(scale="smoke", out=tmp_path, overrides=overrides))
    stats = res.statistics
    assert stats["n_parameters"] > 10 * 1000
    # clear-cut: ten times the data, far smaller ID KL
    assert stats["mean_kl_id_by_n"][1000]["estimate"] < 0.5 * stats["mean_kl_id_by_n"][100]["estimate"]
    assert res.decision == "pass"
    with pytest.raises(ValueError, match="over-parameterised"):
        run_check("overparameterised", CheckContext(scale="smoke", out=tmp_path, overrides={"n": "100,5000"}))
