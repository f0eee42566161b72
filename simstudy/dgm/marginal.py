"""The truth's exact marginal by integration over the latent (DESIGN §4).

m*(y | x) = E_z p*(y | x, z), z ~ N(0, I_q), by a tensor trapezoid rule on [-9, 9]^q
(q <= 3; with steep tanh features it beats Gauss-Hermite by orders of magnitude),
Gauss-Hermite, or randomised quasi-Monte Carlo (any q) with a standard error over
independent scrambles. A quadrature value is the refined rule's (nodes doubled)
and its error the change from the coarse rule.

:class:`ExactMarginal` is a mixin for a DGM whose truth is a frozen
:class:`~simstudy.models.PerturbedLM` ``teacher`` with a Gaussian latent. Its host
sets ``vocab_size``, ``prefix_len``, ``latent_dim``, ``teacher``, ``_rqmc_seed`` (a
SeedSequence), ``_cache = {}`` and offers ``_check_prefixes``, ``prefix_index``,
``_enumerated`` and ``_prefix_sets["all"]`` (:class:`~simstudy.dgm.support.SemanticSupport`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import quadrature
from ..validation import check_choice, check_int

__all__ = ["MARGINAL_RULES", "ExactMarginal"]

MARGINAL_RULES = ("auto", "trapezoid", "gauss-hermite", "rqmc")

_ERROR_FLOOR = 1e-14  # round-off floor added to every quadrature error estimate
_DROPPED_MASS = 1e-17  # quadrature nodes are pruned while their total weight stays below this
_DEFAULT_NODES = {"trapezoid": {1: 201, 2: 61, 3: 31}, "gauss-hermite": {1: 80, 2: 40, 3: 20}}
_DEFAULT_RQMC_POINTS = 2**12
ELEMENT_BUDGET = 4_000_000  # (rows x V) elements per forward chunk
_MAX_CACHE = 20_000_000  # cache the marginal of all prefixes when V^L * V is below this


class ExactMarginal:
    """m*(. | x), log m*(y | x) and the deterministic teacher's distribution, from ``teacher``."""

    def _resolve_rule(self, rule: str, num_nodes: int | None) -> tuple[str, int]:
        """``(rule, num_nodes)`` with "auto" and the default node counts resolved; ValueError if unusable."""
        check_choice("rule", rule, MARGINAL_RULES, word="unknown")
        q = self.latent_dim
        if rule == "auto":
            rule = "trapezoid" if q <= 3 else "rqmc"
        if rule != "rqmc" and q > 3:
            raise ValueError(f"rule={rule!r} needs latent_dim <= 3 (latent_dim={q}); allowed: 'rqmc' or 'auto'")
        if num_nodes is None:
            num_nodes = _DEFAULT_RQMC_POINTS if rule == "rqmc" else _DEFAULT_NODES[rule][q]
        return rule, check_int("num_nodes", num_nodes, 3 if rule == "trapezoid" else 2 if rule == "rqmc" else 1)

    def _rules(self, rule: str, num_nodes: int, randomisations: int) -> list[quadrature.Rule]:
        """The coarse and refined quadrature rules, or ``randomisations`` RQMC scrambles (the same every call)."""
        q = self.latent_dim
        if rule == "rqmc":
            root = np.random.SeedSequence(self._rqmc_seed.entropy, spawn_key=self._rqmc_seed.spawn_key)
            seeds = root.spawn(randomisations)  # a fresh root each call: the same scrambles every time
            return [quadrature.rqmc(num_nodes, q, seed=s) for s in seeds]
        coarse = quadrature.make_rule(rule, num_nodes, q)
        return [coarse, quadrature.refined(coarse)]

    def _integrate(self, x: np.ndarray, rule: str, num_nodes: int, randomisations: int):
        """``(value, error)``, each ``(N, V)``, of m*(. | x) for prefixes ``x`` ``(N, L)``."""
        nodes, W = quadrature.shared_nodes(self._rules(rule, num_nodes, randomisations),
                                           dropped_mass=_DROPPED_MASS)
        est = self.teacher.weighted_marginals(torch.as_tensor(x, dtype=torch.long), nodes, W,
                                              ELEMENT_BUDGET)  # (N, R, V)
        if rule == "rqmc":
            R = est.shape[1]
            return est.mean(1), est.std(1, ddof=1) / math.sqrt(R)
        coarse, fine = est[:, 0], est[:, 1]  # (N, V) each
        change = np.abs(fine - coarse).max(1, keepdims=True)  # (N, 1): per-token changes oscillate (Gauss-Hermite)
        return fine, np.broadcast_to(change + _ERROR_FLOOR, fine.shape).copy()

    def exact_marginal(self, prefixes, *, rule: str = "auto", num_nodes: int | None = None,
                       return_error: bool = False, randomisations: int = 16):
        """The truth's next-token marginal m*(. | x) = E_z p*(. | x, z), ``(N, V)`` (DESIGN §4).

        rule : "auto" (trapezoid for q <= 3, RQMC above), "trapezoid" (tensor rule on
            [-9, 9]^q), "gauss-hermite", or "rqmc".
        num_nodes : nodes per dimension of the coarse quadrature rule (default 201, 61,
            31 trapezoid and 80, 40, 20 Gauss-Hermite nodes for q = 1, 2, 3; the value
            returned uses the refined rule: 401, 121, 61 and 160, 80, 40), or points per
            randomisation for RQMC (default 4096).
        return_error : also return the error ``(N, V)``. Quadrature: the value is the
            refined rule's (nodes doubled, trapezoid step halved) and the error, for
            every token of a prefix, is max_v |refined_v - coarse_v| + 1e-14 (a round-off
            floor): the largest change over the prefix's V probabilities, since single
            tokens' changes can oscillate (Gauss-Hermite). As both rules converge
            fast, it bounds the refined value's own error and the change from
            doubling the nodes again. RQMC: the mean over ``randomisations``
            independent scrambles and its standard error.

        Results for the enumerated prefixes are computed for all of them in one pass and cached per rule,
        so repeated calls are free and a prefix's value does not depend on the order of the calls (a batch
        of other composition changes the last bits of the matrix products).
        """
        x = self._check_prefixes(prefixes)  # (N, L)
        rule, num_nodes = self._resolve_rule(rule, num_nodes)
        randomisations = check_int("randomisations", randomisations, 2)
        P, V = self.vocab_size**self.prefix_len, self.vocab_size
        if self._enumerated and P * V <= _MAX_CACHE:
            key = (rule, num_nodes, randomisations if rule == "rqmc" else None)
            if key not in self._cache:
                self._cache[key] = (np.zeros((P, V)), np.zeros((P, V)), np.zeros(P, dtype=bool))
            probs_all, err_all, done = self._cache[key]  # (P, V), (P, V), (P,)
            idx = self.prefix_index(x)
            if not done[idx].all():  # every prefix in one pass: a value never depends on which came first
                probs_all[:], err_all[:] = self._integrate(self._prefix_sets["all"], rule, num_nodes, randomisations)
                done[:] = True
            probs, err = probs_all[idx], err_all[idx]
        else:
            probs, err = self._integrate(x, rule, num_nodes, randomisations)
        return (probs, err) if return_error else probs

    @torch.no_grad()
    def exact_log_likelihood(self, x, y, *, rule: str = "auto", num_nodes: int | None = None,
                             return_error: bool = False, randomisations: int = 16):
        """log m*(y | x) of whole data ``(N,)``: log E_z prod_j p*(y_j | x, y_<j, z), the c
        observations sharing one z (DESIGN §2, per-datum scope). Same rules and error
        conventions as :meth:`exact_marginal` (the error is that of the log)."""
        x = self._check_prefixes(x, "x")  # (N, L)
        y = np.asarray(y)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (
                y.size and (y.min() < 0 or y.max() >= self.vocab_size)):
            raise ValueError(f"y of shape {y.shape} is invalid; allowed: token ids in 0..{self.vocab_size - 1} "
                             f"of shape ({len(x)}, c)")
        rule, num_nodes = self._resolve_rule(rule, num_nodes)
        rules = self._rules(rule, num_nodes, check_int("randomisations", randomisations, 2))
        nodes, W = quadrature.shared_nodes(rules, dropped_mass=_DROPPED_MASS)
        nodes_t = torch.as_tensor(nodes, dtype=torch.float64)  # (U, q)
        log_W = torch.as_tensor(W, dtype=torch.float64).log()  # (U, R)
        xt, yt = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
        rows = max(1, ELEMENT_BUDGET // (len(nodes) * self.vocab_size * y.shape[1]))
        out = []
        for i in range(0, len(x), rows):
            latent = nodes_t[None].expand(len(xt[i:i + rows]), -1, -1)  # (b, U, q)
            ll = self.teacher.log_lik(xt[i:i + rows], yt[i:i + rows], latent)  # (b, U)
            out.append(torch.logsumexp(ll[:, :, None] + log_W[None], dim=1))  # (b, R)
        est = torch.cat(out).numpy()  # (N, R)
        if rule == "rqmc":
            lik = np.exp(est - est.max(1, keepdims=True))
            mean = lik.mean(1)
            value = np.log(mean) + est.max(1)
            error = lik.std(1, ddof=1) / math.sqrt(est.shape[1]) / mean  # delta method for the log
        else:
            value, error = est[:, 1], np.abs(est[:, 1] - est[:, 0]) + _ERROR_FLOOR
        return (value, error) if return_error else value

    @torch.no_grad()
    def teacher_probs(self, prefixes) -> np.ndarray:
        """The deterministic teacher's next-token distribution (z = 0), ``(N, V)``."""
        x = torch.as_tensor(self._check_prefixes(prefixes))  # (N, L)
        return self.teacher.log_probs(x, None, None)[:, 0, 0].exp().numpy()
