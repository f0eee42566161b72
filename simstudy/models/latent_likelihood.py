"""The likelihood of a model with a latent perturbation, written once for the synthetic ``PerturbedLM`` and
the LLM wrapper ``PerturbedCausalLM`` (DESIGN §2, §3).

A host class supplies ``token_log_lik(x, y, latent) -> (B, K, c)``, ``perturbation`` (with
``gaussian_latent``, ``latent_dim``, ``perturb_at_eval``) and ``dtype``; the mixin derives:

* ``log_lik``: log p(y | x, z_k) of the whole continuation, ``(B, K)``;
* ``can_integrate``: whether m(y | x) can be computed by deterministic quadrature;
* ``quadrature_log_lik``: log m(y | x) = log E_z p(y | x, z) by a quadrature rule over z, ``(B,)``,
  differentiable: the population objective of the likelihood equations and the exact solver's.
"""
from __future__ import annotations

import torch

from .. import quadrature
from .perturbations import NoPerturbation

__all__ = ["LatentLikelihood"]


class LatentLikelihood:
    """Mixin: the datum likelihood and its quadrature marginal from a host's ``token_log_lik``."""

    def log_lik(self, x: torch.Tensor, y: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """log p(y | x, z_k) of the whole datum (sum over the c observations): ``(B, K)``."""
        return self.token_log_lik(x, y, latent).sum(-1)

    def can_integrate(self) -> bool:
        """True when m(y | x) can be computed by quadrature (a Gaussian latent of dimension <= 3, or none)."""
        p = self.perturbation
        if isinstance(p, NoPerturbation) or not p.perturb_at_eval:
            return True
        return bool(p.gaussian_latent and p.latent_dim <= 3)

    def quadrature_log_lik(self, x: torch.Tensor, y: torch.Tensor, rule: quadrature.Rule) -> torch.Tensor:
        """log m(y | x) = log E_z p(y | x, z) of each whole datum by a quadrature rule over z: ``(B,)``.

        Differentiable (autograd flows to the parameters). The rule must match a Gaussian latent.
        """
        p = self.perturbation
        if not (p.gaussian_latent and p.latent_dim == rule.dim):
            raise ValueError(f"rule of dimension {rule.dim} does not fit latent_dim={p.latent_dim} "
                             f"({type(p).__name__}); allowed: a Gaussian latent of the rule's dimension")
        nodes = torch.as_tensor(rule.nodes, dtype=self.dtype, device=x.device)  # (M, q)
        log_w = torch.as_tensor(rule.log_weights, dtype=self.dtype, device=x.device)  # (M,)
        latent = nodes[None].expand(x.shape[0], -1, -1)  # (B, M, q)
        return torch.logsumexp(self.log_lik(x, y, latent) + log_w, dim=1)  # (B,)
