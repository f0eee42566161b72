"""ps-mh: posterior draws by Metropolis-Hastings (DESIGN §3).

g = grad log p(y | x, z) with z from a Metropolis-Hastings chain targeting the
per-datum posterior p(z | x, y) proportional to p(z) p(y | x, z). By Fisher's
identity E_post grad log p(y | x, z) = grad log m(y | x), so once the chain has
mixed the estimating function is unbiased for the likelihood equation (B = 100
steps was unbiased in DESIGN §3, B = 20 was not). ps-exact, the exact-draw
variant by rejection, is in :mod:`simstudy.equations.posterior`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import draws
from ..validation import check_choice, check_int, check_positive
from .base import Equation
from .proposal_scoring import SCORE_DTYPES, Float32Scorer

__all__ = ["CHAIN_DTYPES", "PosteriorMH"]

#: the dtype the independence chain scores its proposals in (:mod:`.proposal_scoring`)
CHAIN_DTYPES = SCORE_DTYPES


def _accept_reject_scan(logp_all: torch.Tensor, log_u: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The independence sampler's accept/reject scan over stored log-likelihoods: ``logp_all`` (B, S+1, K) of
    the start (block 0) and the S proposals, ``log_u`` (S, B, K) log-uniforms; returns the block of each
    chain's final state (B, K, on the device of ``logp_all``) and the number of acceptances. Step s accepts
    where log u_s < logp(proposal s) - logp(current). The scan is S small sequential steps, so it runs in
    numpy on the host (the same float arithmetic; per-operation overhead a few times smaller than torch's,
    and no kernel launch per step on a GPU)."""
    lp, lu = logp_all.cpu().numpy(), log_u.cpu().numpy()
    state = np.zeros(lp[:, 0].shape, dtype=np.int64)  # (B, K)
    logp = lp[:, 0].copy()  # (B, K)
    accepted = 0
    for step in range(1, lu.shape[0] + 1):
        prop = lp[:, step]  # (B, K)
        acc = lu[step - 1] < prop - logp  # (B, K)
        np.copyto(state, step, where=acc)
        np.copyto(logp, prop, where=acc)
        accepted += int(np.count_nonzero(acc))
    return torch.from_numpy(state).to(logp_all.device), accepted


@dataclass
class PosteriorMH(Equation):
    """ps-mh: z from a Metropolis-Hastings chain targeting p(z | x, y), ``steps`` B per visit (DESIGN §3).

    Proposals: ``"independence"`` (z' from the prior; accept with probability
    min(1, p(y | x, z') / p(y | x, z)); any latent prior) or ``"random-walk"``
    (z' = z + step_size * eps; accept with min(1, pi(z') / pi(z)),
    pi(z) = N(z; 0, I) p(y | x, z); Gaussian latents only). Each step is one
    forward pass for all chains of the minibatch (``num_draws`` chains per datum);
    independence proposals do not depend on the chain, so all B of them are drawn and
    scored in one forward pass and only the accept/reject scan runs step by step.
    ``chain_dtype="float32"`` scores those proposals with a float32 copy of the model (the
    draws themselves and the gradient pass keep the model's dtype): about twice as fast on a
    CPU for the float64 synthetic students, and the chain then targets the posterior of the
    float32 likelihood, whose log differs from the float64 one by about 1e-6 (rounding), far
    below the Monte Carlo noise of one draw. The default, "model", scores in the model's dtype.

    Chains start from a fresh prior draw each call by default: the mean of g is
    grad log m only once the chain has mixed (DESIGN §3: B = 20 was still biased
    away from the truth, B = 100 was not). ``persistent=True`` keeps one set of
    chains per datum id (``index``) across calls, each visit continuing from the
    stored state at the current parameters.
    """

    name = "ps-mh"
    audit_expectation = "mixing"
    root_objective = "likelihood"
    label_pattern = r"ps-mh-B(\d+)"
    label_option = "steps"
    estimand = "mean log m(y | x) (per-datum posterior, once the chain has mixed)"
    scopes = ("datum",)

    steps: int = 100
    proposal: str = "independence"
    chain_dtype: str = "model"
    step_size: float = 0.5
    num_draws: int = 1
    persistent: bool = False
    scope: str = "datum"
    _chains: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _scorer: Float32Scorer = field(default_factory=Float32Scorer, init=False, repr=False, compare=False)

    def validate(self):
        check_int("steps", self.steps, 1)
        check_choice("proposal", self.proposal, ("independence", "random-walk"))
        check_positive("step_size", self.step_size)
        check_int("num_draws", self.num_draws, 1)
        check_choice("chain_dtype", self.chain_dtype, CHAIN_DTYPES)
        if not isinstance(self.persistent, bool):
            raise ValueError(f"persistent={self.persistent!r} is invalid; allowed: True or False")
        super().validate()

    def reset_chains(self) -> None:
        """Forget the persistent chains."""
        self._chains.clear()

    @torch.no_grad()
    def run_chains(self, model, x, y, *, generator=None, index=None):
        """Run ``steps`` MH steps for ``num_draws`` chains per datum: ``(latent (B, K, ...), stats)``."""
        K = self.num_draws
        if self.proposal == "random-walk" and not getattr(model.perturbation, "gaussian_latent", False):
            raise ValueError(f"proposal='random-walk' needs a Gaussian latent; "
                             f"{type(model.perturbation).__name__} has none; allowed: independence")
        independence = self.proposal == "independence"
        S = self.steps
        # independence proposals do not depend on the chain: draw the start and all S proposals at once and
        # score them in one forward pass, then run the accept/reject scan on the stored log-likelihoods
        z = model.sample_latent(x, K * (S + 1) if independence else K, generator)  # (B, K [* (S+1)], ...)
        keys = None
        if self.persistent:
            if index is None:
                raise ValueError("index=None is invalid with persistent=True; allowed: a (B,) tensor of datum ids")
            keys = [int(i) for i in index.tolist()]
            for b, key in enumerate(keys):
                state = self._chains.get(key)
                if state is not None:
                    z[b, :K] = state.to(z)
        if independence:
            z, stats = self._independence_scan(model, x, y, z, generator)
        else:
            z, stats = self._random_walk(model, x, y, z, generator)
        if keys is not None:
            for b, key in enumerate(keys):
                self._chains[key] = z[b].clone()
        return z, stats

    def _independence_scan(self, model, x, y, z_all, generator):
        """The independence sampler on pre-drawn proposals ``z_all`` ``(B, K (S+1), ...)``: slot block 0 is
        the start, block s the proposal of step s; one forward pass scores all of them."""
        B, K, S = x.shape[0], self.num_draws, self.steps
        scorer, z_scored = model, z_all
        if self.chain_dtype == "float32" and z_all.dtype != torch.float32:
            scorer, z_scored = self._scorer(model), z_all.float()
        logp_all = scorer.log_lik(x, y, z_scored).view(B, S + 1, K)  # (B, S+1, K)
        log_u = draws.rand((S, B, K), generator=generator, dtype=logp_all.dtype, device=x.device).log()
        state, accepted = _accept_reject_scan(logp_all, log_u)  # (B, K) block of the final state, acceptances
        slots = state * K + torch.arange(K, device=x.device)  # (B, K) index into the K (S+1) draws
        z = z_all[torch.arange(B, device=x.device)[:, None], slots]  # (B, K, ...)
        proposals = B * K * S
        return z, {"proposals": float(proposals), "accepted": float(accepted),
                   "acceptance_rate": float(accepted) / proposals, "steps": float(S)}

    def _random_walk(self, model, x, y, z, generator):
        """The random-walk sampler from ``z`` ``(B, K, ...)``: one forward pass per step."""
        B, K = x.shape[0], self.num_draws
        logp = model.log_lik(x, y, z)  # (B, K)
        accepted = torch.zeros((), dtype=torch.long, device=x.device)
        event = tuple(range(2, z.dim()))
        for _ in range(self.steps):
            eps = draws.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            prop = z + self.step_size * eps
            log_prior_ratio = 0.5 * ((z ** 2).sum(event) - (prop ** 2).sum(event))  # (B, K)
            logp_prop = model.log_lik(x, y, prop)  # (B, K)
            log_u = draws.rand(logp.shape, generator=generator, dtype=logp.dtype, device=x.device).log()
            acc = log_u < logp_prop - logp + log_prior_ratio  # (B, K)
            z = torch.where(acc.view(*acc.shape, *([1] * len(event))), prop, z)
            logp = torch.where(acc, logp_prop, logp)
            accepted += acc.sum()
        proposals = B * K * self.steps
        stats = {"proposals": float(proposals), "accepted": float(accepted),
                 "acceptance_rate": float(accepted) / proposals, "steps": float(self.steps)}
        return z, stats

    def per_datum_loss(self, model, x, y, *, weights, generator, index):
        z, stats = self.run_chains(model, x, y, generator=generator, index=index)
        return -model.log_lik(x, y, z).mean(1), stats
