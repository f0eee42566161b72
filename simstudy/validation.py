"""Validation of keyword arguments where they enter (DESIGN §7: one line naming the problem).

Every configurable object of the package (DGMs, equations, networks, solver and study
settings) validates its inputs with these helpers, so that a bad value gives the same
kind of one-line ``ValueError`` everywhere: the name, the value, and what is allowed::

    check_int("vocab_size", 1, 2)        # ValueError: vocab_size=1 is invalid; allowed: an integer >= 2

numpy scalars are accepted as numbers; ``bool`` never is.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "check_positive", "check_rng",
           "is_integer", "is_real"]


def is_integer(value: Any) -> bool:
    """An ``int`` or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number (int, float or numpy scalar), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int | None = None, *, maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]``; ValueError naming ``name`` otherwise."""
    ok = is_integer(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")
    return int(value)


def check_float(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                high_open: bool = True) -> float:
    """``value`` as a finite ``float`` in the stated interval; ValueError naming ``name`` otherwise."""
    ok = is_real(value)
    v = float(value) if ok else math.nan
    inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not (ok and math.isfinite(v) and inside):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number in {lo}{low:g}, {high:g}{hi}")
    return v


def check_positive(name: str, value: Any, *, strict: bool = True) -> float:
    """A finite number > 0 (``strict``) or >= 0."""
    ok = is_real(value) and math.isfinite(float(value)) and (value > 0 if strict else value >= 0)
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; allowed: a finite number {'>' if strict else '>='} 0")
    return float(value)


def check_choice(name: str, value: Any, allowed, *, word: str = "invalid"):
    """``value`` if it is one of ``allowed``; ValueError listing them otherwise (``word``: "invalid" or "unknown")."""
    try:
        known = value in allowed
    except TypeError:  # an unhashable value against a dict or set
        known = False
    if not known:
        raise ValueError(f"{name}={value!r} is {word}; allowed: {', '.join(map(str, allowed))}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (TOML ``true`` / ``false``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is invalid; allowed: true or false")
    return bool(value)


def check_rng(rng: Any, name: str = "rng") -> np.random.Generator:
    """A numpy Generator."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{name}={rng!r} is invalid; allowed: a numpy Generator (np.random.default_rng(seed))")
    return rng
