"""The perturbed next-token DGM ("PNT"): data from a known perturbed model (DESIGN §4).

Tokens 0..V-1 carry a semantic coordinate s_v evenly spaced on [-1, 1]. Their
embeddings are smooth functions of it plus a small fixed random part,

    E[v] = phi(s_v) + embed_noise * N(0, I_d)      (phi: :func:`~simstudy.dgm.features.smooth_features`),

phi the d named ``features`` (default: the first d of s, s^2, sin(pi*s), cos(pi*s), ...),
so neighbouring tokens have neighbouring embeddings. The training support holds
the prefixes whose tokens all have s_v <= s_max; an out-of-support (OOS) prefix
has at least one token beyond it, at distance max_l (s_{x_l} - s_max)^+
(:mod:`simstudy.dgm.support`).

The truth is a :class:`~simstudy.models.PerturbedLM` (DESIGN §2):
p*(y | x, z) = softmax(f*(E(x) + reshape(A* z))) with z ~ N(0, I_q), f* a random
teacher network whose logit scale is set by bisection (Brent) so that the deterministic
teacher's mean entropy over in-support prefixes is ``entropy`` nats, and A* of
Frobenius norm ``sigma`` (:mod:`simstudy.dgm.teacher`). Its next-token marginal
m*(y | x) = E_z p*(y | x, z) is computed by quadrature (q <= 3) or randomised QMC
(q > 3) with an error estimate (:mod:`simstudy.dgm.marginal`); the students it
implies come from :mod:`simstudy.dgm.students`.

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
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from ..models import CONTINUATIONS, NETWORKS, TransformerConfig
from ..validation import check_choice, check_float, check_int, check_rng, is_integer
from .base import Dataset, inverse_cdf
from .designs import DESIGNS
from .features import resolve_features, smooth_features
from .marginal import ELEMENT_BUDGET, MARGINAL_RULES, ExactMarginal
from .students import StudentFactory
from .support import S_TOL, SemanticSupport
from .teacher import (TEACHER_LAWS, calibrate_entropy, make_direction, make_teacher, make_teacher_network, tangent,
                      transformer_config)

__all__ = ["DIRECTIONS", "MARGINAL_RULES", "TEACHERS", "TEACHER_LAWS", "Dataset", "PerturbedNextToken",
           "smooth_features"]

TEACHERS = NETWORKS
DIRECTIONS = ("random", "tangent")
_ROWS = 65536  # rows per forward chunk when sampling sequences


class PerturbedNextToken(SemanticSupport, ExactMarginal, StudentFactory):
    """The perturbed next-token DGM of DESIGN §4, with its exact marginal.

    Parameters (keyword-only)
    ----------
    vocab_size : int >= 2
        V, tokens 0..V-1 with coordinates s_v evenly spaced on [-1, 1].
    prefix_len : int >= 1
        L, tokens per prefix.
    embed_dim : int >= 1 or None
        d; None: the number of ``features``, or 3 when ``features`` is None. With ``features``
        given it must equal their number.
    features : list of str, comma-separated str, or None
        Names of the embedding's smooth features (:mod:`simstudy.dgm.features`: ``s``, ``s^K``,
        ``sin(pi*s)``, ``cos(pi*s)``, ``sin(K*pi*s)``, ``cos(K*pi*s)``), in order; the tangent
        direction uses their derivatives. None: the first d default features (s, s^2,
        sin(pi*s), cos(pi*s), s^3, sin(2*pi*s), ...), bitwise as before. In :meth:`reference`,
        ``features`` without ``embed_dim`` replaces the design's d.
    latent_dim : int >= 1
        q, the dimension of z.
    teacher : {"linear", "mlp", "transformer"}
        Family of f*. Weights are drawn from ``seed`` by ``teacher_law``; "scaled" (default):

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

        "gaussian" (DESIGN §4, the independent implementation's teacher): mlp: W1 entries
        N(0, w^2), b1 ~ N(0, b^2), W2 ~ N(0, 1), b2 = 0; linear: W entries N(0, w^2),
        b ~ N(0, b^2) (the calibrated logit scale absorbs w, so only b / w matters there);
        w = ``teacher_weight_sd``, b = ``teacher_bias_sd``; the transformer refuses it.

        Then the logit scale is set by a bracketing (bisection/Brent) search so the
        deterministic teacher's mean entropy hits ``entropy`` (module docstring).
    hidden : int >= 1
        Hidden units of the mlp teacher (ignored by the others); the students' default width
        unless ``student_hidden`` is set.
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
        Pre-activation standard deviation of the mlp teacher's hidden units under the
        "scaled" law (above; ignored by the "gaussian" law).
    teacher_law : {"scaled", "gaussian"}
        Law of the teacher's weights (``teacher`` above). Default "scaled": bitwise the
        teachers of earlier versions for every seed.
    teacher_weight_sd : float > 0
        w of the "gaussian" law (default 1.0; ignored by "scaled").
    teacher_bias_sd : float >= 0
        b of the "gaussian" law (default 0.5; ignored by "scaled").
    student_hidden : int >= 1 or None
        Width of the MLP student :meth:`make_student` builds when the method gives no
        ``hidden``; None: the teacher's ``hidden``.
    student_init_scale : float > 0
        Initial scale of a learned perturbation (linear and mlp maps) in :meth:`make_student`
        when the method gives no ``init_scale`` (default 0.05).
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

    kind: ClassVar[str] = "perturbed-next-token"
    #: A small, fast instance for the conformance tests (V = 5, c = 2 iid observations).
    tiny_options: ClassVar[dict] = dict(vocab_size=5, prefix_len=2, embed_dim=3, latent_dim=1, hidden=4,
                                        entropy=1.0, observations=2, seed=1)

    def __init__(self, *, vocab_size: int = 41, prefix_len: int = 2, embed_dim: int | None = None, latent_dim: int = 1,
                 teacher: str = "mlp", hidden: int = 16, transformer: TransformerConfig | dict | None = None,
                 entropy: float = 2.0, s_max: float = 0.5, sigma: float = 0.6, direction: str = "random",
                 observations: int = 1, continuation: str = "iid", embed_noise: float = 0.1, steepness: float = 2.0,
                 teacher_law: str = "scaled", teacher_weight_sd: float = 1.0, teacher_bias_sd: float = 0.5,
                 student_hidden: int | None = None, student_init_scale: float = 0.05,
                 features: Sequence[str] | str | None = None,
                 max_enumerate: int = 200_000, num_prefix_samples: int = 20_000, n: int | None = None,
                 name: str = "custom", seed: int = 0) -> None:
        self.vocab_size = V = check_int("vocab_size", vocab_size, 2)
        self.prefix_len = L = check_int("prefix_len", prefix_len, 1)
        self.features, self.embed_dim = resolve_features(features, embed_dim)
        d = self.embed_dim
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.teacher_kind = check_choice("teacher", teacher, TEACHERS, word="unknown")
        self.hidden = check_int("hidden", hidden, 1)
        self.entropy = check_float("entropy", entropy, low=0.0, high=math.log(V), low_open=True)
        self.s_max = check_float("s_max", s_max, low=-1.0, high=1.0)
        self.sigma = check_float("sigma", sigma, low=0.0)
        self.direction = check_choice("direction", direction, DIRECTIONS, word="unknown")
        self.observations = check_int("observations", observations, 1)
        self.continuation = check_choice("continuation", continuation, CONTINUATIONS, word="unknown")
        self.embed_noise = check_float("embed_noise", embed_noise, low=0.0)
        self.steepness = check_float("steepness", steepness, low=0.0, low_open=True)
        self.teacher_law = check_choice("teacher_law", teacher_law, TEACHER_LAWS, word="unknown")
        self.teacher_weight_sd = check_float("teacher_weight_sd", teacher_weight_sd, low=0.0, low_open=True)
        self.teacher_bias_sd = check_float("teacher_bias_sd", teacher_bias_sd, low=0.0)
        if student_hidden is not None and not (is_integer(student_hidden) and student_hidden >= 1):
            raise ValueError(f"student_hidden={student_hidden!r} is invalid; allowed: an integer >= 1 or None "
                             "(the teacher's hidden)")
        self.student_hidden = None if student_hidden is None else int(student_hidden)
        self.student_init_scale = check_float("student_init_scale", student_init_scale, low=0.0, low_open=True)
        self.max_enumerate = check_int("max_enumerate", max_enumerate, 1)
        self.num_prefix_samples = check_int("num_prefix_samples", num_prefix_samples, 1)
        self.n = None if n is None else check_int("n", n, 1)
        if not isinstance(name, str):
            raise ValueError(f"name={name!r} is invalid; allowed: a string")
        self.name = name
        self.seed = check_int("seed", seed, 0)
        self.transformer_config = (transformer_config(transformer, prefix_len=L, observations=self.observations)
                                   if teacher == "transformer" else None)

        streams = np.random.SeedSequence(self.seed).spawn(5)
        rng_embedding, rng_teacher, rng_direction, self._rng_prefixes = (np.random.default_rng(s)
                                                                         for s in streams[:4])
        self._rqmc_seed = streams[4]

        # tokens, coordinates and embedding (DESIGN §4)
        self.coordinates = np.linspace(-1.0, 1.0, V)  # (V,) s_v
        self.tokens_in_support = np.flatnonzero(self.coordinates <= self.s_max + S_TOL)  # never empty: s_0 = -1
        E = smooth_features(self.coordinates, self.features) + self.embed_noise * rng_embedding.standard_normal((V, d))
        self.embedding = torch.tensor(E, dtype=torch.float64)  # (V, d)
        self._init_prefix_sets()

        # the truth p*(y | x, z): teacher network, direction A*, entropy calibration
        network = make_teacher_network(self.teacher_kind, embedding=self.embedding, prefix_len=L, hidden=self.hidden,
                                       steepness=self.steepness, transformer=self.transformer_config, rng=rng_teacher,
                                       law=self.teacher_law, weight_sd=self.teacher_weight_sd,
                                       bias_sd=self.teacher_bias_sd)
        A = make_direction(self.direction, prefix_len=L, embed_dim=d, latent_dim=self.latent_dim, sigma=self.sigma,
                           s_max=self.s_max, rng=rng_direction, features=self.features)  # (L*d, q)
        self.teacher = make_teacher(network, A, embedding=self.embedding, prefix_len=L,
                                    continuation=self.continuation)
        self.teacher_entropy, self.logit_scale = calibrate_entropy(self.teacher, self.embedding,
                                                                   self.prefixes("in"), self.entropy)
        self._cache: dict = {}

    @classmethod
    def reference(cls, name: str, **overrides) -> "PerturbedNextToken":
        """A reference design of DESIGN §3/§4 by name (see :mod:`simstudy.dgm.designs`),
        with any constructor argument overridden (e.g. ``sigma=0.3, seed=4``); ``features`` without
        ``embed_dim`` replaces the design's embed_dim (d is then their number)."""
        check_choice("name", name, tuple(DESIGNS), word="unknown")
        design = dict(DESIGNS[name])
        if overrides.get("features") is not None and "embed_dim" not in overrides:
            design.pop("embed_dim", None)
        return cls(**{**design, "name": name, **overrides})

    def tangent(self) -> np.ndarray:
        """The unit tangent d phi / ds of the smooth embedding (its ``features``) at s_max, ``(d,)``."""
        return tangent(self.s_max, self.features)

    @property
    def A_star(self) -> torch.Tensor:
        """A* ``(L d, q)``, float64 (a copy)."""
        return self.teacher.perturbation.A.detach().clone()

    # ---- sampling ---------------------------------------------------------------------------
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
        n = check_int("n", n, 1)
        rng = check_rng(rng)
        if prefixes is None:
            x = self._draw_prefixes(n, rng)  # (n, L)
        else:
            x = self._check_prefixes(prefixes)
            if len(x) != n:
                raise ValueError(f"prefixes has {len(x)} rows; allowed: n = {n} rows")
        z = rng.standard_normal((n, self.latent_dim))  # (n, q)
        u = rng.random((n, self.observations))  # (n, c)
        c = self.observations
        y = np.empty((n, c), dtype=np.int64)
        chunk = max(1, ELEMENT_BUDGET // (self.vocab_size * c))
        for i in range(0, n, chunk):
            s = slice(i, i + chunk)
            if c == 1 or self.continuation == "iid":
                probs = self._next_token_probs(x[s], z[s])  # (b, V): shared by the c observations
                y[s] = inverse_cdf(probs[:, None, :], u[s])  # (b, c)
            else:
                for j in range(c):  # autoregressive: token j sees the perturbed prefix and y_<j
                    y[s, j] = inverse_cdf(self._next_token_probs(x[s], z[s], y[s, :j]), u[s, j])
        return Dataset(x=x, y=y, z=z)

    def sample_sequences(self, n: int, length: int, rng: np.random.Generator, *, start=None) -> np.ndarray:
        """Whole sequences by ancestral sampling (DESIGN §2): ``(n, L + length)`` int64.

        Starts from a uniform in-support prefix (or ``start`` ``(n, L)``); at every step
        draws a fresh z, perturbs the current window of the last L tokens, samples the
        next token, and slides the window. Draws from ``rng``: the start, then z ``(n, q)``
        and uniforms ``(n,)`` per step.
        """
        n = check_int("n", n, 1)
        length = check_int("length", length, 1)
        rng = check_rng(rng)
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
            z = rng.standard_normal((n, self.latent_dim))  # (n, q)
            u = rng.random(n)  # (n,)
            probs = np.concatenate([self._next_token_probs(seq[i:i + _ROWS, t:t + L], z[i:i + _ROWS])
                                    for i in range(0, n, _ROWS)])  # (n, V)
            seq[:, L + t] = inverse_cdf(probs, u)
        return seq

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
            "dgm": self.kind, "design": self.name, "n": self.n, "seed": self.seed,
            "vocab_size": self.vocab_size, "prefix_len": self.prefix_len, "embed_dim": self.embed_dim,
            "latent_dim": self.latent_dim, "teacher": self.teacher_kind,
            "hidden": self.hidden if self.teacher_kind == "mlp" else None,
            "transformer_n_layer": cfg.n_layer if cfg else None, "transformer_n_head": cfg.n_head if cfg else None,
            "transformer_n_embd": cfg.n_embd if cfg else None,
            "entropy_target": self.entropy, "entropy_teacher_id": self.teacher_entropy,
            "logit_scale": self.logit_scale, "s_max": self.s_max, "sigma": self.sigma, "direction": self.direction,
            "observations": self.observations, "continuation": self.continuation, "embed_noise": self.embed_noise,
            "steepness": self.steepness if self.teacher_kind == "mlp" and self.teacher_law == "scaled" else None,
            "teacher_law": self.teacher_law,
            "teacher_weight_sd": self.teacher_weight_sd if self.teacher_law == "gaussian" else None,
            "teacher_bias_sd": self.teacher_bias_sd if self.teacher_law == "gaussian" else None,
            "features": ",".join(self.features),
            "student_hidden": self.hidden if self.student_hidden is None else self.student_hidden,
            "student_init_scale": self.student_init_scale,
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
                m, err = self.exact_marginal(x, return_error=True)  # (N, V) each
                p0 = self.teacher_probs(x)  # (N, V)
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
