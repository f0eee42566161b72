"""Estimands and metrics of DESIGN §5.

The primary estimand is the model marginal m(. | x): every fit is judged by the
divergence of the truth's marginal m* from the fitted m-hat, averaged over
in-support (ID) and out-of-support (OOS) prefixes, and OOS binned by the
prefix's distance to the support (the extrapolation curve). Infinite KL (a fit
that puts zero probability on a token the truth can emit) is reported as inf,
never dropped (DESIGN §3, q2 at small n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .models import PerturbedLM
from .validation import check_choice, check_int


def kl_divergence(p_true: np.ndarray, p_hat: np.ndarray | None = None, *,
                  log_p_hat: np.ndarray | None = None) -> np.ndarray:
    """KL(p_true || p_hat) row by row, in nats: (N, V) x (N, V) -> (N,).

    Terms with p_true = 0 contribute 0; p_hat = 0 where p_true > 0 gives inf.
    ``log_p_hat`` (the fit's log-probabilities, e.g. from a logsumexp over
    quadrature nodes) replaces ``log(p_hat)``: the KL stays finite where
    ``p_hat`` underflows to 0 though its logarithm is finite (a steep fitted
    head), as it should.
    """
    p_true = np.asarray(p_true, dtype=np.float64)
    if log_p_hat is not None:
        log_q = np.asarray(log_p_hat, dtype=np.float64)
    elif p_hat is not None:
        log_q = None
        p_hat = np.asarray(p_hat, dtype=np.float64)
    else:
        raise ValueError("p_hat and log_p_hat are both None; allowed: one of them")
    shape = log_q.shape if log_q is not None else p_hat.shape
    if p_true.shape != shape:
        raise ValueError(f"shapes differ: truth {p_true.shape} vs fit {shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if log_q is None:
            log_q = np.log(p_hat)
        terms = np.where(p_true > 0, p_true * (np.log(p_true) - log_q), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def tv_distance(p_true: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """Total variation distance row by row: (N, V) x (N, V) -> (N,)."""
    return 0.5 * np.abs(np.asarray(p_true) - np.asarray(p_hat)).sum(axis=-1)


def mc_marginal_kl(truth: np.ndarray, probs: np.ndarray, error: np.ndarray) -> dict[str, np.ndarray]:
    """KL(m* || m-hat) per row for a Monte Carlo marginal m-hat with per-class
    standard errors ``error`` (``PerturbedLM.marginal(method="mc")``), DESIGN §5.

    The plug-in KL is biased upwards by E[-log m-hat_v] + log m_v ~ Var(m-hat_v) /
    (2 m_v^2); b = sum_v m*_v error_v^2 / (2 m-hat_v^2) is subtracted. The standard
    error sqrt(sum_v (m*_v / m-hat_v)^2 error_v^2) is the delta method without the
    between-class covariance (the model does not return it). Returns ``kl``
    (corrected), ``kl_plugin``, ``bias``, ``mc_se``, each ``(N,)``.
    """
    m = np.asarray(truth, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    e = np.asarray(error, dtype=np.float64)
    if not (m.shape == p.shape == e.shape) or m.ndim != 2:
        raise ValueError(f"shapes {m.shape}, {p.shape}, {e.shape} are invalid; allowed: equal (N, V) shapes")
    plugin = kl_divergence(m, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        bias = np.where(m > 0, m * e ** 2 / (2 * p ** 2), 0.0).sum(1)
        se = np.sqrt(np.where(m > 0, (m / p) ** 2 * e ** 2, 0.0).sum(1))
    return {"kl": plugin - bias, "kl_plugin": plugin, "bias": bias, "mc_se": se}


def _mean_and_mcse(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if not np.all(np.isfinite(values)):
        return float("inf"), float("nan")
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return float(values.mean()), float(se)


@dataclass
class MarginalEvaluation:
    """Divergences of a fitted model from the truth, prefix by prefix.

    ``table`` has one row per prefix: ``region`` ("ID"/"OOS"), ``distance`` to the
    support, ``kl``, ``tv``; ``marginal_error`` is the largest numerical error of
    the fitted marginal (quadrature doubling or Monte Carlo SE).
    """

    table: pd.DataFrame
    marginal_error: float
    marginal_method: str

    def metrics(self) -> dict[str, float]:
        """Flat dict: kl_id, kl_oos, tv_id, tv_oos (prefix averages, each set equally weighted)."""
        out: dict[str, float] = {}
        for region in ("ID", "OOS"):
            rows = self.table[self.table.region == region]
            for name in ("kl", "tv"):
                out[f"{name}_{region.lower()}"] = float(rows[name].mean()) if len(rows) else float("nan")
        out["marginal_error"] = self.marginal_error
        return out

    def extrapolation_curve(self, bins: int | np.ndarray = 5, metric: str = "kl") -> pd.DataFrame:
        """OOS ``metric`` binned by distance to the support: one row per bin with
        the bin's edges, prefix count, mean and its standard error over prefixes."""
        return extrapolation_curve(self.table[self.table.region == "OOS"], bins=bins, metric=metric)


def extrapolation_curve(table: pd.DataFrame, *, bins: int | np.ndarray = 5, metric: str = "kl") -> pd.DataFrame:
    """Bin rows of ``table`` (columns ``distance`` and ``metric``) by distance; mean and SE per bin."""
    if table.empty:
        return pd.DataFrame(columns=["distance_low", "distance_high", "distance", "count", metric, f"{metric}_se"])
    distance = table["distance"].to_numpy()
    edges = np.linspace(0.0, distance.max(), bins + 1) if np.isscalar(bins) else np.asarray(bins, dtype=float)
    edges[-1] = np.nextafter(edges[-1], np.inf)
    which = np.clip(np.digitize(distance, edges[1:-1], right=True), 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        values = table[metric].to_numpy()[which == b]
        if values.size == 0:
            continue
        mean, se = _mean_and_mcse(values)
        rows.append({"distance_low": edges[b], "distance_high": edges[b + 1],
                     "distance": float(distance[which == b].mean()), "count": int(values.size),
                     metric: mean, f"{metric}_se": se})
    return pd.DataFrame(rows)


LOG_SPACE_BELOW = 1e-200  # m-hat below this on a token the truth emits: KL from log m-hat (evaluate_marginals)


def evaluate_marginals(model: PerturbedLM, *, prefixes: np.ndarray, truth: np.ndarray, distance: np.ndarray,
                       in_support: np.ndarray, method: str = "auto", num_draws: int = 2000,
                       generator: torch.Generator | None = None) -> MarginalEvaluation:
    """Compare the fitted marginal m-hat(. | x) with the truth m*(. | x) on ``prefixes``.

    Parameters
    ----------
    prefixes : (N, L) int array; truth : (N, V) exact m*; distance : (N,) distance to
    the support; in_support : (N,) bool. ``method`` is passed to ``model.marginal``
    (quadrature when q <= 3, else Monte Carlo with ``num_draws``).
    """
    x = torch.as_tensor(np.asarray(prefixes), dtype=torch.long, device=model.embedding.device)
    replay = generator.get_state() if generator is not None else None
    with torch.no_grad():
        fitted = model.marginal(x, method=method, num_draws=num_draws, generator=generator)
    kl = kl_divergence(truth, fitted.probs)
    # rows where m-hat is below LOG_SPACE_BELOW on a token the truth emits (there the per-node or per-draw
    # probabilities summed into m-hat underflow: to 0, giving inf, or to subnormals that have lost their
    # digits): their KL from log m-hat, end to end; every other row keeps the probability path, bitwise
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(kl) | ((np.asarray(truth) > 0) & (np.asarray(fitted.probs, dtype=np.float64)
                                                             < LOG_SPACE_BELOW)).any(axis=1)
    if bad.any():
        log_m = _log_marginal(model, x, method=method, num_draws=num_draws, replay=replay,
                              replay_device=None if generator is None else generator.device)
        if log_m is not None:
            kl[bad] = kl_divergence(np.asarray(truth, dtype=np.float64)[bad], log_p_hat=log_m[bad])
    table = pd.DataFrame({
        "region": np.where(np.asarray(in_support), "ID", "OOS"),
        "distance": np.asarray(distance, dtype=float),
        "kl": kl,
        "tv": tv_distance(truth, fitted.probs),
    })
    return MarginalEvaluation(table=table, marginal_error=fitted.max_error, marginal_method=fitted.method)


@torch.no_grad()
def _log_marginal(model: PerturbedLM, x: torch.Tensor, *, method: str, num_draws: int, replay=None,
                  replay_device=None) -> np.ndarray | None:
    """log m-hat(. | x), ``(N, V)``, computed in log space (logsumexp over quadrature nodes or Monte Carlo
    draws) for the marginal ``model.marginal(x, method=..., num_draws=...)`` computes from probabilities.

    Monte Carlo replays the same draws from ``replay`` (the generator's state before ``marginal``); without
    it (the global generator), or for the discrete substitution kernel, returns None.
    """
    from . import quadrature
    from .models.perturbations import DiscreteSubstitution, NoPerturbation

    p = model.perturbation
    if isinstance(p, NoPerturbation) or not p.perturb_at_eval:
        return model.log_probs(x, None, None)[:, 0, 0].cpu().numpy()
    if method == "auto":
        method = "quadrature" if model.can_integrate() else "mc"
    if isinstance(p, DiscreteSubstitution):
        return None
    if method in ("quadrature", "trapezoid", "gauss-hermite"):
        rule = quadrature.default_rule(p.latent_dim)
        if method == "gauss-hermite":
            rule = quadrature.gauss_hermite(rule.num_nodes_per_dim, p.latent_dim)
        return model.log_marginal_nodes(x, None, quadrature.refined(rule))[:, 0].cpu().numpy()
    if method != "mc" or replay is None:
        return None
    generator = torch.Generator(device=replay_device or "cpu")
    generator.set_state(replay)
    batch = max(1, min(num_draws, 2_000_000 // max(1, x.shape[0] * model.vocab_size)))  # as marginal draws them
    log_sum, done = None, 0
    while done < num_draws:
        k = min(batch, num_draws - done)
        logp = model.log_probs(x, None, model.sample_latent(x, k, generator))[:, :, 0]  # (N, k, V)
        part = torch.logsumexp(logp, dim=1)
        log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
        done += k
    return (log_sum - math.log(num_draws)).cpu().numpy()


def _identifiable_perturbation(model: PerturbedLM) -> torch.Tensor:
    """W1 A: the part of the perturbation the network's first layer sees (DESIGN §3)."""
    A = model.perturbation.A  # (L*d, q)
    network = model.network
    if hasattr(network, "hidden") and isinstance(getattr(network, "hidden"), torch.nn.Linear):
        return network.hidden.weight @ A  # (H, q)
    return A


@torch.no_grad()
def perturbation_recovery(student: PerturbedLM, teacher: PerturbedLM) -> dict[str, float]:
    """Identifiable perturbation-covariance error (DESIGN §5) for linear perturbations.

    * ``cov_error``: ||A A^T - A* A*^T||_F (meaningful when f sees all of G, e.g. linear f);
    * ``cov_spectrum_error``: distance between the sorted eigenvalues of W1 A A^T W1^T
      and of the truth's (invariant to rotations of z and to sign flips and
      permutations of tanh hidden units, which leave m unchanged);
    * ``scale_ratio``: ||W1 A||_F / ||W1* A*||_F (1 when the perturbation's size is recovered).
    Returns NaNs when either model has no linear perturbation.
    """
    if not (hasattr(student.perturbation, "A") and hasattr(teacher.perturbation, "A")):
        return {"cov_error": float("nan"), "cov_spectrum_error": float("nan"), "scale_ratio": float("nan")}
    A, A_star = student.perturbation.A.double(), teacher.perturbation.A.double()
    out = {"cov_error": float(torch.linalg.norm(A @ A.T - A_star @ A_star.T))}
    S, S_star = _identifiable_perturbation(student).double(), _identifiable_perturbation(teacher).double()
    if S.shape == S_star.shape:
        eig = torch.linalg.eigvalsh(S @ S.T)
        eig_star = torch.linalg.eigvalsh(S_star @ S_star.T)
        out["cov_spectrum_error"] = float(torch.linalg.norm(eig - eig_star))
    else:
        out["cov_spectrum_error"] = float("nan")
    out["scale_ratio"] = float(torch.linalg.norm(S) / torch.linalg.norm(S_star).clamp_min(1e-300))
    return out


def iwae_bound(token_log_lik: torch.Tensor, *, scope: str = "datum") -> torch.Tensor:
    """The K-sample IWAE bound from per-token log-likelihoods of K prior draws (DESIGN §5).

    Parameters
    ----------
    token_log_lik : (B, K, c) tensor
        log p(y_j | x, y_<j, z_k) of K prior draws z_k (K = 1 and no latent: the exact log-likelihood).
    scope : {"datum", "token"}
        "datum": log mean_k p(y | x, z_k), one bound per datum, ``(B,)``; "token": per-position bounds
        log mean_k p(y_j | x, y_<j, z_k), ``(B, c)``, the draws shared across positions (DESIGN §2, per-token
        scope: each position's bound stays valid).
    """
    k = token_log_lik.shape[1]
    if scope == "datum":
        return torch.logsumexp(token_log_lik.sum(-1), dim=1) - math.log(k)  # (B,)
    if scope == "token":
        return torch.logsumexp(token_log_lik, dim=1) - math.log(k)  # (B, c)
    raise ValueError(f"scope={scope!r} is unknown; allowed: datum, token")


def has_eval_latent(model) -> bool:
    """True when the model's predictive distribution integrates over a latent (NEFTune and mle have none)."""
    p = model.perturbation
    return bool(p.perturb_at_eval and p.latent_dim > 0)


@torch.no_grad()
def iwae_log_marginal(model: PerturbedLM, x: torch.Tensor, y: torch.Tensor, *, num_draws: int,
                      generator: torch.Generator | None = None, scope: str = "datum",
                      batch_size: int | None = None) -> torch.Tensor:
    """K-sample IWAE estimate of log m(y | x): log mean_k p(y | x, z_k), a lower bound
    in expectation that tightens as K grows (DESIGN §5). The one IWAE estimate of the package:
    :func:`perplexity` and :func:`simstudy.llm.datum_log_marginals` call it.

    Parameters
    ----------
    model : PerturbedLM or PerturbedCausalLM
    x : (B, L) long; y : (B, c) long
    num_draws : int >= 1
        K. A model without a latent at evaluation (:func:`has_eval_latent` false) is evaluated exactly,
        K = 1, and draws nothing from ``generator``.
    scope : {"datum", "token"}
        See :func:`iwae_bound`: ``(B,)`` per datum, ``(B, c)`` per token.
    batch_size : int, optional
        Data per forward pass (the draws of each batch are made in turn); None: one pass.
    """
    check_int("num_draws", num_draws, 1)
    check_choice("scope", scope, ("datum", "token"), word="unknown")
    n = x.shape[0]
    step = max(n, 1) if batch_size is None else check_int("batch_size", batch_size, 1)
    latent_on = has_eval_latent(model)
    out = []
    for s in range(0, max(n, 1), step):  # one (empty) pass when there are no data
        xb, yb = x[s:s + step], y[s:s + step]  # (b, L), (b, c)
        latent = model.sample_latent(xb, num_draws, generator) if latent_on else None  # (b, K, ...)
        out.append(iwae_bound(model.token_log_lik(xb, yb, latent), scope=scope))  # (b,) or (b, c)
    return torch.cat(out)


def perplexity(model: PerturbedLM, x: torch.Tensor, y: torch.Tensor, *, num_draws: int = 16,
               generator: torch.Generator | None = None, scope: str = "datum") -> dict[str, float]:
    """exp(- mean per-token log m) with log m by the K-sample IWAE bound; returns the
    perplexity, its K, and a delta-method standard error over data."""
    log_m = iwae_log_marginal(model, x, y, num_draws=num_draws, generator=generator, scope=scope)
    per_datum = log_m if scope == "datum" else log_m.sum(-1)  # (B,)
    tokens = y.shape[1]
    per_token = (per_datum / tokens).double().cpu().numpy()
    mean, se = _mean_and_mcse(per_token)
    ppl = float(np.exp(-mean))
    return {"perplexity": ppl, "perplexity_se": ppl * se, "num_draws": int(num_draws)}
