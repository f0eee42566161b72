"""The registry of data-generating mechanisms: a ``[dgm] kind`` selects a registered class (DESIGN §4, §7).

    dgm = make_dgm({"design": "identified", "sigma": 0.3, "seed": 4})   # kind defaults to perturbed-next-token
    dgm_keywords("perturbed-next-token")   # ("vocab_size", "prefix_len", ..., "seed"): from the signature
    dgm_defaults("perturbed-next-token")   # {"vocab_size": 41, ..., "seed": 0}

Adding a DGM is one class that satisfies :class:`~simstudy.dgm.base.DGM` plus one
:func:`register_dgm` line; clients derive its settings from the constructor's
signature (:func:`dgm_keywords`, :func:`dgm_defaults`) and never keep hand lists of them.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from ..validation import check_choice
from .base import DGM, DGM_METHODS
from .perturbed_next_token import PerturbedNextToken

__all__ = ["DEFAULT_KIND", "DGMS", "DGM_KEYS", "dgm_defaults", "dgm_keywords", "make_dgm", "register_dgm"]

DGMS: dict[str, type] = {}
DEFAULT_KIND = "perturbed-next-token"


def register_dgm(kind: str, cls: type) -> type:
    """Register ``cls`` as the DGM named ``kind`` (its ``describe()["dgm"]``); returns ``cls``.

    ValueError when ``kind`` is taken by another class, when ``cls.kind`` names another kind,
    or when ``cls`` lacks a method of the interface (:data:`~simstudy.dgm.base.DGM_METHODS`)
    or takes a constructor argument that is positional or has no default.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind={kind!r} is invalid; allowed: a non-empty string")
    if not isinstance(cls, type):
        raise ValueError(f"cls={cls!r} is invalid; allowed: a class")
    if DGMS.get(kind, cls) is not cls:
        raise ValueError(f"kind={kind!r} is invalid; allowed: a name not yet registered (it names {DGMS[kind]!r})")
    if getattr(cls, "kind", kind) != kind:
        raise ValueError(f"kind={kind!r} is invalid for {cls.__name__} (its kind is {cls.kind!r})")
    missing = [m for m in DGM_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{cls.__name__} lacks {', '.join(missing)}; allowed: a class with every method of DGM")
    for p in _parameters(cls):
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise ValueError(f"{cls.__name__} argument {p.name!r} is invalid; allowed: keyword-only with a default")
    DGMS[kind] = cls
    return cls


def _parameters(cls: type) -> list[inspect.Parameter]:
    """The constructor's keyword parameters, without ``self``: a subclass whose ``__init__`` passes
    ``**kwargs`` on to its parent (to change a few defaults) has its own keywords first, then the parent's."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    own = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(own) == len(params):
        return own
    names = {p.name for p in own}
    parent = next((base for base in cls.__mro__[1:] if "__init__" in vars(base) and base is not object), None)
    inherited = [p for p in (_parameters(parent) if parent is not None else []) if p.name not in names]
    return own + inherited


def _class(kind: str) -> type:
    return DGMS[check_choice("kind", kind, tuple(DGMS), word="unknown")]


def dgm_keywords(kind: str = DEFAULT_KIND) -> tuple[str, ...]:
    """The constructor keywords of the DGM ``kind``, in signature order (the keys a ``[dgm]`` table may set)."""
    return tuple(p.name for p in _parameters(_class(kind)))


def dgm_defaults(kind: str = DEFAULT_KIND) -> dict[str, Any]:
    """The constructor defaults of the DGM ``kind``, ``{keyword: default}`` in signature order."""
    return {p.name: p.default for p in _parameters(_class(kind))}


def make_dgm(options: Mapping[str, Any] | None = None) -> DGM:
    """Build a DGM from a ``[dgm]`` table.

    ``options`` may hold ``kind`` (default "perturbed-next-token") and ``design`` (a
    reference design of the kind, :mod:`simstudy.dgm.designs`: the class's
    ``reference(design, **rest)``); every other key is a constructor keyword of the
    kind and overrides the design. ValueError for an unknown kind, design or key.
    """
    options = dict(options or {})
    kind = options.pop("kind", DEFAULT_KIND)
    cls = _class(kind)
    design = options.pop("design", None)
    allowed = dgm_keywords(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"dgm option {unknown[0]}={options[unknown[0]]!r} is unknown for kind={kind!r}; "
                         f"allowed: kind, design, {', '.join(allowed)}")
    if design is None:
        return cls(**options)
    if not callable(getattr(cls, "reference", None)):
        raise ValueError(f"design={design!r} is invalid for kind={kind!r}; allowed: none (it has no reference designs)")
    return cls.reference(design, **options)


register_dgm(PerturbedNextToken.kind, PerturbedNextToken)

#: The constructor keywords of the default DGM (derived from its signature).
DGM_KEYS: tuple[str, ...] = dgm_keywords(DEFAULT_KIND)
