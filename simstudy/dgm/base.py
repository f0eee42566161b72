"""The interface every data-generating mechanism offers (DESIGN §2, §4).

A DGM is a seeded mechanism with a known truth: it draws (prefix, observations)
data, names the prefixes in and out of its training support, and returns the
truth's exact next-token marginal m*(. | x) for any prefix. Clients (the study
kinds, the paper checks, the domain library) use only what :class:`DGM` names, so
a new mechanism is one class that offers these members plus one
:func:`~simstudy.dgm.register_dgm` line; ``tests/test_conformance.py`` checks it.

Notation of DESIGN §2: V tokens, prefixes x of L tokens, c observations per datum,
embeddings E (V x d), latent z in R^q.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["DGM", "DGM_METHODS", "Dataset", "inverse_cdf"]


@dataclass
class Dataset:
    """n (prefix, observations) pairs drawn from a DGM.

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
        """c, the observations per datum."""
        return int(self.y.shape[1])

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as torch long tensors ``(n, L)`` and ``(n, c)``, the input of the models and equations."""
        return (torch.as_tensor(self.x, dtype=torch.long, device=device),
                torch.as_tensor(self.y, dtype=torch.long, device=device))

    def subset(self, index) -> "Dataset":
        """The data at ``index`` (a slice, an integer array or a boolean mask)."""
        return Dataset(self.x[index], self.y[index], self.z[index])


def inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Token ids by inversion: the first v with cdf_v >= u. ``probs`` ``(..., V)``, ``u`` ``(...)`` -> ``(...)``."""
    cdf = np.cumsum(probs, axis=-1)[..., :-1]  # (..., V-1); the last bin takes the rest
    return (cdf < u[..., None]).sum(-1).astype(np.int64)


@runtime_checkable
class DGM(Protocol):
    """What every data-generating mechanism offers (DESIGN §4).

    Structural: a class satisfies it by having these members (``isinstance(dgm, DGM)``
    checks their presence). Constructors take explicit keyword arguments only, every
    one with a default, so :func:`~simstudy.dgm.dgm_keywords` and
    :func:`~simstudy.dgm.dgm_defaults` can read the settings from the signature.

    Attributes
    ----------
    kind : str
        The registered name of the class (``describe()["dgm"]``), e.g. "perturbed-next-token".
    name : str
        The design's label in ``describe()`` (a reference design's name, or "custom").
    seed : int
        Seed of the mechanism itself (embedding, teacher, direction), not of the data.
    n : int or None
        The design's sample size, recorded only (``sample`` takes its own n).
    vocab_size, prefix_len, embed_dim, latent_dim, observations : int
        V, L, d, q and c of DESIGN §2.
    continuation : str
        "iid" or "autoregressive": how the c observations of a datum depend on each other.
    embedding : torch.Tensor
        E ``(V, d)`` float64, shared by the truth and by every student it implies.
    teacher : simstudy.models.PerturbedLM
        The truth p*(y | x, z), frozen, float64 (its ``perturbation`` is the true G*).
    tiny_options : dict (class attribute, optional)
        Constructor keywords of a small, fast instance, used by the conformance tests
        (tests/test_conformance.py) in the manner of scikit-learn's estimator checks.
    """

    kind: ClassVar[str]
    name: str
    seed: int
    n: int | None
    vocab_size: int
    prefix_len: int
    embed_dim: int
    latent_dim: int
    observations: int
    continuation: str
    embedding: torch.Tensor  # (V, d)
    teacher: Any  # PerturbedLM

    def sample(self, n: int, rng: np.random.Generator, *, prefixes=None) -> Dataset:
        """n data by ancestral sampling from ``rng`` (same generator state, same data): x ``(n, L)``, y ``(n, c)``."""
        ...

    def prefixes(self, which: str = "all") -> np.ndarray:
        """Prefixes ``(N, L)`` int64 in the support (``"in"``), out of it (``"oos"``) or both (``"all"``)."""
        ...

    def distance(self, prefixes) -> np.ndarray:
        """Distance of each prefix ``(N, L)`` to the training support, ``(N,)`` float, 0 in support."""
        ...

    def in_support(self, prefixes) -> np.ndarray:
        """Whether each prefix ``(N, L)`` lies in the training support, ``(N,)`` bool."""
        ...

    def exact_marginal(self, prefixes, *, return_error: bool = False, **options):
        """The truth's marginal m*(. | x) ``(N, V)``, rows summing to 1 (with its error ``(N, V)`` if asked)."""
        ...

    def exact_log_likelihood(self, x, y, *, return_error: bool = False, **options):
        """log m*(y | x) of whole data ``(N,)``, the c observations sharing one latent (DESIGN §2, per datum)."""
        ...

    def teacher_probs(self, prefixes) -> np.ndarray:
        """The deterministic teacher's next-token distribution (z = 0), ``(N, V)``."""
        ...

    def describe(self, *, exact: bool = True) -> dict:
        """A flat dict of scalars (settings and derived numbers) for results tables; ``"dgm"`` is ``kind``."""
        ...

    def make_student(self, *, network: str | None = None, hidden: int | None = None, perturbation: str = "linear",
                     latent_dim: int | None = None, transformer: Any = None, init_scale: float | None = None,
                     seed: int = 0, dtype: torch.dtype = torch.float64, **perturbation_options) -> Any:
        """The student the DGM implies: a fresh PerturbedLM sharing ``embedding``, initialised from ``seed``.

        The defaults (None) give a well-specified student: the teacher's network family and
        size (or the DGM's own default student width) and the truth's q, and the DGM's default
        initial scale of a learned perturbation (``init_scale``); ``perturbation`` names a map of
        :data:`simstudy.models.PERTURBATIONS`. Its marginal is ``(N, V)`` for prefixes ``(N, L)``.
        """
        ...


#: The methods a registered DGM class must define (checked by :func:`~simstudy.dgm.register_dgm`).
DGM_METHODS = ("sample", "prefixes", "distance", "in_support", "exact_marginal", "exact_log_likelihood",
               "teacher_probs", "describe", "make_student")
