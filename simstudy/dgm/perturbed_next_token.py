"""The perturbed next-token DGM ("PNT"): data from a known perturbed model (DESIGN §4).

Tokens 0..V-1 carry a semantic coordinate s_v evenly spaced on [-1, 1]. Their
embeddings are smooth functions of it plus a small fixed random part,

    E[v] = phi_d(s_v) + embed_noise * N(0, I_d),
    phi(s) = (s, s^2, sin(pi s), cos(pi s), s^3, sin(2 pi s), cos(2 pi s), s^4, sin(3 pi s), ...),

so neighbouring tokens have neighbouring embeddings. The training support holds
the prefixes whose tokens all have s_v <= s_max; an out-of-support (OOS) prefix
has at least one token beyond it, at distance max_l (s_{x_l} - s_max)^+.

The truth is a :class:`~simstudy.models.PerturbedLM` (DESIGN §2):
p*(y | x, z) = softmax(f*(E(x) + reshape(A* z))) with z ~ N(0, I_q), f* a random
teacher network whose logit scale is set by bisection (Brent) so that the deterministic
teacher's mean entropy over in-support prefixes is ``entropy`` nats, and A* of
Frobenius norm ``sigma``. Its next-token marginal m*(y | x) = E_z p*(y | x, z) is
computed by quadrature (q <= 3) or randomised QMC (q > 3) with an error estimate.

Data are drawn by ancestral sampling: a prefix uniform over the in-support
prefixes, z ~ N(0, I_q), then c observations sharing z (conditionally iid, or an
autoregressive continuation in which token j sees the perturbed prefix and the
unperturbed earlier tokens). Whole sequences use a fresh z for every step.

Every random choice of the mechanism itself (embedding noise, teacher weights,
direction of A*, sampled prefix sets, RQMC randomisations) comes from ``seed``
through numpy's SeedSequence, one stream each, so designs that differ only in q,
sigma, direction or c share the embedding and the teacher network for the same
seed (sigma = 0 gives exactly the deterministic teacher of the sigma > 0 design).
Data come from the numpy Generator passed to :meth:`PerturbedNextToken.sample`,
so the same generator state gives identical data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from scipy import optimize

from .. import quadrature
from ..models import (CONTINUATIONS, NETWORKS, LinearPerturbation, PerturbedLM, TransformerConfig, make_network,
                      make_perturbation)
from .designs import DESIGNS

TEACHERS = NETWORKS
DIRECTIONS = ("random", "tangent")
MARGINAL_RULES = ("auto", "trapezoid", "gauss-hermite", "rqmc")

_S_TOL = 1e-12  # tolerance of the support test s_v <= s_max on the coordinate grid
_ERROR_FLOOR = 1e-14  # round-off floor added to every quadrature error estimate
_DROPPED_MASS = 1e-17  # quadrature nodes are pruned while their total weight stays below this
_DEFAULT_NODES = {"trapezoid": {1: 201, 2: 61, 3: 31}, "gauss-hermite": {1: 80, 2: 40, 3: 20}}
_DEFAULT_RQMC_POINTS = 2**12
_ELEMENT_BUDGET = 4_000_000  # (rows x V) elements per forward chunk
_MAX_CACHE = 20_000_000  # cache the marginal of all prefixes when V^L * V is below this


# ---- the smooth embedding features ---------------------------------------------------------
def _feature_terms(dim: int) -> Iterator[tuple]:
    """(feature, derivative) pairs in the order s, s^2, sin(pi s), cos(pi s), then for
    k = 2, 3, ...: s^(k+1), sin(k pi s), cos(k pi s)."""
    pi = math.pi
    terms = [(lambda s: s, lambda s: np.ones_like(s)),
             (lambda s: s**2, lambda s: 2 * s),
             (lambda s: np.sin(pi * s), lambda s: pi * np.cos(pi * s)),
             (lambda s: np.cos(pi * s), lambda s: -pi * np.sin(pi * s))]
    k = 2
    while len(terms) < dim:
        terms += [(lambda s, k=k: s ** (k + 1), lambda s, k=k: (k + 1) * s**k),
                  (lambda s, k=k: np.sin(k * pi * s), lambda s, k=k: k * pi * np.cos(k * pi * s)),
                  (lambda s, k=k: np.cos(k * pi * s), lambda s, k=k: -k * pi * np.sin(k * pi * s))]
        k += 1
    return iter(terms[:dim])


def smooth_features(s, dim: int, *, derivative: bool = False) -> np.ndarray:
    """phi_dim(s) ``(..., dim)``, the smooth part of the embedding (or its derivative d phi / ds)."""
    s = np.asarray(s, dtype=np.float64)
    return np.stack([(df if derivative else f)(s) for f, df in _feature_terms(dim)], axis=-1)


# ---- data containers -----------------------------------------------------------------------
@dataclass
class Dataset:
    """n (prefix, observations) pairs drawn from the DGM.

    ``x`` ``(n, L)`` int64 prefixes; ``y`` ``(n, c)`` int64 observations sharing the
    datum's latent; ``z`` ``(n, q)`` float64: the latents that generated them, for
    diagnostics only (a fitting method must never see them).
    """

    x: np.ndarray  # (n, L)
    y: np.ndarray  # (n, c)
    z: np.ndarray  # (n, q)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def observations(self) -> int:
        return int(self.y.shape[1])

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as torch long tensors, the input of the models and equations."""
        return (torch.as_tensor(self.x, dtype=torch.long, device=device),
                torch.as_tensor(self.y, dtype=torch.long, device=device))

    def subset(self, index) -> "Dataset":
        """The data at ``index`` (a slice, an integer array or a boolean mask)."""
        return Dataset(self.x[index], self.y[index], self.z[index])


# ---- validation helpers ----------------------------------------------------------------------
def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {minimum}")
    return int(value)


def _float(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = True) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else math.nan
    inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not (ok and math.isfinite(v) and inside):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number in {lo}{low:g}, {high:g}{hi}")
    return v


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")
    return value


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng={rng!r} is invalid; allowed: a numpy Generator (np.random.default_rng(seed))")
    return rng


def _inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Token ids by inversion: the first v with cdf_v >= u. probs (..., V), u (...)."""
    cdf = np.cumsum(probs, axis=-1)[..., :-1]  # (..., V-1); the last bin takes the rest
    return (cdf < u[..., None]).sum(-1).astype(np.int64)


class PerturbedNextToken:
    """The perturbed next-token DGM of DESIGN §4, with its exact marginal.

    Parameters (keyword-only)
    ----------
    vocab_size : int >= 2
        V, tokens 0..V-1 with coordinates s_v evenly spaced on [-1, 1].
    prefix_len : int >= 1
        L, tokens per prefix.
    embed_dim : int >= 1
        d; the embedding is the first d smooth features of s plus noise (module docstring).
    latent_dim : int >= 1
        q, the dimension of z.
    teacher : {"linear", "mlp", "transformer"}
        Family of f*. Weights are drawn from ``seed``:

        * ``mlp``: f(u) = W2 tanh(W1 u + b1) + b2 on the flattened window u. Each row of
          W1 is a Gaussian direction rescaled so that its pre-activation has standard
          deviation ``steepness`` (default 2) over windows of independent uniform
          tokens (all V), and b1 puts the unit's centre at ``steepness * U(-1, 1)`` from
          the mean pre-activation: each unit's tanh bends inside the embedding range
          rather than acting as a linear or a sign function. W2 and b2 are N(0, 1).
        * ``linear``: f(u) = W u + b with rows of W scaled to unit standard deviation
          over the same windows, b ~ N(0, 1).
        * ``transformer``: the small decoder of :mod:`simstudy.models.networks` with
          PyTorch's default initialisation under a seeded generator.

        Then the logit scale is set by a bracketing (bisection/Brent) search so the
        deterministic teacher's mean entropy hits ``entropy`` (module docstring).
    hidden : int >= 1
        Hidden units of the mlp teacher (ignored by the others).
    transformer : TransformerConfig | dict | None
        Size of the transformer teacher (default: TransformerConfig() with max_len
        large enough for L + c - 1 inputs).
    entropy : float in (0, log V)
        Target mean entropy (nats) of the deterministic teacher (z = 0) over the
        in-support prefixes; hit to 1e-6.
    s_max : float in [-1, 1)
        Edge of the training support in s units.
    sigma : float >= 0
        ||A*||_F; 0 gives the unperturbed teacher.
    direction : {"random", "tangent"}
        A* Gaussian then normalised, or "semantic jitter": prefix position l moves
        along the unit tangent d phi / ds at s_max, driven by latent coordinate
        l mod q (when q > L, coordinate j drives position j mod L).
    observations : int >= 1
        c observations per datum, sharing its latent.
    continuation : {"iid", "autoregressive"}
        Observations conditionally independent given z, or an autoregressive
        continuation (DESIGN §2 notation).
    embed_noise : float >= 0
        Scale of the fixed random part of the embedding.
    steepness : float > 0
        Pre-activation standard deviation of the mlp teacher's hidden units (above).
    max_enumerate : int >= 1
        Enumerate all V^L prefixes when V^L <= this; otherwise ``prefixes()`` returns
        a fixed seeded sample (``num_prefix_samples`` draws per set, duplicates removed).
    num_prefix_samples : int >= 1
        Size of that sample for each of the in-support and OOS sets.
    n : int >= 1 or None
        The design's sample size; recorded in ``describe()`` only (``sample`` takes its own n).
    name : str
        Label of the design in ``describe()``.
    seed : int >= 0
        Seed of the mechanism (not of the data).
    """

    def __init__(self, *, vocab_size: int = 41, prefix_len: int = 2, embed_dim: int = 3, latent_dim: int = 1,
                 teacher: str = "mlp", hidden: int = 16, transformer: TransformerConfig | dict | None = None,
                 entropy: float = 2.0, s_max: float = 0.5, sigma: float = 0.6, direction: str = "random",
                 observations: int = 1, continuation: str = "iid", embed_noise: float = 0.1, steepness: float = 2.0,
                 max_enumerate: int = 200_000, num_prefix_samples: int = 20_000, n: int | None = None,
                 name: str = "custom", seed: int = 0) -> None:
        self.vocab_size = V = _int("vocab_size", vocab_size, 2)
        self.prefix_len = L = _int("prefix_len", prefix_len, 1)
        self.embed_dim = d = _int("embed_dim", embed_dim, 1)
        self.latent_dim = q = _int("latent_dim", latent_dim, 1)
        self.teacher_kind = _choice("teacher", teacher, TEACHERS)
        self.hidden = _int("hidden", hidden, 1)
        self.entropy = _float("entropy", entropy, low=0.0, high=math.log(V), low_open=True)
        self.s_max = _float("s_max", s_max, low=-1.0, high=1.0)
        self.sigma = _float("sigma", sigma, low=0.0)
        self.direction = _choice("direction", direction, DIRECTIONS)
        self.observations = c = _int("observations", observations, 1)
        self.continuation = _choice("continuation", continuation, CONTINUATIONS)
        self.embed_noise = _float("embed_noise", embed_noise, low=0.0)
        self.steepness = _float("steepness", steepness, low=0.0, low_open=True)
        self.max_enumerate = _int("max_enumerate", max_enumerate, 1)
        self.num_prefix_samples = _int("num_prefix_samples", num_prefix_samples, 1)
        self.n = None if n is None else _int("n", n, 1)
        if not isinstance(name, str):
            raise ValueError(f"name={name!r} is invalid; allowed: a string")
        self.name = name
        self.seed = _int("seed", seed, 0)
        self.transformer_config = self._transformer_config(transformer) if teacher == "transformer" else None

        streams = np.random.SeedSequence(self.seed).spawn(5)
        self._rng_embedding, self._rng_teacher, self._rng_direction, self._rng_prefixes = (
            np.random.default_rng(s) for s in streams[:4])
        self._rqmc_seed = streams[4]

        # tokens, coordinates and embedding (DESIGN §4)
        self.coordinates = np.linspace(-1.0, 1.0, V)  # (V,) s_v
        self.tokens_in_support = np.flatnonzero(self.coordinates <= self.s_max + _S_TOL)  # never empty: s_0 = -1
        E = smooth_features(self.coordinates, d) + self.embed_noise * self._rng_embedding.standard_normal((V, d))
        self.embedding = torch.tensor(E, dtype=torch.float64)  # (V, d)

        self._enumerated = V**L <= self.max_enumerate
        self._prefix_sets = self._make_prefix_sets()

        network = self._make_teacher_network()
        A = self._make_direction()  # (L*d, q)
        with torch.random.fork_rng(devices=[]):  # the constructor's own draw must not touch the global stream
            perturbation = LinearPerturbation(prefix_len=L, embed_dim=d, latent_dim=q, init_scale=1.0).double()
        perturbation.A.data.copy_(torch.tensor(A, dtype=torch.float64))
        self.teacher = PerturbedLM(embedding=self.embedding, network=network, perturbation=perturbation,
                                   continuation=self.continuation).double()
        self.teacher.requires_grad_(False).eval()
        self.teacher_entropy, self.logit_scale = self._calibrate_entropy()
        self._cache: dict = {}

    # ---- construction ------------------------------------------------------------------
    def _transformer_config(self, transformer) -> TransformerConfig:
        need = self.prefix_len + self.observations - 1
        if transformer is None:
            return TransformerConfig(max_len=max(TransformerConfig().max_len, need))
        config = TransformerConfig(**transformer) if isinstance(transformer, dict) else transformer
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"transformer={transformer!r} is invalid; allowed: a TransformerConfig, a dict or None")
        if config.max_len < need:
            raise ValueError(f"transformer max_len={config.max_len} is too small; allowed: >= prefix_len + "
                             f"observations - 1 = {need}")
        return config

    def _window_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``(L d,)`` and covariance ``(L d, L d)`` of the window of L independent uniform tokens."""
        E = self.embedding.numpy()
        mean = np.tile(E.mean(0), self.prefix_len)
        cov = np.kron(np.eye(self.prefix_len), np.cov(E.T, bias=True).reshape(self.embed_dim, self.embed_dim))
        return mean, cov

    def _make_teacher_network(self):
        V, L, d = self.vocab_size, self.prefix_len, self.embed_dim
        rng = self._rng_teacher
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            net = make_network(self.teacher_kind, vocab_size=V, prefix_len=L, embed_dim=d, hidden=self.hidden,
                               transformer=self.transformer_config).double()
        mean, cov = self._window_moments()

        def standardised_rows(rows: int, scale: float) -> np.ndarray:
            G = rng.standard_normal((rows, L * d))
            sd = np.sqrt(np.einsum("hi,ij,hj->h", G, cov, G))  # (rows,) sd of each row's output
            return scale * G / sd[:, None]

        with torch.no_grad():
            if self.teacher_kind == "mlp":
                W1 = standardised_rows(self.hidden, self.steepness)  # (H, L*d)
                b1 = -W1 @ mean + self.steepness * rng.uniform(-1.0, 1.0, self.hidden)
                net.hidden.weight.copy_(torch.tensor(W1))
                net.hidden.bias.copy_(torch.tensor(b1))
                net.head.weight.copy_(torch.tensor(rng.standard_normal((V, self.hidden))))
                net.head.bias.copy_(torch.tensor(rng.standard_normal(V)))
            elif self.teacher_kind == "linear":
                net.head.weight.copy_(torch.tensor(standardised_rows(V, 1.0)))
                net.head.bias.copy_(torch.tensor(rng.standard_normal(V)))
        return net

    def _make_direction(self) -> np.ndarray:
        L, d, q = self.prefix_len, self.embed_dim, self.latent_dim
        if self.direction == "random":
            A = self._rng_direction.standard_normal((L * d, q))
        else:
            t = self.tangent()
            A = np.zeros((L * d, q))
            for pos in range(L):
                for j in range(q):
                    if (pos - j) % min(q, L) == 0:
                        A[pos * d:(pos + 1) * d, j] = t
        return self.sigma * A / np.linalg.norm(A)

    def tangent(self) -> np.ndarray:
        """The unit tangent d phi / ds of the smooth embedding at s_max, ``(d,)``."""
        t = smooth_features(self.s_max, self.embed_dim, derivative=True)
        return t / np.linalg.norm(t)

    @torch.no_grad()
    def _raw_logits(self, x: np.ndarray) -> torch.Tensor:
        """Logits of the deterministic teacher (z = 0) with logit scale 1, ``(N, V)``."""
        net = self.teacher.network
        old = net.logit_scale.clone()
        net.logit_scale.fill_(1.0)
        try:
            xt = torch.as_tensor(x, dtype=torch.long)
            return torch.cat([net(self.embedding[xt[i:i + 65536]], None, "iid")[:, 0]
                              for i in range(0, len(xt), 65536)])
        finally:
            net.logit_scale.copy_(old)

    def _calibrate_entropy(self) -> tuple[float, float]:
        """Bracketing root search on log(logit scale) for the target mean entropy over the
        in-support prefixes: bisection safeguarded by Brent's method (the mean entropy falls
        monotonically in the scale), to 1e-12 in log scale; the result is checked to 1e-6."""
        logits = self._raw_logits(self.prefixes("in"))  # (N_in, V)

        def gap(log_beta: float) -> float:
            logp = torch.log_softmax(math.exp(log_beta) * logits, dim=-1)
            return float(-(logp.exp() * logp).sum(-1).mean()) - self.entropy

        lo, hi = -25.0, 25.0
        if not gap(lo) > 0 > gap(hi):
            raise ValueError(f"entropy={self.entropy} cannot be reached by this teacher (mean entropy spans "
                             f"[{gap(hi) + self.entropy:.4g}, {gap(lo) + self.entropy:.4g}] nats)")
        log_beta = optimize.brentq(gap, lo, hi, xtol=1e-12, rtol=1e-14, maxiter=500)
        achieved = gap(log_beta) + self.entropy
        if abs(achieved - self.entropy) > 1e-6:
            raise RuntimeError(f"entropy calibration ended at {achieved} for the target {self.entropy}")
        self.teacher.network.logit_scale.fill_(math.exp(log_beta))
        return achieved, math.exp(log_beta)

    # ---- reference designs ------------------------------------------------------------------
    @classmethod
    def reference(cls, name: str, **overrides) -> "PerturbedNextToken":
        """A reference design of DESIGN §3/§4 by name (see :mod:`simstudy.dgm.designs`),
        with any constructor argument overridden (e.g. ``sigma=0.3, seed=4``)."""
        _choice("name", name, tuple(DESIGNS))
        return cls(**{**DESIGNS[name], "name": name, **overrides})

    # ---- prefixes ---------------------------------------------------------------------------
    def _make_prefix_sets(self) -> dict[str, np.ndarray]:
        V, L = self.vocab_size, self.prefix_len
        if self._enumerated:
            all_ = np.stack(np.unravel_index(np.arange(V**L), (V,) * L), axis=1).astype(np.int64)  # (V^L, L)
            inside = self.in_support(all_)
            return {"all": all_, "in": all_[inside], "oos": all_[~inside]}
        rng, S, tokens = self._rng_prefixes, self.num_prefix_samples, self.tokens_in_support
        inside = np.unique(tokens[rng.integers(0, len(tokens), (S, L))], axis=0)
        oos = np.empty((0, L), dtype=np.int64)
        while len(oos) < S:  # uniform over all prefixes, keeping the OOS ones
            draws = rng.integers(0, V, (2 * S, L))
            oos = np.concatenate([oos, draws[~self.in_support(draws)]])
        oos = np.unique(oos[:S], axis=0)
        return {"all": np.unique(np.concatenate([inside, oos]), axis=0), "in": inside, "oos": oos}

    def prefixes(self, which: str = "all") -> np.ndarray:
        """Prefixes ``(N, L)`` int64: in support (``"in"``), out of it (``"oos"``) or both (``"all"``).

        All V^L prefixes in lexicographic order when V^L <= ``max_enumerate``; otherwise a
        fixed sample drawn from ``seed``: ``num_prefix_samples`` uniform in-support prefixes
        and as many uniform OOS prefixes, duplicates removed, sorted (``"all"`` is their union).
        """
        _choice("which", which, ("in", "oos", "all"))
        return self._prefix_sets[which].copy()

    @property
    def prefixes_enumerated(self) -> bool:
        return self._enumerated

    def _check_prefixes(self, prefixes, name: str = "prefixes") -> np.ndarray:
        x = np.asarray(prefixes.cpu() if isinstance(prefixes, torch.Tensor) else prefixes)
        if x.ndim == 1 and x.shape[0] == self.prefix_len:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.prefix_len or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} of shape {x.shape} and dtype {x.dtype} is invalid; allowed: integer token ids "
                             f"of shape (N, {self.prefix_len})")
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(f"{name} holds token ids in [{x.min()}, {x.max()}]; allowed: 0..{self.vocab_size - 1}")
        return x.astype(np.int64)

    def in_support(self, prefixes) -> np.ndarray:
        """``(N,)`` bool: all tokens of the prefix have s_v <= s_max."""
        x = self._check_prefixes(prefixes)
        return np.all(self.coordinates[x] <= self.s_max + _S_TOL, axis=1)

    def distance(self, prefixes) -> np.ndarray:
        """Distance to the support in s units, ``(N,)``: max_l (s_{x_l} - s_max)^+ (0 in support)."""
        x = self._check_prefixes(prefixes)
        gap = np.clip(self.coordinates[x] - self.s_max, 0.0, None).max(axis=1)
        return np.where(gap <= _S_TOL, 0.0, gap)

    def prefix_index(self, prefixes) -> np.ndarray:
        """Lexicographic index ``(N,)`` of each prefix among all V^L (its base-V number)."""
        x = self._check_prefixes(prefixes)
        return x @ (self.vocab_size ** np.arange(self.prefix_len - 1, -1, -1, dtype=np.int64))

    @property
    def A_star(self) -> torch.Tensor:
        """A* ``(L d, q)``, float64 (a copy)."""
        return self.teacher.perturbation.A.detach().clone()

    # ---- sampling ---------------------------------------------------------------------------
    def _draw_prefixes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform over in-support prefixes: each token uniform over the in-support tokens."""
        tokens = self.tokens_in_support
        return tokens[rng.integers(0, len(tokens), (n, self.prefix_len))]

    @torch.no_grad()
    def _next_token_probs(self, x: np.ndarray, z: np.ndarray, y_prev: np.ndarray | None = None) -> np.ndarray:
        """p*(y_j | x, y_<j, z) of the last position j = c' - 1 for each row; x (b, L), z (b, q),
        y_prev (b, c' - 1) the earlier tokens (None: c' = 1). Returns (b, V)."""
        xt = torch.as_tensor(x, dtype=torch.long)
        latent = torch.as_tensor(z, dtype=torch.float64)[:, None, :]  # (b, 1, q)
        y = None
        if y_prev is not None and y_prev.shape[1] > 0:  # the last column is a placeholder: never read
            y = torch.as_tensor(np.concatenate([y_prev, np.zeros((len(x), 1), np.int64)], axis=1))
        logp = self.teacher.log_probs(xt, y, latent)  # (b, 1, c', V)
        return logp[:, 0, -1].exp().numpy()

    def sample(self, n: int, rng: np.random.Generator, *, prefixes=None) -> Dataset:
        """Draw n data by ancestral sampling (DESIGN §4).

        Prefixes are uniform over the in-support prefixes (or the given ``prefixes``
        ``(n, L)``, to sample observations at chosen prefixes); z ~ N(0, I_q), one per
        datum; then c observations by inversion of uniforms. Everything is drawn from
        ``rng`` in the order prefixes, z ``(n, q)``, uniforms ``(n, c)``.
        """
        n = _int("n", n, 1)
        rng = _check_rng(rng)
        if prefixes is None:
            x = self._draw_prefixes(n, rng)
        else:
            x = self._check_prefixes(prefixes)
            if len(x) != n:
                raise ValueError(f"prefixes has {len(x)} rows; allowed: n = {n} rows")
        z = rng.standard_normal((n, self.latent_dim))
        u = rng.random((n, self.observations))
        c = self.observations
        y = np.empty((n, c), dtype=np.int64)
        chunk = max(1, _ELEMENT_BUDGET // (self.vocab_size * c))
        for i in range(0, n, chunk):
            s = slice(i, i + chunk)
            if c == 1 or self.continuation == "iid":
                probs = self._next_token_probs(x[s], z[s])  # (b, V): shared by the c observations
                y[s] = _inverse_cdf(probs[:, None, :], u[s])  # (b, c)
            else:
                for j in range(c):  # autoregressive: token j sees the perturbed prefix and y_<j
                    y[s, j] = _inverse_cdf(self._next_token_probs(x[s], z[s], y[s, :j]), u[s, j])
        return Dataset(x=x, y=y, z=z)

    def sample_sequences(self, n: int, length: int, rng: np.random.Generator, *, start=None) -> np.ndarray:
        """Whole sequences by ancestral sampling (DESIGN §2): ``(n, L + length)`` int64.

        Starts from a uniform in-support prefix (or ``start`` ``(n, L)``); at every step
        draws a fresh z, perturbs the current window of the last L tokens, samples the
        next token, and slides the window. Draws from ``rng``: the start, then z ``(n, q)``
        and uniforms ``(n,)`` per step.
        """
        n = _int("n", n, 1)
        length = _int("length", length, 1)
        rng = _check_rng(rng)
        L = self.prefix_len
        seq = np.empty((n, L + length), dtype=np.int64)
        if start is None:
            seq[:, :L] = self._draw_prefixes(n, rng)
        else:
            x0 = self._check_prefixes(start, "start")
            if len(x0) != n:
                raise ValueError(f"start has {len(x0)} rows; allowed: n = {n} rows")
            seq[:, :L] = x0
        for t in range(length):
            z = rng.standard_normal((n, self.latent_dim))
            u = rng.random(n)
            probs = np.concatenate([self._next_token_probs(seq[i:i + 65536, t:t + L], z[i:i + 65536])
                                    for i in range(0, n, 65536)])  # (n, V)
            seq[:, L + t] = _inverse_cdf(probs, u)
        return seq

    # ---- exact marginal -----------------------------------------------------------------------
    def _resolve_rule(self, rule: str, num_nodes: int | None) -> tuple[str, int]:
        _choice("rule", rule, MARGINAL_RULES)
        q = self.latent_dim
        if rule == "auto":
            rule = "trapezoid" if q <= 3 else "rqmc"
        if rule != "rqmc" and q > 3:
            raise ValueError(f"rule={rule!r} needs latent_dim <= 3 (latent_dim={q}); allowed: 'rqmc' or 'auto'")
        if num_nodes is None:
            num_nodes = _DEFAULT_RQMC_POINTS if rule == "rqmc" else _DEFAULT_NODES[rule][q]
        return rule, _int("num_nodes", num_nodes, 3 if rule == "trapezoid" else 2 if rule == "rqmc" else 1)

    def _rules(self, rule: str, num_nodes: int, randomisations: int) -> list[quadrature.Rule]:
        q = self.latent_dim
        if rule == "rqmc":
            root = np.random.SeedSequence(self._rqmc_seed.entropy, spawn_key=self._rqmc_seed.spawn_key)
            seeds = root.spawn(randomisations)  # a fresh root each call: the same scrambles every time
            return [quadrature.rqmc(num_nodes, q, seed=s) for s in seeds]
        coarse = quadrature.make_rule(rule, num_nodes, q)
        return [coarse, quadrature.refined(coarse)]

    def _integrate(self, x: np.ndarray, rule: str, num_nodes: int, randomisations: int):
        nodes, W = quadrature.shared_nodes(self._rules(rule, num_nodes, randomisations),
                                           dropped_mass=_DROPPED_MASS)
        est = self.teacher.weighted_marginals(torch.as_tensor(x, dtype=torch.long), nodes, W, _ELEMENT_BUDGET)  # (N, R, V)
        if rule == "rqmc":
            R = est.shape[1]
            return est.mean(1), est.std(1, ddof=1) / math.sqrt(R)
        coarse, fine = est[:, 0], est[:, 1]
        change = np.abs(fine - coarse).max(1, keepdims=True)  # (N, 1): per-token changes oscillate (Gauss-Hermite)
        return fine, np.broadcast_to(change + _ERROR_FLOOR, fine.shape).copy()

    def exact_marginal(self, prefixes, *, rule: str = "auto", num_nodes: int | None = None,
                       return_error: bool = False, randomisations: int = 16):
        """The truth's next-token marginal m*(. | x) = E_z p*(. | x, z), ``(N, V)`` (DESIGN §4).

        rule : "auto" (trapezoid for q <= 3, RQMC above), "trapezoid" (tensor rule on
            [-9, 9]^q), "gauss-hermite", or "rqmc".
        num_nodes : nodes per dimension of the coarse quadrature rule (default 201, 61,
            31 trapezoid and 80, 40, 20 Gauss-Hermite nodes for q = 1, 2, 3; the value
            returned uses the refined rule: 401, 121, 61 and 160, 80, 40), or points per
            randomisation for RQMC (default 4096).
        return_error : also return the error ``(N, V)``. Quadrature: the value is the
            refined rule's (nodes doubled, trapezoid step halved) and the error, for
            every token of a prefix, is max_v |refined_v - coarse_v| + 1e-14 (a round-off
            floor): the largest change over the prefix's V probabilities, since single
            tokens' changes can oscillate (Gauss-Hermite). As both rules converge
            fast, it bounds the refined value's own error and the change from
            doubling the nodes again. RQMC: the mean over ``randomisations``
            independent scrambles and its standard error.

        Results for the enumerated prefixes are cached per rule, so repeated calls are free.
        """
        x = self._check_prefixes(prefixes)
        rule, num_nodes = self._resolve_rule(rule, num_nodes)
        randomisations = _int("randomisations", randomisations, 2)
        P, V = self.vocab_size**self.prefix_len, self.vocab_size
        if self._enumerated and P * V <= _MAX_CACHE:
            key = (rule, num_nodes, randomisations if rule == "rqmc" else None)
            if key not in self._cache:
                self._cache[key] = (np.zeros((P, V)), np.zeros((P, V)), np.zeros(P, dtype=bool))
            probs_all, err_all, done = self._cache[key]
            idx = self.prefix_index(x)
            missing = np.unique(idx[~done[idx]])
            if missing.size:
                probs_all[missing], err_all[missing] = self._integrate(
                    self._prefix_sets["all"][missing], rule, num_nodes, randomisations)
                done[missing] = True
            probs, err = probs_all[idx], err_all[idx]
        else:
            probs, err = self._integrate(x, rule, num_nodes, randomisations)
        return (probs, err) if return_error else probs

    @torch.no_grad()
    def exact_log_likelihood(self, x, y, *, rule: str = "auto", num_nodes: int | None = None,
                             return_error: bool = False, randomisations: int = 16):
        """log m*(y | x) of whole data ``(N,)``: log E_z prod_j p*(y_j | x, y_<j, z), the c
        observations sharing one z (DESIGN §2, per-datum scope). Same rules and error
        conventions as :meth:`exact_marginal` (the error is that of the log)."""
        x = self._check_prefixes(x, "x")
        y = np.asarray(y)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (
                y.size and (y.min() < 0 or y.max() >= self.vocab_size)):
            raise ValueError(f"y of shape {y.shape} is invalid; allowed: token ids in 0..{self.vocab_size - 1} "
                             f"of shape ({len(x)}, c)")
        rule, num_nodes = self._resolve_rule(rule, num_nodes)
        nodes, W = quadrature.shared_nodes(self._rules(rule, num_nodes, _int("randomisations", randomisations, 2)),
                                           dropped_mass=_DROPPED_MASS)
        nodes_t = torch.as_tensor(nodes, dtype=torch.float64)
        log_W = torch.as_tensor(W, dtype=torch.float64).log()  # (U, R)
        xt, yt = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
        rows = max(1, _ELEMENT_BUDGET // (len(nodes) * self.vocab_size * y.shape[1]))
        out = []
        for i in range(0, len(x), rows):
            latent = nodes_t[None].expand(len(xt[i:i + rows]), -1, -1)  # (b, U, q)
            ll = self.teacher.log_lik(xt[i:i + rows], yt[i:i + rows], latent)  # (b, U)
            out.append(torch.logsumexp(ll[:, :, None] + log_W[None], dim=1))  # (b, R)
        est = torch.cat(out).numpy()  # (N, R)
        if rule == "rqmc":
            lik = np.exp(est - est.max(1, keepdims=True))
            mean = lik.mean(1)
            value = np.log(mean) + est.max(1)
            error = lik.std(1, ddof=1) / math.sqrt(est.shape[1]) / mean  # delta method for the log
        else:
            value, error = est[:, 1], np.abs(est[:, 1] - est[:, 0]) + _ERROR_FLOOR
        return (value, error) if return_error else value

    @torch.no_grad()
    def teacher_probs(self, prefixes) -> np.ndarray:
        """The deterministic teacher's next-token distribution (z = 0), ``(N, V)``."""
        x = torch.as_tensor(self._check_prefixes(prefixes))
        return self.teacher.log_probs(x, None, None)[:, 0, 0].exp().numpy()

    # ---- students -----------------------------------------------------------------------------
    def make_student(self, *, network: str | None = None, hidden: int | None = None, perturbation: str = "linear",
                     latent_dim: int | None = None, transformer: TransformerConfig | dict | None = None,
                     init_scale: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float64,
                     **perturbation_options) -> PerturbedLM:
        """A fresh, randomly initialised student sharing the embedding E (DESIGN §4).

        Defaults give a well-specified student: the teacher's family, hidden size,
        transformer size and q, a linear perturbation with A small and random
        (``init_scale``; never zero, DESIGN §2). Initialised from ``seed`` without
        touching torch's global generator.
        """
        kind = _choice("network", self.teacher_kind if network is None else network, TEACHERS)
        hidden = _int("hidden", self.hidden if hidden is None else hidden, 1)
        q = _int("latent_dim", self.latent_dim if latent_dim is None else latent_dim, 1)
        if kind == "transformer":
            config = self._transformer_config(transformer if transformer is not None else self.transformer_config)
        else:
            config = None
        options = dict(perturbation_options)
        if perturbation in ("linear", "mlp", "mlp-conditional"):
            options["init_scale"] = init_scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_int("seed", seed, 0))
            net = make_network(kind, vocab_size=self.vocab_size, prefix_len=self.prefix_len,
                               embed_dim=self.embed_dim, hidden=hidden, transformer=config)
            pert = make_perturbation(perturbation, prefix_len=self.prefix_len, embed_dim=self.embed_dim,
                                     latent_dim=q, embedding=self.embedding, **options)
        student = PerturbedLM(embedding=self.embedding, network=net, perturbation=pert,
                              continuation=self.continuation)
        return student.to(dtype)

    # ---- description ----------------------------------------------------------------------------
    def describe(self, *, exact: bool = True) -> dict:
        """A flat dict (scalars only) of the settings and derived numbers, for results tables.

        With ``exact`` (default) it includes quantities that need the exact marginal
        over the in-support prefixes (cached afterwards): ``kl_truth_teacher_id``, the
        mean KL(m* || deterministic teacher), its OOS counterpart, the truth's mean
        entropy, and the largest quadrature error.
        """
        cfg = self.transformer_config
        A = self.A_star
        out = {
            "dgm": "perturbed-next-token", "design": self.name, "n": self.n, "seed": self.seed,
            "vocab_size": self.vocab_size, "prefix_len": self.prefix_len, "embed_dim": self.embed_dim,
            "latent_dim": self.latent_dim, "teacher": self.teacher_kind,
            "hidden": self.hidden if self.teacher_kind == "mlp" else None,
            "transformer_n_layer": cfg.n_layer if cfg else None, "transformer_n_head": cfg.n_head if cfg else None,
            "transformer_n_embd": cfg.n_embd if cfg else None,
            "entropy_target": self.entropy, "entropy_teacher_id": self.teacher_entropy,
            "logit_scale": self.logit_scale, "s_max": self.s_max, "sigma": self.sigma, "direction": self.direction,
            "observations": self.observations, "continuation": self.continuation, "embed_noise": self.embed_noise,
            "steepness": self.steepness if self.teacher_kind == "mlp" else None,
            "tokens_in_support": len(self.tokens_in_support),
            "prefixes_enumerated": self._enumerated,
            "num_prefixes_in": len(self._prefix_sets["in"]), "num_prefixes_oos": len(self._prefix_sets["oos"]),
            "max_distance_oos": float(self.distance(self._prefix_sets["oos"]).max()),
            "teacher_num_parameters": sum(p.numel() for p in self.teacher.network.parameters()),
            "a_star_norm": float(A.norm()),
        }
        if self.teacher_kind != "transformer":
            out["w1_a_star_norm"] = float((self.teacher.network.first_layer() @ A).norm())
        if exact:
            rule, num_nodes = self._resolve_rule("auto", None)
            out["quadrature_rule"] = rule
            out["quadrature_num_nodes"] = num_nodes
            for which in ("in", "oos"):
                x = self._prefix_sets[which]
                m, err = self.exact_marginal(x, return_error=True)
                p0 = self.teacher_probs(x)
                kl = np.sum(np.where(m > 0, m * (np.log(np.where(m > 0, m, 1.0)) - np.log(p0)), 0.0), axis=1)
                tag = "id" if which == "in" else "oos"
                out[f"kl_truth_teacher_{tag}"] = float(kl.mean())
                out[f"entropy_truth_{tag}"] = float(-np.sum(np.where(m > 0, m * np.log(np.where(m > 0, m, 1)), 0),
                                                            axis=1).mean())
                out[f"quadrature_max_error_{tag}"] = float(err.max())
        return out

    def __repr__(self) -> str:
        return (f"PerturbedNextToken(name={self.name!r}, V={self.vocab_size}, L={self.prefix_len}, "
                f"d={self.embed_dim}, q={self.latent_dim}, teacher={self.teacher_kind!r}, sigma={self.sigma}, "
                f"direction={self.direction!r}, c={self.observations}, continuation={self.continuation!r}, "
                f"seed={self.seed})")
