"""Linear algebra of the asymptotic theory (DESIGN §3 "Identifiability", §6.3-§6.5).

* :class:`FlatParameters` -- the trainable parameters of a model as one vector theta ``(P,)``,
  with ``call`` evaluating the model at another theta (usable inside ``torch.func`` transforms);
* :class:`Subspace` and :func:`identifiable_subspace` -- the eigenvectors of the Fisher
  information whose eigenvalues exceed a stated relative tolerance (the identifiable directions);
* :func:`pseudo_inverse`, :func:`sandwich_covariance` (A^+ B A^+ on the identifiable subspace)
  and :func:`kl_constant` ((1/2) tr(I Sigma), the limit of n E[KL]).

:mod:`simstudy.checks.fisher` builds the matrices these act on (by quadrature and enumeration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_RTOL", "FlatParameters", "Subspace", "identifiable_subspace", "kl_constant", "pseudo_inverse",
           "sandwich_covariance"]

DEFAULT_RTOL = 1e-10  # relative eigenvalue tolerance of the identifiable subspace


# ---- a flat view of the trainable parameters -------------------------------------------------
class _Bound(nn.Module):
    """Holds a model so that ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.model, *args)


@dataclass
class FlatParameters:
    """The trainable parameters of a model as one vector theta ``(P,)``.

    ``call(fn, theta, *args)`` evaluates ``fn(model, *args)`` with the model's
    trainable parameters replaced by ``theta`` (differentiable in theta, usable
    inside ``torch.func`` transforms); frozen parameters and buffers stay as they are.
    """

    model: nn.Module
    names: list
    shapes: list
    sizes: list

    @classmethod
    def of(cls, model: nn.Module) -> "FlatParameters":
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters; allowed: a model with requires_grad parameters")
        return cls(model=model, names=[k for k, _ in named], shapes=[p.shape for _, p in named],
                   sizes=[p.numel() for _, p in named])

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def theta(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[k].detach().reshape(-1) for k in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict:
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = theta[start:start + size].view(shape)
            start += size
        return out

    def call(self, fn, theta: torch.Tensor, *args):
        bound = _Bound(self.model, fn)
        params = {f"model.{k}": v for k, v in self.unflatten(theta).items()}
        return torch.func.functional_call(bound, params, args, strict=False)

    @torch.no_grad()
    def assign(self, theta: torch.Tensor) -> None:
        params = dict(self.model.named_parameters())
        for name, value in self.unflatten(theta).items():
            params[name].copy_(value)


# ---- identifiable subspace and sandwich ----------------------------------------------------------
@dataclass
class Subspace:
    """The identifiable subspace: eigenvectors of I with eigenvalue > rtol * largest.

    ``basis`` ``(P, r)``, ``eigenvalues`` ``(P,)`` in decreasing order, ``rank`` r,
    ``gap``: smallest kept eigenvalue / largest dropped one (inf when none dropped),
    which says how clear-cut the cut is.
    """

    vectors: np.ndarray  # (P, P) eigenvectors, columns in the order of ``eigenvalues``
    eigenvalues: np.ndarray
    rank: int
    rtol: float

    @property
    def basis(self) -> np.ndarray:
        """``(P, r)``: the identifiable directions."""
        return self.vectors[:, :self.rank]

    @property
    def null_basis(self) -> np.ndarray:
        """``(P, P - r)``: the dropped (unidentified) directions."""
        return self.vectors[:, self.rank:]

    @property
    def gap(self) -> float:
        if self.rank == len(self.eigenvalues):
            return math.inf
        dropped = max(abs(self.eigenvalues[self.rank]), np.finfo(float).tiny)
        return float(self.eigenvalues[self.rank - 1] / dropped)

    @property
    def condition(self) -> float:
        """Largest / smallest kept eigenvalue: how weakly the weakest direction is identified."""
        return float(self.eigenvalues[0] / self.eigenvalues[self.rank - 1])


def identifiable_subspace(information, rtol: float = DEFAULT_RTOL) -> Subspace:
    """Eigen-decomposition of a symmetric PSD matrix with a relative eigenvalue cut ``rtol``."""
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol={rtol!r} is invalid; allowed: a number in (0, 1)")
    M = np.asarray(information, dtype=np.float64)
    M = 0.5 * (M + M.T)
    values, vectors = np.linalg.eigh(M)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    if not values[0] > 0:
        raise ValueError("information has no positive eigenvalue; allowed: a non-zero PSD matrix")
    rank = int(np.sum(values > rtol * values[0]))
    return Subspace(vectors=vectors, eigenvalues=values, rank=rank, rtol=float(rtol))


def pseudo_inverse(matrix, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Symmetric pseudo-inverse keeping eigenvalues with |lambda| > rtol * max |lambda|."""
    M = np.asarray(matrix, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (M + M.T))
    keep = np.abs(values) > rtol * np.abs(values).max()
    return (vectors[:, keep] / values[keep]) @ vectors[:, keep].T


def sandwich_covariance(A, B, basis: np.ndarray | None = None, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Sigma = A^+ B A^+ on the identifiable subspace ``basis`` ``(P, r)`` (or, without a
    basis, with pseudo-inverses of A at relative tolerance ``rtol``): ``(P, P)``."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if basis is None:
        Ainv = pseudo_inverse(A, rtol)
        return Ainv @ B @ Ainv
    U = np.asarray(basis)
    Ar_inv = np.linalg.inv(U.T @ A @ U)  # (r, r)
    S = Ar_inv @ (U.T @ B @ U) @ Ar_inv.T
    return U @ S @ U.T


def kl_constant(information, covariance) -> float:
    """(1/2) tr(I Sigma): the limit of n E[KL] for a root with covariance Sigma / n."""
    return 0.5 * float(np.trace(np.asarray(information) @ np.asarray(covariance)))
