"""Integration rules over the standard Gaussian latent z ~ N(0, I_q) (DESIGN §4, §5).

Every rule returns a :class:`Rule`: nodes ``(M, q)`` and log-weights ``(M,)`` that
already include the N(0, I_q) density, normalised to sum to one, so that

    E_z[f(z)]  ~=  sum_j exp(log_weights[j]) * f(nodes[j]).

* ``trapezoid``: tensor trapezoid rule on [-9, 9]^q, the default. With the steep
  tanh features of the reference teachers it beats Gauss-Hermite by orders of
  magnitude (DESIGN §4: 201 nodes gave 7e-13 where 160 Gauss-Hermite nodes gave
  1.2e-5).
* ``pruned_trapezoid``: the trapezoid rule without its nodes of negligible weight.
* ``gauss-hermite``: tensor product of probabilists' Gauss-Hermite rules.
* ``rqmc``: randomised (scrambled Sobol) quasi-Monte Carlo, the rule above q = 3;
  independent randomisations give a standard error.

``refined`` returns the rule with the nodes doubled (trapezoid: the step halved),
the basis of the error estimate reported with every exact marginal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from .validation import check_int

RULES = ("trapezoid", "gauss-hermite", "rqmc")
TRAPEZOID_HALF_WIDTH = 9.0  # default interval [-9, 9]^q of the trapezoid rule


@dataclass(frozen=True)
class Rule:
    """A quadrature rule for E over N(0, I_q)."""

    name: str
    nodes: np.ndarray  # (M, q)
    log_weights: np.ndarray  # (M,), sums (in exp) to one
    num_nodes_per_dim: int
    half_width: float | None = None  # trapezoid: the rule covers [-half_width, half_width]^q

    @property
    def size(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.nodes.shape[1])


def _tensor(nodes_1d: np.ndarray, log_w_1d: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    grids = np.meshgrid(*([nodes_1d] * dim), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], axis=1)  # (M^q, q)
    lw_grids = np.meshgrid(*([log_w_1d] * dim), indexing="ij")
    log_w = np.sum([g.ravel() for g in lw_grids], axis=0)  # (M^q,)
    return nodes, log_w - logsumexp(log_w)


def trapezoid(num_nodes: int, dim: int, *, half_width: float = TRAPEZOID_HALF_WIDTH) -> Rule:
    """Tensor trapezoid rule with ``num_nodes`` per dimension on [-half_width, half_width]."""
    _check(num_nodes, dim, minimum=3)
    z = np.linspace(-half_width, half_width, num_nodes)
    h = z[1] - z[0]
    trap = np.full(num_nodes, h)
    trap[[0, -1]] = h / 2
    log_w = np.log(trap) + stats.norm.logpdf(z)
    nodes, log_w = _tensor(z, log_w, dim)
    return Rule("trapezoid", nodes, log_w, num_nodes, half_width=float(half_width))


def pruned_trapezoid(num_nodes: int, dim: int, *, floor: float = 1e-14) -> Rule:
    """The tensor trapezoid rule on [-9, 9]^dim without the nodes of weight below ``floor``
    (their total weight is below 1e-11): the same integral with about half the nodes for q = 2,
    the exact solver's rule in the extrapolation check (DESIGN §3 "Solving the equations")."""
    rule = trapezoid(num_nodes, dim)
    keep = np.exp(rule.log_weights) > floor
    log_w = rule.log_weights[keep] - np.logaddexp.reduce(rule.log_weights[keep])
    return Rule(rule.name, rule.nodes[keep], log_w, rule.num_nodes_per_dim, half_width=rule.half_width)


def gauss_hermite(num_nodes: int, dim: int) -> Rule:
    """Tensor product of probabilists' Gauss-Hermite rules (exact for polynomials)."""
    _check(num_nodes, dim, minimum=1)
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    nodes, log_w = _tensor(z, np.log(w), dim)
    return Rule("gauss-hermite", nodes, log_w, num_nodes)


def rqmc(num_points: int, dim: int, *, seed: int | np.random.SeedSequence = 0) -> Rule:
    """One randomisation of a scrambled Sobol rule mapped through the normal quantile."""
    _check(num_points, dim, minimum=2)
    m = int(np.ceil(np.log2(num_points)))
    u = stats.qmc.Sobol(d=dim, scramble=True, seed=np.random.default_rng(seed)).random_base2(m)
    u = np.clip(u, 1e-16, 1 - 1e-16)
    nodes = stats.norm.ppf(u)
    log_w = np.full(nodes.shape[0], -np.log(nodes.shape[0]))
    return Rule("rqmc", nodes, log_w, nodes.shape[0])


def make_rule(name: str, num_nodes: int, dim: int, *, seed: int = 0) -> Rule:
    """Build a rule by name; ``num_nodes`` is per dimension (total points for rqmc)."""
    if name == "trapezoid":
        return trapezoid(num_nodes, dim)
    if name == "gauss-hermite":
        return gauss_hermite(num_nodes, dim)
    if name == "rqmc":
        return rqmc(num_nodes, dim, seed=seed)
    raise ValueError(f"rule={name!r} is not a quadrature rule; allowed: {', '.join(RULES)}")


def refined(rule: Rule, *, seed: int = 1) -> Rule:
    """The same rule with the nodes doubled (trapezoid: step halved, 2M - 1 nodes, same interval)."""
    if rule.name == "trapezoid":
        return trapezoid(2 * rule.num_nodes_per_dim - 1, rule.dim,
                         half_width=TRAPEZOID_HALF_WIDTH if rule.half_width is None else rule.half_width)
    if rule.name == "gauss-hermite":
        return gauss_hermite(2 * rule.num_nodes_per_dim, rule.dim)
    return rqmc(rule.size, rule.dim, seed=seed)


def shared_nodes(rules: list[Rule], *, dropped_mass: float = 1e-17) -> tuple[np.ndarray, np.ndarray]:
    """Union of the rules' nodes ``(U, q)`` with one weight column per rule ``(U, R)``.

    A rule and its refinement share most nodes (the trapezoid's coarse grid is
    every other node of the fine one), so one forward pass over the union serves
    both. Nodes whose total weight stays below ``dropped_mass`` in every rule are
    pruned; columns are renormalised to one.
    """
    nodes = np.concatenate([r.nodes for r in rules])
    keys, inverse = np.unique(np.round(nodes, 12), axis=0, return_inverse=True)
    W = np.zeros((len(keys), len(rules)))
    start = 0
    for r, rule in enumerate(rules):
        np.add.at(W[:, r], inverse.ravel()[start:start + rule.size], np.exp(rule.log_weights))
        start += rule.size
    order = np.argsort(W.max(1))
    dropped = np.all(np.cumsum(W[order], axis=0) < dropped_mass, axis=1)
    keep = np.sort(order[~dropped])
    W = W[keep]
    return keys[keep], W / W.sum(0)


def default_rule(dim: int) -> Rule:
    """The rule used for the exact truth: trapezoid for q <= 3, else RQMC (DESIGN §4)."""
    check_int("latent_dim", dim, 1)
    per_dim = {1: 201, 2: 61, 3: 31}.get(dim)
    if per_dim is None:
        return rqmc(2**14, dim)
    return trapezoid(per_dim, dim)


def _check(num_nodes: int, dim: int, *, minimum: int) -> None:
    check_int("num_nodes", num_nodes, minimum)
    check_int("latent_dim", dim, 1)
