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

``make_equation("is-8")`` is shorthand for ``make_equation("is-K", num_draws=8)``; likewise ``q2-K8`` and
``ps-mh-B20`` (:func:`parse_label`). Facts about each equation (its audit expectation, exact root
objective, default LLM scope, label form) are class attributes of its class (:class:`Equation`).
"""
from __future__ import annotations

import dataclasses

from .audit import AuditResult, gradient_audit
from .base import (SCOPES, Equation, EquationOutput, quadrature_divergences, quadrature_log_marginal,
                   quadrature_log_probs, quadrature_posterior_mean, quadrature_token_log_lik)
from .importance import SUMO, Augmentation, ImportanceSampling
from .mle import MLE
from .posterior import FALLBACKS, PosteriorDraws, PosteriorExact, RejectionBudgetExceeded
from .posterior_mh import PosteriorMH
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


def parse_label(label: str) -> tuple[str, dict]:
    """A method label -> ``(registry name, options)``: ``"ps-exact"`` -> ``("ps-exact", {})``,
    ``"is-8"`` -> ``("is-K", {"num_draws": 8})``, ``"q2-K8"`` -> ``("q2", {"num_draws": 8})``,
    ``"ps-mh-B20"`` -> ``("ps-mh", {"steps": 20})``. Each equation parses its own labels
    (:meth:`Equation.parse_label`); an unknown label raises ValueError listing the forms."""
    if isinstance(label, str):
        if label in EQUATIONS:
            return label, {}
        for name, cls in EQUATIONS.items():
            options = cls.parse_label(label)
            if options is not None:
                return name, options
    raise ValueError(f"equation={label!r} is unknown; allowed: {', '.join(EQUATIONS)} (or {label_forms()}, "
                     "e.g. is-8)")


def label_forms() -> str:
    """The short-label forms of the registered equations, for messages: ``"ps-mh-B<n>, q2-K<n>, is-<n>"``."""
    return ", ".join(cls.label_pattern.replace("(\\d+)", "<n>") for cls in EQUATIONS.values() if cls.label_pattern)


def is_label(name) -> bool:
    """Whether ``name`` is an equation's short label (``is-8``, ``q2-K8``, ``ps-mh-B20``), not a registry name."""
    if not isinstance(name, str) or name in EQUATIONS:
        return False
    try:
        parse_label(name)
    except ValueError:
        return False
    return True


def make_equation(name: str, **options) -> Equation:
    """Build an estimating equation by name or short label with explicit keyword options.

    Unknown names and unknown or invalid options raise ValueError naming what is allowed.
    """
    name, fixed = parse_label(name)
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise ValueError(f"equation label fixes {clash[0]}={fixed[clash[0]]}; do not pass {clash[0]} again")
    options = {**options, **fixed}
    cls = EQUATIONS[name]
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"option {unknown[0]}={options[unknown[0]]!r} is unknown for equation {name!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**options)


def equations_with(**facts) -> list[str]:
    """Registry names of the equations whose class facts match, e.g. ``equations_with(root_objective="brier")``."""
    return [name for name, cls in EQUATIONS.items() if all(getattr(cls, k) == v for k, v in facts.items())]


__all__ = [
    "EQUATIONS", "FALLBACKS", "SCOPES", "equations_with", "is_label", "label_forms", "parse_label", "AuditResult", "Augmentation", "Equation", "EquationOutput", "ImportanceSampling",
    "MLE", "PosteriorDraws", "PosteriorExact", "PosteriorMH", "Q2", "RejectionBudgetExceeded", "SUMO",
    "gradient_audit", "make_equation", "quadrature_divergences", "quadrature_log_marginal", "quadrature_log_probs",
    "quadrature_posterior_mean", "quadrature_token_log_lik",
]
