"""The one per-process cache of built objects (DESIGN §7: build each distinct DGM once per worker).

Building a DGM is costly (teacher draw, entropy bisection, exact marginals on every
prefix, which the DGM then keeps), and every replicate of a condition needs the same
one. :class:`BuildCache` keys a built object by the canonical repr of its options;
:func:`cached_dgm` is the DGM cache every client uses (the study kinds, the checks).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

__all__ = ["BuildCache", "cached_dgm", "options_key"]


def options_key(options: Mapping) -> tuple:
    """A hashable, order-independent key of keyword options (values by repr)."""
    return tuple(sorted((str(k), repr(v)) for k, v in options.items()))


class BuildCache:
    """Objects built from options, at most ``max_size`` kept (least recently used dropped first)."""

    def __init__(self, max_size: int = 8) -> None:
        self.max_size = int(max_size)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_DGMS = BuildCache(max_size=8)


def cached_dgm(options: Mapping):
    """The DGM of ``options`` (``kind``, ``design`` and constructor keywords; see
    :func:`simstudy.dgm.make_dgm`), built once per process."""
    from ..dgm import make_dgm

    options = dict(options)
    return _DGMS.get(options_key(options), lambda: make_dgm(options))
