"""The smooth embedding features phi_d(s) of the semantic coordinate s (DESIGN §4).

    phi(s) = (s, s^2, sin(pi s), cos(pi s), s^3, sin(2 pi s), cos(2 pi s), s^4, sin(3 pi s), ...)

Neighbouring coordinates get neighbouring features, so a DGM whose embedding is
E[v] = phi_d(s_v) + noise gives neighbouring tokens neighbouring embeddings; the
derivative d phi / ds gives the "semantic jitter" direction (the tangent at s_max).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

__all__ = ["smooth_features"]


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
    s = np.asarray(s, dtype=np.float64)  # (...)
    return np.stack([(df if derivative else f)(s) for f, df in _feature_terms(dim)], axis=-1)  # (..., dim)
