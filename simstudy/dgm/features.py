"""The smooth embedding features phi(s) of the semantic coordinate s, by name (DESIGN §4).

    phi(s) = (s, s^2, sin(pi s), cos(pi s), s^3, sin(2 pi s), cos(2 pi s), s^4, sin(3 pi s), ...)

Neighbouring coordinates get neighbouring features, so a DGM whose embedding is
E[v] = phi(s_v) + noise gives neighbouring tokens neighbouring embeddings; the
derivative d phi / ds gives the "semantic jitter" direction (the tangent at s_max).

Every feature has a short name without spaces (so that it survives a command line),
and any list of names is a feature map:

* powers: ``s``, ``s^K`` (K >= 2): s^K, derivative K s^(K-1);
* harmonics: ``sin(pi*s)``, ``cos(pi*s)``, ``sin(K*pi*s)``, ``cos(K*pi*s)`` (K >= 2).

Only these canonical spellings are accepted (``s^1``, ``sin(1*pi*s)`` or ``sin(pi s)``
are not), so a name identifies one feature and a description round-trips.
:func:`feature_names` gives the default order (the first d names above);
``smooth_features(s, d)`` and ``smooth_features(s, feature_names(d))`` agree bitwise.
A list of names may also be given as one comma-separated string (``"s,s^2,sin(pi*s)"``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Callable

import numpy as np

from ..validation import is_integer

__all__ = ["feature_names", "parse_features", "resolve_features", "smooth_features"]

_POWER = re.compile(r"s(?:\^([1-9][0-9]*))?")
_HARMONIC = re.compile(r"(sin|cos)\((?:([1-9][0-9]*)\*)?pi\*s\)")
ALLOWED = "s, s^K, sin(pi*s), cos(pi*s), sin(K*pi*s), cos(K*pi*s) (integers K >= 2)"


def feature_names(dim: int) -> tuple[str, ...]:
    """The names of the first ``dim`` default features: s, s^2, sin(pi*s), cos(pi*s), then for
    k = 2, 3, ...: s^(k+1), sin(k*pi*s), cos(k*pi*s)."""
    names = ["s", "s^2", "sin(pi*s)", "cos(pi*s)"]
    k = 2
    while len(names) < dim:
        names += [f"s^{k + 1}", f"sin({k}*pi*s)", f"cos({k}*pi*s)"]
        k += 1
    return tuple(names[:dim])


def _term(name: str) -> tuple[Callable, Callable] | None:
    """(feature, derivative) of one canonical name, or None when the name is not one."""
    pi = math.pi
    m = _POWER.fullmatch(name)
    if m is not None:
        p = int(m.group(1) or 1)
        if p == 1 and m.group(1) is not None:
            return None  # "s^1": the canonical name is "s"
        if p == 1:
            return (lambda s: s, lambda s: np.ones_like(s))
        if p == 2:
            return (lambda s: s**2, lambda s: 2 * s)
        return (lambda s: s**p, lambda s: p * s ** (p - 1))
    m = _HARMONIC.fullmatch(name)
    if m is None:
        return None
    k = int(m.group(2) or 1)
    if k == 1 and m.group(2) is not None:
        return None  # "sin(1*pi*s)": the canonical name is "sin(pi*s)"
    if m.group(1) == "sin":
        if k == 1:
            return (lambda s: np.sin(pi * s), lambda s: pi * np.cos(pi * s))
        return (lambda s: np.sin(k * pi * s), lambda s: k * pi * np.cos(k * pi * s))
    if k == 1:
        return (lambda s: np.cos(pi * s), lambda s: -pi * np.sin(pi * s))
    return (lambda s: np.cos(k * pi * s), lambda s: -k * pi * np.sin(k * pi * s))


def parse_features(features, name: str = "features") -> tuple[str, ...]:
    """The validated feature names of ``features``: a list or tuple of names, or one comma-separated
    string; at least one name, each canonical (module docstring), none twice. One-line ValueError
    naming ``name``, the value and what is allowed otherwise."""
    if isinstance(features, str):
        names = tuple(part.strip() for part in features.split(","))
    elif isinstance(features, (list, tuple)):
        names = tuple(features)
    else:
        raise ValueError(f"{name}={features!r} is invalid; allowed: a list of feature names ({ALLOWED}), "
                         "a comma-separated string of them, or None")
    if not names:
        raise ValueError(f"{name}={features!r} is invalid; allowed: at least one feature name ({ALLOWED})")
    for entry in names:
        if not isinstance(entry, str) or _term(entry) is None:
            raise ValueError(f"{name} entry {entry!r} is unknown; allowed: {ALLOWED}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{name}={features!r} names {repeated[0]!r} twice; allowed: distinct feature names")
    return names


def smooth_features(s, features: int | Sequence[str], *, derivative: bool = False) -> np.ndarray:
    """phi(s) ``(..., d)``, the smooth part of the embedding (or its derivative d phi / ds).

    ``features``: the number d of default features (the first d of :func:`feature_names`)
    or a sequence of feature names (module docstring).
    """
    names = feature_names(features) if isinstance(features, (int, np.integer)) else parse_features(features)
    s = np.asarray(s, dtype=np.float64)  # (...)
    terms = [_term(n) for n in names]
    return np.stack([(df if derivative else f)(s) for f, df in terms], axis=-1)  # (..., d)


def resolve_features(features, embed_dim) -> tuple[tuple[str, ...], int]:
    """(feature names, d) of a DGM's ``features`` and ``embed_dim`` keywords: ``features`` None gives the
    first d default features (d = ``embed_dim``, or 3 when that is None too); a list (or comma-separated
    string) of names gives d = its length, and ``embed_dim``, when not None, must equal it."""
    if embed_dim is not None and not (is_integer(embed_dim) and embed_dim >= 1):
        raise ValueError(f"embed_dim={embed_dim!r} is invalid; allowed: an integer >= 1 or None "
                         "(the number of features, or 3)")
    if features is None:
        d = 3 if embed_dim is None else int(embed_dim)
        return feature_names(d), d
    names = parse_features(features)
    if embed_dim is not None and int(embed_dim) != len(names):
        raise ValueError(f"embed_dim={embed_dim!r} does not match features ({len(names)} names: {','.join(names)}); "
                         f"allowed: embed_dim={len(names)} or None (derived from features)")
    return names, len(names)
