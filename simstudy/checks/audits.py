"""The gradient-audit study of the ``unbiasedness`` and ``calibration`` checks (DESIGN §6.1; issue 4).

The reference problem
---------------------
Population: every in-support prefix x of the DGM times every continuation y (all
V^c of them), weighted by the truth's exact m*(y | x) / (number of prefixes), so
that at the truth the population score of the likelihood equations is zero. The
student is the teacher itself (well specified). "truth" is the teacher's
parameters; "perturbed" adds ``perturb_scale`` N(0, 1) to every trainable entry
(torch generator seeded ``perturb_seed``) and keeps the truth's weights, so there
the reference gradient is far from zero. The DGM comes from the one DGM cache
(:func:`simstudy.domain.cached_dgm`).

One audit
---------
One audit replicate g_r is one call of ``equation.loss`` on the whole population
with fresh draws (one draw set per datum); an audit is ``num_replicates`` such calls,
decided by :func:`simstudy.equations.gradient_audit` (Hotelling-type statistic on the
identifiable subspace). Beside it, where the exact mean of g is known
(:mod:`simstudy.equations.exact_means`), the bias it should find and the audit's power
against it: unbiased equations 0; aug and is-1 grad [log m - KL(prior, posterior)];
is-K (K > 1) the leading term -grad chi2 / (2K); ps-mh with independence chains the
exact chain on the quadrature grid (q = 1). Equations whose variance is not finite
("spread", sumo) are run in ``sumo_batches`` independent batches and report their spread.

The study
---------
:func:`run_audits` runs audits as an engine study (:class:`simstudy.Study`):
conditions = equation label x point, each replicate one complete audit whose analyse
returns its scalars. With a store folder the rows are kept in
``store/<study>-<config hash[:12]>`` and a rerun resumes (the hash covers the settings
and the source of the functions that compute an audit's row).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import quadrature
from ..dgm import DESIGNS, DGM
from ..domain import cached_dgm
from ..engine import Study
from ..equations import (EQUATIONS, AuditResult, Augmentation, ImportanceSampling, PosteriorMH, gradient_audit,
                         make_equation, parse_label)
from ..equations.exact_means import MAX_CHAIN_NODES, aug_mean, chi2_direction, hotelling_power, mh_chain_mean
from ..validation import check_choice, check_int, check_positive
from .base import CheckContext
from .common import comma_list, dgm_settings, study_store

__all__ = ["POINTS", "AuditSetup", "Problem", "analyse_audit", "audit_points", "audit_setup", "failed_rows",
           "generate_seed", "label_parameter", "perturbed_copy", "population", "problem_description",
           "reference_problem", "run_audit", "run_audits"]

POINTS = ("truth", "perturbed")


# ---- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditSetup:
    """Settings of one audit (hashable; its repr fingerprints the engine study).

    design : reference design of :mod:`simstudy.dgm.designs` (default "five-token").
    dgm : sorted ``(key, value)`` constructor keywords of the DGM (over the design's).
    perturb_scale, perturb_seed : the perturbed point (scale of the N(0, 1) shift).
    num_replicates : R, calls of ``equation.loss`` per audit.
    alpha : level of the audit's verdict.
    rtol : eigenvalue cut of the identifiable subspace (gradient_audit).
    sumo_batches : independent batches of R replicates for sumo's spread.
    max_rows : largest population (prefixes x continuations).
    """

    design: str = "five-token"
    dgm: tuple = ()
    perturb_scale: float = 0.3
    perturb_seed: int = 7
    num_replicates: int = 200
    alpha: float = 0.001
    rtol: float = 1e-8
    sumo_batches: int = 3
    max_rows: int = 200_000

    def __post_init__(self) -> None:
        check_choice("design", self.design, tuple(DESIGNS), word="unknown")
        check_positive("perturb_scale", self.perturb_scale)
        for key, minimum in (("num_replicates", 2), ("sumo_batches", 1), ("max_rows", 1), ("perturb_seed", 0)):
            check_int(key, getattr(self, key), minimum)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha!r} is invalid; allowed: a level in (0, 1)")

    def dgm_options(self) -> dict:
        return dict(self.dgm)


def audit_setup(context: CheckContext) -> AuditSetup:
    """The :class:`AuditSetup` of a check: the design, its DGM keywords (:func:`~.common.dgm_settings`)
    and the audit's own settings, each overridable by ``--set``."""
    design = context.param("design", "five-token")
    dgm = dgm_settings(context, design)
    return AuditSetup(design=design, dgm=tuple(sorted(dgm.items())),
                      perturb_scale=context.param("perturb_scale", 0.3),
                      perturb_seed=context.param("perturb_seed", 7),
                      num_replicates=context.param("replicates_per_audit", 150, 4000),
                      alpha=context.param("alpha", 0.001), rtol=context.param("rtol", 1e-8),
                      sumo_batches=context.param("sumo_batches", 3),
                      max_rows=context.param("max_rows", 200_000))


def audit_points(context: CheckContext, default: list[str]) -> list[str]:
    """``--set points=truth,perturbed``: the points to audit (a subset of :data:`POINTS`)."""
    points = comma_list(context.param("points", default))
    for p in points:
        if p not in POINTS:
            raise ValueError(f"--set points={','.join(points)} is invalid; allowed: a comma list of "
                             f"{', '.join(POINTS)}")
    return points


def label_parameter(label: str) -> int | None:
    """K or B of an equation label (the value of its class's ``label_option``; the class default when the
    label is the bare name, e.g. ``q2`` -> 2); None for an equation without one (ps-exact, aug, sumo)."""
    name, options = parse_label(label)
    key = EQUATIONS[name].label_option
    if key is None:
        return None
    return options[key] if key in options else getattr(make_equation(label), key)


# ---- the reference problem ------------------------------------------------------------------------
@dataclass
class Problem:
    """The DGM, the weighted population and the models at each point."""

    dgm: DGM
    x: torch.Tensor  # (N, L) long
    y: torch.Tensor  # (N, c) long
    w: torch.Tensor  # (N,) float64, the truth's m*(y | x) / number of prefixes
    models: dict  # point -> PerturbedLM (float64, trainable)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.models["truth"].parameters() if p.requires_grad)


def population(dgm: DGM, max_rows: int = 200_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All in-support prefixes x all V^c continuations, weighted by m*(y | x) / #prefixes.

    Returns ``x (N, L)``, ``y (N, c)`` long and ``w (N,)`` float64 (summing to one).
    """
    xs = dgm.prefixes("in")  # (P, L)
    V, c = dgm.vocab_size, dgm.observations
    rows = len(xs) * V ** c
    if rows > max_rows:
        raise ValueError(f"population of {len(xs)} prefixes x {V}^{c} continuations = {rows} rows is too large; "
                         f"allowed: at most max_rows={max_rows} (use a smaller vocab_size or observations)")
    ys = np.stack(np.unravel_index(np.arange(V ** c), (V,) * c), axis=1).astype(np.int64)  # (V^c, c)
    x = np.repeat(xs, len(ys), axis=0)  # (N, L)
    y = np.tile(ys, (len(xs), 1))  # (N, c)
    if c == 1:
        w = dgm.exact_marginal(xs).reshape(-1)
    else:
        w = np.exp(dgm.exact_log_likelihood(x, y))
    w = w / len(xs)
    return torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(w, dtype=torch.float64)


def perturbed_copy(model, scale: float, seed: int):
    """A copy of ``model`` with ``scale`` N(0, 1) added to every trainable entry."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


@functools.lru_cache(maxsize=4)
def reference_problem(setup: AuditSetup) -> Problem:
    """Build (once per process and setup) the population and both points; the DGM from the one DGM cache."""
    dgm = cached_dgm({"design": setup.design, **setup.dgm_options()})
    x, y, w = population(dgm, setup.max_rows)
    truth = copy.deepcopy(dgm.teacher).double()
    truth.requires_grad_(False)
    for p in truth.parameters():
        p.requires_grad_(True)
    truth.embedding.requires_grad_(False)
    models = {"truth": truth, "perturbed": perturbed_copy(truth, setup.perturb_scale, setup.perturb_seed)}
    return Problem(dgm=dgm, x=x, y=y, w=w, models=models)


def problem_description(setup: AuditSetup) -> dict:
    """The settings a check reports: the DGM's description, the population's size and the setup."""
    prob = reference_problem(setup)
    return {"design": setup.design, **prob.dgm.describe(exact=False), "population_rows": int(prob.x.shape[0]),
            "num_parameters": prob.num_parameters, **{k: v for k, v in asdict(setup).items() if k != "dgm"}}


# ---- one audit = one engine replicate -------------------------------------------------------------
def _against(audit: AuditResult, reference: np.ndarray, kind: str) -> AuditResult:
    """The same replicates audited against another reference vector."""
    return AuditResult(equation=audit.equation, estimand=audit.estimand, reference_kind=kind,
                       replicates=audit.replicates, reference=np.asarray(reference, dtype=float),
                       parameter_names=audit.parameter_names, rtol=audit.rtol, alpha=audit.alpha)


def generate_seed(cond: dict, rng: np.random.Generator) -> dict:
    """The engine's ``generate``: the population is fixed, only the draws' seed is random."""
    return {"torch_seed": int(rng.integers(0, 2**62))}


def run_audit(setup: AuditSetup, label: str, point: str, torch_seed: int) -> dict:
    """One gradient audit of equation ``label`` at ``point``; a flat dict of scalars.

    Keys: ``p_value``, ``t2``, ``df``, ``reject``, ``residual_ok``, ``bias_norm`` (+ ``_mcse``),
    ``noise`` (sqrt(tr S / R)), ``mean_norm`` (+ ``_mcse``), ``reference_norm``,
    ``seconds_per_replicate`` and, where an expected mean is known, ``expected_bias_norm``,
    ``power`` and (exact means only) ``p_vs_expected``; is-K and aug add ``s`` (+ ``_mcse``),
    ``proj`` (+ ``_mcse``) and ``u_norm``; sumo adds per-batch spreads ``sd_b<i>``,
    ``max_dev_b<i>``, ``log_m_sd_b<i>``, ``truncated``.
    """
    if point not in POINTS:
        raise ValueError(f"point={point!r} is invalid; allowed: {', '.join(POINTS)}")
    prob = reference_problem(setup)
    model, x, y, w = prob.models[point], prob.x, prob.y, prob.w
    eq = make_equation(label)
    gen = torch.Generator().manual_seed(int(torch_seed))
    started = time.perf_counter()
    batches = setup.sumo_batches if eq.audit_expectation == "spread" else 1
    audits = [gradient_audit(eq, model, x, y, weights=w, num_replicates=setup.num_replicates, generator=gen,
                             rtol=setup.rtol, alpha=setup.alpha) for _ in range(batches)]
    seconds = (time.perf_counter() - started) / (batches * setup.num_replicates)
    audit = audits[0] if batches == 1 else AuditResult(
        equation=audits[0].equation, estimand=audits[0].estimand, reference_kind=audits[0].reference_kind,
        replicates=np.concatenate([a.replicates for a in audits]), reference=audits[0].reference,
        parameter_names=audits[0].parameter_names, rtol=setup.rtol, alpha=setup.alpha)
    R = audit.num_replicates
    mean_norm = float(np.linalg.norm(audit.mean))
    mean_mcse = float(np.sqrt(max(audit.mean @ audit.cov @ audit.mean, 0.0) / R) / mean_norm) if mean_norm else 0.0
    out = {"p_value": audit.p_value, "t2": audit.t2, "df": audit.df, "reject": bool(audit.reject()),
           "residual_ok": bool(audit.residual_ok), "bias_norm": audit.bias_norm,
           "bias_norm_mcse": audit.bias_norm_mcse, "noise": audit.bias_norm_noise, "mean_norm": mean_norm,
           "mean_norm_mcse": mean_mcse, "reference_norm": float(np.linalg.norm(audit.reference)),
           "num_replicates": R, "num_parameters": int(audit.reference.size), "seconds_per_replicate": seconds}
    expected, exact = _expected_bias(eq, audit, model, x, y, w, out)
    if expected is not None:
        out["expected_bias_norm"] = float(np.linalg.norm(expected))
        out["power"] = hotelling_power(audit, expected, setup.alpha)
        if exact:
            out["p_vs_expected"] = _against(audit, audit.reference + expected, "expected").p_value
    if eq.audit_expectation == "spread":
        out.update(_spread(audits))
    return out


def _expected_bias(eq, audit: AuditResult, model, x, y, w, out: dict) -> tuple[np.ndarray | None, bool]:
    """The bias ``(P,)`` the audit should find (None where unknown) and whether it is exact (not a leading
    term); for aug and is-K, adds the projections on u = -grad chi2 / 2 to ``out``."""
    expected, exact = None, False
    importance = isinstance(eq, (Augmentation, ImportanceSampling))
    K = eq.num_draws if isinstance(eq, ImportanceSampling) else 1  # aug's bias does not shrink with its draws
    if isinstance(eq, Augmentation) or (importance and K == 1):
        expected, exact = aug_mean(model, x, y, w) - audit.reference, True
    if importance:
        R = audit.num_replicates
        u = chi2_direction(model, x, y, w)  # (P,)
        proj = K * (audit.replicates - audit.reference) @ u / (u @ u)  # (R,) s_K per replicate
        unit = K * (audit.replicates - audit.reference) @ u / np.linalg.norm(u)  # (R,) in gradient units
        out.update(s=float(proj.mean()), s_mcse=float(proj.std(ddof=1) / math.sqrt(R)), proj=float(unit.mean()),
                   proj_mcse=float(unit.std(ddof=1) / math.sqrt(R)), u_norm=float(np.linalg.norm(u)))
        if expected is None:
            expected = u / K  # leading term only
    if isinstance(eq, PosteriorMH) and eq.proposal == "independence":
        rule = quadrature.default_rule(model.perturbation.latent_dim)
        if rule.size <= MAX_CHAIN_NODES:
            expected = mh_chain_mean(model, x, y, w, eq.steps, rule) - audit.reference
            exact = True
    if eq.audit_expectation == "unbiased":
        expected, exact = np.zeros_like(audit.reference), True
    return expected, exact


def _spread(audits: list[AuditResult]) -> dict:
    """Per-batch spread of an equation whose variance is not finite (sumo): ``sd_b<i>`` (sqrt tr S),
    ``max_dev_b<i>``, ``log_m_sd_b<i>`` (of its log m estimate) and the ``truncated`` count."""
    out = {}
    for i, a in enumerate(audits):
        dev = a.replicates - a.reference  # (R, P)
        out[f"sd_b{i + 1}"] = float(np.sqrt(np.trace(a.cov)))
        out[f"max_dev_b{i + 1}"] = float(np.abs(dev).max())
        est = a.stats.get("estimate_mean")
        out[f"log_m_sd_b{i + 1}"] = float(np.std(est, ddof=1)) if est is not None and est.size > 1 else math.nan
    out["truncated"] = float(sum(float(np.sum(a.stats.get("truncated", 0.0))) for a in audits))
    return out


def analyse_audit(data: dict, cond: dict, *, setup: AuditSetup) -> dict:
    """The engine's ``analyse``: one audit of ``cond["equation"]`` at ``cond["point"]``."""
    return run_audit(setup, cond["equation"], cond["point"], data["torch_seed"])


# ---- the study ------------------------------------------------------------------------------------
def fingerprint(setup: AuditSetup) -> str:
    """The code and settings that produce an audit's row (the store refuses a stale study)."""
    funcs = (generate_seed, analyse_audit, run_audit, _expected_bias, _spread, mh_chain_mean, aug_mean,
             chi2_direction, hotelling_power, population, perturbed_copy, reference_problem, parse_label)
    return repr(setup) + "\n" + "\n".join(inspect.getsource(f) for f in funcs)


def run_audits(name: str, design: list[dict], setup: AuditSetup, *, replicates: int, seed: int,
               context: CheckContext, store: Path | None):
    """Run the audits of ``design`` (``{"equation": label, "point": point}`` conditions) as an engine study;
    returns the :class:`~simstudy.engine.StudyResult`.

    With ``store`` (a folder) the rows are kept in ``store/<name>-<config hash[:12]>``
    (:func:`~.common.study_store`): a rerun with the same settings resumes, other settings get their own folder.
    """
    study = Study(design=design, generate=generate_seed,
                  analyse={"audit": functools.partial(analyse_audit, setup=setup)},
                  replicates=replicates, seed=seed, name=name, fingerprint=fingerprint(setup))
    where = None if store is None else study_store(store, name, study)
    return study.run(n_jobs=context.n_jobs, store=where, progress=False)


def failed_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a study table whose replicate did not finish (status other than "ok")."""
    return table[table["status"] != "ok"]
