"""One replicate's data and the truth it is judged against; the ``generate`` of every domain study (DESIGN §4, §7).

:func:`make_generate` returns the engine's ``generate(cond, rng)``: the condition's DGM
(``dgm_options`` with the condition's factors other than ``n`` as overrides; a fresh
teacher seed per replicate when asked, DESIGN §4), ``n`` data drawn from it, and a
student seed. The random stream is consumed in one fixed order (teacher seed, data,
student seed), so every client that draws through it sees the same data for the same
replicate. Every method of a replicate receives the same :class:`ReplicateData`
(common random numbers: differences between methods are paired), with the exact
truth on every prefix computed once, before the engine copies the data per method.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .. import metrics
from .cache import cached_dgm

__all__ = ["ReplicateData", "make_generate"]


@dataclass
class ReplicateData:
    """What ``generate`` hands to every method of a replicate."""

    dgm: object  # a DGM (simstudy.dgm.DGM)
    x: torch.Tensor  # (n, L) long prefixes
    y: torch.Tensor  # (n, c) long observations
    student_seed: int
    teacher_seed: int

    prefixes: np.ndarray  # (N, L): every prefix (or the DGM's fixed sample of them)
    distance: np.ndarray  # (N,) distance of each prefix to the training support, 0 inside
    truth: np.ndarray  # (N, V) exact m*(. | x) (DESIGN §4), computed once in generate

    @functools.cached_property
    def truth_shift(self) -> dict[str, float]:
        """Mean KL(m* || deterministic teacher) in and out of support: how far the latent moves the data."""
        shift = metrics.kl_divergence(self.truth, self.dgm.teacher_probs(self.prefixes))
        inside = self.distance == 0
        return {"truth_shift_id": float(shift[inside].mean()), "truth_shift_oos": float(shift[~inside].mean())}


def make_generate(dgm_options: Mapping, *, fresh_teacher: bool = False):
    """``generate(cond, rng) -> ReplicateData`` for the engine.

    Parameters
    ----------
    dgm_options : mapping
        Options of :func:`~simstudy.domain.cached_dgm` (``kind``, ``design``, constructor keywords).
        Condition keys other than ``n`` override them (a design factor such as ``sigma`` or ``design``).
    fresh_teacher : bool
        Draw a new teacher seed per replicate from the replicate's stream (DESIGN §4); otherwise the
        DGM's own ``seed`` (default 0) is the teacher seed.
    """
    dgm_options = dict(dgm_options)
    return functools.partial(_generate, dgm_options=dgm_options, fresh_teacher=bool(fresh_teacher))


def _generate(cond: dict, rng: np.random.Generator, *, dgm_options: dict, fresh_teacher: bool) -> ReplicateData:
    options = {**dgm_options, **{k: v for k, v in cond.items() if k != "n"}}
    if fresh_teacher:
        options["seed"] = int(rng.integers(2**31 - 1))
    dgm = cached_dgm(options)
    x, y = dgm.sample(int(cond["n"]), rng).tensors()  # (n, L), (n, c)
    student_seed = int(rng.integers(2**31 - 1))
    prefixes = dgm.prefixes("all")  # (N, L)
    return ReplicateData(dgm=dgm, x=x, y=y, student_seed=student_seed, teacher_seed=int(getattr(dgm, "seed", 0)),
                         prefixes=prefixes, distance=dgm.distance(prefixes), truth=dgm.exact_marginal(prefixes))
