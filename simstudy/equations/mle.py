"""mle: standard fine-tuning of the unperturbed model (DESIGN §3, last table row)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Equation


@dataclass
class MLE(Equation):
    """g = grad log p(y | x) of the unperturbed model (latent None).

    The perturbation is switched off (its parameters get zero gradient); the
    mean of g is grad of the unperturbed log-likelihood, which is zero at the
    truth only for an unperturbed model. ``scope`` is accepted for a uniform
    interface: the datum log-likelihood is the sum of the token terms, so both
    scopes give the same g.
    """

    name = "mle"
    audit_expectation = "no latent"
    root_objective = "mle"
    estimand = "mean log p(y | x) of the unperturbed model (no latent)"

    scope: str = "datum"

    def per_datum_loss(self, model, x, y, *, weights, generator, index):
        ll = model.log_lik(x, y, None)[:, 0]  # (B,)
        return -ll, {"draws": 0.0}

    def objective_terms(self, model, x, y, rule):
        return model.log_lik(x, y, None)[:, 0]  # (B,)
