"""Prefixes on a semantic coordinate grid: the training support and the distance to it (DESIGN §4).

Tokens 0..V-1 carry coordinates s_v (``coordinates``); the support holds the
prefixes whose tokens all have s_v <= s_max, an out-of-support (OOS) prefix has at
least one token beyond it, at distance max_l (s_{x_l} - s_max)^+.
:class:`SemanticSupport` is a mixin: its host sets ``vocab_size``, ``prefix_len``,
``coordinates`` ``(V,)``, ``s_max``, ``tokens_in_support``, ``max_enumerate``,
``num_prefix_samples`` and ``_rng_prefixes`` (a numpy Generator), then calls
:meth:`SemanticSupport._init_prefix_sets`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..validation import check_choice

__all__ = ["S_TOL", "SemanticSupport"]

S_TOL = 1e-12  # tolerance of the support test s_v <= s_max on the coordinate grid


class SemanticSupport:
    """Prefix sets, support test, distance and lexicographic index of prefixes of L tokens."""

    def _init_prefix_sets(self) -> None:
        """Enumerate all V^L prefixes when V^L <= ``max_enumerate``, else draw the fixed seeded sample."""
        self._enumerated = self.vocab_size**self.prefix_len <= self.max_enumerate
        self._prefix_sets = self._make_prefix_sets()

    def _make_prefix_sets(self) -> dict[str, np.ndarray]:
        V, L = self.vocab_size, self.prefix_len
        if self._enumerated:
            all_ = np.stack(np.unravel_index(np.arange(V**L), (V,) * L), axis=1).astype(np.int64)  # (V^L, L)
            inside = self.in_support(all_)
            return {"all": all_, "in": all_[inside], "oos": all_[~inside]}
        rng, S, tokens = self._rng_prefixes, self.num_prefix_samples, self.tokens_in_support
        inside = np.unique(tokens[rng.integers(0, len(tokens), (S, L))], axis=0)  # (<= S, L)
        oos = np.empty((0, L), dtype=np.int64)
        while len(oos) < S:  # uniform over all prefixes, keeping the OOS ones
            draws = rng.integers(0, V, (2 * S, L))
            oos = np.concatenate([oos, draws[~self.in_support(draws)]])
        oos = np.unique(oos[:S], axis=0)  # (<= S, L)
        return {"all": np.unique(np.concatenate([inside, oos]), axis=0), "in": inside, "oos": oos}

    def prefixes(self, which: str = "all") -> np.ndarray:
        """Prefixes ``(N, L)`` int64: in support (``"in"``), out of it (``"oos"``) or both (``"all"``).

        All V^L prefixes in lexicographic order when V^L <= ``max_enumerate``; otherwise a
        fixed sample drawn from ``seed``: ``num_prefix_samples`` uniform in-support prefixes
        and as many uniform OOS prefixes, duplicates removed, sorted (``"all"`` is their union).
        """
        check_choice("which", which, ("in", "oos", "all"), word="unknown")
        return self._prefix_sets[which].copy()

    @property
    def prefixes_enumerated(self) -> bool:
        """Whether ``prefixes()`` enumerates all V^L prefixes (else a fixed sample)."""
        return self._enumerated

    def _check_prefixes(self, prefixes, name: str = "prefixes") -> np.ndarray:
        """``prefixes`` as int64 ``(N, L)`` (one prefix ``(L,)`` becomes ``(1, L)``); ValueError otherwise."""
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
        return np.all(self.coordinates[x] <= self.s_max + S_TOL, axis=1)

    def distance(self, prefixes) -> np.ndarray:
        """Distance to the support in s units, ``(N,)``: max_l (s_{x_l} - s_max)^+ (0 in support)."""
        x = self._check_prefixes(prefixes)
        gap = np.clip(self.coordinates[x] - self.s_max, 0.0, None).max(axis=1)  # (N,)
        return np.where(gap <= S_TOL, 0.0, gap)

    def prefix_index(self, prefixes) -> np.ndarray:
        """Lexicographic index ``(N,)`` of each prefix among all V^L (its base-V number)."""
        x = self._check_prefixes(prefixes)
        return x @ (self.vocab_size ** np.arange(self.prefix_len - 1, -1, -1, dtype=np.int64))

    def _draw_prefixes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, L)`` uniform over in-support prefixes: each token uniform over the in-support tokens."""
        tokens = self.tokens_in_support
        return tokens[rng.integers(0, len(tokens), (n, self.prefix_len))]
