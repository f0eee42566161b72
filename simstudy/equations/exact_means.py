"""Exact (quadrature) population means of the estimating equations, and the power of an audit (DESIGN §3, §6.1).

The Monte Carlo mean of g is audited against the gradient of the equation's own
population objective (:func:`~simstudy.equations.gradient_audit`); to judge an audit's
power one needs the bias it should find, i.e. the exact mean of g. For a latent of
dimension q <= 2 the quadrature rule gives it:

* :func:`likelihood_gradient` -- grad of the population mean log m, the mean of the
  likelihood equations (ps-exact, and ps-mh once mixed);
* :func:`aug_mean` -- aug (= is-1): grad [log m - KL(prior, posterior)];
* :func:`chi2_direction` -- u = -grad chi2(posterior, prior) / 2, the leading term of
  is-K's bias times K (is-K's mean is grad log m + u / K + O(K^-2));
* :func:`mh_chain_mean` -- ps-mh with fresh independence chains of B steps, the chain
  run exactly on the quadrature nodes (states: the nodes; proposal: node j with the
  rule's weight w_j, i.e. the prior; acceptance min(1, p_j / p_i); start: the prior;
  pi_B = pi_0 T^B per datum). Accurate to about 1e-6 relative when the nodes are
  doubled in the five-token model;
* :func:`hotelling_power` -- the power of an audit's F test against a given bias
  (noncentral F with noncentrality R b' S^+ b on the kept subspace).

Every mean is population weighted: ``x (N, L)``, ``y (N, c)`` long and weights
``w (N,)``; it returns ``(P,)`` over the model's trainable entries in parameter order.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps

from .. import quadrature
from .audit import AuditResult, flat_grad
from .base import quadrature_divergences, quadrature_log_marginal, quadrature_token_log_lik

__all__ = ["MAX_CHAIN_NODES", "aug_mean", "chi2_direction", "hotelling_power", "likelihood_gradient",
           "mh_chain_mean"]

#: The exact ps-mh chain needs ``(rows, M, M)`` transition matrices: at most this many nodes M.
MAX_CHAIN_NODES = 1024


def _grad(value: torch.Tensor, model) -> np.ndarray:
    """grad of the scalar ``value`` over the trainable entries of ``model``, flat ``(P,)`` float64."""
    return flat_grad(value, [p for p in model.parameters() if p.requires_grad])


def chi2_direction(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """u = -grad chi2(posterior, prior) / 2, population-weighted: K b_K -> u (DESIGN §3). ``(P,)``."""
    div = quadrature_divergences(model, x, y, rule=rule)
    return -_grad((w * div["chi2"]).sum() / w.sum(), model) / 2


def aug_mean(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """The exact mean of aug (= is-1): grad [log m - KL(prior, posterior)] (DESIGN §3). ``(P,)``."""
    div = quadrature_divergences(model, x, y, rule=rule)
    return _grad((w * (div["log_m"] - div["kl"])).sum() / w.sum(), model)


def likelihood_gradient(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """grad of the population mean log m (the reference of the likelihood equations). ``(P,)``."""
    return _grad((w * quadrature_log_marginal(model, x, y, rule=rule)).sum() / w.sum(), model)


def mh_chain_mean(model, x, y, w, steps: int, rule: quadrature.Rule | None = None,
                  max_elements: int = 20_000_000) -> np.ndarray:
    """Exact mean of ps-mh with fresh independence chains of ``steps`` steps, on the grid.

    The chain of each datum lives on the rule's nodes: the proposal picks node j with
    the rule's weight w_j (the prior), acceptance min(1, p_j / p_i) with
    p = p(y | x, z), start = the prior. pi_B = pi_0 T^B, and the mean of g is
    sum_data w_d sum_i pi_B,d(i) grad log p(y_d | x_d, z_i) / sum w (module docstring).

    Parameters
    ----------
    model : PerturbedLM with a Gaussian latent; x ``(N, L)``, y ``(N, c)``, w ``(N,)``.
    steps : int >= 0, B (0 gives aug's mean).
    rule : quadrature rule (default: the latent's default rule); at most :data:`MAX_CHAIN_NODES` nodes.
    max_elements : size of the largest ``(rows, M, M)`` block of transition matrices held at once.

    Returns
    -------
    ``(P,)`` the mean estimating function.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is invalid; allowed: an integer >= 0")
    rule = quadrature.default_rule(model.perturbation.latent_dim) if rule is None else rule
    if rule.size > MAX_CHAIN_NODES:
        raise ValueError(f"rule with {rule.size} nodes is too large for the exact chain; allowed: at most "
                         f"{MAX_CHAIN_NODES} nodes (latent_dim = 1)")
    ll, log_w = quadrature_token_log_lik(model, x, y, rule)  # (N, M, c), (M,)
    ll = ll.sum(-1)  # (N, M) per-datum log p(y | x, z_i)
    M = ll.shape[1]
    with torch.no_grad():
        prior = log_w.exp()  # (M,)
        pis = []
        chunk = max(1, max_elements // (M * M))
        off = 1.0 - torch.eye(M, dtype=ll.dtype)  # (M, M)
        for s in range(0, ll.shape[0], chunk):
            l = ll[s:s + chunk].detach()  # (b, M)
            T = (l[:, None, :] - l[:, :, None]).clamp(max=0.0).exp() * prior[None, None, :] * off  # (b, M, M)
            T = T + torch.diag_embed(1.0 - T.sum(-1))  # rejections stay
            pi = prior[None].expand(l.shape[0], M).clone()  # (b, M)
            for _ in range(steps):
                pi = torch.einsum("bi,bij->bj", pi, T)
            pis.append(pi)
        pi = torch.cat(pis)  # (N, M)
    value = (w * (pi * ll).sum(1)).sum() / w.sum()
    return _grad(value, model)


def hotelling_power(audit: AuditResult, bias: np.ndarray, alpha: float) -> float:
    """Power of the audit's F test against a true bias ``bias`` ``(P,)``.

    Noncentral F(df, R - df) with noncentrality R b' Sigma^-1 b on the kept subspace.
    Sigma^-1 is estimated by (R - df - 2) / (R - 1) S_k^+ (S the audit's sample covariance:
    E[S^-1] = (R - 1) / (R - df - 2) Sigma^-1 for Gaussian g, so the plain plug-in would
    overstate the power at small R / df). NaN when R <= df + 2.
    """
    lam, U, _ = audit.eigen
    R, k = audit.num_replicates, audit.df
    if not k or R <= k + 2:
        return float("nan")
    nc = float(R * np.sum((U.T @ bias) ** 2 / lam)) * (R - k - 2) / (R - 1)
    crit = sps.f.isf(alpha, k, R - k)
    return float(sps.ncf.sf(crit, k, R - k, nc)) if nc > 0 else float(alpha)
