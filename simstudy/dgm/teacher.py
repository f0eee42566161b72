"""The truth of the perturbed next-token DGM: teacher network f*, direction A*, entropy calibration (DESIGN §4).

The truth is a :class:`~simstudy.models.PerturbedLM`
p*(y | x, z) = softmax(f*(E(x) + reshape(A* z))), z ~ N(0, I_q), built here from
numpy Generators (one stream for the teacher's weights, one for the direction),
so that designs differing only in q, sigma, direction or c share the same teacher
network for the same seed. The logit scale is then set so that the deterministic
teacher's mean entropy over the in-support prefixes is a stated value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import optimize

from ..models import LinearPerturbation, Network, PerturbedLM, TransformerConfig, make_network
from .features import smooth_features

__all__ = ["TEACHER_LAWS", "calibrate_entropy", "make_direction", "make_teacher", "make_teacher_network", "tangent",
           "transformer_config", "window_moments"]

_ROWS = 65536  # rows per forward chunk of the deterministic teacher
#: Laws of the teacher's weights (:func:`make_teacher_network`); "scaled" is the default.
TEACHER_LAWS = ("scaled", "gaussian")


def transformer_config(transformer: TransformerConfig | dict | None, *, prefix_len: int,
                       observations: int) -> TransformerConfig:
    """The transformer's size, with ``max_len`` at least L + c - 1 (the longest input sequence).

    ``None`` gives ``TransformerConfig()`` with ``max_len`` raised to that length if needed.
    """
    need = prefix_len + observations - 1
    if transformer is None:
        return TransformerConfig(max_len=max(TransformerConfig().max_len, need))
    config = TransformerConfig(**transformer) if isinstance(transformer, dict) else transformer
    if not isinstance(config, TransformerConfig):
        raise ValueError(f"transformer={transformer!r} is invalid; allowed: a TransformerConfig, a dict or None")
    if config.max_len < need:
        raise ValueError(f"transformer max_len={config.max_len} is too small; allowed: >= prefix_len + "
                         f"observations - 1 = {need}")
    return config


def window_moments(embedding: torch.Tensor, prefix_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(L d,)`` and covariance ``(L d, L d)`` of the window of L independent uniform tokens."""
    E = embedding.numpy()  # (V, d)
    d = E.shape[1]
    mean = np.tile(E.mean(0), prefix_len)
    cov = np.kron(np.eye(prefix_len), np.cov(E.T, bias=True).reshape(d, d))
    return mean, cov


def make_teacher_network(kind: str, *, embedding: torch.Tensor, prefix_len: int, hidden: int, steepness: float,
                         transformer: TransformerConfig | None, rng: np.random.Generator, law: str = "scaled",
                         weight_sd: float = 1.0, bias_sd: float = 0.5) -> Network:
    """The teacher network f* (float64) with weights drawn from ``rng`` (the laws in PerturbedNextToken's docs).

    ``law="scaled"``: mlp: rows of W1 scaled so each unit's pre-activation has SD ``steepness`` over
    windows of uniform tokens, b1 centring the unit at ``steepness * U(-1, 1)``, W2 and b2 N(0, 1);
    linear: rows of W with unit SD, b ~ N(0, 1).
    ``law="gaussian"`` (DESIGN §4, the independent implementation's teacher): mlp: W1 entries
    N(0, weight_sd^2), b1 ~ N(0, bias_sd^2), W2 ~ N(0, 1), b2 = 0; linear: W entries N(0, weight_sd^2),
    b ~ N(0, bias_sd^2). transformer: PyTorch's default initialisation under a seed drawn from ``rng``
    (law "scaled" only). Every law first draws that torch seed, then the weights in the order above.
    """
    if law not in TEACHER_LAWS:
        raise ValueError(f"teacher_law={law!r} is unknown; allowed: {', '.join(TEACHER_LAWS)}")
    if kind == "transformer" and law != "scaled":
        raise ValueError(f"teacher_law={law!r} is invalid for teacher='transformer'; allowed: 'scaled' "
                         "(the transformer teacher keeps PyTorch's default initialisation)")
    V, d = embedding.shape
    L = prefix_len
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        net = make_network(kind, vocab_size=V, prefix_len=L, embed_dim=d, hidden=hidden,
                           transformer=transformer).double()
    mean, cov = window_moments(embedding, L)

    def standardised_rows(rows: int, scale: float) -> np.ndarray:
        G = rng.standard_normal((rows, L * d))  # (rows, L*d)
        sd = np.sqrt(np.einsum("hi,ij,hj->h", G, cov, G))  # (rows,) sd of each row's output
        return scale * G / sd[:, None]

    with torch.no_grad():
        if kind == "mlp" and law == "gaussian":
            W1 = weight_sd * rng.standard_normal((hidden, L * d))  # (H, L*d)
            b1 = bias_sd * rng.standard_normal(hidden)  # (H,)
            net.hidden.weight.copy_(torch.tensor(W1))
            net.hidden.bias.copy_(torch.tensor(b1))
            net.head.weight.copy_(torch.tensor(rng.standard_normal((V, hidden))))  # (V, H)
            net.head.bias.zero_()  # (V,) b2 = 0
        elif kind == "linear" and law == "gaussian":
            net.head.weight.copy_(torch.tensor(weight_sd * rng.standard_normal((V, L * d))))  # (V, L*d)
            net.head.bias.copy_(torch.tensor(bias_sd * rng.standard_normal(V)))  # (V,)
        elif kind == "mlp":
            W1 = standardised_rows(hidden, steepness)  # (H, L*d)
            b1 = -W1 @ mean + steepness * rng.uniform(-1.0, 1.0, hidden)  # (H,)
            net.hidden.weight.copy_(torch.tensor(W1))
            net.hidden.bias.copy_(torch.tensor(b1))
            net.head.weight.copy_(torch.tensor(rng.standard_normal((V, hidden))))
            net.head.bias.copy_(torch.tensor(rng.standard_normal(V)))
        elif kind == "linear":
            net.head.weight.copy_(torch.tensor(standardised_rows(V, 1.0)))
            net.head.bias.copy_(torch.tensor(rng.standard_normal(V)))
    return net


def tangent(s_max: float, features: int | Sequence[str]) -> np.ndarray:
    """The unit tangent d phi / ds of the smooth embedding at s_max, ``(d,)``; ``features``: the number d of
    default features or their names (:mod:`simstudy.dgm.features`)."""
    t = smooth_features(s_max, features, derivative=True)
    return t / np.linalg.norm(t)


def make_direction(direction: str, *, prefix_len: int, embed_dim: int, latent_dim: int, sigma: float,
                   s_max: float, rng: np.random.Generator, features: Sequence[str] | None = None) -> np.ndarray:
    """A* ``(L d, q)`` of Frobenius norm ``sigma``: Gaussian then normalised ("random"), or "tangent":
    prefix position l moves along the unit tangent at s_max of the embedding's ``features`` (None: the
    first d default ones), driven by latent coordinate l mod q."""
    L, d, q = prefix_len, embed_dim, latent_dim
    if direction == "random":
        A = rng.standard_normal((L * d, q))
    else:
        t = tangent(s_max, d if features is None else features)  # (d,)
        A = np.zeros((L * d, q))
        for pos in range(L):
            for j in range(q):
                if (pos - j) % min(q, L) == 0:
                    A[pos * d:(pos + 1) * d, j] = t
    return sigma * A / np.linalg.norm(A)


def make_teacher(network: Network, A: np.ndarray, *, embedding: torch.Tensor, prefix_len: int,
                 continuation: str) -> PerturbedLM:
    """The frozen float64 truth p*(y | x, z) with network f* and linear perturbation A* ``(L d, q)``."""
    d = embedding.shape[1]
    with torch.random.fork_rng(devices=[]):  # the constructor's own draw must not touch the global stream
        perturbation = LinearPerturbation(prefix_len=prefix_len, embed_dim=d, latent_dim=A.shape[1],
                                          init_scale=1.0).double()
    perturbation.A.data.copy_(torch.tensor(A, dtype=torch.float64))
    teacher = PerturbedLM(embedding=embedding, network=network, perturbation=perturbation,
                          continuation=continuation).double()
    teacher.requires_grad_(False).eval()
    return teacher


@torch.no_grad()
def raw_logits(teacher: PerturbedLM, embedding: torch.Tensor, x: np.ndarray) -> torch.Tensor:
    """Logits of the deterministic teacher (z = 0) with logit scale 1, ``(N, V)``."""
    net = teacher.network
    old = net.logit_scale.clone()
    net.logit_scale.fill_(1.0)
    try:
        xt = torch.as_tensor(x, dtype=torch.long)  # (N, L)
        return torch.cat([net(embedding[xt[i:i + _ROWS]], None, "iid")[:, 0] for i in range(0, len(xt), _ROWS)])
    finally:
        net.logit_scale.copy_(old)


def calibrate_entropy(teacher: PerturbedLM, embedding: torch.Tensor, x: np.ndarray,
                      entropy: float) -> tuple[float, float]:
    """Set the teacher's logit scale so its deterministic mean entropy over ``x`` ``(N, L)`` is ``entropy``.

    Bracketing root search on log(logit scale): bisection safeguarded by Brent's method
    (the mean entropy falls monotonically in the scale), to 1e-12 in log scale; the result
    is checked to 1e-6. Returns ``(achieved entropy, logit scale)``.
    """
    logits = raw_logits(teacher, embedding, x)  # (N, V)

    def gap(log_beta: float) -> float:
        logp = torch.log_softmax(math.exp(log_beta) * logits, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean()) - entropy

    lo, hi = -25.0, 25.0
    if not gap(lo) > 0 > gap(hi):
        raise ValueError(f"entropy={entropy} cannot be reached by this teacher (mean entropy spans "
                         f"[{gap(hi) + entropy:.4g}, {gap(lo) + entropy:.4g}] nats)")
    log_beta = optimize.brentq(gap, lo, hi, xtol=1e-12, rtol=1e-14, maxiter=500)
    achieved = gap(log_beta) + entropy
    if abs(achieved - entropy) > 1e-6:
        raise RuntimeError(f"entropy calibration ended at {achieved} for the target {entropy}")
    teacher.network.logit_scale.fill_(math.exp(log_beta))
    return achieved, math.exp(log_beta)
