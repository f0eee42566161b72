"""Estimating equations as surrogate losses (DESIGN §3), a registry by name, and the gradient audit.

    eq = make_equation("q2", num_draws=8)
    out = eq.loss(model, x, y, generator=gen)   # x (B, L), y (B, c) long
    out.loss.backward()                          # gradient == -(1/B) sum_i g_i
    out.stats                                    # floats: proposals, acceptance, K, spread, ...

| name     | class               | mean of g                                   |
| -------- | ------------------- | ------------------------------------------- |
| ps-exact | PosteriorExact      | grad log m (unbiased)                       |
| ps-mh    | PosteriorMH         | grad log m once the chain has mixed         |
| q2       | Q2                  | grad of minus the expected Brier score of m |
| sumo     | SUMO                | grad log m (infinite variance; spread kept) |
| is-K     | ImportanceSampling  | grad log m - grad chi2 / (2K) + O(K^-2)     |
| aug      | Augmentation        | grad log m - grad KL(prior, posterior)      |
| mle      | MLE                 | grad log p of the unperturbed model         |

``make_equation("is-8")`` is shorthand for ``make_equation("is-K", num_draws=8)``.
"""
from __future__ import annotations

import dataclasses
import re

from .audit import AuditResult, gradient_audit
from .base import (SCOPES, Equation, EquationOutput, quadrature_divergences, quadrature_log_marginal,
                   quadrature_log_probs, quadrature_posterior_mean, quadrature_token_log_lik)
from .importance import SUMO, Augmentation, ImportanceSampling
from .mle import MLE
from .posterior import PosteriorDraws, PosteriorExact, PosteriorMH, RejectionBudgetExceeded
from .scoring import Q2

EQUATIONS: dict[str, type[Equation]] = {
    "ps-exact": PosteriorExact,
    "ps-mh": PosteriorMH,
    "q2": Q2,
    "sumo": SUMO,
    "is-K": ImportanceSampling,
    "aug": Augmentation,
    "mle": MLE,
}


def make_equation(name: str, **options) -> Equation:
    """Build an estimating equation by name with explicit keyword options.

    Unknown names and unknown or invalid options raise ValueError naming what is allowed.
    """
    match = re.fullmatch(r"is-(\d+)", name) if isinstance(name, str) else None
    if match and name not in EQUATIONS:
        if "num_draws" in options:
            raise ValueError(f"equation={name!r} fixes num_draws={match.group(1)}; do not pass num_draws again")
        options = {**options, "num_draws": int(match.group(1))}
        name = "is-K"
    if name not in EQUATIONS:
        raise ValueError(f"equation={name!r} is unknown; allowed: {', '.join(EQUATIONS)} (or is-<K>, e.g. is-8)")
    cls = EQUATIONS[name]
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"option {unknown[0]}={options[unknown[0]]!r} is unknown for equation {name!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**options)


__all__ = [
    "EQUATIONS", "SCOPES", "AuditResult", "Augmentation", "Equation", "EquationOutput", "ImportanceSampling",
    "MLE", "PosteriorDraws", "PosteriorExact", "PosteriorMH", "Q2", "RejectionBudgetExceeded", "SUMO",
    "gradient_audit", "make_equation", "quadrature_divergences", "quadrature_log_marginal", "quadrature_log_probs",
    "quadrature_posterior_mean", "quadrature_token_log_lik",
]
