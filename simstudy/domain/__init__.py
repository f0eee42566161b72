"""The domain library: what both clients (the study kinds and the paper checks) stand on (DESIGN §3-§5, §7).

Between the core (DGMs, models, equations, solvers, metrics) and the clients, one
place for each concept of a perturbation study:

* :mod:`.methods` -- :class:`MethodSpec` (the fields every method shares) and
  :class:`PerturbationMethod` (the synthetic domain's method, with its baselines);
* :mod:`.cache` -- :func:`cached_dgm`, the one per-process DGM cache;
* :mod:`.data` -- :class:`ReplicateData` and :func:`make_generate`, the ``generate`` of every study;
* :mod:`.fitting` -- :func:`fit_method` / :func:`fit_student`: sgd or the exact root;
* :mod:`.evaluation` -- :func:`evaluate_student`: region metrics, extrapolation curve, recovery;
* :mod:`.analysis` -- :func:`fit_and_evaluate` / :func:`make_analyse`: the two together, the engine's ``analyse``.

The layers: engine <- core <- domain <- checks, studies <- cli. Nothing here imports a client.
"""
from .analysis import FIT_STATISTICS, fit_and_evaluate, make_analyse
from .cache import BuildCache, cached_dgm, options_key
from .data import ReplicateData, make_generate
from .evaluation import evaluate_student, fit_statistics, fitted_marginal, region_metrics
from .fitting import build_student, fit_method, fit_student
from .methods import SOLVERS, MethodSpec, PerturbationMethod, describe_method

__all__ = ["FIT_STATISTICS", "fit_and_evaluate", "make_analyse", "BuildCache", "MethodSpec", "PerturbationMethod", "ReplicateData", "SOLVERS", "build_student",
           "cached_dgm", "describe_method", "evaluate_student", "fit_method", "fit_statistics", "fit_student",
           "fitted_marginal", "make_generate", "options_key", "region_metrics"]
