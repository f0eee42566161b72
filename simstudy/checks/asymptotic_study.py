"""The shared asymptotic study of paper checks 2-5 (DESIGN §6.2-§6.5): ``consistency``, ``rates``,
``inference`` and ``efficiency`` read the same fits, stored once and reused.

A well-specified parametric student of the "five-token" reference model (DESIGN §3:
V = 5, L = 2, d = 3, q = 1, 4-unit tanh teacher) is fitted by the *exact* solver
(:func:`simstudy.domain.fit_student` with ``solver="exact"``: quadrature over z, L-BFGS;
deterministic given the data, so replicates vary only in data) to the root of each equation
of :data:`STUDY_METHODS`, the root of its class's ``root_objective``:

* ``ps-exact``: the likelihood equations (the root of ps-exact, ps-mh and sumo), and
* ``q2``: the Brier-score equations,

on the same data in every replicate (paired), over a grid of n. Every fit records ID and
OOS KL(m* || m-hat) (:func:`simstudy.domain.evaluate_student`), the estimates of a few
identifiable scalar functionals m(y0 | x0) with their sandwich standard errors and 95% Wald
intervals, and solver diagnostics. The statistics the checks share (mean tables, the start
of the asymptotic regime, paired ratios) are in :mod:`.asymptotic_statistics`.

The student (``trainable``)
---------------------------
``head+perturbation`` (default): the network's first layer (W1, b1) is held at the truth and
the head (W2, b2) and the perturbation A are fitted: 31 parameters, Fisher rank r = 24 by
quadrature (the 7 dropped directions: 5 softmax shifts of the head, 2 directions of A that W1
ignores), eigenvalues spanning 4 orders of magnitude; the "5-token sub-model" of DESIGN §6.3.
``all`` (``--set trainable=all``): every parameter is fitted, 59, rank 52 (DESIGN §3), smallest
kept eigenvalue 5e-8 of the largest: its weakest directions need n far beyond 10^6 before the
quadratic theory applies, and pilot fits took 2,000 to 7,500 evaluations (12 to 115 s) against
100 to 400 for the sub-model. The rank and every constant are computed for the student in use
(:mod:`simstudy.checks.fisher`).

``init`` (default ``truth``): the solver starts at the truth, so that it finds the consistent
root the theory is about (with ``random`` the trainable part starts from the student's random
initialisation; both reached the same root in every pilot fit with n >= 4000, and differed
only in the runaway fits at n = 500).

Theory (by quadrature, :func:`simstudy.checks.fisher.asymptotic_theory`): r = rank of
I = E[s s^T] at the truth, the KL constants lim n E[KL] (r/2 for the likelihood equations,
(1/2) tr(I A^+ B A^+) for q2; I_oos for OOS KL) and the asymptotic variances g^T Sigma g of
the functionals.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from .. import quadrature
from ..domain import BuildCache, PerturbationMethod, ReplicateData, cached_dgm, evaluate_student, fit_student, \
    make_generate
from ..engine import Study, StudyResult
from ..equations import EQUATIONS
from ..fit import default_solver_rule
from . import fisher
from .base import CheckContext
from .common import comma_list, dgm_settings, study_store

__all__ = ["AsymptoticSettings", "CONVERGED_GRAD_NORM", "Functional", "INITS", "REGION_METRICS", "STUDY_METHODS",
           "STUDY_NAME", "TRAINABLE", "asymptotic_settings", "build_study", "design_dgm", "make_student",
           "root_objective", "run_shared_study", "select_functionals", "settings_record", "theory_constants",
           "theory_for"]

STUDY_NAME = "asymptotics"  # the store folder: OUT/studies/asymptotics-<config hash[:12]>
STUDY_METHODS = ("ps-exact", "q2")  # the equations whose exact roots the study fits, in table order
REGION_METRICS = ("kl_id", "kl_oos", "tv_id", "tv_oos")  # of simstudy.domain.evaluate_student, kept per fit
TRAINABLE = ("head+perturbation", "all")
INITS = ("truth", "random")
CONVERGED_GRAD_NORM = 1e-5  # a fit whose final gradient norm is above this stopped on a ridge (runaway)
_VERSION = 1  # bump when the analysis changes what a stored row means


def root_objective(method: str) -> str:
    """The objective whose exact root ``method`` solves (a fact of the equation class): the key of
    the theory's constants and covariances (``likelihood`` or ``brier``)."""
    return EQUATIONS[method].root_objective


# ---- settings (one study for the four checks) ----------------------------------------------------
@dataclass(frozen=True)
class AsymptoticSettings:
    """Everything that determines the shared study's rows (its repr enters the config hash)."""

    design: str
    dgm: tuple  # sorted (key, value) pairs: the DGM's constructor keywords
    trainable: str
    init: str
    n_grid: tuple
    replicates: int
    study_seed: int
    max_iter: int
    version: int = _VERSION

    def dgm_options(self) -> dict:
        return dict(self.dgm)


def asymptotic_settings(context: CheckContext) -> AsymptoticSettings:
    """Read the shared study's parameters from ``context`` (the same keys in all four checks)."""
    design = context.param("design", "five-token")
    options = dgm_settings(context, design)
    if options["latent_dim"] not in (1, 2):
        raise ValueError(f"--set latent_dim={options['latent_dim']} is invalid; allowed: 1 or 2 (the exact solver)")
    if options["teacher"] not in ("linear", "mlp"):
        raise ValueError(f"--set teacher={options['teacher']!r} is invalid; allowed: linear or mlp (a parametric "
                         "student whose Fisher information is computed exactly)")
    trainable = context.param("trainable", "head+perturbation")
    if trainable not in TRAINABLE:
        raise ValueError(f"--set trainable={trainable!r} is invalid; allowed: {', '.join(TRAINABLE)}")
    init = context.param("init", "truth")
    if init not in INITS:
        raise ValueError(f"--set init={init!r} is invalid; allowed: {', '.join(INITS)}")
    n_grid = tuple(sorted({int(n) for n in comma_list(context.param(
        "n", [4000, 16000, 64000], [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000]))}))
    if len(n_grid) < 2 or n_grid[0] < 2:
        raise ValueError(f"--set n={','.join(map(str, n_grid))} is invalid; allowed: at least two sizes >= 2")
    replicates = context.param("replicates", 6, 50)
    if replicates < 3:
        raise ValueError(f"--set replicates={replicates} is invalid; allowed: an integer >= 3 (MCSEs need spread)")
    max_iter = context.param("max_iter", 500)
    if max_iter < 1:
        raise ValueError(f"--set max_iter={max_iter} is invalid; allowed: an integer >= 1")
    return AsymptoticSettings(design=design, dgm=tuple(sorted(options.items())), trainable=trainable, init=init,
                              n_grid=n_grid, replicates=replicates,
                              study_seed=context.param("study_seed", 20240602), max_iter=max_iter)


def design_dgm(settings) -> object:
    """The DGM of settings with a ``design`` and ``dgm_options()`` (:func:`simstudy.domain.cached_dgm`)."""
    return cached_dgm({"design": settings.design, **settings.dgm_options()})


def settings_record(settings: AsymptoticSettings, theory: fisher.AsymptoticTheory, context: CheckContext) -> dict:
    """The settings of a check result: the study's settings, the student's size and rank, the solver."""
    d = asdict(settings)
    d["dgm"] = settings.dgm_options()
    d["n_grid"] = list(settings.n_grid)
    d.update(num_parameters=theory.num_parameters, fisher_rank=theory.rank, n_jobs=context.n_jobs,
             solver="fit_exact (L-BFGS, quadrature over z)")
    return d


# ---- the student and the functionals -------------------------------------------------------------
def make_student(dgm, *, trainable: str = "head+perturbation", init: str = "truth", seed: int = 0):
    """A well-specified student of the teacher's family (DESIGN §4), float64.

    ``init="truth"``: every parameter (and the logit scale buffer) is the teacher's.
    ``init="random"``: the trainable parameters come from ``dgm.make_student(seed=)``;
    frozen ones are the teacher's. ``trainable="head+perturbation"`` freezes the first
    layer (``network.hidden``, W1 and b1) of an MLP; ``"all"`` fits everything.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r} is invalid; allowed: {', '.join(TRAINABLE)}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is invalid; allowed: {', '.join(INITS)}")
    student = dgm.make_student(seed=seed)
    state = {k: v.clone() for k, v in dgm.teacher.state_dict().items()}
    frozen = ("network.hidden.",) if trainable == "head+perturbation" else ()
    if init == "random":
        own = student.state_dict()
        for name, _ in student.named_parameters():
            if not name.startswith(frozen):
                state[name] = own[name]
    student.load_state_dict(state)
    student.requires_grad_(True)
    for name, p in student.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
    return student


@dataclass(frozen=True)
class Functional:
    """m(y0 | x0), an identifiable scalar functional (DESIGN §3, §6.4)."""

    name: str
    x0: tuple
    y0: int
    region: str
    distance: float
    truth: float


def select_functionals(dgm) -> list[Functional]:
    """The functionals of the inference check, chosen from the DGM alone: the first and the last
    in-support prefix, the first OOS prefix at the smallest distance to the support and the last
    one at the largest (lexicographic order; duplicates dropped), each with its most probable
    next token under the truth. In the five-token model: (0,0), (3,3), (0,4) and (4,4)."""
    chosen = []
    inside, oos = dgm.prefixes("in"), dgm.prefixes("oos")
    picks = [("m_id_first", inside[0], "ID"), ("m_id_last", inside[-1], "ID")]
    if len(oos):
        dist = dgm.distance(oos)
        near = int(np.flatnonzero(dist == dist.min())[0])
        far = int(np.flatnonzero(dist == dist.max())[-1])
        picks += [("m_oos_near", oos[near], "OOS"), ("m_oos_far", oos[far], "OOS")]
    seen = set()
    for name, x0, region in picks:
        key = tuple(int(t) for t in x0)
        if key in seen:
            continue
        seen.add(key)
        truth = dgm.exact_marginal(np.asarray([key]))[0]
        y0 = int(np.argmax(truth))
        chosen.append(Functional(name=name, x0=key, y0=y0, region=region, distance=float(dgm.distance([key])[0]),
                                 truth=float(truth[y0])))
    return chosen


_THEORY = BuildCache(max_size=8)


def theory_for(settings: AsymptoticSettings) -> tuple[fisher.AsymptoticTheory, np.ndarray]:
    """The asymptotic theory of the settings' student at the truth (cached) and the
    functionals' gradients ``(K, P)`` at the truth."""

    def build():
        dgm = design_dgm(settings)
        student = make_student(dgm, trainable=settings.trainable, init="truth")
        theory = fisher.asymptotic_theory(student, dgm.prefixes("in"), dgm.prefixes("oos"),
                                          observations=dgm.observations)
        funcs = select_functionals(dgm)
        _, grads = fisher.marginal_gradient(student, torch.tensor([f.x0 for f in funcs]),
                                            torch.tensor([f.y0 for f in funcs]))
        return theory, grads.numpy()

    return _THEORY.get((settings.design, settings.dgm, settings.trainable), build)


def theory_constants(theory: fisher.AsymptoticTheory, region: str = "id") -> dict:
    """lim n E[KL] of each study method's root in ``region`` ("id" or "oos")."""
    return {m: theory.constants[root_objective(m)][region] for m in STUDY_METHODS}


# ---- the study -----------------------------------------------------------------------------------
def _solver_rule(latent_dim: int, refinements: int) -> quadrature.Rule:
    rule = default_solver_rule(latent_dim)
    for _ in range(int(refinements)):
        rule = quadrature.refined(rule)
    return rule


def _analyse(data: ReplicateData, cond: dict, *, method: str, settings: AsymptoticSettings) -> dict:
    """Fit one equation's root exactly and measure it (one row of the shared study)."""
    dgm = data.dgm
    x, y = data.x, data.y  # (n, L), (n, c)
    n = int(x.shape[0])
    student = make_student(dgm, trainable=settings.trainable, init=settings.init, seed=data.student_seed)
    spec = PerturbationMethod.from_name(method, solver="exact")
    fit = fit_student(student, spec, x, y, seed=data.student_seed, exact={"max_iter": settings.max_iter})
    evaluation = evaluate_student(student, data, recovery=False)
    out = {k: evaluation[k] for k in REGION_METRICS}
    # functionals and their sandwich standard errors (DESIGN §6.4)
    rule = _solver_rule(dgm.latent_dim, fit.stats.get("refinements", 0))
    funcs = select_functionals(dgm)
    estimates, grads = fisher.marginal_gradient(student, torch.tensor([f.x0 for f in funcs]),
                                                torch.tensor([f.y0 for f in funcs]), rule)  # (K,), (K, P)
    sigma = fisher.empirical_sandwich(student, x, y, root_objective(method), rule)  # (P, P); covariance sigma / n
    variances = np.einsum("kp,pq,kq->k", grads.numpy(), sigma, grads.numpy()) / n
    if not np.all(np.isfinite(variances)):
        raise FloatingPointError("the sandwich variance of a functional is not finite")
    z = stats.norm.ppf(0.975)
    for f, est, var in zip(funcs, estimates.numpy(), variances):
        se = math.sqrt(max(float(var), 0.0))
        out.update({f.name: float(est), f"{f.name}_se": se, f"{f.name}_ci_low": float(est) - z * se,
                    f"{f.name}_ci_high": float(est) + z * se})
    grad_norm = float(fit.stats["grad_norm"])
    quad_err = float(fit.stats.get("quadrature_error", 0.0))
    out.update(fit_evaluations=float(fit.stats["evaluations"]), fit_grad_norm=grad_norm,
               fit_refinements=float(fit.stats.get("refinements", 0)), fit_quadrature_error=quad_err,
               fit_seconds=float(fit.stats["seconds"]),
               fit_converged=float(grad_norm <= CONVERGED_GRAD_NORM and quad_err <= 1e-7))
    return out


def _truth(cond: dict, *, settings: AsymptoticSettings) -> dict:
    return {f.name: f.truth for f in select_functionals(design_dgm(settings))}


def build_study(settings: AsymptoticSettings) -> Study:
    """The shared study: n grid x :data:`STUDY_METHODS` exact roots x replicates."""
    analyse = {m: functools.partial(_analyse, method=m, settings=settings) for m in STUDY_METHODS}
    generate = make_generate({"design": settings.design, **settings.dgm_options()})
    return Study(design={"n": list(settings.n_grid)}, generate=generate, analyse=analyse,
                 truth=functools.partial(_truth, settings=settings),
                 replicates=settings.replicates, seed=settings.study_seed, name=STUDY_NAME,
                 options={"description": "exact roots of the likelihood and Brier equations (DESIGN §6.2-§6.5)"})


_RESULTS: dict = {}


def run_shared_study(context: CheckContext) -> tuple[AsymptoticSettings, StudyResult]:
    """Run (or resume, or reuse) the shared study; stored under ``OUT/studies/asymptotics-<hash>``."""
    settings = asymptotic_settings(context)
    study = build_study(settings)
    store = study_store(Path(context.out) / "studies", STUDY_NAME, study)
    key = str(store.resolve())
    if key not in _RESULTS or not _RESULTS[key].complete:
        _RESULTS[key] = study.run(n_jobs=context.n_jobs, store=store, progress=False)
    return settings, context.record(_RESULTS[key])
