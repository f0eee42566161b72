"""Fit and evaluate: the engine's ``analyse`` for a method of the perturbation domain (DESIGN §3, §5, §7).

:func:`fit_and_evaluate` fits one method to one replicate's data (:func:`~.fitting.fit_method`:
sgd or the exact root) and returns the replicate's metrics (:func:`~.evaluation.evaluate_student`)
with the solver's diagnostics. :func:`make_analyse` wraps it as ``analyse(data, cond)``.
Every client that fits a method of this domain goes through here or through its two parts.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

from .evaluation import evaluate_student, fit_statistics
from .fitting import fit_method
from .methods import PerturbationMethod

__all__ = ["FIT_STATISTICS", "fit_and_evaluate", "make_analyse"]

#: the solver statistics a study reports as ``fit_<name>`` (timing lives in the engine's seconds)
FIT_STATISTICS = ("steps", "evaluations", "grad_norm", "quadrature_error")


def fit_and_evaluate(method: PerturbationMethod, data, *, num_bins: int = 4, mc_draws: int = 4096,
                     nodes: Mapping[int, int] | None = None, exact: Mapping | None = None, device: str = "cpu",
                     fit_keys: Sequence[str] = FIT_STATISTICS) -> dict:
    """Fit ``method`` to ``data`` (:class:`~simstudy.domain.ReplicateData`) and measure the fit.

    Returns a flat dict of floats: the metrics of :func:`~simstudy.domain.evaluate_student`, the
    solver's ``fit_<key>`` statistics for ``fit_keys`` and ``n_parameters`` (trainable). A fitted
    marginal that is NaN raises FloatingPointError; an infinite KL (a zero probability on a possible
    token, DESIGN §3) is returned as it is and the engine records the row as ``nonfinite`` with its
    value kept (issue 12: non-finite values are recorded failures, counted, never dropped).
    """
    student, fit = fit_method(method, data, exact=exact, device=device)
    out = evaluate_student(student, data, num_bins=num_bins, mc_draws=mc_draws, nodes=nodes)
    out.update(fit_statistics(fit, fit_keys))
    out["n_parameters"] = float(sum(p.numel() for p in student.parameters() if p.requires_grad))
    if math.isnan(out.get("kl_id", 0.0)):
        raise FloatingPointError("the fitted marginal is not finite")
    return out


def _analyse(data, cond: dict, *, method: PerturbationMethod, settings: dict) -> dict:
    return fit_and_evaluate(method, data, **settings)


def make_analyse(method: PerturbationMethod, **settings):
    """``analyse(data, cond) -> dict`` for the engine: :func:`fit_and_evaluate` with ``settings``."""
    return functools.partial(_analyse, method=method, settings=dict(settings))
