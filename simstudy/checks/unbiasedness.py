"""Paper checks ``unbiasedness`` and ``calibration`` (DESIGN §6.1; issue 4).

``unbiasedness``: for every estimating equation of DESIGN §3, at the truth and at a
perturbed parameter of the "five-token" reference model, the Monte Carlo mean of
g is compared with the exact quadrature gradient of the equation's population
objective by the Hotelling-type test of :func:`simstudy.equations.gradient_audit`
(identifiable subspace, alpha = 0.001).

``calibration``: the false-alarm rate of that decision under the null (independent
audits of an unbiased equation) and its power against aug and is-1, with binomial
MCSEs.

The reference problem
---------------------
Population: every in-support prefix x of the DGM times every continuation y (all
V^c of them), weighted by the truth's exact m*(y | x) / (number of prefixes), so
that at the truth the population score of the likelihood equations is zero. The
student is the teacher itself (well specified). "truth" is the teacher's
parameters; "perturbed" adds ``perturb_scale`` N(0, 1) to every trainable entry
(torch generator seeded ``perturb_seed``) and keeps the truth's weights, so there
the reference gradient is far from zero. One audit replicate g_r is one call of
``equation.loss`` on the whole population with fresh draws (one draw set per
datum); an audit is ``replicates_per_audit`` such calls.

Equations (labels): ``ps-exact``; ``q2-K<k>`` (q2 with k draws); ``ps-mh-B<b>``
(fresh independence chains of b steps); ``is-<K>``; ``aug``; ``sumo`` (power tail
alpha = 2.5, finite mean, infinite variance: spread only).

Exact expected means, beside the Monte Carlo ones
-------------------------------------------------
* aug (= is-1): grad [log m - KL(prior, posterior)] by quadrature (DESIGN §3).
* ps-mh with fresh independence chains of B steps (q = 1): the chain is run
  *exactly* on the quadrature grid: states are the nodes, the proposal puts the
  rule's weight w_j on node j, acceptance min(1, p_j / p_i), start = the prior;
  after B steps pi_B = pi_0 T^B per datum and E g = sum_i pi_B(i) grad log p(y | x, z_i).
  This is the quadrature version of the continuous chain (every integral in the
  kernel is a prior expectation), accurate to about 1e-6 relative when the nodes
  are doubled in the five-token model. It gives the bias an audit of R replicates
  must detect, hence the test's power (noncentral F with noncentrality
  R b' S^+ b on the kept subspace, S the audit's own covariance).
* is-K: the leading term only, -grad chi2(posterior, prior) / (2K) (DESIGN §3).

Decision rules (stated in the result)
-------------------------------------
unbiasedness passes when every expected verdict holds at every point:

1. ps-exact and every q2 variant: the audit does not reject (p >= alpha and the
   bias off the identifiable subspace within its noise).
2. ps-mh: at the largest B of the grid (default 100) the audit does not reject; at
   every smaller B where the audit has power >= ``power_threshold`` (0.9) against
   the exact chain bias, it rejects (where the power is lower, the verdict is
   reported as "no power", not judged; without an exact chain mean, i.e. q > 1, the
   smallest B must be rejected).
3. is-K: the audit rejects at every K, and "K x bias roughly constant": with
   s_K = <K b_K, u> / |u|^2 the bias's projection on u = -grad chi2 / 2 in units of
   u (the leading term gives s_K -> 1), every s_K is positive and the weighted
   least-squares slope of log s_K on log K (weights from the delta-method MCSE)
   has its 95% interval inside (-1/2, 1/2): K b_K changes across the grid by less
   than a K^(+-1/2) power law, so the bias is closer to order 1/K than to
   K^(-1/2) or K^(-3/2). s_K at the largest K against 1 is reported.
4. aug: the audit rejects (at the truth the reference is 0: |mean g| vs 0).
5. sumo: reported (spread of g over independent batches); no Hotelling verdict.

calibration passes when the one-sided exact binomial test of H0: false-alarm rate
<= alpha (n null audits, alpha = 0.001) does not reject at level 0.05 (with n = 200:
at most one false alarm); with fewer than ``min_null_audits`` (200, issue 4) null
audits the decision is "reported" (smoke scale: 50 audits cannot judge a rate of
0.001). The rates at 0.01 and 0.05, a Kolmogorov-Smirnov test of the null
p-values' uniformity, and the power against aug and is-1 (each with MCSE and a
Clopper-Pearson interval) are reported.

Figures: ``bias_audit.png`` (bias norm with MCSE bars per equation and point, log
scale, with the noise level and the exact / leading-term expected bias),
``is_k_bias.png`` (K x bias along u against K with MCSE bars and |u|),
``ps_mh_bias.png`` (Monte Carlo and exact-chain bias against B),
``calibration/null_pvalues.png`` (histogram and -log10 QQ plot of null p-values).

Both checks are studies on the engine (:class:`simstudy.Study`): conditions =
equation x point, each replicate one complete audit whose analyse returns its
scalars (p-value, T^2, df, reject, bias norm and MCSE, projections, power); at
full scale (or with ``--set store=true``) the studies store to
``OUT/NAME/store/<study>-<config hash>`` and resume (the hash covers the settings and the source
of the functions that compute an audit's row).

Cost (1 core, five-token, per audit replicate): ps-exact 23-26 ms, ps-mh 1.6 + 0.36 B ms, q2 1.4-2.6
ms, is-K 0.8-2.6 ms, aug 0.7-1 ms, sumo 2-3 ms per batch. Full scale (R = 4000): unbiasedness about
13 minutes CPU; calibration (200 null q2 audits, 50 each against aug and is-1) about 45 minutes.
"""
from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from .. import quadrature
from ..dgm import DESIGNS, PerturbedNextToken
from ..equations import AuditResult, gradient_audit, make_equation, quadrature_divergences, quadrature_log_marginal
from ..equations.base import quadrature_token_log_lik
from .base import CheckContext, CheckResult, register

POINTS = ("truth", "perturbed")
DGM_KEYS = ("vocab_size", "prefix_len", "embed_dim", "latent_dim", "teacher", "hidden", "entropy", "s_max", "sigma",
            "direction", "observations", "continuation", "seed")
_CTOR_DEFAULTS = dict(vocab_size=41, prefix_len=2, embed_dim=3, latent_dim=1, teacher="mlp", hidden=16, entropy=2.0,
                      s_max=0.5, sigma=0.6, direction="random", observations=1, continuation="iid", seed=0)
_MAX_CHAIN_NODES = 1024  # the exact ps-mh chain needs (rows, M, M) transition matrices


# ------------------------------------------------------------------------------------------------
# Equation labels
# ------------------------------------------------------------------------------------------------
def parse_equation(label: str) -> tuple[str, dict]:
    """An equation label of this check -> ``(name, options)`` for :func:`make_equation`.

    ``ps-exact``, ``aug``, ``sumo``, ``q2`` (K = 2) or ``q2-K<k>``, ``ps-mh-B<b>``, ``is-<K>``.
    """
    if not isinstance(label, str):
        raise ValueError(f"equation={label!r} is invalid; allowed: a label like ps-exact, q2-K2, ps-mh-B20, is-8")
    if label in ("ps-exact", "aug", "sumo"):
        return label, {}
    if label == "q2":
        return "q2", {"num_draws": 2}
    for pattern, name, key in ((r"q2-K(\d+)", "q2", "num_draws"), (r"ps-mh-B(\d+)", "ps-mh", "steps"),
                               (r"is-(\d+)", "is-K", "num_draws")):
        match = re.fullmatch(pattern, label)
        if match:
            return name, {key: int(match.group(1))}
    raise ValueError(f"equation={label!r} is unknown; allowed: ps-exact, aug, sumo, q2, q2-K<k>, ps-mh-B<b>, is-<K>")


def equation_family(label: str) -> str:
    """The equation's registry name: ``ps-mh-B20`` -> ``ps-mh``, ``is-8`` -> ``is-K``."""
    return parse_equation(label)[0]


def equation_param(label: str) -> int | None:
    """K of q2 / is-K, B of ps-mh; None otherwise."""
    options = parse_equation(label)[1]
    return next(iter(options.values())) if options else None


# ------------------------------------------------------------------------------------------------
# The reference problem: population, truth and perturbed point
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditSetup:
    """Settings of one audit (hashable; its repr fingerprints the engine study).

    design : reference design of :mod:`simstudy.dgm.designs` (default "five-token").
    dgm : sorted ``(key, value)`` constructor overrides of the DGM.
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
        if self.design not in DESIGNS:
            raise ValueError(f"design={self.design!r} is unknown; allowed: {', '.join(DESIGNS)}")
        if not (isinstance(self.perturb_scale, (int, float)) and math.isfinite(self.perturb_scale)
                and self.perturb_scale > 0):
            raise ValueError(f"perturb_scale={self.perturb_scale!r} is invalid; allowed: a finite number > 0")
        for key, minimum in (("num_replicates", 2), ("sumo_batches", 1), ("max_rows", 1), ("perturb_seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{key}={value!r} is invalid; allowed: an integer >= {minimum}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha!r} is invalid; allowed: a level in (0, 1)")

    def dgm_options(self) -> dict:
        return dict(self.dgm)


@dataclass
class Problem:
    """The DGM, the weighted population and the models at each point."""

    dgm: PerturbedNextToken
    x: torch.Tensor  # (N, L) long
    y: torch.Tensor  # (N, c) long
    w: torch.Tensor  # (N,) float64, the truth's m*(y | x) / number of prefixes
    models: dict  # point -> PerturbedLM (float64, trainable)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.models["truth"].parameters() if p.requires_grad)


def population(dgm: PerturbedNextToken, max_rows: int = 200_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    """Build (once per process and setup) the DGM, the population and both points."""
    dgm = PerturbedNextToken.reference(setup.design, **setup.dgm_options())
    x, y, w = population(dgm, setup.max_rows)
    truth = copy.deepcopy(dgm.teacher).double()
    truth.requires_grad_(False)
    for p in truth.parameters():
        p.requires_grad_(True)
    truth.embedding.requires_grad_(False)
    models = {"truth": truth, "perturbed": perturbed_copy(truth, setup.perturb_scale, setup.perturb_seed)}
    return Problem(dgm=dgm, x=x, y=y, w=w, models=models)


def _params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(value: torch.Tensor, model) -> np.ndarray:
    params = _params(model)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
                     ).detach().double().numpy()


# ------------------------------------------------------------------------------------------------
# Exact (quadrature) expected means and directions
# ------------------------------------------------------------------------------------------------
def chi2_direction(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """u = -grad chi2(posterior, prior) / 2, population-weighted: K b_K -> u (DESIGN §3). ``(P,)``."""
    div = quadrature_divergences(model, x, y, rule=rule)
    return -_flat_grad((w * div["chi2"]).sum() / w.sum(), model) / 2


def aug_mean(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """The exact mean of aug (= is-1): grad [log m - KL(prior, posterior)] (DESIGN §3). ``(P,)``."""
    div = quadrature_divergences(model, x, y, rule=rule)
    return _flat_grad((w * (div["log_m"] - div["kl"])).sum() / w.sum(), model)


def likelihood_gradient(model, x, y, w, rule: quadrature.Rule | None = None) -> np.ndarray:
    """grad of the population mean log m (the reference of the likelihood equations). ``(P,)``."""
    return _flat_grad((w * quadrature_log_marginal(model, x, y, rule=rule)).sum() / w.sum(), model)


def mh_chain_mean(model, x, y, w, steps: int, rule: quadrature.Rule | None = None,
                  max_elements: int = 20_000_000) -> np.ndarray:
    """Exact mean of ps-mh with fresh independence chains of ``steps`` steps, on the grid.

    The chain of each datum lives on the rule's nodes: the proposal picks node j with
    the rule's weight w_j (the prior), acceptance min(1, p_j / p_i) with
    p = p(y | x, z), start = the prior. pi_B = pi_0 T^B, and the mean of g is
    sum_data w_d sum_i pi_B,d(i) grad log p(y_d | x_d, z_i) / sum w (module docstring).

    Parameters
    ----------
    model : PerturbedLM with a Gaussian latent; x ``(N, L)``, y ``(N, c)``, w ``(N,)``.
    steps : int >= 0, B (0 gives aug's mean).
    rule : quadrature rule (default: the latent's default rule); at most 1024 nodes.

    Returns
    -------
    ``(P,)`` the mean estimating function.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is invalid; allowed: an integer >= 0")
    rule = quadrature.default_rule(model.perturbation.latent_dim) if rule is None else rule
    if rule.size > _MAX_CHAIN_NODES:
        raise ValueError(f"rule with {rule.size} nodes is too large for the exact chain; allowed: at most "
                         f"{_MAX_CHAIN_NODES} nodes (latent_dim = 1)")
    ll, log_w = quadrature_token_log_lik(model, x, y, rule)  # (N, M, c), (M,)
    ll = ll.sum(-1)  # (N, M) per-datum log p(y | x, z_i)
    M = ll.shape[1]
    with torch.no_grad():
        prior = log_w.exp()  # (M,)
        pis = []
        chunk = max(1, max_elements // (M * M))
        off = 1.0 - torch.eye(M, dtype=ll.dtype)
        for s in range(0, ll.shape[0], chunk):
            l = ll[s:s + chunk].detach()  # (b, M)
            T = (l[:, None, :] - l[:, :, None]).clamp(max=0.0).exp() * prior[None, None, :] * off  # (b, M, M)
            T = T + torch.diag_embed(1.0 - T.sum(-1))  # rejections stay
            pi = prior[None].expand(l.shape[0], M).clone()  # (b, M)
            for _ in range(steps):
                pi = torch.einsum("bi,bij->bj", pi, T)
            pis.append(pi)
        pi = torch.cat(pis)  # (N, M)
    value = (w * (pi * ll).sum(1)).sum() / w.sum()
    return _flat_grad(value, model)


def hotelling_power(audit: AuditResult, bias: np.ndarray, alpha: float) -> float:
    """Power of the audit's F test against a true bias ``bias`` ``(P,)``.

    Noncentral F(df, R - df) with noncentrality R b' Sigma^-1 b on the kept subspace.
    Sigma^-1 is estimated by (R - df - 2) / (R - 1) S_k^+ (S the audit's sample covariance:
    E[S^-1] = (R - 1) / (R - df - 2) Sigma^-1 for Gaussian g, so the plain plug-in would
    overstate the power at small R / df). NaN when R <= df + 2.
    """
    lam, U, _ = audit._eig
    R, k = audit.num_replicates, audit.df
    if not k or R <= k + 2:
        return float("nan")
    nc = float(R * np.sum((U.T @ bias) ** 2 / lam)) * (R - k - 2) / (R - 1)
    crit = sps.f.isf(alpha, k, R - k)
    return float(sps.ncf.sf(crit, k, R - k, nc)) if nc > 0 else float(alpha)


def _against(audit: AuditResult, reference: np.ndarray, kind: str) -> AuditResult:
    """The same replicates audited against another reference vector."""
    return AuditResult(equation=audit.equation, estimand=audit.estimand, reference_kind=kind,
                       replicates=audit.replicates, reference=np.asarray(reference, dtype=float),
                       parameter_names=audit.parameter_names, rtol=audit.rtol, alpha=audit.alpha)


# ------------------------------------------------------------------------------------------------
# One audit = one engine replicate
# ------------------------------------------------------------------------------------------------
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
    import time

    if point not in POINTS:
        raise ValueError(f"point={point!r} is invalid; allowed: {', '.join(POINTS)}")
    name, options = parse_equation(label)
    prob = reference_problem(setup)
    model, x, y, w = prob.models[point], prob.x, prob.y, prob.w
    eq = make_equation(name, **options)
    gen = torch.Generator().manual_seed(int(torch_seed))
    started = time.perf_counter()
    batches = setup.sumo_batches if name == "sumo" else 1
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
    expected, exact = None, False
    if name == "aug" or (name == "is-K" and options["num_draws"] == 1):
        expected, exact = aug_mean(model, x, y, w) - audit.reference, True
    if name in ("aug", "is-K"):
        K = options.get("num_draws", 1)
        u = chi2_direction(model, x, y, w)
        proj = K * (audit.replicates - audit.reference) @ u / (u @ u)  # (R,) s_K per replicate
        unit = K * (audit.replicates - audit.reference) @ u / np.linalg.norm(u)  # (R,) in gradient units
        out.update(s=float(proj.mean()), s_mcse=float(proj.std(ddof=1) / math.sqrt(R)), proj=float(unit.mean()),
                   proj_mcse=float(unit.std(ddof=1) / math.sqrt(R)), u_norm=float(np.linalg.norm(u)))
        if expected is None:
            expected = u / K  # leading term only
    if name == "ps-mh" and getattr(eq, "proposal", "") == "independence":
        rule = quadrature.default_rule(model.perturbation.latent_dim)
        if rule.size <= _MAX_CHAIN_NODES:
            expected = mh_chain_mean(model, x, y, w, options["steps"], rule) - audit.reference
            exact = True
    if name in ("ps-exact", "q2"):
        expected, exact = np.zeros_like(audit.reference), True
    if expected is not None:
        out["expected_bias_norm"] = float(np.linalg.norm(expected))
        out["power"] = hotelling_power(audit, expected, setup.alpha)
        if exact:
            out["p_vs_expected"] = _against(audit, audit.reference + expected, "expected").p_value
    if name == "sumo":
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


def _fingerprint(setup: AuditSetup) -> str:
    """The code and settings that produce an audit's row (the store refuses a stale study)."""
    import inspect

    funcs = (generate_seed, analyse_audit, run_audit, mh_chain_mean, aug_mean, chi2_direction, hotelling_power,
             population, perturbed_copy, reference_problem, parse_equation)
    return repr(setup) + "\n" + "\n".join(inspect.getsource(f) for f in funcs)


def run_audits(name: str, design: list[dict], setup: AuditSetup, *, replicates: int, seed: int,
               context: CheckContext, store: Path | None):
    """Run the audits as an engine study; returns the :class:`StudyResult`.

    With ``store`` (a folder) the rows are kept in ``store/<name>-<config hash>``: a rerun with the
    same settings resumes, other settings get their own folder.
    """
    from ..engine import Study

    study = Study(design=design, generate=generate_seed, analyse={"audit": functools.partial(analyse_audit,
                                                                                             setup=setup)},
                  replicates=replicates, seed=seed, name=name, fingerprint=_fingerprint(setup))
    where = None if store is None else Path(store) / f"{name}-{study.config_hash[:12]}"
    return study.run(n_jobs=context.n_jobs, store=where, progress=False)


# ------------------------------------------------------------------------------------------------
# Small statistics helpers
# ------------------------------------------------------------------------------------------------
def binomial_rate(k: int, n: int, level: float = 0.95) -> dict:
    """A proportion k / n with its MCSE sqrt(p (1 - p) / n) (Morris et al. 2019, Table 6) and the
    Clopper-Pearson interval."""
    if n <= 0:
        return {"rate": math.nan, "mcse": math.nan, "ci_low": math.nan, "ci_high": math.nan, "k": k, "n": n}
    p = k / n
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(sps.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(sps.beta.ppf(1 - a, k + 1, n - k))
    return {"rate": p, "mcse": math.sqrt(p * (1 - p) / n), "ci_low": low, "ci_high": high, "k": int(k), "n": int(n)}


def binomial_excess_pvalue(k: int, n: int, alpha: float) -> float:
    """One-sided exact binomial test of H0: rate <= alpha against rate > alpha: P(Bin(n, alpha) >= k)."""
    return float(sps.binom.sf(k - 1, n, alpha)) if k > 0 else 1.0


def loglog_slope(K, s, s_mcse) -> dict:
    """Weighted least squares of log s on log K with known variances (delta method: var log s =
    (mcse / s)^2). Returns slope, its standard error and 95% interval (NaN if any s <= 0)."""
    K, s, se = (np.asarray(v, dtype=float) for v in (K, s, s_mcse))
    if K.size < 2 or np.any(s <= 0) or np.any(~np.isfinite(se)) or np.any(se <= 0):
        return {"slope": math.nan, "slope_se": math.nan, "slope_low": math.nan, "slope_high": math.nan}
    X = np.column_stack([np.ones_like(K), np.log(K)])
    W = (s / se) ** 2  # 1 / var(log s)
    cov = np.linalg.inv(X.T @ (W[:, None] * X))
    beta = cov @ X.T @ (W * np.log(s))
    se_slope = float(math.sqrt(cov[1, 1]))
    return {"slope": float(beta[1]), "slope_se": se_slope, "slope_low": float(beta[1] - 1.96 * se_slope),
            "slope_high": float(beta[1] + 1.96 * se_slope)}


# ------------------------------------------------------------------------------------------------
# Settings shared by both checks
# ------------------------------------------------------------------------------------------------
def _list(value) -> list:
    return [v for v in (value.split(",") if isinstance(value, str) else value) if v != ""]


def audit_setup(context: CheckContext) -> AuditSetup:
    design = context.param("design", "five-token")
    if design not in DESIGNS:
        raise ValueError(f"--set design={design!r} is unknown; allowed: {', '.join(DESIGNS)}")
    base = {**_CTOR_DEFAULTS, **{k: v for k, v in DESIGNS[design].items() if k != "n"}}
    overrides = {}
    for key in DGM_KEYS:
        value = context.param(key, base[key])
        if value != base[key]:
            overrides[key] = value
    return AuditSetup(design=design, dgm=tuple(sorted(overrides.items())),
                      perturb_scale=context.param("perturb_scale", 0.3),
                      perturb_seed=context.param("perturb_seed", 7),
                      num_replicates=context.param("replicates_per_audit", 150, 4000),
                      alpha=context.param("alpha", 0.001), rtol=context.param("rtol", 1e-8),
                      sumo_batches=context.param("sumo_batches", 3),
                      max_rows=context.param("max_rows", 200_000))


def _points(context: CheckContext, default: list[str]) -> list[str]:
    points = _list(context.param("points", default))
    for p in points:
        if p not in POINTS:
            raise ValueError(f"--set points={','.join(points)} is invalid; allowed: a comma list of "
                             f"{', '.join(POINTS)}")
    return points


def _problem_description(setup: AuditSetup) -> dict:
    prob = reference_problem(setup)
    return {"design": setup.design, **prob.dgm.describe(exact=False), "population_rows": int(prob.x.shape[0]),
            "num_parameters": prob.num_parameters, **{k: v for k, v in asdict(setup).items() if k != "dgm"}}


def _failed(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"] != "ok"]


# ------------------------------------------------------------------------------------------------
# Check 1: unbiasedness
# ------------------------------------------------------------------------------------------------
UNBIASEDNESS_CLAIM = ("At the truth and at a perturbed parameter of the five-token model, the Monte Carlo mean of g "
                      "equals the exact quadrature gradient of its population objective for ps-exact and q2 "
                      "(unbiased); ps-mh is biased at small B and not at large B; is-K is biased with K x bias "
                      "roughly constant (towards -grad chi2 / 2); aug is biased; sumo's spread is reported "
                      "(DESIGN §3, §6.1).")

UNBIASEDNESS_RULE = (
    "Hotelling-type audit on the identifiable subspace at alpha (default 0.001), R replicates per audit. Pass when, "
    "at every point: ps-exact and every q2 variant are not rejected; ps-mh at the largest B is not rejected and is "
    "rejected at every smaller B where the audit has power >= power_threshold (0.9) against the exact quadrature-"
    "chain bias (lower power: reported, not judged; no exact chain: the smallest B must be rejected); is-K is "
    "rejected at every K, s_K = <K bias, u>/|u|^2 (u = -grad chi2/2) is positive at every K and the WLS slope of "
    "log s_K on log K has its 95% interval inside (-1/2, 1/2) ('K x bias roughly constant': closer to order 1/K "
    "than to K^-1/2 or K^-3/2); aug is rejected. sumo: spread over batches reported, no verdict.")


def _unbiasedness_labels(context: CheckContext) -> dict[str, list[str]]:
    q2 = [int(k) for k in _list(context.param("q2_draws", [2, 8]))]
    mh = [int(b) for b in _list(context.param("mh_steps", [1, 5, 20, 100]))]
    isk = [int(k) for k in _list(context.param("is_draws", [1, 2, 4, 8, 16, 32]))]
    if not mh or not isk or not q2:
        raise ValueError("--set q2_draws, mh_steps and is_draws need at least one value each; allowed: comma lists")
    equations = _list(context.param("equations", ["ps-exact", "q2", "ps-mh", "is-K", "aug", "sumo"]))
    allowed = ("ps-exact", "q2", "ps-mh", "is-K", "aug", "sumo")
    for e in equations:
        if e not in allowed:
            raise ValueError(f"--set equations={','.join(equations)} is invalid; allowed: a comma list of "
                             f"{', '.join(allowed)}")
    labels = {"ps-exact": ["ps-exact"], "q2": [f"q2-K{k}" for k in q2], "ps-mh": [f"ps-mh-B{b}" for b in sorted(mh)],
              "is-K": [f"is-{k}" for k in sorted(isk)], "aug": ["aug"], "sumo": ["sumo"]}
    return {e: labels[e] for e in allowed if e in equations}


def _verdicts(frame: pd.DataFrame, families: dict, power_threshold: float, points: list[str]) -> tuple[
        pd.DataFrame, pd.DataFrame, list[str]]:
    """Expected vs observed verdict per audit; is-K constancy per point; failure messages."""
    rows, problems = [], []
    for point in points:
        at = frame[frame["point"] == point].set_index("equation")
        mh = families.get("ps-mh", [])
        for label in at.index:
            r = at.loc[label]
            fam = equation_family(label)
            got = "biased" if bool(r["reject"]) else "no bias detected"
            power = r.get("power", math.nan)
            if fam in ("ps-exact", "q2"):
                expected = "no bias detected"
            elif fam == "aug" or fam == "is-K":
                expected = "biased"
            elif fam == "ps-mh":
                if label == mh[-1]:
                    expected = "no bias detected"
                elif np.isfinite(power):
                    expected = "biased" if power >= power_threshold else "not judged (no power)"
                else:
                    expected = "biased" if label == mh[0] else "not judged (no exact chain)"
            else:
                expected = "reported"
            judged = expected in ("biased", "no bias detected")
            ok = (got == expected) if judged else True
            rows.append({"point": point, "equation": label, "family": fam, "expected": expected, "observed": got,
                         "holds": ok if judged else None, "p_value": r["p_value"], "power": power})
            if judged and not ok:
                problems.append(f"{label}@{point}: expected {expected}, observed {got} (p={r['p_value']:.3g})")
    verdicts = pd.DataFrame(rows)
    slopes = []
    isk = families.get("is-K", [])
    for point in points:
        at = frame[(frame["point"] == point) & frame["equation"].isin(isk)].copy()
        if at.empty:
            continue
        at["K"] = [equation_param(e) for e in at["equation"]]
        at = at.sort_values("K")
        fit = loglog_slope(at["K"], at["s"], at["s_mcse"])
        positive = bool(np.all(at["s"] > 0))
        inside = bool(np.isfinite(fit["slope"]) and -0.5 < fit["slope_low"] and fit["slope_high"] < 0.5)
        last = at.iloc[-1]
        slopes.append({"point": point, **fit, "all_positive": positive, "roughly_constant": positive and inside,
                       "s_min": float(at["s"].min()), "s_max": float(at["s"].max()),
                       "K_max": int(last["K"]), "s_at_K_max": float(last["s"]),
                       "s_at_K_max_mcse": float(last["s_mcse"])})
        if not (positive and inside):
            problems.append(f"is-K@{point}: K x bias not roughly constant (s_K > 0: {positive}; slope "
                            f"{fit['slope']:.3g} [{fit['slope_low']:.3g}, {fit['slope_high']:.3g}])")
    return verdicts, pd.DataFrame(slopes), problems


@register("unbiasedness", UNBIASEDNESS_CLAIM)
def run_unbiasedness(context: CheckContext) -> CheckResult:
    """Check DESIGN §6.1 (see the module docstring for the population, points and rules)."""
    name = "unbiasedness"
    setup = audit_setup(context)
    points = _points(context, list(POINTS))
    families = _unbiasedness_labels(context)
    power_threshold = context.param("power_threshold", 0.9)
    seed = context.param("study_seed", 20240601)
    design = [{"equation": label, "point": p} for p in points for labels in families.values() for label in labels]
    store = context.folder(name) / "store" if context.scale == "full" or context.param("store", False) else None
    res = context.record(run_audits(name, design, setup, replicates=1, seed=seed, context=context, store=store))
    table = res.table
    failed = _failed(table)
    frame = table[table["status"] == "ok"].copy()
    folder = context.folder(name)
    settings = {**_problem_description(setup), "points": points, "families": families,
                "power_threshold": power_threshold, "study_seed": seed, "n_jobs": context.n_jobs}
    verdicts, slopes, problems = _verdicts(frame, families, power_threshold, points)
    for _, r in failed.iterrows():
        problems.append(f"{r['equation']}@{r['point']}: audit failed ({r['message']})")
    figures = []
    if not frame.empty:
        figures.append(str(_plot_bias(frame, folder / "bias_audit.png", setup)))
        if families.get("is-K"):
            figures.append(str(_plot_isk(frame, families["is-K"], folder / "is_k_bias.png")))
        if families.get("ps-mh") and "expected_bias_norm" in frame:
            figures.append(str(_plot_mh(frame, families["ps-mh"], folder / "ps_mh_bias.png")))
    audit_cols = ["point", "equation", "p_value", "t2", "df", "reject", "residual_ok", "bias_norm", "bias_norm_mcse",
                  "noise", "mean_norm", "mean_norm_mcse", "reference_norm", "expected_bias_norm", "power",
                  "p_vs_expected", "s", "s_mcse", "proj", "proj_mcse", "u_norm", "num_replicates",
                  "seconds_per_replicate"]
    audits = frame[[c for c in audit_cols if c in frame]].reset_index(drop=True)
    tables = {"audits": audits, "verdicts": verdicts}
    if not slopes.empty:
        tables["is_k_slope"] = slopes
    sumo = frame[frame["equation"] == "sumo"]
    statistics: dict = {"audits": {f"{r['equation']}@{r['point']}": {c: r[c] for c in audits.columns
                                                                       if c not in ("point", "equation")
                                                                       and pd.notna(r[c])}
                                   for _, r in audits.iterrows()}}
    if not slopes.empty:
        statistics["is_k_slope"] = slopes.set_index("point").to_dict(orient="index")
    if not sumo.empty:
        spread_cols = [c for c in sumo.columns if re.fullmatch(r"(sd|max_dev|log_m_sd)_b\d+", c)]
        spread = sumo[["point", *spread_cols, "bias_norm", "bias_norm_mcse", "truncated"]].reset_index(drop=True)
        tables["sumo_spread"] = spread
        statistics["sumo_spread"] = spread.set_index("point").to_dict(orient="index")
    statistics["failures"] = int(len(failed))
    judged = verdicts[verdicts["holds"].notna()] if not verdicts.empty else verdicts
    decision = "pass" if not problems and len(judged) else "fail"
    summary = _unbiasedness_summary(frame, verdicts, slopes, problems)
    return CheckResult(name=name, claim=UNBIASEDNESS_CLAIM, decision_rule=UNBIASEDNESS_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables=tables, figures=figures, settings=settings)


def _unbiasedness_summary(frame, verdicts, slopes, problems) -> str:
    if frame.empty:
        return "no audit finished; " + "; ".join(problems[:3])
    parts = []
    null = frame[frame["equation"].map(lambda e: equation_family(e) in ("ps-exact", "q2"))]
    if not null.empty:
        parts.append(f"ps-exact/q2 min p {null['p_value'].min():.3g}")
    mh = verdicts[verdicts["family"] == "ps-mh"] if not verdicts.empty else verdicts
    if not mh.empty:
        flagged = [f"{e}@{p}" for e, p, o in zip(mh["equation"], mh["point"], mh["observed"]) if o == "biased"]
        parts.append("ps-mh flagged at " + (",".join(flagged) or "none"))
    if not slopes.empty:
        parts.append("is-K slope " + ", ".join(f"{r.slope:.2f}+-{r.slope_se:.2f} ({r.point})"
                                               for r in slopes.itertuples()))
    aug = frame[(frame["equation"] == "aug") & (frame["point"] == "truth")]
    if not aug.empty:
        parts.append(f"aug |mean g| at truth {aug['mean_norm'].iloc[0]:.3g}+-{aug['mean_norm_mcse'].iloc[0]:.2g}")
    if problems:
        parts.append(("" if problems[0].startswith("NOT DECIDED") else "FAILED: ") + "; ".join(problems[:3]))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Check 2: calibration
# ------------------------------------------------------------------------------------------------
CALIBRATION_CLAIM = ("The unbiasedness decision (Hotelling audit at alpha = 0.001) has a false-alarm rate consistent "
                     "with alpha on an unbiased equation, and power against aug and is-1 (issue 4, Calibration).")

CALIBRATION_RULE = ("n independent null audits (default q2-K2 at the perturbed point, same R and alpha as the "
                    "unbiasedness check). Pass when the one-sided exact binomial test of H0: false-alarm rate <= "
                    "alpha does not reject at level 0.05 (P(Bin(n, alpha) >= observed alarms) >= 0.05); with fewer "
                    "than min_null_audits (200, issue 4) null audits the rates are reported without a verdict. "
                    "Reported: rates with binomial MCSE and Clopper-Pearson 95% intervals at alpha, 0.01 and 0.05, "
                    "a KS test of the null p-values against U(0, 1), and the power (reject rate) against aug and "
                    "is-1.")


@register("calibration", CALIBRATION_CLAIM)
def run_calibration(context: CheckContext) -> CheckResult:
    """False-alarm rate and power of the unbiasedness decision (module docstring)."""
    name = "calibration"
    setup = audit_setup(context)
    points = _points(context, ["perturbed"])
    null_labels = _list(context.param("null_equations", ["q2-K2"]))
    power_labels = _list(context.param("power_equations", ["aug", "is-1"]))
    for label in null_labels + power_labels:
        parse_equation(label)
    n_null = context.param("null_audits", 50, 200)
    n_power = context.param("power_audits", 10, 50)
    min_null = context.param("min_null_audits", 200)
    seed = context.param("study_seed", 20240602)
    store = context.folder(name) / "store" if context.scale == "full" or context.param("store", False) else None
    null = context.record(run_audits(f"{name}-null", [{"equation": e, "point": p} for p in points
                                                      for e in null_labels], setup,
                                     replicates=n_null, seed=seed, context=context, store=store)).table
    power = context.record(run_audits(f"{name}-power", [{"equation": e, "point": p} for p in points
                                                        for e in power_labels], setup,
                                      replicates=n_power, seed=seed + 1, context=context, store=store)).table
    table = pd.concat([null.assign(role="false-alarm"), power.assign(role="power")], ignore_index=True)
    failed = _failed(table)
    ok = table[table["status"] == "ok"]
    rows = []
    for (role, label, point), g in ok.groupby(["role", "equation", "point"], sort=False):
        levels = sorted({setup.alpha, 0.01, 0.05}) if role == "false-alarm" else [setup.alpha]
        ks = sps.kstest(g["p_value"].to_numpy(float), "uniform") if role == "false-alarm" else None
        for level in levels:
            # the audit's own decision at alpha; at other levels the same rule (p < level or bias off the subspace)
            k = int((g["reject"] > 0.5).sum()) if level == setup.alpha else \
                int(((g["p_value"] < level) | (g["residual_ok"] < 0.5)).sum())
            rate = binomial_rate(k, len(g))
            row = {"role": role, "equation": label, "point": point, "level": level, **rate}
            if role == "false-alarm":
                row["binomial_p"] = binomial_excess_pvalue(k, len(g), level)
                row["mcse_under_null"] = math.sqrt(level * (1 - level) / len(g))
                row["ks_p"], row["ks_stat"] = float(ks.pvalue), float(ks.statistic)  # uniformity of all p-values
            rows.append(row)
    rates = pd.DataFrame(rows)
    decisive = rates[(rates["role"] == "false-alarm") & (rates["level"] == setup.alpha)] if len(rates) else rates
    alarms = [f"{r.equation}@{r.point}: {r.k}/{r.n} false alarms at alpha={setup.alpha:g} "
              f"(binomial p = {r.binomial_p:.3g})" for r in decisive.itertuples() if r.binomial_p < 0.05]
    errors = [f"{r['equation']}@{r['point']} replicate {r['replicate']}: audit failed ({r['message']})"
              for _, r in failed.iterrows()]
    folder = context.folder(name)
    figures = []
    null_ok = ok[ok["role"] == "false-alarm"]
    if not null_ok.empty:
        figures.append(str(_plot_calibration(null_ok, folder / "null_pvalues.png", setup.alpha)))
    statistics = {f"{r.role}:{r.equation}@{r.point}:level={r.level:g}": {
        k: getattr(r, k) for k in ("rate", "mcse", "ci_low", "ci_high", "k", "n", "binomial_p", "mcse_under_null",
                                   "ks_p", "ks_stat") if hasattr(r, k) and pd.notna(getattr(r, k))}
        for r in rates.itertuples()}
    statistics["failures"] = int(len(failed))
    enough = len(decisive) > 0 and bool((decisive["n"] >= min_null).all())
    if errors or not len(decisive):
        decision, problems = "fail", errors or ["no null audit finished"]
    elif not enough:
        decision = "reported"
        problems = [f"NOT DECIDED: fewer than min_null_audits={min_null} null audits"
                    + (f" (the binomial test would reject: {'; '.join(alarms)})" if alarms else "")]
    else:
        decision, problems = ("fail" if alarms else "pass"), alarms
    audits = ok[["role", "equation", "point", "replicate", "p_value", "t2", "df", "reject", "residual_ok",
                 "bias_norm", "noise"]].reset_index(drop=True)
    summary = _calibration_summary(rates, setup.alpha, problems)
    settings = {**_problem_description(setup), "points": points, "null_equations": null_labels,
                "power_equations": power_labels, "null_audits": n_null, "power_audits": n_power,
                "min_null_audits": min_null,
                "study_seed": seed, "n_jobs": context.n_jobs}
    return CheckResult(name=name, claim=CALIBRATION_CLAIM, decision_rule=CALIBRATION_RULE, decision=decision,
                       statistics=statistics, summary=summary, tables={"rates": rates, "audits": audits},
                       figures=figures, settings=settings)


def _calibration_summary(rates: pd.DataFrame, alpha: float, problems: list[str]) -> str:
    if rates.empty:
        return "no audit finished; " + "; ".join(problems[:3])
    parts = []
    for r in rates[rates["level"] == alpha].itertuples():
        # At k = 0 or k = n the plug-in MCSE sqrt(p (1 - p) / n) is 0 and says nothing: quote the exact
        # (Clopper-Pearson) interval always, and for false alarms the MCSE a rate of alpha would have.
        interval = f" (95% CI {r.ci_low:.2g} to {r.ci_high:.2g})"
        if r.role == "false-alarm":
            parts.append(f"{r.equation}@{r.point} false alarms {r.k}/{r.n} = {r.rate:.3g}{interval}, "
                         f"MCSE {r.mcse:.2g} (under alpha {r.mcse_under_null:.2g}), binomial p {r.binomial_p:.3g}")
        else:
            parts.append(f"{r.equation}@{r.point} power {r.k}/{r.n} = {r.rate:.3g}{interval}, MCSE {r.mcse:.2g}")
    ks = rates["ks_p"].dropna() if "ks_p" in rates else pd.Series(dtype=float)
    if len(ks):
        parts.append(f"KS p {ks.min():.3g}")
    if problems:
        parts.append(("" if problems[0].startswith("NOT DECIDED") else "FAILED: ") + "; ".join(problems[:3]))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib Agg)
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_bias(frame: pd.DataFrame, path: Path, setup: AuditSetup) -> Path:
    """Bias norm with MCSE bars per equation and point (log scale); open markers: not rejected."""
    plt = _plt()
    labels = list(dict.fromkeys(frame["equation"]))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(labels) + 2), 4.6))
    offsets = {"truth": -0.15, "perturbed": 0.15}
    colours = {"truth": "C0", "perturbed": "C3"}
    for point, g in frame.groupby("point"):
        pos = np.array([labels.index(e) for e in g["equation"]]) + offsets.get(point, 0.0)
        b, se = g["bias_norm"].to_numpy(float), g["bias_norm_mcse"].to_numpy(float)
        lower = np.minimum(se, b * 0.999)  # log scale: keep the bar above zero
        rej = g["reject"].to_numpy(bool)
        ax.errorbar(pos, b, yerr=[lower, se], fmt="none", ecolor=colours.get(point, "k"), capsize=3)
        ax.scatter(pos[rej], b[rej], color=colours.get(point, "k"), marker="o", zorder=3,
                   label=f"{point}: rejected")
        ax.scatter(pos[~rej], b[~rej], facecolors="white", edgecolors=colours.get(point, "k"), marker="o", zorder=3,
                   label=f"{point}: not rejected")
        ax.scatter(pos, g["noise"].to_numpy(float), color="grey", marker="_", s=120, zorder=2,
                   label="noise level sqrt(tr S / R)" if point == frame["point"].iloc[0] else None)
        if "expected_bias_norm" in g:
            e = g["expected_bias_norm"].to_numpy(float)
            keep = np.isfinite(e) & (e > 0)
            ax.scatter(pos[keep], e[keep], color=colours.get(point, "k"), marker="x", zorder=4,
                       label=f"{point}: expected (exact / leading term)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_ylabel("|mean g - exact gradient|  (MCSE bars)")
    ax.set_title(f"Gradient audit, {setup.design}: R = {setup.num_replicates} per audit, alpha = {setup.alpha:g}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both", axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_isk(frame: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """K x bias projected on -grad chi2 / 2 (unit direction) against K, with the |u| reference."""
    plt = _plt()
    at = frame[frame["equation"].isin(labels)].copy()
    at["K"] = [equation_param(e) for e in at["equation"]]
    points = list(dict.fromkeys(at["point"]))
    fig, axes = plt.subplots(1, len(points), figsize=(5.2 * len(points), 4.2), squeeze=False)
    for ax, point in zip(axes[0], points):
        g = at[at["point"] == point].sort_values("K")
        ax.errorbar(g["K"], g["proj"], yerr=g["proj_mcse"], fmt="o-", capsize=3,
                    label="<K (mean g - grad log m), u/|u|>")
        u = float(g["u_norm"].iloc[0])
        ax.axhline(u, color="k", ls="--", label="|u|, u = -grad chi2 / 2 (leading term)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.set_ylabel("K x bias along u")
        ax.set_title(f"is-K, point: {point}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_mh(frame: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """ps-mh: Monte Carlo bias norm (MCSE bars) and the exact chain's bias against B."""
    plt = _plt()
    at = frame[frame["equation"].isin(labels)].copy()
    at["B"] = [equation_param(e) for e in at["equation"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (point, g) in enumerate(at.groupby("point")):
        g = g.sort_values("B")
        ax.errorbar(g["B"], g["bias_norm"], yerr=g["bias_norm_mcse"], fmt="o", capsize=3, color=f"C{i}",
                    label=f"{point}: Monte Carlo")
        if "expected_bias_norm" in g and g["expected_bias_norm"].notna().any():
            ax.plot(g["B"], g["expected_bias_norm"], "x--", color=f"C{i}", label=f"{point}: exact chain")
        ax.plot(g["B"], g["noise"], "_", color=f"C{i}", ms=14, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("B (MH steps per visit, fresh independence chains)")
    ax.set_ylabel("|mean g - grad log m|")
    ax.set_title("ps-mh bias against burn-in (bars: MCSE; dashes: noise level)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_calibration(null: pd.DataFrame, path: Path, alpha: float) -> Path:
    """Null p-values: histogram, and a QQ plot against U(0, 1) on -log10 scales (the lower tail,
    where alpha lives, is what matters) with a 95% pointwise band from the beta order statistics."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    top = 0.0
    for i, ((label, point), g) in enumerate(null.groupby(["equation", "point"])):
        p = np.sort(g["p_value"].to_numpy(float))
        n = p.size
        bins = min(20, max(5, n // 10))
        ax1.hist(p, bins=bins, range=(0, 1), alpha=0.6, color=f"C{i}", label=f"{label}@{point} (n={n})")
        k = np.arange(1, n + 1)
        expected = -np.log10(k / (n + 1))
        ax2.plot(expected, -np.log10(np.clip(p, 1e-300, None)), ".", color=f"C{i}", label=f"{label}@{point}")
        top = max(top, float(expected.max()), float(-np.log10(max(p.min(), 1e-300))))
        if i == 0:
            ax1.axhline(n / bins, color="k", ls="--", lw=1, label="uniform")
            ax2.fill_between(expected, -np.log10(sps.beta.ppf(0.975, k, n + 1 - k)),
                             -np.log10(sps.beta.ppf(0.025, k, n + 1 - k)), color="grey", alpha=0.3,
                             label="95% pointwise band")
    ax2.plot([0, top], [0, top], "k--", lw=1)
    ax2.axhline(-math.log10(alpha), color="C3", lw=0.8, ls=":", label=f"alpha = {alpha:g}")
    ax1.set_xlabel("audit p-value under the null")
    ax1.set_ylabel("count")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("-log10 expected p (uniform order statistics)")
    ax2.set_ylabel("-log10 observed p")
    ax2.set_title("QQ vs U(0, 1); above the band = anti-conservative", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
