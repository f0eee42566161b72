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
for c = 1 or iid continuations each distinct prefix is evaluated once.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from .. import quadrature
from .results import FitDiverged, FitResult

OBJECTIVES = ("likelihood", "brier", "mle")


def default_solver_rule(latent_dim: int) -> quadrature.Rule:
    """Trapezoid rule of the exact solver: 81 nodes (q = 1), 31^2 (q = 2)."""
    if latent_dim == 1:
        return quadrature.trapezoid(81, 1)
    if latent_dim == 2:
        return quadrature.trapezoid(31, 2)
    raise ValueError(f"latent_dim={latent_dim} is too large for the exact solver; allowed: 1 or 2")


def _group(x: torch.Tensor, y: torch.Tensor):
    rows = torch.cat([x, y], dim=1)
    unique, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    L = x.shape[1]
    return unique[:, :L], unique[:, L:], counts


def _token_log_lik_on_nodes(model, xu: torch.Tensor, yu: torch.Tensor, rule: quadrature.Rule) -> torch.Tensor:
    """log p(y_j | x, y_<j, z_m) on the nodes for the distinct data: (D, M, c)."""
    nodes = torch.as_tensor(rule.nodes, dtype=model.dtype, device=xu.device)  # (M, q)
    if model.continuation == "iid" or yu.shape[1] == 1:
        prefixes, inv = torch.unique(xu, dim=0, return_inverse=True)
        logp = model.log_probs(prefixes, None, nodes[None].expand(prefixes.shape[0], -1, -1))[:, :, 0]  # (U, M, V)
        # gather (prefix, token) pairs without a (D, M, V) copy
        return logp.permute(0, 2, 1)[inv[:, None], yu].permute(0, 2, 1)  # (D, M, c)
    return model.token_log_lik(xu, yu, nodes[None].expand(xu.shape[0], -1, -1))  # (D, M, c)


def exact_objective(model, x: torch.Tensor, y: torch.Tensor, *, objective: str = "likelihood",
                    rule: quadrature.Rule | None = None, grouped=None) -> torch.Tensor:
    """The empirical objective (to maximise) with expectations over z by quadrature."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
    xu, yu, counts = grouped if grouped is not None else _group(x, y)
    weights = counts.to(model.dtype) / counts.sum()
    if objective == "mle":
        return (model.log_lik(xu, yu, None)[:, 0] * weights).sum()
    rule = rule or default_solver_rule(model.perturbation.latent_dim)
    log_w = torch.as_tensor(rule.log_weights, dtype=model.dtype, device=x.device)  # (M,)
    if objective == "likelihood":
        token = _token_log_lik_on_nodes(model, xu, yu, rule)  # (D, M, c)
        log_m = torch.logsumexp(token.sum(-1) + log_w, dim=1)  # (D,)
        return (log_m * weights).sum()
    marg = model.quadrature_token_log_marginals(xu, yu, rule).exp()  # (D, c, V)
    observed = marg.gather(-1, yu[..., None]).squeeze(-1)  # (D, c)
    brier = (marg ** 2).sum(-1) - 2 * observed  # (D, c)
    return -(brier.sum(-1) * weights).sum()


def fit_exact(model, x: torch.Tensor, y: torch.Tensor, *, objective: str = "likelihood",
              rule: quadrature.Rule | None = None, max_iter: int = 2000, tolerance_grad: float = 1e-10,
              history_size: int = 50, quadrature_tolerance: float = 1e-7,
              max_refinements: int = 2) -> FitResult:
    """Solve the empirical equations by L-BFGS with quadrature over z (q <= 2).

    Returns a :class:`FitResult` whose ``stats`` hold the final objective, gradient
    norm, iterations and the quadrature error of the objective at the root
    (the change when the nodes are doubled). When that error exceeds
    ``quadrature_tolerance`` the rule is refined (nodes doubled) and the solve
    continues from the current root, at most ``max_refinements`` times.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
    p = model.perturbation
    if objective != "mle" and not (p.gaussian_latent and 1 <= p.latent_dim <= 2):
        raise ValueError("the exact solver needs a Gaussian latent of dimension 1 or 2 "
                         f"(got {type(p).__name__} with latent_dim={p.latent_dim})")
    if objective != "mle":
        rule = rule or default_solver_rule(p.latent_dim)
    grouped = _group(x, y)
    params = [q for q in model.parameters() if q.requires_grad]
    evaluations = []

    def closure():
        for q in params:
            q.grad = None
        loss = -exact_objective(model, x, y, objective=objective, rule=rule, grouped=grouped)
        if not torch.isfinite(loss):
            raise FitDiverged(f"non-finite exact objective after {len(evaluations)} evaluations")
        loss.backward()
        evaluations.append(float(loss.detach()))
        return loss

    started = time.perf_counter()
    refinements = 0
    while True:
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                      tolerance_change=1e-14, history_size=history_size,
                                      line_search_fn="strong_wolfe")  # fresh curvature history per rule
        optimizer.step(closure)
        if objective == "mle":
            break
        with torch.no_grad():
            coarse = exact_objective(model, x, y, objective=objective, rule=rule, grouped=grouped)
            fine_rule = quadrature.refined(rule)
            fine = exact_objective(model, x, y, objective=objective, rule=fine_rule, grouped=grouped)
        quadrature_error = abs(float(fine - coarse))
        if quadrature_error <= quadrature_tolerance or refinements >= max_refinements:
            break
        rule, refinements = fine_rule, refinements + 1  # the root moved where the rule is too coarse: refine
    value = -exact_objective(model, x, y, objective=objective, rule=rule, grouped=grouped)
    grad = torch.autograd.grad(value, params, allow_unused=True)
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grad if g is not None)))
    stats = {"objective": -float(value.detach()), "grad_norm": grad_norm, "evaluations": len(evaluations),
             "distinct_data": int(grouped[0].shape[0]), "seconds": time.perf_counter() - started}
    if objective != "mle":
        stats.update(quadrature_error=quadrature_error, rule=f"{rule.name} ({rule.size} nodes)",
                     refinements=refinements)
    history = pd.DataFrame({"evaluation": np.arange(1, len(evaluations) + 1), "loss": evaluations})
    return FitResult(model=model, solver="exact", objective=objective, history=history, stats=stats)
