"""Paper checks 2-5 of DESIGN §6: ``consistency``, ``rates``, ``inference`` and ``efficiency``.

One study serves all four (same fits, stored once and reused): a well-specified
parametric student of the "five-token" reference model (DESIGN §3: V = 5, L = 2,
d = 3, q = 1, 4-unit tanh teacher) is fitted by the *exact* solver
(:func:`simstudy.fit.fit_exact`: quadrature over z, L-BFGS; deterministic given
the data, so replicates vary only in data) to the root of

* ``ps-exact``: the likelihood equations (objective ``likelihood``; the root of
  ps-exact, ps-mh and sumo), and
* ``q2``: the Brier-score equations (objective ``brier``),

on the same data in every replicate (paired), over a grid of n. Every fit
records ID and OOS KL(m* || m-hat), the estimates of a few identifiable scalar
functionals m(y0 | x0) with their sandwich standard errors and 95% Wald
intervals, and solver diagnostics.

The student (``trainable``)
---------------------------
``head+perturbation`` (default): the network's first layer (W1, b1) is held at
the truth and the head (W2, b2) and the perturbation A are fitted: 31
parameters, Fisher rank r = 24 by quadrature (the 7 dropped directions: 5 softmax
shifts of the head, 2 directions of A that W1 ignores), eigenvalues spanning 4
orders of magnitude. Its rank matches the "5-token sub-model" of DESIGN §6.3
(r = 24). ``all`` (``--set trainable=all``): every parameter is fitted, 59, rank
52 (DESIGN §3: "rank 52 of 59"), eigenvalues spanning 7 orders of magnitude
(smallest kept 5e-8 of the largest): its weakest directions need n far beyond
10^6 before the quadratic theory applies, and in pilot fits at n = 500 and 4000
the exact solver took 2,000 to 7,500 evaluations (12 to 115 s) per fit, against
100 to 400 for the sub-model. The rank and every constant are computed for the
student in use (:mod:`simstudy.checks.fisher`).

``init`` (default ``truth``): the solver starts at the truth, so that it finds
the consistent root the theory is about (with ``random`` the trainable part
starts from the student's random initialisation; both inits reached the same
root in every pilot fit with n >= 4000, and differed only in the runaway fits
at n = 500).

Theory (by quadrature, :func:`simstudy.checks.fisher.asymptotic_theory`)
-------------------------------------------------------------------------
r = rank of I = E[s s^T] at the truth (relative eigenvalue tolerance ``rtol``),
the KL constants lim n E[KL]: r/2 for the likelihood equations and
(1/2) tr(I A^+ B A^+) for q2 (ID), with I replaced by the OOS information for
OOS KL, and the asymptotic variances g^T Sigma g of the functionals.

Decision rules: see the ``*_RULE`` constants (also in each result).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import stats

from .. import metrics, quadrature
from ..dgm import DESIGNS, PerturbedNextToken
from ..engine import Study, StudyResult
from ..fit import default_solver_rule, fit_exact
from . import fisher
from .base import CheckContext, CheckResult, register

METHODS = {"ps-exact": "likelihood", "q2": "brier"}  # method label -> objective of the exact solver
THEORY_LABEL = {"ps-exact": "r/2", "q2": "sandwich"}
DGM_KEYS = ("vocab_size", "prefix_len", "embed_dim", "latent_dim", "teacher", "hidden", "entropy", "s_max", "sigma",
            "direction", "observations", "continuation", "seed")
_CTOR_DEFAULTS = dict(vocab_size=41, prefix_len=2, embed_dim=3, latent_dim=1, teacher="mlp", hidden=16, entropy=2.0,
                      s_max=0.5, sigma=0.6, direction="random", observations=1, continuation="iid", seed=0)
TRAINABLE = ("head+perturbation", "all")
INITS = ("truth", "random")
CONVERGED_GRAD_NORM = 1e-5  # a fit whose final gradient norm is above this stopped on a ridge (runaway)
_VERSION = 1  # bump when the analysis changes what a stored row means

CONSISTENCY_CLAIM = ("ID and OOS KL(m* || m-hat) of the root of each consistent estimating equation (ps-exact: the "
                     "likelihood equations; q2: the Brier equations) fall as n grows (DESIGN §6.2).")
CONSISTENCY_RULE = ("For each equation and region (ID, OOS): (a) the WLS slope of log mean KL on log n over every n "
                    "with a finite mean (weights from replicate-level MCSEs; StudyResult.rate) has its 95% upper "
                    "limit below 0, and (b) the mean KL at the largest n is below the mean at the smallest n by more "
                    "than 2 standard errors of the difference (independent replicates: sqrt(MCSE_1^2 + MCSE_2^2); "
                    "an infinite mean at the smallest n, a fit giving zero mass to a possible token, counts as "
                    "above). Pass when (a) and (b) hold for both equations and both regions.")
RATES_CLAIM = ("For a well-specified parametric student, E[KL] falls as n^-1 and n E[KL_ID] tends to r/2 for the "
               "likelihood equations (r = rank of the Fisher information) and to the sandwich constant "
               "(1/2) tr(I A^+ B A^+) for q2 (DESIGN §6.3).")
RATES_RULE = ("Per equation: (a) the 95% interval of the WLS slope of log mean ID KL on log n, over n >= rate_n_min, "
              "contains -1; (b) the asymptotic regime starts inside the grid: n0, the smallest n such that the "
              "constants C_n' = n' mean KL_ID at every n' >= n are jointly consistent with theory (sum of "
              "((C_n' - theory) / MCSE_n')^2 at most the 0.95 quantile of chi-square with as many degrees of freedom "
              "as levels), exists and is below the largest n (at least two levels in the regime). Pass when (a) "
              "and (b) hold for both equations. Reported: each n's 2-MCSE flag, the slope over n >= n0, OOS slopes "
              "and constants.")
INFERENCE_CLAIM = ("Wald intervals m-hat(y0|x0) +- 1.96 SE, SE from the empirical sandwich A^+ B A^+ of the estimating "
                   "equation at the root (pseudo-inverse on the identifiable subspace) by the delta method, cover "
                   "identifiable functionals m(y0 | x0), in and out of support, at 95% (DESIGN §6.4).")
INFERENCE_RULE = ("Per equation, over the n >= inference_n_min: (a) the coverage pooled over functionals and n, "
                  "with a fit as the cluster (MCSE = SD of the fits' mean covered indicators / sqrt(fits), floored at "
                  "sqrt(0.95 x 0.05 / (fits x functionals))), is within "
                  "2 MCSE of 0.95; (b) every (functional, n) cell's coverage is within z MCSE of 0.95, MCSE = "
                  "sqrt(0.95 x 0.05 / R) at the nominal level and z the Bonferroni quantile 1 - 0.05 / (2k) over "
                  "the k cells judged. Pass when (a) and (b) hold for both equations. Reported per cell: coverage, "
                  "MCSE and the 2-MCSE flag |coverage - 0.95| <= 2 MCSE of DESIGN §6.4.")
EFFICIENCY_CLAIM = ("The likelihood root (ps-exact) attains the Cramer-Rao limit, n E[KL_ID] -> r/2, and q2 is less "
                    "efficient: its n E[KL_ID] over ps-exact's tends to the sandwich ratio tr(I A^+ B A^+) / r "
                    "(DESIGN §6.5).")
EFFICIENCY_RULE = ("At the largest n: (a) ps-exact's n mean KL_ID / (r/2) is within 2 MCSE of 1; (b) the paired ratio "
                   "of mean ID KL, q2 over ps-exact (same data in each replicate; delta-method MCSE of a ratio of "
                   "means), is within 2 MCSE of the theoretical ratio. Pass when both hold. Reported at every n: both "
                   "ratios, and n Var of each functional's estimate over replicates against its asymptotic variance "
                   "g^T Sigma g (ratio with MCSE ratio x sqrt(2 / (R - 1))).")


# ================================================================================================
# Settings (one study for the four checks)
# ================================================================================================
@dataclass(frozen=True)
class AsymptoticSettings:
    """Everything that determines the shared study's rows (its repr enters the config hash)."""

    design: str
    dgm: tuple  # sorted (key, value) pairs: PerturbedNextToken keyword arguments
    trainable: str
    init: str
    n_grid: tuple
    replicates: int
    study_seed: int
    max_iter: int
    version: int = _VERSION

    def dgm_options(self) -> dict:
        return dict(self.dgm)


def _list(value) -> list:
    return [v for v in (value.split(",") if isinstance(value, str) else value) if v != ""]


def asymptotic_settings(context: CheckContext) -> AsymptoticSettings:
    """Read the shared study's parameters from ``context`` (the same keys in all four checks)."""
    design = context.param("design", "five-token")
    if design not in DESIGNS:
        raise ValueError(f"--set design={design!r} is unknown; allowed: {', '.join(DESIGNS)}")
    base = {**_CTOR_DEFAULTS, **{k: v for k, v in DESIGNS[design].items() if k != "n"}}
    options = {key: context.param(key, base[key]) for key in DGM_KEYS}
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
    n_grid = tuple(sorted({int(n) for n in _list(context.param(
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


# ================================================================================================
# Model pieces
# ================================================================================================
_DGMS: dict = {}


def make_dgm(settings: AsymptoticSettings) -> PerturbedNextToken:
    """The design's DGM (built once per process)."""
    key = (settings.design, settings.dgm)
    if key not in _DGMS:
        if len(_DGMS) > 4:
            _DGMS.clear()
        _DGMS[key] = PerturbedNextToken(**settings.dgm_options(), name=settings.design)
    return _DGMS[key]


def make_student(dgm: PerturbedNextToken, *, trainable: str = "head+perturbation", init: str = "truth",
                 seed: int = 0):
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


def select_functionals(dgm: PerturbedNextToken) -> list[Functional]:
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


_THEORY: dict = {}


def theory_for(settings: AsymptoticSettings) -> tuple[fisher.AsymptoticTheory, np.ndarray]:
    """The asymptotic theory of the settings' student at the truth (cached) and the
    functionals' gradients ``(K, P)`` at the truth."""
    key = (settings.design, settings.dgm, settings.trainable)
    if key not in _THEORY:
        dgm = make_dgm(settings)
        student = make_student(dgm, trainable=settings.trainable, init="truth")
        theory = fisher.asymptotic_theory(student, dgm.prefixes("in"), dgm.prefixes("oos"),
                                          observations=dgm.observations)
        funcs = select_functionals(dgm)
        _, grads = fisher.marginal_gradient(student, torch.tensor([f.x0 for f in funcs]),
                                            torch.tensor([f.y0 for f in funcs]))
        _THEORY[key] = (theory, grads.numpy())
    return _THEORY[key]


# ================================================================================================
# The study
# ================================================================================================
def _generate(cond: dict, rng: np.random.Generator, *, settings: AsymptoticSettings) -> dict:
    dgm = make_dgm(settings)
    data = dgm.sample(int(cond["n"]), rng)
    x, y = data.tensors()
    return {"x": x, "y": y, "student_seed": int(rng.integers(2**31 - 1))}


def _solver_rule(latent_dim: int, refinements: int) -> quadrature.Rule:
    rule = default_solver_rule(latent_dim)
    for _ in range(int(refinements)):
        rule = quadrature.refined(rule)
    return rule


def _analyse(data: dict, cond: dict, *, method: str, settings: AsymptoticSettings) -> dict:
    """Fit one equation's root exactly and measure it (one row of the shared study)."""
    dgm = make_dgm(settings)
    x, y = data["x"], data["y"]
    n = int(x.shape[0])
    student = make_student(dgm, trainable=settings.trainable, init=settings.init, seed=data["student_seed"])
    fit = fit_exact(student, x, y, objective=METHODS[method], max_iter=settings.max_iter)
    prefixes = dgm.prefixes("all")
    distance = dgm.distance(prefixes)
    evaluation = metrics.evaluate_marginals(student, prefixes=prefixes, truth=dgm.exact_marginal(prefixes),
                                            distance=distance, in_support=distance == 0)
    out = {k: v for k, v in evaluation.metrics().items() if k in ("kl_id", "kl_oos", "tv_id", "tv_oos")}
    # functionals and their sandwich standard errors (DESIGN §6.4)
    rule = _solver_rule(dgm.latent_dim, fit.stats.get("refinements", 0))
    funcs = select_functionals(dgm)
    estimates, grads = fisher.marginal_gradient(student, torch.tensor([f.x0 for f in funcs]),
                                                torch.tensor([f.y0 for f in funcs]), rule)
    sigma = fisher.empirical_sandwich(student, x, y, METHODS[method], rule)  # (P, P); covariance sigma / n
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
    return {f.name: f.truth for f in select_functionals(make_dgm(settings))}


def build_study(settings: AsymptoticSettings) -> Study:
    """The shared study: n grid x {ps-exact, q2} exact roots x replicates."""
    analyse = {m: functools.partial(_analyse, method=m, settings=settings) for m in METHODS}
    return Study(design={"n": list(settings.n_grid)}, generate=functools.partial(_generate, settings=settings),
                 analyse=analyse, truth=functools.partial(_truth, settings=settings),
                 replicates=settings.replicates, seed=settings.study_seed, name="asymptotics",
                 options={"description": "exact roots of the likelihood and Brier equations (DESIGN §6.2-§6.5)"})


_RESULTS: dict = {}


def run_shared_study(context: CheckContext) -> tuple[AsymptoticSettings, StudyResult]:
    """Run (or resume, or reuse) the shared study; stored under ``OUT/studies/asymptotics-<hash>``."""
    settings = asymptotic_settings(context)
    study = build_study(settings)
    store = Path(context.out) / "studies" / f"asymptotics-{study.config_hash[:12]}"
    key = str(store.resolve())
    if key not in _RESULTS or not _RESULTS[key].complete:
        _RESULTS[key] = study.run(n_jobs=context.n_jobs, store=store, progress=False)
    return settings, context.record(_RESULTS[key])


# ================================================================================================
# Statistics
# ================================================================================================
def _ok(result: StudyResult) -> pd.DataFrame:
    return result.table[result.table["status"] == "ok"]


def mean_table(result: StudyResult, metric: str) -> pd.DataFrame:
    """Per method and n: mean of ``metric`` with MCSE, replicates used, infinite values, failures."""
    rows = []
    table = result.table
    for (method, n), g in table.groupby(["method", "n"], sort=True):
        ok = g[g["status"] == "ok"]
        v = ok[metric].to_numpy(np.float64) if metric in ok else np.array([])
        finite = np.isfinite(v)
        mean = float(v.mean()) if v.size and finite.all() else (math.inf if v.size else math.nan)
        mcse = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 and finite.all() else math.nan
        rows.append({"method": method, "n": int(n), "mean": mean, "mcse": mcse, "replicates": int(v.size),
                     "infinite": int((~finite).sum()), "failures": int((g["status"] != "ok").sum()),
                     "converged": float(ok["fit_converged"].mean()) if "fit_converged" in ok and len(ok) else math.nan})
    return pd.DataFrame(rows)


def _subset(result: StudyResult, mask) -> StudyResult:
    return StudyResult(result.table[mask].reset_index(drop=True), manifest=result.manifest)


def asymptotic_start(n: np.ndarray, constant: np.ndarray, mcse: np.ndarray, theory: float,
                     level: float = 0.95) -> float:
    """The smallest n from which the constants at every larger n are jointly consistent with
    ``theory``: sum z^2 <= chi2_{level}(k) over the k levels >= n (nan when none)."""
    order = np.argsort(n)
    n, constant, mcse = np.asarray(n)[order], np.asarray(constant)[order], np.asarray(mcse)[order]
    start = math.nan
    for i in range(len(n) - 1, -1, -1):
        z = (constant[i:] - theory) / mcse[i:]
        if not np.all(np.isfinite(z)) or float(np.sum(z ** 2)) > stats.chi2.ppf(level, len(z)):
            break
        start = float(n[i])
    return start


def paired_ratio(numerator, denominator) -> tuple[float, float]:
    """mean(a) / mean(b) over paired replicates with its delta-method MCSE."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    k = a.size
    if k < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan, math.nan
    ma, mb = a.mean(), b.mean()
    ratio = ma / mb
    cov = np.cov(a, b, ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[1, 1]) / (k * mb ** 2)
    return float(ratio), float(math.sqrt(max(var, 0.0)))


def _paired(result: StudyResult, metric: str, n: int, a: str = "q2", b: str = "ps-exact") -> tuple[np.ndarray, ...]:
    ok = _ok(result)
    ok = ok[ok["n"] == n]
    wide = ok.pivot(index="replicate", columns="method", values=metric).dropna()
    if a not in wide or b not in wide:
        return np.array([]), np.array([])
    return wide[a].to_numpy(np.float64), wide[b].to_numpy(np.float64)


def _settings_dict(settings: AsymptoticSettings, theory: fisher.AsymptoticTheory, context: CheckContext) -> dict:
    d = asdict(settings)
    d["dgm"] = settings.dgm_options()
    d["n_grid"] = list(settings.n_grid)
    d.update(num_parameters=theory.num_parameters, fisher_rank=theory.rank, n_jobs=context.n_jobs,
             solver="fit_exact (L-BFGS, quadrature over z)")
    return d


def _fmt(x: float, digits: int = 3) -> str:
    return "inf" if x == math.inf else "nan" if not np.isfinite(x) else f"{x:.{digits}g}"


# ================================================================================================
# Figures
# ================================================================================================
def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=120)
    return str(path)


def _constant_plot(points: pd.DataFrame, theory: dict, path: Path, title: str, starts: dict) -> str:
    """n E[KL] against n per method with 2-MCSE bars and the theory lines (r/2, sandwich)."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    colors = {"ps-exact": "#1f77b4", "q2": "#ff7f0e"}
    for method, p in points.groupby("method", sort=False):
        p = p.sort_values("n")
        finite = np.isfinite(p["constant"].to_numpy(float))
        ax.errorbar(p["n"][finite], p["constant"][finite], yerr=2 * p["constant_mcse"][finite], fmt="o-",
                    capsize=3, ms=4, color=colors.get(method),
                    label=f"{method}: n mean KL (+-2 MCSE){_infinite_note(p, 'constant')}")
        ax.axhline(theory[method], color=colors.get(method), ls="--", lw=1,
                   label=f"{method} theory {THEORY_LABEL[method]} = {theory[method]:.3g}")
        if np.isfinite(starts.get(method, math.nan)):
            ax.axvline(starts[method], color=colors.get(method), ls=":", lw=1,
                       label=f"{method}: asymptotic from n = {int(starts[method])}")
    ax.set_xscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("n E[KL]")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


def _infinite_note(p: pd.DataFrame, column: str) -> str:
    bad = p.loc[~np.isfinite(p[column].to_numpy(float)), "n"]
    return f"; infinite mean at n = {', '.join(str(int(n)) for n in bad)}" if len(bad) else ""


def _rate_theory_plot(points: pd.DataFrame, fits: pd.DataFrame, theory: dict | None, n_min: float, path: Path,
                      title: str) -> str:
    """Log-log mean KL against n per method: +-2 MCSE bars, the WLS line over n >= n_min and
    (with ``theory``) the theory line theory_constant / n. Levels with an infinite mean (a fit
    giving zero mass to a possible token) are named in the legend."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    colors = {"ps-exact": "#1f77b4", "q2": "#ff7f0e"}
    for method, p in points.groupby("method", sort=False):
        p = p.sort_values("n")
        note = _infinite_note(p, "mean")
        p = p[np.isfinite(p["mean"].to_numpy(float))]
        color = colors.get(method)
        mean, mcse = p["mean"].to_numpy(float), p["mcse"].to_numpy(float)
        lower = np.minimum(2 * mcse, 0.9 * mean)  # keep the bars on the log axis
        ax.errorbar(p["n"], mean, yerr=[lower, 2 * mcse], fmt="o", capsize=3, ms=4, color=color)
        if not len(p):
            continue
        fit = fits[fits["method"] == method].iloc[0]
        g = np.geomspace(max(p["n"].min(), n_min), p["n"].max(), 50)
        if np.isfinite(fit["slope"]):
            ax.plot(g, fit["constant"] * g ** fit["slope"], "-", color=color,
                    label=f"{method}: WLS slope {fit['slope']:.3f} [{fit['slope_low']:.3f}, {fit['slope_high']:.3f}]"
                    + note)
        if theory is not None:
            grid = np.geomspace(p["n"].min(), p["n"].max(), 50)
            ax.plot(grid, theory[method] / grid, "--", color=color, lw=1,
                    label=f"{method}: theory {THEORY_LABEL[method]} / n = {theory[method]:.3g} / n")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("mean KL")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


def _coverage_plot(cells: pd.DataFrame, path: Path, n_min: int) -> str:
    methods = list(dict.fromkeys(cells["method"]))
    fig = Figure(figsize=(6.4 * len(methods), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True))
    for ax, method in zip(axes, methods):
        c = cells[cells["method"] == method]
        funcs = list(dict.fromkeys(c["functional"]))
        for j, f in enumerate(funcs):
            cf = c[c["functional"] == f].sort_values("n")
            shift = 1.0 + 0.04 * (j - (len(funcs) - 1) / 2)
            ax.errorbar(cf["n"] * shift, cf["coverage"], yerr=2 * cf["mcse"], fmt="o-", capsize=3, ms=4, label=f)
        ns = np.sort(c["n"].unique())
        mc = np.sqrt(0.95 * 0.05 / c["replicates"].max())
        ax.axhline(0.95, color="black", lw=0.8)
        ax.fill_between([ns.min() * 0.8, ns.max() * 1.25], 0.95 - 2 * mc, 0.95 + 2 * mc, color="grey", alpha=0.2,
                        label="0.95 +- 2 MCSE (nominal)")
        ax.axvline(n_min * 0.97, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("n")
        ax.set_title(f"{method}: coverage of 95% sandwich Wald intervals (bars: +-2 MCSE)", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("coverage")
    return _save(fig, path)


def _efficiency_plot(frame: pd.DataFrame, theory_ratio: float, path: Path) -> str:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    f = frame.sort_values("n")
    ax.errorbar(f["n"], f["ps_ratio_to_cr"], yerr=2 * f["ps_ratio_to_cr_mcse"], fmt="o-", capsize=3, ms=4,
                label="ps-exact: n E[KL] / (r/2)")
    ax.errorbar(f["n"] * 1.04, f["q2_over_ps"], yerr=2 * f["q2_over_ps_mcse"], fmt="s-", capsize=3, ms=4,
                label="q2 / ps-exact: paired ratio of E[KL]")
    ax.axhline(1.0, color="#1f77b4", ls="--", lw=1, label="Cramer-Rao limit (1)")
    ax.axhline(theory_ratio, color="#ff7f0e", ls="--", lw=1, label=f"sandwich theory ratio {theory_ratio:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("ratio (ID KL)")
    ax.set_title("Efficiency (bars: +-2 MCSE)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


# ================================================================================================
# Check 2: consistency
# ================================================================================================
@register("consistency", CONSISTENCY_CLAIM)
def run_consistency(context: CheckContext) -> CheckResult:
    """DESIGN §6.2: ID and OOS KL of the exact roots fall with n (rule: CONSISTENCY_RULE)."""
    name = "consistency"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    folder = context.folder(name)
    rows, statistics, figures, problems = [], {}, [], []
    for metric, region in (("kl_id", "ID"), ("kl_oos", "OOS")):
        means = mean_table(result, metric)
        rate = result.rate(metric, x="n", by=["method"])
        figures.append(_rate_theory_plot(means, rate.fits, None, 0, folder / f"{metric}_rate.png",
                                         f"{region} KL of the exact roots: WLS over the finite levels (bars +-2 MCSE)"))
        for method in METHODS:
            m = means[means["method"] == method].sort_values("n")
            fit = rate.fits[rate.fits["method"] == method].iloc[0]
            first, last = m.iloc[0], m.iloc[-1]
            if math.isinf(first["mean"]) and np.isfinite(last["mean"]):
                diff, diff_se, fell = -math.inf, math.nan, True
            else:
                diff = float(last["mean"] - first["mean"])
                diff_se = float(math.hypot(first["mcse"], last["mcse"]))
                fell = bool(np.isfinite(diff) and diff < -2 * diff_se)
            slope_ok = bool(np.isfinite(fit["slope_high"]) and fit["slope_high"] < 0)
            holds = slope_ok and fell
            if not holds:
                problems.append(f"{method} {region}: slope upper {_fmt(fit['slope_high'])}, "
                                f"difference {_fmt(diff)} +- {_fmt(diff_se)}")
            rows.append({"method": method, "region": region, "slope": fit["slope"], "slope_se": fit["slope_se"],
                         "slope_low": fit["slope_low"], "slope_high": fit["slope_high"], "levels": int(fit["k"]),
                         "n_small": int(first["n"]), "kl_small": first["mean"], "kl_small_mcse": first["mcse"],
                         "n_large": int(last["n"]), "kl_large": last["mean"], "kl_large_mcse": last["mcse"],
                         "difference": diff, "difference_se": diff_se, "slope_below_0": slope_ok, "fell": fell,
                         "holds": holds})
            statistics[f"{method}/{region}"] = {
                "slope": {"estimate": fit["slope"], "se": fit["slope_se"],
                          "ci95": [fit["slope_low"], fit["slope_high"]]},
                "mean_kl_by_n": {int(r.n): {"estimate": r.mean, "mcse": r.mcse, "infinite": r.infinite,
                                            "converged_fraction": r.converged} for r in m.itertuples()},
                "difference_largest_minus_smallest": {"estimate": diff, "se": diff_se}, "holds": holds}
    verdicts = pd.DataFrame(rows)
    means = pd.concat([mean_table(result, mt).assign(metric=mt) for mt in ("kl_id", "kl_oos")], ignore_index=True)
    decision = "pass" if verdicts["holds"].all() else "fail"
    statistics.update(failures=int((result.table["status"] != "ok").sum()), fisher_rank=theory.rank,
                      problems=problems)
    parts = [f"{r.method} {r.region} slope {_fmt(r.slope)} [{_fmt(r.slope_low)}, {_fmt(r.slope_high)}], "
             f"KL {_fmt(r.kl_small)}->{_fmt(r.kl_large)}" for r in verdicts.itertuples()]
    summary = f"n {settings.n_grid[0]}..{settings.n_grid[-1]}, R={settings.replicates}: " + "; ".join(parts)
    return CheckResult(name=name, claim=CONSISTENCY_CLAIM, decision_rule=CONSISTENCY_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"verdicts": verdicts, "mean_kl": means,
                                                                        "replicates": result.table},
                       figures=figures, settings=_settings_dict(settings, theory, context))


# ================================================================================================
# Check 3: rates
# ================================================================================================
def _theory_constants(theory: fisher.AsymptoticTheory, region: str = "id") -> dict:
    return {m: theory.constants[obj][region] for m, obj in METHODS.items()}


def _slope_over(result: StudyResult, metric: str, method: str, n_from: float) -> dict:
    """The WLS slope of one method over n >= n_from (nan when fewer than two finite levels)."""
    empty = {"slope": math.nan, "slope_se": math.nan, "slope_low": math.nan, "slope_high": math.nan}
    if not np.isfinite(n_from):
        return empty
    sub = _subset(result, (result.table["n"] >= n_from) & (result.table["method"] == method))
    if sub.table["n"].nunique() < 2:
        return empty
    fit = sub.rate(metric, x="n", by=["method"], theory_slope=-1.0).fits.iloc[0]
    return {k: float(fit[k]) for k in empty}


@register("rates", RATES_CLAIM)
def run_rates(context: CheckContext) -> CheckResult:
    """DESIGN §6.3: slope -1 and the constants r/2 and sandwich (rule: RATES_RULE)."""
    name = "rates"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    n_min = context.param("rate_n_min", settings.n_grid[0], 4000)
    folder = context.folder(name)
    upper = _subset(result, result.table["n"] >= n_min)
    if upper.table["n"].nunique() < 2:
        raise ValueError(f"--set rate_n_min={n_min} is invalid; allowed: at most the second-largest n "
                         f"({sorted(settings.n_grid)[-2]})")
    consts_id, consts_oos = _theory_constants(theory, "id"), _theory_constants(theory, "oos")
    statistics = {"theory": theory.statistics(), "rate_n_min": n_min}
    rows, points_all, problems, starts = [], [], [], {}
    figures = []
    for metric, consts in (("kl_id", consts_id), ("kl_oos", consts_oos)):
        rate = upper.rate(metric, x="n", by=["method"], theory_slope=-1.0)
        full = result.rate(metric, x="n", by=["method"], theory_slope=-1.0)
        region = "ID" if metric == "kl_id" else "OOS"
        figures.append(_rate_theory_plot(full.points, rate.fits, consts, n_min, folder / f"{metric}_rate.png",
                                         f"{region} KL of the exact roots: WLS over n >= {n_min}, theory C/n "
                                         f"(bars +-2 MCSE)"))
        for method in METHODS:
            fit = rate.fits[rate.fits["method"] == method].iloc[0]
            fit_all = full.fits[full.fits["method"] == method].iloc[0]
            pts = full.points[full.points["method"] == method].copy()
            pts["theory"] = consts[method]
            pts["z"] = (pts["constant"] - consts[method]) / pts["constant_mcse"]
            pts["within_2_mcse"] = pts["z"].abs() <= 2
            pts["metric"] = metric
            start = asymptotic_start(pts["n"].to_numpy(float), pts["constant"].to_numpy(float),
                                     pts["constant_mcse"].to_numpy(float), consts[method])
            slope_ok = bool(fit["slope_low"] <= -1.0 <= fit["slope_high"])
            start_ok = bool(np.isfinite(start) and start < max(settings.n_grid))
            from_start = _slope_over(result, metric, method, start)  # reported: the slope inside the regime
            judged = metric == "kl_id"
            if judged:
                starts[method] = start
                if not (slope_ok and start_ok):
                    problems.append(f"{method}: slope {_fmt(fit['slope'])} [{_fmt(fit['slope_low'])}, "
                                    f"{_fmt(fit['slope_high'])}], asymptotic start {_fmt(start)}")
            last = pts.sort_values("n").iloc[-1]
            rows.append({"method": method, "metric": metric, "judged": judged, "slope": fit["slope"],
                         "slope_se": fit["slope_se"], "slope_low": fit["slope_low"], "slope_high": fit["slope_high"],
                         "slope_contains_-1": slope_ok, "lack_of_fit_p": fit["lack_of_fit_p"],
                         "slope_all_n": fit_all["slope"], "slope_all_n_low": fit_all["slope_low"],
                         "slope_all_n_high": fit_all["slope_high"], "theory_constant": consts[method],
                         "constant_at_n_max": last["constant"], "constant_at_n_max_mcse": last["constant_mcse"],
                         "asymptotic_start": start, "start_inside_grid": start_ok,
                         "slope_from_start": from_start["slope"], "slope_from_start_low": from_start["slope_low"],
                         "slope_from_start_high": from_start["slope_high"],
                         "holds": (slope_ok and start_ok) if judged else np.nan})
            statistics[f"{method}/{metric}"] = {
                "slope": {"estimate": fit["slope"], "se": fit["slope_se"],
                          "ci95": [fit["slope_low"], fit["slope_high"]], "n_min": n_min},
                "slope_all_n": {"estimate": fit_all["slope"], "se": fit_all["slope_se"],
                                "ci95": [fit_all["slope_low"], fit_all["slope_high"]]},
                "slope_from_asymptotic_start": {"estimate": from_start["slope"], "se": from_start["slope_se"],
                                                "ci95": [from_start["slope_low"], from_start["slope_high"]]},
                "theory_constant": consts[method],
                "constant_by_n": {int(p.n): {"estimate": p.constant, "mcse": p.constant_mcse,
                                             "within_2_mcse": bool(p.within_2_mcse)} for p in pts.itertuples()},
                "asymptotic_start": start}
            points_all.append(pts)
    points = pd.concat(points_all, ignore_index=True)
    figures.append(_constant_plot(points[points["metric"] == "kl_id"], consts_id, folder / "constant_id.png",
                                  "n E[KL_ID] with the theory lines r/2 (ps-exact) and sandwich (q2)", starts))
    figures.append(_constant_plot(points[points["metric"] == "kl_oos"], consts_oos, folder / "constant_oos.png",
                                  "n E[KL_OOS] against its theory (reported, not judged)", {}))
    verdicts = pd.DataFrame(rows)
    statistics["problems"] = problems
    decision = "pass" if verdicts.loc[verdicts["judged"], "holds"].astype(bool).all() else "fail"
    ids = verdicts[verdicts["judged"]]
    summary = (f"r = {theory.rank}; " + "; ".join(
        f"{r.method}: slope {_fmt(r.slope)} [{_fmt(r.slope_low)}, {_fmt(r.slope_high)}], n E[KL] at "
        f"n={max(settings.n_grid)} {_fmt(r.constant_at_n_max, 4)} +- {_fmt(r.constant_at_n_max_mcse, 2)} vs "
        f"{_fmt(r.theory_constant, 4)}, asymptotic from n={_fmt(r.asymptotic_start)}" for r in ids.itertuples()))
    return CheckResult(name=name, claim=RATES_CLAIM, decision_rule=RATES_RULE, decision=decision,
                       statistics=statistics, summary=summary,
                       tables={"verdicts": verdicts, "constants": points,
                               "eigenvalues": pd.DataFrame({"eigenvalue": theory.subspace.eigenvalues,
                                                            "kept": np.arange(theory.num_parameters) < theory.rank})},
                       figures=figures, settings=_settings_dict(settings, theory, context) | {"rate_n_min": n_min})


# ================================================================================================
# Check 4: inference
# ================================================================================================
def coverage_cells(result: StudyResult, functionals: list[Functional], level: float = 0.95) -> pd.DataFrame:
    """Coverage of each (method, functional, n) with MCSEs (estimated and nominal)."""
    ok = _ok(result)
    rows = []
    for (method, n), g in ok.groupby(["method", "n"], sort=True):
        for f in functionals:
            covered = ((g[f"{f.name}_ci_low"] <= f.truth) & (f.truth <= g[f"{f.name}_ci_high"])).to_numpy(float)
            R = covered.size
            cov = float(covered.mean())
            est = g[f.name].to_numpy(float)
            se = g[f"{f.name}_se"].to_numpy(float)
            rows.append({"method": method, "functional": f.name, "region": f.region, "x0": str(f.x0), "y0": f.y0,
                         "n": int(n), "replicates": R, "coverage": cov, "mcse": math.sqrt(cov * (1 - cov) / R),
                         "mcse_nominal": math.sqrt(level * (1 - level) / R),
                         "within_2_mcse": abs(cov - level) <= 2 * math.sqrt(level * (1 - level) / R),
                         "bias": float(est.mean() - f.truth), "empse": float(est.std(ddof=1)),
                         "modse": float(np.sqrt(np.mean(se ** 2)))})
    return pd.DataFrame(rows)


@register("inference", INFERENCE_CLAIM)
def run_inference(context: CheckContext) -> CheckResult:
    """DESIGN §6.4: coverage of sandwich Wald intervals (rule: INFERENCE_RULE)."""
    name = "inference"
    settings, result = run_shared_study(context)
    theory, _ = theory_for(settings)
    n_min = context.param("inference_n_min", settings.n_grid[0], 4000)
    level = 0.95
    dgm = make_dgm(settings)
    funcs = select_functionals(dgm)
    cells = coverage_cells(result, funcs, level)
    judged = cells[cells["n"] >= n_min]
    if judged.empty:
        raise ValueError(f"--set inference_n_min={n_min} is invalid; allowed: at most the largest n "
                         f"({max(settings.n_grid)})")
    k = int(len(judged) / judged["method"].nunique())
    z_bonf = float(stats.norm.ppf(1 - 0.05 / (2 * k)))
    cells["judged"] = cells["n"] >= n_min
    cells["within_bonferroni"] = (cells["coverage"] - level).abs() <= z_bonf * cells["mcse_nominal"]
    ok = _ok(result)
    statistics: dict = {"functionals": [asdict(f) for f in funcs], "inference_n_min": n_min,
                        "bonferroni_z": z_bonf, "cells_per_equation": k}
    rows, problems = [], []
    for method in METHODS:
        fits = ok[(ok["method"] == method) & (ok["n"] >= n_min)]
        per_fit = np.mean([((fits[f"{f.name}_ci_low"] <= f.truth) & (f.truth <= fits[f"{f.name}_ci_high"]))
                           .to_numpy(float) for f in funcs], axis=0)
        pooled = float(per_fit.mean())
        # a fit is the cluster; the floor (independent indicators at the nominal level) keeps a sample
        # in which every interval covers from having MCSE 0
        pooled_mcse = max(float(per_fit.std(ddof=1) / math.sqrt(per_fit.size)),
                          math.sqrt(level * (1 - level) / (per_fit.size * len(funcs))))
        pooled_ok = abs(pooled - level) <= 2 * pooled_mcse
        c = cells[(cells["method"] == method) & cells["judged"]]
        cells_ok = bool(c["within_bonferroni"].all())
        holds = pooled_ok and cells_ok
        if not holds:
            bad = c[~c["within_bonferroni"]]
            problems.append(f"{method}: pooled {pooled:.3f} +- {pooled_mcse:.3f}; cells outside: "
                            + ", ".join(f"{r.functional}@{r.n}={r.coverage:.2f}" for r in bad.itertuples()))
        rows.append({"method": method, "pooled_coverage": pooled, "pooled_mcse": pooled_mcse, "fits": int(per_fit.size),
                     "pooled_within_2_mcse": pooled_ok, "cells_within_bonferroni": cells_ok,
                     "cells_within_2_mcse": int(c["within_2_mcse"].sum()), "cells": int(len(c)), "holds": holds})
        statistics[method] = {
            "pooled_coverage": {"estimate": pooled, "mcse": pooled_mcse},
            "cells": {f"{r.functional}@n={r.n}": {"coverage": r.coverage, "mcse": r.mcse,
                                                  "within_2_mcse": bool(r.within_2_mcse)}
                      for r in cells[cells["method"] == method].itertuples()}, "holds": holds}
    verdicts = pd.DataFrame(rows)
    statistics["problems"] = problems
    decision = "pass" if verdicts["holds"].all() else "fail"
    figures = [_coverage_plot(cells, context.folder(name) / "coverage.png", n_min)]
    summary = f"n >= {n_min}, R={settings.replicates}: " + "; ".join(
        f"{r.method} pooled coverage {r.pooled_coverage:.3f} +- {r.pooled_mcse:.3f}, {r.cells_within_2_mcse}/{r.cells} "
        f"cells within 2 MCSE" for r in verdicts.itertuples())
    return CheckResult(name=name, claim=INFERENCE_CLAIM, decision_rule=INFERENCE_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"verdicts": verdicts, "coverage": cells},
                       figures=figures,
                       settings=_settings_dict(settings, theory, context) | {"inference_n_min": n_min})


# ================================================================================================
# Check 5: efficiency
# ================================================================================================
@register("efficiency", EFFICIENCY_CLAIM)
def run_efficiency(context: CheckContext) -> CheckResult:
    """DESIGN §6.5: ps-exact at the Cramer-Rao limit, q2 against ps-exact (rule: EFFICIENCY_RULE)."""
    name = "efficiency"
    settings, result = run_shared_study(context)
    theory, grads = theory_for(settings)
    funcs = select_functionals(make_dgm(settings))
    cr = theory.constants["likelihood"]["id"]
    ratio_theory = theory.efficiency_ratio("id")
    ok = _ok(result)
    rows, var_rows = [], []
    for n in settings.n_grid:
        q2, ps = _paired(result, "kl_id", n)
        ps_all = ok[(ok["method"] == "ps-exact") & (ok["n"] == n)]["kl_id"].to_numpy(float)
        finite = np.isfinite(ps_all)
        ps_ratio = float(n * ps_all.mean() / cr) if ps_all.size and finite.all() else math.inf
        ps_ratio_mcse = float(n * ps_all.std(ddof=1) / math.sqrt(ps_all.size) / cr) if finite.all() and \
            ps_all.size > 1 else math.nan
        ratio, ratio_mcse = paired_ratio(q2, ps)
        rows.append({"n": int(n), "ps_ratio_to_cr": ps_ratio, "ps_ratio_to_cr_mcse": ps_ratio_mcse,
                     "q2_over_ps": ratio, "q2_over_ps_mcse": ratio_mcse, "pairs": int(q2.size),
                     "theory_ratio": ratio_theory})
        for method, obj in METHODS.items():
            g = ok[(ok["method"] == method) & (ok["n"] == n)]
            avar = theory.functional_variance(grads, obj)
            for f, v in zip(funcs, avar):
                est = g[f.name].to_numpy(float)
                R = est.size
                r = float(n * est.var(ddof=1) / v) if R > 1 else math.nan
                var_rows.append({"method": method, "functional": f.name, "region": f.region, "n": int(n),
                                 "n_var": float(n * est.var(ddof=1)) if R > 1 else math.nan, "asymptotic_var": float(v),
                                 "ratio": r, "ratio_mcse": r * math.sqrt(2 / (R - 1)) if R > 1 else math.nan})
    frame = pd.DataFrame(rows)
    variances = pd.DataFrame(var_rows)
    last = frame.sort_values("n").iloc[-1]
    a_ok = bool(abs(last["ps_ratio_to_cr"] - 1) <= 2 * last["ps_ratio_to_cr_mcse"])
    b_ok = bool(abs(last["q2_over_ps"] - ratio_theory) <= 2 * last["q2_over_ps_mcse"])
    decision = "pass" if a_ok and b_ok else "fail"
    statistics = {
        "fisher_rank": theory.rank, "cramer_rao_constant": cr, "theory_ratio_q2_over_ps": ratio_theory,
        "by_n": {int(r.n): {"ps_over_cramer_rao": {"estimate": r.ps_ratio_to_cr, "mcse": r.ps_ratio_to_cr_mcse},
                            "q2_over_ps": {"estimate": r.q2_over_ps, "mcse": r.q2_over_ps_mcse}}
                 for r in frame.itertuples()},
        "at_n_max": {"n": int(last["n"]), "ps_at_cramer_rao": a_ok, "q2_ratio_matches_theory": b_ok},
        "functional_variance_ratios_at_n_max": {
            f"{r.method}/{r.functional}": {"estimate": r.ratio, "mcse": r.ratio_mcse}
            for r in variances[variances["n"] == last["n"]].itertuples()}}
    figures = [_efficiency_plot(frame, ratio_theory, context.folder(name) / "efficiency.png")]
    summary = (f"n={int(last['n'])}: ps-exact n E[KL]/(r/2) = {_fmt(last['ps_ratio_to_cr'], 4)} +- "
               f"{_fmt(last['ps_ratio_to_cr_mcse'], 2)} (r={theory.rank}); q2/ps-exact = {_fmt(last['q2_over_ps'], 4)} "
               f"+- {_fmt(last['q2_over_ps_mcse'], 2)} vs theory {ratio_theory:.4g}")
    return CheckResult(name=name, claim=EFFICIENCY_CLAIM, decision_rule=EFFICIENCY_RULE, decision=decision,
                       statistics=statistics, summary=summary,
                       tables={"ratios": frame, "functional_variances": variances}, figures=figures,
                       settings=_settings_dict(settings, theory, context))
