"""Solvers of the estimating equations (DESIGN §3): stochastic (``sgd``) and the
deterministic quadrature reference (``exact``)."""
from .exact import OBJECTIVES, default_solver_rule, exact_objective, fit_exact
from .results import FitDiverged, FitFailure, FitResult
from .sgd import SGDConfig, fit_sgd, held_out_score

__all__ = ["OBJECTIVES", "FitDiverged", "FitFailure", "FitResult", "SGDConfig", "default_solver_rule",
           "exact_objective", "fit_exact", "fit_sgd", "held_out_score"]
