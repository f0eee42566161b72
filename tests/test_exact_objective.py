"""The exact solver's blocked likelihood objective (DESIGN §3 "Solving the equations"; issue 11) equals
today's autograd implementation, kept here as a reference copy, to 1e-10 in float64: the objective
and its gradient, c = 1 and c = 2 iid, q = 1 and q = 2, an autoregressive continuation, every logit
source (MLP and linear window networks by hand, a transformer and an MLP perturbation by autograd),
logit scales far from 1, several blocks; float32 is close for every logit source and leaves the model
alone; the node-doubling check prunes like its rule; and fit_exact reaches the reference solver's root."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simstudy import quadrature
from simstudy.dgm import PerturbedNextToken
from simstudy.fit import exact_objective, fit_exact
from simstudy.fit.blocked_likelihood import blocked_log_likelihood, plan_prefixes
from simstudy.fit.exact import group_data, refined_rule


# ---- the reference: simstudy/fit/exact.py before issue 11 -------------------------------------------
def reference_group(x, y):
    rows = torch.cat([x, y], dim=1)
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    return unique[:, :x.shape[1]], unique[:, x.shape[1]:], counts


def reference_objective(model, x, y, rule, grouped=None):
    """The old ``exact_objective(objective="likelihood")``: (D, M, c) token log-likelihoods by autograd."""
    xu, yu, counts = grouped if grouped is not None else reference_group(x, y)
    weights = counts.to(model.dtype) / counts.sum()
    log_w = torch.as_tensor(rule.log_weights, dtype=model.dtype)  # (M,)
    nodes = torch.as_tensor(rule.nodes, dtype=model.dtype)  # (M, q)
    if model.continuation == "iid" or yu.shape[1] == 1:
        prefixes, inv = torch.unique(xu, dim=0, return_inverse=True)
        logp = model.log_probs(prefixes, None, nodes[None].expand(prefixes.shape[0], -1, -1))[:, :, 0]  # (U, M, V)
        token = logp.permute(0, 2, 1)[inv[:, None], yu].permute(0, 2, 1)  # (D, M, c)
    else:
        token = model.token_log_lik(xu, yu, nodes[None].expand(xu.shape[0], -1, -1))  # (D, M, c)
    log_m = torch.logsumexp(token.sum(-1) + log_w, dim=1)  # (D,)
    return (log_m * weights).sum()


def reference_fit(model, x, y, rule, max_iter):
    """The old ``fit_exact(objective="likelihood")``'s L-BFGS solve; returns the objective at its end."""
    grouped = reference_group(x, y)
    params = [q for q in model.parameters() if q.requires_grad]

    def closure():
        for q in params:
            q.grad = None
        loss = -reference_objective(model, x, y, rule, grouped)
        loss.backward()
        return loss

    torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                      history_size=50, line_search_fn="strong_wolfe").step(closure)
    with torch.no_grad():
        return float(reference_objective(model, x, y, rule, grouped))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as in the engine's replicates: the blocked objective runs many small operations,
    which a second thread on a busy machine only slows down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- cases ---------------------------------------------------------------------------------------------
def _student(dgm, seed, scale=0.6, **options):
    """A student with random weights of a stated size (A far from its small initialisation)."""
    student = dgm.make_student(seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return student


def _data(dgm, n, seed):
    return dgm.sample(n, np.random.default_rng(seed)).tensors()


def _value_and_grad(objective, model):
    params = [q for q in model.parameters() if q.requires_grad]
    value = objective()
    grads = torch.autograd.grad(value, params)
    return float(value.detach()), torch.cat([g.reshape(-1) for g in grads])


def _assert_equal(model, x, y, rule, tol=1e-10, **kwargs):
    ref_value, ref_grad = _value_and_grad(lambda: reference_objective(model, x, y, rule), model)
    value, grad = _value_and_grad(lambda: exact_objective(model, x, y, rule=rule, **kwargs), model)
    assert abs(value - ref_value) <= tol * max(1.0, abs(ref_value)), (value, ref_value)
    assert float((grad - ref_grad).abs().max()) <= tol * max(1.0, float(ref_grad.abs().max()))


RULE_Q1 = quadrature.trapezoid(41, 1)
RULE_Q2 = quadrature.pruned_trapezoid(15, 2)


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("q", [1, 2])
def test_blocked_objective_equals_the_reference_on_the_five_token_model(c, q):
    dgm = PerturbedNextToken.reference("five-token", seed=3, observations=c, latent_dim=q)
    x, y = _data(dgm, 400, seed=c + 10 * q)
    rule = RULE_Q1 if q == 1 else RULE_Q2
    _assert_equal(_student(dgm, seed=c + q), x, y, rule)


def test_autoregressive_continuation_equals_the_reference():
    dgm = PerturbedNextToken.reference("five-token", seed=4, observations=2, continuation="autoregressive")
    x, y = _data(dgm, 300, seed=5)
    _assert_equal(_student(dgm, seed=6), x, y, RULE_Q1)


@pytest.mark.parametrize("options", [dict(network="linear"), dict(network="transformer"),
                                     dict(perturbation="mlp"), dict(network="linear", perturbation="mlp")],
                         ids=["linear-network", "transformer", "mlp-perturbation", "linear-mlp-perturbation"])
def test_every_logit_source_equals_the_reference(options):
    dgm = PerturbedNextToken.reference("five-token", seed=5, observations=2)
    x, y = _data(dgm, 300, seed=7)
    _assert_equal(_student(dgm, seed=8, scale=0.4, **options), x, y, RULE_Q1)


@pytest.mark.parametrize("network", ["mlp", "linear"])
@pytest.mark.parametrize("logit_scale", [0.3, 300.0])
def test_logit_scales_and_extreme_logits_equal_the_reference(network, logit_scale):
    # logit scale 300 gives logits of order 1e3 to 1e4 (DESIGN §3 "Numerics": extremes stay finite)
    dgm = PerturbedNextToken.reference("five-token", seed=6, observations=2, latent_dim=2)
    x, y = _data(dgm, 300, seed=9)
    student = _student(dgm, seed=10, network=network)
    student.network.logit_scale.fill_(logit_scale)
    value = exact_objective(student, x, y, rule=RULE_Q2)
    assert torch.isfinite(value)
    _assert_equal(student, x, y, RULE_Q2)


def test_blocks_of_any_size_give_the_same_objective():
    dgm = PerturbedNextToken.reference("five-token", seed=7, observations=2, latent_dim=2)
    x, y = _data(dgm, 500, seed=11)
    student = _student(dgm, seed=12)
    grouped = group_data(x, y)
    plan = plan_prefixes(grouped.xu, grouped.yu, grouped.counts, student.dtype)
    per_prefix = RULE_Q2.size * dgm.vocab_size
    results = [_value_and_grad(lambda: blocked_log_likelihood(student, plan, RULE_Q2, block_elements=k * per_prefix),
                               student) for k in (1, 3, 1000)]  # one prefix, three (a short last block), all
    for value, grad in results[:-1]:
        assert value == pytest.approx(results[-1][0], abs=1e-12)
        assert torch.allclose(grad, results[-1][1], rtol=0, atol=1e-12)


def test_float32_precision_is_close_and_no_grad_evaluates_only_the_value():
    dgm = PerturbedNextToken.reference("five-token", seed=8, observations=2, latent_dim=2)
    x, y = _data(dgm, 400, seed=13)
    student = _student(dgm, seed=14)
    ref_value, ref_grad = _value_and_grad(lambda: reference_objective(student, x, y, RULE_Q2), student)
    value, grad = _value_and_grad(lambda: exact_objective(student, x, y, rule=RULE_Q2, precision="float32"), student)
    assert value == pytest.approx(ref_value, abs=1e-5)
    assert float((grad - ref_grad).abs().max()) <= 1e-4 * float(ref_grad.abs().max())
    assert next(student.parameters()).dtype == torch.float64  # the float32 copy never touches the model
    with torch.no_grad():
        plain = exact_objective(student, x, y, rule=RULE_Q2)
    assert not plain.requires_grad and float(plain) == pytest.approx(ref_value, abs=1e-12)


@pytest.mark.parametrize("options", [dict(network="linear"), dict(network="transformer"), dict(perturbation="mlp")],
                         ids=["linear-network", "transformer", "mlp-perturbation"])
def test_float32_is_close_for_every_logit_source_and_leaves_the_model_alone(options):
    dgm = PerturbedNextToken.reference("five-token", seed=5, observations=2)
    x, y = _data(dgm, 300, seed=7)
    student = _student(dgm, seed=8, scale=0.4, **options)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ref_value, ref_grad = _value_and_grad(lambda: reference_objective(student, x, y, RULE_Q1), student)
    value, grad = _value_and_grad(lambda: exact_objective(student, x, y, rule=RULE_Q1, precision="float32"), student)
    assert value == pytest.approx(ref_value, abs=1e-5)
    assert float((grad - ref_grad).abs().max()) <= 1e-4 * float(ref_grad.abs().max())
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in student.state_dict().items())


def test_a_plan_builds_its_blocks_once():
    dgm = PerturbedNextToken.reference("five-token", seed=7, observations=2, latent_dim=2)
    x, y = _data(dgm, 500, seed=11)
    student = _student(dgm, seed=12)
    grouped = group_data(x, y)
    with torch.no_grad():
        first = exact_objective(student, x, y, rule=RULE_Q2, grouped=grouped)
        blocks = grouped.plan.blocks
        second = exact_objective(student, x, y, rule=RULE_Q2, grouped=grouped)
    assert grouped.plan.blocks is blocks and float(first) == float(second)
    assert len(grouped.plan.block_list(3)) == -(-grouped.plan.prefixes.shape[0] // 3)
    assert sum(len(b.local) for b in grouped.plan.block_list(3)) == grouped.xu.shape[0]


def test_the_node_doubling_check_prunes_like_its_rule():
    pruned = quadrature.pruned_trapezoid(15, 2)
    fine = refined_rule(pruned)
    assert fine.size == quadrature.pruned_trapezoid(29, 2).size < 29 ** 2
    assert refined_rule(quadrature.trapezoid(15, 2)).size == 29 ** 2  # a full rule refines to the full rule
    assert refined_rule(RULE_Q1).size == 81
    dgm = PerturbedNextToken.reference("five-token", seed=7, observations=2, latent_dim=2)
    x, y = _data(dgm, 300, seed=11)
    student = _student(dgm, seed=12)
    with torch.no_grad():  # the pruned nodes weigh below 1e-11 in all: the check's estimate is unchanged
        values = [float(exact_objective(student, x, y, rule=r)) for r in (fine, quadrature.refined(pruned))]
    assert values[0] == pytest.approx(values[1], abs=1e-10)


def test_a_bad_precision_gives_one_line():
    dgm = PerturbedNextToken.reference("five-token", seed=3)
    x, y = _data(dgm, 20, seed=0)
    with pytest.raises(ValueError, match=r"^precision='float16' is unknown; allowed: float64, float32$"):
        exact_objective(dgm.make_student(), x, y, precision="float16")


# designs where L-BFGS converges within max_iter (a capped, unconverged solve depends on its path: a
# difference of 1e-14 in the gradient can move its end by more than 1e-8)
ROOT_CASES = {"linear-q1": (dict(latent_dim=1), dict(network="linear"), RULE_Q1),
              "mlp-q2": (dict(latent_dim=2), dict(network="mlp", hidden=2), RULE_Q2)}


@pytest.fixture(scope="module", params=sorted(ROOT_CASES))
def root_case(request):
    design, student_options, rule = ROOT_CASES[request.param]
    dgm = PerturbedNextToken.reference("five-token", seed=3, observations=2, **design)
    x, y = _data(dgm, 1000, seed=21)
    student = dgm.make_student(seed=2, **student_options)
    return student, x, y, rule, reference_fit(copy.deepcopy(student), x, y, rule, max_iter=300)


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_fit_exact_reaches_the_reference_root(root_case, precision):
    student, x, y, rule, ref_objective = root_case
    student = copy.deepcopy(student)
    fit = fit_exact(student, x, y, rule=rule, max_iter=300, max_refinements=0, precision=precision)
    assert fit.stats["objective"] == pytest.approx(ref_objective, abs=1e-8)
    assert fit.stats["grad_norm"] < 1e-6
    if precision == "mixed":  # float32 iterations first, float64 once they stop
        assert 0 < fit.stats["float32_iterations"] < fit.stats["iterations"] <= 300
        assert set(fit.history["precision"]) == {"float32", "float64"}
    with torch.no_grad():  # the reported objective is the float64 one at the returned parameters
        assert fit.stats["objective"] == pytest.approx(float(reference_objective(student, x, y, rule)), abs=1e-12)
