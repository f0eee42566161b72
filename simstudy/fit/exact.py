"""Deterministic reference solver (DESIGN §3 "Solving the equations").

For a Gaussian latent with q <= 2 the expectations over z in the population
equations are replaced by quadrature, and the *empirical* equations are solved
deterministically with L-BFGS. The root separates statistical error from the
optimisation error of the stochastic solver: report KL(root, sgd fit) beside
KL(truth, fit).

Objectives (maximised):
* ``likelihood``: (1/n) sum_i log m(y_i | x_i)          (the root of ps-exact, ps-mh, sumo)
* ``brier``: -(1/n) sum_i sum_j [||m_j||^2 - 2 m_j(y_ij)] (the root of q2, per-token scope;
  m_j the per-token marginal, DESIGN §2)
* ``mle``: (1/n) sum_i log p(y_i | x_i) of the unperturbed model.

Identical data are grouped (sufficient statistics: counts of distinct rows), and
for c = 1 or iid continuations each distinct prefix is evaluated once. There the
likelihood objective and its gradient are computed blockwise by hand
(:mod:`simstudy.fit.blocked_likelihood`: the analytic gradient of log-softmax-then-gather,
no (prefixes, nodes, V) tensor); autoregressive continuations keep autograd, as do the
brier and mle objectives.

Precision. :func:`exact_objective` computes in the model's dtype unless asked for
``precision="float32"`` (the network on the nodes in float32, reductions in the model's
dtype). :func:`fit_exact` iterates in the model's dtype unless asked for "mixed" (float32
iterations, then float64 once they stop short of ``max_iter``); its reported objective,
gradient norm and quadrature error are always in the model's dtype. An L-BFGS solve
capped before convergence depends on its path: in the identified design (300
iterations) a relative change of 1e-12 in the initialisation moved the final objective
by 6e-5 to 5e-4 and the fitted marginals by up to 8e-3 to 3e-2 (two runs), about as much
as float32 iterations did (3e-4 and 2e-2); the 31-node rule's quadrature error there is 1e-4.
On one thread there, one evaluation takes 0.15 s in float64 and 0.08 s in float32 (the autograd
version: 1.3 s), and a 300-iteration "mixed" solve about 28 s on a shared machine
(experiments/benchmarks/bench_exact_solver.py). The node-doubling check of the quadrature error
(:func:`refined_rule`) reuses the final evaluation and prunes the doubled rule like the solver's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import quadrature
from ..validation import check_choice
from .blocked_likelihood import PRECISIONS, PrefixPlan, blocked_log_likelihood, plan_prefixes
from .results import FitDiverged, FitResult

OBJECTIVES = ("likelihood", "brier", "mle")
SOLVER_PRECISIONS = ("mixed", "float64", "float32")  # fit_exact's precision (exact_objective: PRECISIONS)


def default_solver_rule(latent_dim: int) -> quadrature.Rule:
    """Trapezoid rule of the exact solver: 81 nodes (q = 1), 31^2 (q = 2)."""
    if latent_dim == 1:
        return quadrature.trapezoid(81, 1)
    if latent_dim == 2:
        return quadrature.trapezoid(31, 2)
    raise ValueError(f"latent_dim={latent_dim} is too large for the exact solver; allowed: 1 or 2")


def refined_rule(rule: quadrature.Rule) -> quadrature.Rule:
    """The rule with the nodes doubled (:func:`simstudy.quadrature.refined`), pruned like ``rule`` when it is a
    pruned trapezoid rule on the default interval: the node-doubling check of the solver's quadrature error
    (DESIGN §4) then costs about half as much, and the nodes it drops weigh less than 1e-11 in all."""
    full = rule.num_nodes_per_dim ** rule.dim
    if rule.name == "trapezoid" and rule.size < full and rule.half_width == quadrature.TRAPEZOID_HALF_WIDTH:
        return quadrature.pruned_trapezoid(2 * rule.num_nodes_per_dim - 1, rule.dim)
    return quadrature.refined(rule)


@dataclass
class GroupedData:
    """Distinct data rows ``xu`` (D, L), ``yu`` (D, c) with their ``counts`` (D,), and (for shared
    prefixes) the same data grouped by distinct prefix (:class:`~simstudy.fit.blocked_likelihood.PrefixPlan`)."""

    xu: torch.Tensor
    yu: torch.Tensor
    counts: torch.Tensor
    plan: PrefixPlan | None = None


def group_data(x: torch.Tensor, y: torch.Tensor) -> GroupedData:
    """Distinct (x, y) rows of ``x`` (n, L), ``y`` (n, c) and their counts."""
    rows = torch.cat([x, y], dim=1)
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    L = x.shape[1]
    return GroupedData(unique[:, :L], unique[:, L:], counts)


def _shares_prefixes(model, y: torch.Tensor) -> bool:
    """Whether every observation is predicted from the prefix alone (iid continuation or c = 1)."""
    return model.continuation == "iid" or y.shape[1] == 1


def exact_objective(model, x: torch.Tensor, y: torch.Tensor, *, objective: str = "likelihood",
                    rule: quadrature.Rule | None = None, grouped: GroupedData | None = None,
                    precision: str = "float64") -> torch.Tensor:
    """The empirical objective (to maximise) with expectations over z by quadrature: a scalar.

    ``grouped`` (from :func:`group_data`) saves regrouping ``x`` (n, L), ``y`` (n, c) at every call.
    ``precision`` ("float64" or "float32") is that of the network on the nodes for the likelihood
    objective with shared prefixes (DESIGN §3 "Solving the equations"); elsewhere the model's dtype.
    """
    check_choice("objective", objective, OBJECTIVES, word="unknown")
    check_choice("precision", precision, PRECISIONS, word="unknown")
    grouped = grouped if grouped is not None else group_data(x, y)
    xu, yu, counts = grouped.xu, grouped.yu, grouped.counts
    weights = counts.to(model.dtype) / counts.sum()
    if objective == "mle":
        return (model.log_lik(xu, yu, None)[:, 0] * weights).sum()
    rule = rule or default_solver_rule(model.perturbation.latent_dim)
    log_w = torch.as_tensor(rule.log_weights, dtype=model.dtype, device=x.device)  # (M,)
    if objective == "likelihood":
        if _shares_prefixes(model, yu):
            if grouped.plan is None:
                grouped.plan = plan_prefixes(xu, yu, counts, model.dtype)
            return blocked_log_likelihood(model, grouped.plan, rule, precision=precision)
        nodes = torch.as_tensor(rule.nodes, dtype=model.dtype, device=x.device)  # (M, q)
        token = model.token_log_lik(xu, yu, nodes[None].expand(xu.shape[0], -1, -1))  # (D, M, c)
        log_m = torch.logsumexp(token.sum(-1) + log_w, dim=1)  # (D,)
        return (log_m * weights).sum()
    marg = model.quadrature_token_log_marginals(xu, yu, rule).exp()  # (D, c, V)
    observed = marg.gather(-1, yu[..., None]).squeeze(-1)  # (D, c)
    brier = (marg ** 2).sum(-1) - 2 * observed  # (D, c)
    return -(brier.sum(-1) * weights).sum()


def _phases(precision: str, blocked: bool) -> tuple:
    """The precisions L-BFGS runs in, in turn (DESIGN §3 "Solving the equations"); float64 unless the
    objective is the blocked likelihood."""
    if not blocked or precision == "float64":
        return ("float64",)
    return ("float32", "float64") if precision == "mixed" else ("float32",)


def fit_exact(model, x: torch.Tensor, y: torch.Tensor, *, objective: str = "likelihood",
              rule: quadrature.Rule | None = None, max_iter: int = 2000, tolerance_grad: float = 1e-10,
              history_size: int = 50, quadrature_tolerance: float = 1e-7,
              max_refinements: int = 2, precision: str = "float64") -> FitResult:
    """Solve the empirical equations by L-BFGS with quadrature over z (q <= 2).

    Returns a :class:`FitResult` whose ``stats`` hold the final objective, gradient
    norm, iterations and the quadrature error of the objective at the root
    (the change when the nodes are doubled). When that error exceeds
    ``quadrature_tolerance`` the rule is refined (nodes doubled) and the solve
    continues from the current root, at most ``max_refinements`` times.

    ``precision`` (the likelihood objective with shared prefixes only; see
    :func:`exact_objective`): "float64" (default) iterates in the model's dtype;
    "mixed" iterates with the network in float32 (about twice as fast on one CPU
    thread) and, once those iterations stop short of ``max_iter`` (converged, or
    stalled on float32 rounding near the root), continues in float64 for the
    iterations left; "float32" iterates in float32 only. The reported objective,
    gradient norm and quadrature error are always computed in the model's dtype;
    ``stats`` records the iterations made in float32.
    """
    check_choice("objective", objective, OBJECTIVES, word="unknown")
    check_choice("precision", precision, SOLVER_PRECISIONS, word="unknown")
    p = model.perturbation
    if objective != "mle" and not (p.gaussian_latent and 1 <= p.latent_dim <= 2):
        raise ValueError("the exact solver needs a Gaussian latent of dimension 1 or 2 "
                         f"(got {type(p).__name__} with latent_dim={p.latent_dim})")
    if objective != "mle":
        rule = rule or default_solver_rule(p.latent_dim)
    grouped = group_data(x, y)
    params = [q for q in model.parameters() if q.requires_grad]
    evaluations, phases = [], []

    def closure_in(phase: str):
        def closure():
            for q in params:
                q.grad = None
            loss = -exact_objective(model, x, y, objective=objective, rule=rule, grouped=grouped, precision=phase)
            if not torch.isfinite(loss):
                raise FitDiverged(f"non-finite exact objective after {len(evaluations)} evaluations")
            loss.backward()
            evaluations.append(float(loss.detach()))
            phases.append(phase)
            return loss
        return closure

    started = time.perf_counter()
    refinements, iterations, float32_iterations = 0, 0, 0
    max_eval = max_iter * 5 // 4  # L-BFGS's own default, shared by the phases
    while True:
        done, spent = 0, 0  # iterations and evaluations of this rule
        for phase in _phases(precision, objective == "likelihood" and _shares_prefixes(model, y)):
            if done >= max_iter or spent >= max_eval:
                break
            optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter - done, max_eval=max_eval - spent,
                                          tolerance_grad=tolerance_grad, tolerance_change=1e-14,
                                          history_size=history_size, line_search_fn="strong_wolfe")  # fresh history
            optimizer.step(closure_in(phase))
            state = optimizer.state[params[0]] if params else {}
            made = int(state.get("n_iter", 0))
            done, spent = done + made, spent + int(state.get("func_evals", 0))
            float32_iterations += made if phase == "float32" else 0
        iterations += done
        value = -exact_objective(model, x, y, objective=objective, rule=rule, grouped=grouped)  # model's dtype
        if objective == "mle":
            break
        fine_rule = refined_rule(rule)
        with torch.no_grad():
            fine = exact_objective(model, x, y, objective=objective, rule=fine_rule, grouped=grouped)
        quadrature_error = abs(float(fine) + float(value.detach()))
        if quadrature_error <= quadrature_tolerance or refinements >= max_refinements:
            break
        value = None  # free its graph before the next solve
        rule, refinements = fine_rule, refinements + 1  # the root moved where the rule is too coarse: refine
    grad = torch.autograd.grad(value, params, allow_unused=True)
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grad if g is not None)))
    stats = {"objective": -float(value.detach()), "grad_norm": grad_norm, "evaluations": len(evaluations),
             "iterations": iterations, "float32_iterations": float32_iterations,
             "distinct_data": int(grouped.xu.shape[0]), "seconds": time.perf_counter() - started}
    if objective != "mle":
        stats.update(quadrature_error=quadrature_error, rule=f"{rule.name} ({rule.size} nodes)",
                     refinements=refinements)
    history = pd.DataFrame({"evaluation": np.arange(1, len(evaluations) + 1), "loss": evaluations,
                            "precision": phases})
    return FitResult(model=model, solver="exact", objective=objective, history=history, stats=stats)
