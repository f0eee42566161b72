"""Shared machinery of the estimating equations (DESIGN §3).

Every estimating equation g(params; x, y, draws) is implemented as a surrogate
loss whose autograd gradient is ``-(1/B) sum_i g_i`` (weighted, when weights are
given): minimising the loss solves the equation. The latent draws are made at
the current parameters under ``torch.no_grad`` and held fixed inside the
gradient; no gradient flows through a sampler (DESIGN §3, last paragraph).

Any ``model`` with this interface works (``simstudy.models.PerturbedLM`` or an
LLM wrapper):

* ``sample_latent(x, K, generator) -> (B, K, *latent_shape)`` prior draws;
* ``log_probs(x, y, latent) -> (B, K, c, V)`` log next-token distributions;
* ``token_log_lik(x, y, latent) -> (B, K, c)``; ``log_lik(x, y, latent) -> (B, K)``;
* ``vocab_size``; ``perturbation`` (with ``gaussian_latent``, ``latent_dim``).

Latent scope (DESIGN §2): ``scope="datum"`` applies an equation to the whole
continuation likelihood p(y | x, z) = prod_j p(y_j | x, y_<j, z), one latent per
datum; ``scope="token"`` sums per-token terms, each with its own marginal
m(y_j | x, y_<j) = E_z p(y_j | x, y_<j, z). With c = 1 the two coincide.

This module also holds the differentiable quadrature used by each equation's
``exact_objective`` (the population objective whose gradient is the exact mean
of g for the unbiased equations, and the target the biased ones miss).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from .. import quadrature

SCOPES = ("datum", "token")


@dataclass
class EquationOutput:
    """What :meth:`Equation.loss` returns.

    ``loss``: scalar tensor; its autograd gradient is minus the (weighted) mean of
    the estimating function g over the minibatch. ``stats``: floats describing the
    draws (proposals, acceptance, K used, spread, ...).
    """

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in model.parameters():
        return p.dtype
    return torch.float64


# ---- the base class -----------------------------------------------------------------
@dataclass
class Equation:
    """Base class of the estimating equations (DESIGN §3).

    Subclasses are dataclasses with explicit, validated keyword arguments; they
    implement :meth:`per_datum_loss` (a ``(B,)`` tensor, each entry a surrogate
    whose gradient is -g_i) and :meth:`objective_terms` (the per-datum population
    objective by quadrature, with autograd).
    """

    # ---- facts about the equation (DESIGN §3), read by every client; no table elsewhere repeats them ----
    name: ClassVar[str] = ""
    estimand: ClassVar[str] = ""
    scopes: ClassVar[tuple[str, ...]] = SCOPES
    #: "unbiased" (mean of g is the gradient of its population objective), "biased", "mixing" (unbiased only
    #: once the sampler has mixed: biased at small ``steps``), "spread" (unbiased in form, variance not finite:
    #: its spread is reported, no Hotelling verdict) or "no latent" (nothing to audit). The unbiasedness
    #: check's expected verdicts derive from it (DESIGN §6.1).
    audit_expectation: ClassVar[str] = "biased"
    #: The empirical objective whose root the exact solver finds (:func:`simstudy.fit.fit_exact`):
    #: "likelihood", "brier" or "mle"; None when the equation has no exact root of its own.
    root_objective: ClassVar[str | None] = None
    #: The default latent scope on an LLM (DESIGN §2): "token" where g is a sum of per-token terms that one
    #: forward pass serves, "datum" for posterior sampling.
    llm_scope: ClassVar[str] = "datum"
    #: Short labels: ``label_pattern`` (a regex with one integer group) sets the option ``label_option``;
    #: e.g. is-K: ``is-(\d+)`` -> num_draws ("is-8"), ps-mh: ``ps-mh-B(\d+)`` -> steps ("ps-mh-B20").
    label_pattern: ClassVar[str | None] = None
    label_option: ClassVar[str | None] = None

    @classmethod
    def parse_label(cls, label: str) -> dict | None:
        """The options a short label of this equation fixes (``{}`` for its bare name), None if not its label."""
        if label == cls.name:
            return {}
        if cls.label_pattern is not None:
            match = re.fullmatch(cls.label_pattern, label)
            if match:
                return {cls.label_option: int(match.group(1))}
        return None

    @classmethod
    def label_of(cls, **options) -> str:
        """The short label of this equation with ``options`` (inverse of :meth:`parse_label`)."""
        value = options.get(cls.label_option) if cls.label_option else None
        if value is None:
            return cls.name
        return cls.label_pattern.replace("(\\d+)", str(int(value)))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        scope = getattr(self, "scope", "datum")
        if scope not in self.scopes:
            extra = ""
            if scope == "token" and self.scopes == ("datum",):
                extra = " (posterior sampling per token needs a forward pass per position, DESIGN §2)"
            raise ValueError(f"scope={scope!r} is not offered by {self.name}{extra}; allowed: {', '.join(self.scopes)}")

    # -- public API --------------------------------------------------------------------
    def loss(self, model, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
             index: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> EquationOutput:
        """Surrogate loss of a minibatch: its autograd gradient is -(sum_i w_i g_i) / sum_i w_i.

        Parameters
        ----------
        model : PerturbedLM-like
        x : (B, L) long prefixes; y : (B, c) long continuations.
        generator : torch.Generator for the latent draws (None: torch's global RNG).
        index : (B,) long datum ids (used by ps-mh's persistent chains).
        weights : (B,) non-negative datum weights (None: uniform); data of weight 0 are
            skipped where that saves work (ps-exact draws nothing for them).
        """
        x, y, w = self._prepare(model, x, y, weights, index)
        per_datum, stats = self.per_datum_loss(model, x, y, weights=w, generator=generator, index=index)  # (B,)
        per_datum = torch.where(w > 0, per_datum, torch.zeros_like(per_datum))
        loss = (w * per_datum).sum() / w.sum()
        return EquationOutput(loss=loss, stats={k: float(v) for k, v in stats.items()})

    def exact_objective(self, model, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
                        rule: quadrature.Rule | None = None) -> torch.Tensor:
        """The population objective by quadrature, a scalar with autograd (DESIGN §3, §6.1).

        Its gradient is the exact mean of g for the unbiased equations (ps-exact,
        ps-mh at stationarity, q2, sumo) and the target that the biased ones (is-K,
        aug) miss. ``estimand`` names it. Requires a Gaussian latent of dimension <= 3
        (or no latent).
        """
        x, y, w = self._prepare(model, x, y, weights, None)
        terms = self.objective_terms(model, x, y, rule)  # (B,)
        return (w * terms).sum() / w.sum()

    def get_params(self) -> dict[str, Any]:
        """The keyword arguments (scikit-learn style): ``type(eq)(**eq.get_params())`` clones it (fields with
        ``init=False``, such as a cache, are state, not parameters)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def describe(self) -> dict[str, Any]:
        """A flat dict for results tables."""
        return {"equation": self.name, **{f"equation_{k}": v for k, v in self.get_params().items()}}

    # -- to implement --------------------------------------------------------------------
    def per_datum_loss(self, model, x, y, *, weights, generator, index) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def objective_terms(self, model, x, y, rule) -> torch.Tensor:
        """Per-datum population objective (B,), default: the log marginal of the scope."""
        return quadrature_log_marginal(model, x, y, rule=rule, scope=getattr(self, "scope", "datum"))

    # -- helpers ----------------------------------------------------------------------------
    def _prepare(self, model, x, y, weights, index):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.long:
            raise ValueError(f"x={_shape(x)} is invalid; allowed: a (B, L) long tensor of token ids")
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.dtype != torch.long or y.shape[0] != x.shape[0]:
            raise ValueError(f"y={_shape(y)} is invalid; allowed: a (B, c) long tensor with B = {x.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("x has B=0 rows; allowed: a minibatch of at least one datum")
        V = int(model.vocab_size)
        for name, t in (("x", x), ("y", y)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
                raise ValueError(f"{name} holds token ids outside 0..{V - 1}; allowed: ids in [0, vocab_size)")
        dtype = model_dtype(model)
        if weights is None:
            w = torch.ones(x.shape[0], dtype=dtype, device=x.device)
        else:
            w = torch.as_tensor(weights, dtype=dtype, device=x.device)
            if w.shape != (x.shape[0],) or not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
                raise ValueError(f"weights={_shape(weights)} is invalid; allowed: (B,) finite, >= 0, positive sum")
        if index is not None and (not isinstance(index, torch.Tensor) or index.shape != (x.shape[0],)):
            raise ValueError(f"index={_shape(index)} is invalid; allowed: a (B,) tensor of datum ids or None")
        return x, y, w.detach()


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{value.dtype}"
    return repr(value) if not hasattr(value, "shape") else f"array{tuple(value.shape)}"


# ---- latent draws -----------------------------------------------------------------------
@torch.no_grad()
def prior_draws(model, x: torch.Tensor, num_draws: int, generator) -> torch.Tensor:
    """K prior draws per datum, ``(B, K, *latent_shape)``, made without gradient."""
    return model.sample_latent(x, num_draws, generator)


def log_weights(token_ll: torch.Tensor, scope: str) -> torch.Tensor:
    """Per-term log-likelihoods of the scope: ``(B, K, c)`` -> ``(B, K, c')`` (c' = 1 for datum)."""
    return token_ll.sum(-1, keepdim=True) if scope == "datum" else token_ll


# ---- differentiable quadrature (the population objectives) ---------------------------------
def _has_latent(model) -> bool:
    p = getattr(model, "perturbation", None)
    return p is not None and getattr(p, "latent_dim", 0) > 0 and getattr(p, "perturb_at_eval", True)


def resolve_rule(model, rule: quadrature.Rule | None) -> quadrature.Rule:
    p = model.perturbation
    if not getattr(p, "gaussian_latent", False) or p.latent_dim > 3:
        raise ValueError(f"perturbation={type(p).__name__} has no quadrature rule; allowed: a Gaussian latent "
                         f"of dimension <= 3 (latent_dim={getattr(p, 'latent_dim', None)})")
    if rule is None:
        return quadrature.default_rule(p.latent_dim)
    if rule.dim != p.latent_dim:
        raise ValueError(f"rule of dimension {rule.dim} does not match latent_dim={p.latent_dim}")
    return rule


def quadrature_log_probs(model, x: torch.Tensor, y: torch.Tensor, rule: quadrature.Rule | None = None,
                         max_rows: int = 400_000) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(. | x, y_<j, z_a) at the quadrature nodes, WITH autograd.

    Returns ``(log_probs (B, M, c, V), log_w (M,))``; a model without a latent
    returns its unperturbed log-probabilities with one node of weight one.
    """
    dtype = model_dtype(model)
    if not _has_latent(model):
        return model.log_probs(x, y, None), torch.zeros(1, dtype=dtype, device=x.device)
    rule = resolve_rule(model, rule)
    nodes = torch.as_tensor(rule.nodes, dtype=dtype, device=x.device)  # (M, q)
    log_w = torch.as_tensor(rule.log_weights, dtype=dtype, device=x.device)  # (M,)
    M = nodes.shape[0]
    chunk = max(1, max_rows // M)
    out = []
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        latent = nodes[None].expand(xb.shape[0], M, nodes.shape[1])  # (b, M, q)
        out.append(model.log_probs(xb, yb, latent))  # (b, M, c, V)
    return torch.cat(out, dim=0), log_w


def quadrature_token_log_lik(model, x: torch.Tensor, y: torch.Tensor, rule: quadrature.Rule | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_j | x, y_<j, z_a) at the quadrature nodes, WITH autograd: ``((B, M, c), (M,))``."""
    logp, log_w = quadrature_log_probs(model, x, y, rule)  # (B, M, c, V)
    return gather_observed(logp, y), log_w


def gather_observed(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pick the observed tokens: ``(B, K, c, V)`` log-probs -> ``(B, K, c)``."""
    index = y[:, None, :, None].expand(-1, logp.shape[1], -1, 1)  # (B, K, c, 1)
    return logp.gather(-1, index).squeeze(-1)


def quadrature_log_marginal(model, x, y, *, rule=None, scope: str = "datum") -> torch.Tensor:
    """log m by quadrature with autograd, per datum ``(B,)``.

    datum: log E_z p(y | x, z); token: sum_j log E_z p(y_j | x, y_<j, z).
    """
    ll, log_w = quadrature_token_log_lik(model, x, y, rule)  # (B, M, c), (M,)
    lw = log_weights(ll, scope)  # (B, M, c')
    return torch.logsumexp(lw + log_w[None, :, None], dim=1).sum(-1)  # (B,)


def quadrature_divergences(model, x, y, *, rule=None, scope: str = "datum") -> dict[str, torch.Tensor]:
    """Posterior-versus-prior divergences by quadrature, with autograd, per datum ``(B,)``.

    ``chi2``: chi^2(posterior || prior) = E_prior[(p / m)^2] - 1 (the is-K bias is
    -grad chi2 / (2K) + O(K^-2), DESIGN §3); ``kl``: KL(prior || posterior) =
    log m - E_prior log p (aug's bias is -grad kl). Token scope sums over positions.
    """
    ll, log_w = quadrature_token_log_lik(model, x, y, rule)
    lw = log_weights(ll, scope)  # (B, M, c')
    log_m = torch.logsumexp(lw + log_w[None, :, None], dim=1)  # (B, c')
    log_m2 = torch.logsumexp(2 * lw + log_w[None, :, None], dim=1)  # (B, c')
    chi2 = torch.expm1(log_m2 - 2 * log_m).sum(-1)
    kl = (log_m - (lw * log_w.exp()[None, :, None]).sum(1)).sum(-1)
    return {"chi2": chi2, "kl": kl, "log_m": log_m.sum(-1)}


@torch.no_grad()
def quadrature_posterior_mean(model, x, y, *, rule=None) -> torch.Tensor:
    """E[z | x, y] under the per-datum posterior, by quadrature: ``(B, q)``."""
    rule = resolve_rule(model, rule)
    ll, log_w = quadrature_token_log_lik(model, x, y, rule)
    log_post = ll.sum(-1) + log_w[None]  # (B, M)
    post = torch.softmax(log_post, dim=1)
    nodes = torch.as_tensor(rule.nodes, dtype=post.dtype, device=post.device)  # (M, q)
    return post @ nodes
