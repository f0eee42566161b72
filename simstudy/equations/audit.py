"""Gradient audit: is the Monte Carlo mean of g the exact gradient of its objective? (DESIGN §6.1)

Each replicate is one call of ``equation.loss`` with fresh latent draws on the same
data; its flattened parameter gradient, negated, is one draw g_r of the (weighted)
mean estimating function. Replicates run one after another: the samplers (rejection
rounds, MH chains) are data-dependent loops that torch.func cannot vmap, and each
call is already batched over data and draws, so the loop over replicates costs
little more than the draws themselves. The statistics are vectorised (numpy).

The reference is the exact gradient of the equation's population objective by
differentiable quadrature (``equation.exact_objective``), or the gradient of the
likelihood objective mean log m (to measure the bias of is-K, aug, ps-mh, ...),
or a vector supplied by the caller.

The test: the bias b = mean(g) - reference is tested with a Hotelling-type
statistic on the identifiable subspace: with S the sample covariance of the g_r,
keep the eigenvectors u_k whose eigenvalues exceed ``rtol`` times the largest
(directions in which g varies; the rest are fixed by the model's invariances,
DESIGN §3 "Identifiability"), and T^2 = R sum_k (u_k' b)^2 / lambda_k, df = the
number kept. Under no bias T^2 is approximately chi-square(df); with S estimated,
(R - df) / (df (R - 1)) T^2 is F(df, R - df) for Gaussian g, which is what
``p_value`` uses when R > df (``p_value_chi2`` is the large-R approximation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from scipy import stats as sps

from .. import quadrature


@dataclass
class AuditResult:
    """Result of :func:`gradient_audit` (statsmodels-style: statistics on demand, ``summary()``).

    ``replicates`` ``(R, P)``: the replicate estimating functions g_r; ``reference``
    ``(P,)``; ``parameter_names``: one per flattened entry.
    """

    equation: str
    estimand: str
    reference_kind: str
    replicates: np.ndarray
    reference: np.ndarray
    parameter_names: list[str]
    rtol: float = 1e-8
    alpha: float = 0.001
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    # ---- moments -------------------------------------------------------------------------
    @property
    def num_replicates(self) -> int:
        return int(self.replicates.shape[0])

    @cached_property
    def mean(self) -> np.ndarray:
        """Monte Carlo mean of g, ``(P,)``."""
        return self.replicates.mean(0)

    @cached_property
    def cov(self) -> np.ndarray:
        """Sample covariance of one replicate g_r, ``(P, P)``."""
        return np.atleast_2d(np.cov(self.replicates, rowvar=False))

    @cached_property
    def mcse(self) -> np.ndarray:
        """Monte Carlo standard error of each component of the mean, ``(P,)``."""
        return np.sqrt(np.clip(np.diag(self.cov), 0, None) / self.num_replicates)

    @cached_property
    def bias(self) -> np.ndarray:
        """mean(g) - reference, ``(P,)``."""
        return self.mean - self.reference

    @property
    def bias_norm(self) -> float:
        return float(np.linalg.norm(self.bias))

    @property
    def bias_norm_mcse(self) -> float:
        """Delta-method MCSE of ``bias_norm``."""
        n = self.bias_norm
        if n == 0:
            return float(np.sqrt(np.trace(self.cov) / self.num_replicates))
        return float(np.sqrt(max(self.bias @ self.cov @ self.bias, 0.0) / self.num_replicates) / n)

    @property
    def bias_norm_noise(self) -> float:
        """sqrt(tr(S) / R): the bias norm expected from Monte Carlo noise alone."""
        return float(np.sqrt(np.trace(self.cov) / self.num_replicates))

    @cached_property
    def z_scores(self) -> np.ndarray:
        """bias / mcse per component (0 where the MCSE is 0 and the bias is 0, inf otherwise)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            z = self.bias / self.mcse
        return np.where(self.mcse > 0, z, np.where(np.abs(self.bias) > 0, np.inf, 0.0))

    # ---- Hotelling-type test on the identifiable subspace -----------------------------------
    @cached_property
    def eigen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kept eigenvalues, their eigenvectors, and the dropped eigenvalues of the covariance.

        Kept: above ``rtol`` times the largest and above the floating-point floor
        (sd 1e-10 times the scale of g), so that a deterministic g (mle) keeps none.
        """
        lam, U = np.linalg.eigh(self.cov)
        scale = 1.0 + float(np.max(np.abs(self.replicates))) if self.replicates.size else 1.0
        floor = max(self.rtol * float(lam.max(initial=0.0)), (1e-10 * scale) ** 2)
        keep = lam > floor
        return lam[keep], U[:, keep], np.clip(lam[~keep], 0, None)

    @property
    def df(self) -> int:
        """Rank of the covariance kept (dimension of the identifiable subspace)."""
        return int(self.eigen[0].size)

    @cached_property
    def t2(self) -> float:
        lam, U, _ = self.eigen
        proj = U.T @ self.bias  # (df,)
        return float(self.num_replicates * np.sum(proj ** 2 / lam)) if lam.size else 0.0

    @property
    def residual_norm(self) -> float:
        """Norm of the bias outside the kept subspace (where g did not vary)."""
        _, U, _ = self.eigen
        return float(np.linalg.norm(self.bias - U @ (U.T @ self.bias)))

    @property
    def residual_ok(self) -> bool:
        """The bias off the kept subspace is within 4 MCSE of the dropped directions (plus
        rounding). Judged only when R > P: with fewer replicates the sample covariance is
        singular in directions where g does vary, and the check is skipped (True)."""
        if self.num_replicates <= self.reference.size:
            return True
        dropped = self.eigen[2]
        scale = 1.0 + float(np.linalg.norm(self.reference)) + float(np.linalg.norm(self.mean))
        return self.residual_norm <= 4 * np.sqrt(dropped.sum() / self.num_replicates) + 1e-9 * scale

    @property
    def p_value_chi2(self) -> float:
        return float(sps.chi2.sf(self.t2, self.df)) if self.df else 1.0

    @property
    def p_value_f(self) -> float:
        R, k = self.num_replicates, self.df
        if not k or R <= k:
            return float("nan")
        return float(sps.f.sf(self.t2 * (R - k) / (k * (R - 1)), k, R - k))

    @property
    def p_value(self) -> float:
        """Hotelling F p-value when R > df, else the chi-square approximation."""
        p = self.p_value_f
        return p if np.isfinite(p) else self.p_value_chi2

    def reject(self, alpha: float | None = None) -> bool:
        """True when the test finds a bias at level ``alpha`` (default: the audit's), or a
        bias off the identifiable subspace beyond its noise (``residual_ok`` False)."""
        return self.p_value < (self.alpha if alpha is None else alpha) or not self.residual_ok

    def within_mcse(self, factor: float = 4.0, atol: float = 1e-10) -> bool:
        """Every component of the bias within ``factor`` MCSE (plus ``atol``)."""
        return bool(np.all(np.abs(self.bias) <= factor * self.mcse + atol))

    # ---- people --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"equation": self.equation, "estimand": self.estimand, "reference": self.reference_kind,
                "num_replicates": self.num_replicates, "bias_norm": self.bias_norm,
                "bias_norm_mcse": self.bias_norm_mcse, "bias_norm_noise": self.bias_norm_noise,
                "reference_norm": float(np.linalg.norm(self.reference)), "t2": self.t2, "df": self.df,
                "p_value": self.p_value, "p_value_chi2": self.p_value_chi2, "max_abs_z": float(np.max(np.abs(
                    self.z_scores))) if self.z_scores.size else 0.0, "residual_norm": self.residual_norm,
                "residual_ok": self.residual_ok,
                "reject": self.reject(), **{f"stat_{k}": float(np.mean(v)) for k, v in self.stats.items()}}

    def summary(self) -> str:
        d = self.to_dict()
        lines = [f"Gradient audit: {self.equation}  (reference: {self.reference_kind})",
                 f"  estimand          {self.estimand}",
                 f"  replicates        {self.num_replicates}   parameters {self.reference.size}",
                 f"  |reference|       {d['reference_norm']:.4g}",
                 f"  |bias|            {d['bias_norm']:.4g} +- {d['bias_norm_mcse']:.2g}"
                 f"   (noise level {d['bias_norm_noise']:.2g})",
                 f"  max |bias|/MCSE   {d['max_abs_z']:.3g}",
                 f"  Hotelling T^2     {d['t2']:.4g} on df={d['df']} (rtol {self.rtol:g}); "
                 f"p = {d['p_value']:.3g} (F), {d['p_value_chi2']:.3g} (chi2)",
                 f"  bias off subspace {d['residual_norm']:.3g}"
                 f"{'' if d['residual_ok'] else '  (beyond its Monte Carlo noise)'}",
                 f"  verdict           {'BIASED' if d['reject'] else 'no bias detected'} at alpha = {self.alpha:g}"]
        for k, v in self.stats.items():
            v = np.asarray(v, dtype=float)
            lines.append(f"  {k:<17} mean {v.mean():.4g}  sd {v.std(ddof=1) if v.size > 1 else 0.0:.3g}")
        return "\n".join(lines)

    def __repr__(self) -> str:  # pragma: no cover - convenience
        return self.summary()


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> np.ndarray:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
                     ).detach().cpu().double().numpy()


def reference_gradient(equation, model, x, y, *, weights=None, reference="objective",
                       rule: quadrature.Rule | None = None) -> tuple[np.ndarray, str]:
    """The reference vector of an audit and its description.

    reference : "objective" (gradient of ``equation.exact_objective``), "likelihood"
        (gradient of the weighted mean log m of the equation's scope), or a (P,) vector.
    """
    params = [p for _, p in _trainable(model)]
    if isinstance(reference, str):
        if reference == "objective":
            return flat_grad(equation.exact_objective(model, x, y, weights, rule), params), "exact objective"
        if reference == "likelihood":
            from .base import quadrature_log_marginal
            x_, y_, w = equation._prepare(model, x, y, weights, None)
            scope = getattr(equation, "scope", "datum")
            value = (w * quadrature_log_marginal(model, x_, y_, rule=rule, scope=scope)).sum() / w.sum()
            return flat_grad(value, params), f"likelihood (mean log m, {scope})"
        raise ValueError(f"reference={reference!r} is invalid; allowed: 'objective', 'likelihood' or a (P,) vector")
    ref = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, dtype=float)
    P = sum(p.numel() for p in params)
    if ref.shape != (P,):
        raise ValueError(f"reference of shape {ref.shape} is invalid; allowed: a ({P},) vector")
    return ref, "supplied"


def gradient_audit(equation, model, x, y, *, weights=None, reference="objective", num_replicates: int = 200,
                   generator: torch.Generator | None = None, rule: quadrature.Rule | None = None,
                   index: torch.Tensor | None = None, rtol: float = 1e-8, alpha: float = 0.001) -> AuditResult:
    """Monte Carlo mean and covariance of g against an exact reference gradient (DESIGN §6.1).

    Parameters
    ----------
    equation : Equation
    model : PerturbedLM-like; its trainable parameters define g's coordinates.
    x, y : the data (B, L), (B, c) long; weights : (B,) population weights (None: uniform).
    reference : "objective" (default), "likelihood", or a (P,) vector (see
        :func:`reference_gradient`); None means "objective".
    num_replicates : int >= 2, calls of ``equation.loss`` with fresh draws.
    generator : torch.Generator for the draws.
    rule : quadrature rule for the reference (None: the default rule of the latent).
    rtol : eigenvalues of the covariance below rtol * largest are dropped from the test.
    alpha : level of the verdict ``reject()``.
    """
    if isinstance(num_replicates, bool) or not isinstance(num_replicates, int) or num_replicates < 2:
        raise ValueError(f"num_replicates={num_replicates!r} is invalid; allowed: an integer >= 2")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} is invalid; allowed: a level in (0, 1)")
    named = _trainable(model)
    params = [p for _, p in named]
    ref, kind = reference_gradient(equation, model, x, y, weights=weights,
                                   reference="objective" if reference is None else reference, rule=rule)
    G = np.empty((num_replicates, ref.size))
    collected: dict[str, list[float]] = {}
    for r in range(num_replicates):
        out = equation.loss(model, x, y, generator=generator, index=index, weights=weights)
        G[r] = -flat_grad(out.loss, params)
        for k, v in out.stats.items():
            collected.setdefault(k, []).append(v)
    names = [f"{n}[{i}]" for n, p in named for i in range(p.numel())]
    return AuditResult(equation=getattr(equation, "name", type(equation).__name__),
                       estimand=getattr(equation, "estimand", ""), reference_kind=kind, replicates=G,
                       reference=ref, parameter_names=names, rtol=rtol, alpha=alpha,
                       stats={k: np.asarray(v) for k, v in collected.items()})
