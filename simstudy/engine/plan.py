"""Which (condition, replicate) pairs a run computes (DESIGN §7 "Seeds"): all of them, a shard's share of them
(array jobs, :mod:`.shards`), or a different number of replicates per condition (a precision target,
:mod:`.precision`).

Every replicate is keyed by its position, so any subset of the pairs gives exactly the rows the full study
gives for them: a shard's rows, or a condition's first ``R_c`` replicates, are bitwise those of one run.

* A shard ``i/N`` (``1 <= i <= N``) holds the pairs with ``(condition + replicate) % N == i - 1``: every
  shard gets about ``R / N`` replicates of every condition, and a pair's shard does not depend on the
  replicate count, so a shard store extended with more replicates stays a shard of the larger study.
* ``replicates_per_condition`` (in the manifest, only when the counts differ): condition ``c`` holds
  replicates ``0 .. R_c - 1``; the manifest's ``replicates`` is the largest ``R_c``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Shard", "parse_shard", "planned_pairs", "planned_rows", "replicate_counts"]

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (1-based, as Slurm's ``--array=1-N``) of a study's (condition, replicate) pairs."""

    index: int  # 1 .. count
    count: int  # number of shards, >= 1

    def __post_init__(self):
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 1 <= self.index <= self.count):
            raise ValueError(f"shard={self.index!r}/{self.count!r} is invalid; allowed: i/N with 1 <= i <= N, "
                             "e.g. '1/4'")

    def holds(self, condition: int, replicate: int) -> bool:
        """Whether the pair (condition, replicate) is this shard's."""
        return (condition + replicate) % self.count == self.index - 1

    def size(self, condition: int, replicates: int) -> int:
        """How many of replicates ``0 .. replicates - 1`` of ``condition`` are this shard's."""
        first = (self.index - 1 - condition) % self.count
        return 0 if first >= replicates else (replicates - 1 - first) // self.count + 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value) -> Shard | None:
    """``"i/N"``, ``(i, N)``, a :class:`Shard` or None -> :class:`Shard` or None; ValueError (one line) otherwise."""
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value):
        return Shard(*value)
    m = _SHARD.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"shard={value!r} is invalid; allowed: i/N with 1 <= i <= N (e.g. '2/8'), or (i, N)")
    return Shard(int(m.group(1)), int(m.group(2)))


def planned_pairs(counts: Sequence[int], shard: Shard | None = None) -> Iterator[tuple[int, int]]:
    """(condition, replicate) pairs of a run: replicates ``0 .. counts[c] - 1`` of each condition, a shard's share."""
    for c, n in enumerate(counts):
        for r in range(int(n)):
            if shard is None or shard.holds(c, r):
                yield c, r


def replicate_counts(manifest: Mapping) -> list[int]:
    """Replicates per condition of a stored study (``replicates_per_condition``, else ``replicates`` for each)."""
    per = manifest.get("replicates_per_condition")
    if per is not None:
        return [int(n) for n in per]
    return [int(manifest["replicates"])] * len(manifest["conditions"])


def planned_rows(manifest: Mapping) -> int:
    """Rows a complete store of this manifest holds: its pairs (counts per condition, shard) x methods."""
    shard = parse_shard(manifest.get("shard"))
    counts = replicate_counts(manifest)
    pairs = sum(counts) if shard is None else sum(shard.size(c, n) for c, n in enumerate(counts))
    return pairs * len(manifest["methods"])
