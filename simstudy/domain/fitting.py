"""Fit one method to one replicate's data: the one fit path of the domain (DESIGN §3 "Solving the equations").

* ``solver = "sgd"``: :func:`~simstudy.fit.fit_sgd` on the method's estimating equation,
  its latent draws from a generator seeded by the replicate's student seed;
* ``solver = "exact"``: :func:`~simstudy.fit.fit_exact`, the quadrature + L-BFGS root of the
  equation's own ``root_objective`` (a fact of the equation class), optionally on a GPU;
  the fitted student is moved back to the CPU so that every fit is evaluated by the same code.

Every method of a replicate starts from the same student initialisation (the replicate's
student seed), so differences between methods are paired.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..fit import FitResult, fit_exact, fit_sgd
from .methods import PerturbationMethod

__all__ = ["build_student", "fit_method", "fit_student"]


def build_student(dgm, method: PerturbationMethod, seed: int):
    """The student ``method`` fits on ``dgm``'s data, initialised from ``seed``."""
    return dgm.make_student(seed=seed, **method.student_options())


def fit_student(student, method: PerturbationMethod, x: torch.Tensor, y: torch.Tensor, *, seed: int,
                exact: Mapping | None = None, device: str = "cpu") -> FitResult:
    """Fit ``student`` in place by ``method``'s solver.

    Parameters
    ----------
    student : PerturbedLM
    method : PerturbationMethod
    x : (n, L) long; y : (n, c) long
    seed : int
        Seed of the sgd solver's latent draws.
    exact : mapping, optional
        Keyword arguments of :func:`~simstudy.fit.fit_exact` (``rule``, ``max_iter``, ``max_refinements``).
    device : str
        Torch device of the exact solver ("cuda" falls back to the CPU when none is present).

    Returns
    -------
    FitResult
        Exact solves record ``stats["on_gpu"]`` (1.0 when solved on a GPU).
    """
    if method.solver == "exact":
        use = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        student.to(use)
        fit = fit_exact(student, x.to(use), y.to(use), objective=method.equation_class.root_objective,
                        **dict(exact or {}))
        student.to("cpu")
        fit.stats["on_gpu"] = float(use != "cpu")
        return fit
    return fit_sgd(student, method.make_equation(), x, y, config=method.sgd_config(),
                   generator=torch.Generator().manual_seed(seed))


def fit_method(method: PerturbationMethod, data, *, exact: Mapping | None = None, device: str = "cpu"):
    """Build the student of ``method`` for a replicate's data (:class:`~simstudy.domain.ReplicateData`)
    and fit it: ``(student, fit)``."""
    student = build_student(data.dgm, method, data.student_seed)
    fit = fit_student(student, method, data.x, data.y, seed=data.student_seed, exact=exact, device=device)
    return student, fit
