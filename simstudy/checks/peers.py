"""Public peers run on the same synthetic data as simstudy's methods (DESIGN §1, §6.7).

engression (Shen and Meinshausen, arXiv 2307.00835; PyPI ``engression`` 1.1.0) is
the closest public peer of learned prefix perturbation: noise enters *before* the
nonlinearity, and its generalised engression model (GEM) fits a categorical
response with the energy score (``data_type="multiclass"``). It is an optional
extra dependency of simstudy (``pip install 'simstudy[peers]'``); every function
here that needs it raises :class:`PeerUnavailable` with that one-line hint when
``import engression`` fails, and the extrapolation check then skips the peer with
a note.

The engression calls used, and only these (engression 1.1.0):

* ``engression.engression(x, y, data_type="multiclass", num_layer=, hidden_dim=,
  lr=, num_epochs=, batch_size=, standardize=True, verbose=False)``: x the
  flattened prefix embeddings E(x) ``(n c, L d)`` float32, y one-hot responses
  ``(n c, V)`` (a datum's c observations are c rows with the same x: the peer has
  no shared latent), fitted on torch's global generator (seeded here inside
  ``torch.random.fork_rng``);
* ``model.predict(x, target="mean", sample_size=S)``: the mean of S one-hot
  samples of the fitted generative model for each row of x, i.e. class
  frequencies ``(N, V)``. They are multinomial proportions, so their Monte Carlo
  error is known exactly: Var(p-hat_v) = p_v (1 - p_v) / S, Cov = -p_u p_v / S.
  :func:`multinomial_kl` turns them into a KL with its Monte Carlo bias removed
  and its Monte Carlo standard error (add-0.1 smoothing, so no class has
  probability 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..validation import check_int, is_integer, is_real

__all__ = ["ENGRESSION_HINT", "PeerUnavailable", "EngressionConfig", "engression_available", "fit_engression",
           "engression_marginal", "multinomial_kl"]

ENGRESSION_HINT = "engression not installed: pip install 'simstudy[peers]'"


class PeerUnavailable(ImportError):
    """The optional peer package is not importable (the message is the install hint)."""

    status = "skipped"


def engression_available() -> bool:
    """True when ``import engression`` works."""
    try:
        import engression  # noqa: F401
    except ImportError:
        return False
    return True


def _engression():
    try:
        import engression
    except ImportError as exc:
        raise PeerUnavailable(ENGRESSION_HINT) from exc
    return engression


@dataclass
class EngressionConfig:
    """Settings of the engression peer (keyword arguments of ``engression.engression``)."""

    num_layer: int = 2  # layers of the generator g (engression's default)
    hidden_dim: int = 100  # units per layer (default)
    lr: float = 1e-3  # Adam learning rate (engression's default for a GEM)
    num_epochs: int = 500  # passes over the data (engression's GEM default is 2000)
    batch_size: int | None = 1000  # minibatch; None: full batch (engression's default)
    sample_size: int = 10_000  # one-hot samples per prefix in predict(target="mean")
    chunk: int = 64  # prefixes per predict call (memory: chunk * V * sample_size floats)

    def __post_init__(self) -> None:
        for name in ("num_layer", "hidden_dim", "num_epochs", "sample_size", "chunk"):
            check_int(name, getattr(self, name), 1)
        if self.batch_size is not None and not (is_integer(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size={self.batch_size!r} is invalid; allowed: None or an integer >= 1")
        if not (is_real(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is invalid; allowed: a float > 0")


def prefix_features(embedding: torch.Tensor, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Flattened prefix embeddings E(x): ``(N, L d)`` float32, the peer's covariates."""
    E = torch.as_tensor(embedding).detach().to(torch.float64).cpu()
    idx = torch.as_tensor(np.asarray(x), dtype=torch.long)
    return E[idx].reshape(idx.shape[0], -1).to(torch.float32)  # (N, L*d)


def fit_engression(embedding: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, config: EngressionConfig,
                   seed: int):
    """Fit the engression GEM to (E(x), one-hot y): every observation of a datum is a row.

    x ``(n, L)`` and y ``(n, c)`` long. Returns the fitted ``Engressor``.
    """
    engression = _engression()
    X = prefix_features(embedding, x)  # (n, L*d)
    n, c = y.shape
    V = int(torch.as_tensor(embedding).shape[0])
    X = X.repeat_interleave(c, dim=0)  # (n*c, L*d): c rows per datum
    Y = torch.nn.functional.one_hot(torch.as_tensor(y).reshape(-1).long(), V).to(torch.float32)  # (n*c, V)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = engression.engression(X, Y, data_type="multiclass", num_layer=config.num_layer,
                                      hidden_dim=config.hidden_dim, lr=config.lr, num_epochs=config.num_epochs,
                                      batch_size=config.batch_size, standardize=True, verbose=False)
    return model


@torch.no_grad()
def engression_marginal(model, embedding: torch.Tensor, prefixes: np.ndarray, *, config: EngressionConfig,
                        seed: int) -> np.ndarray:
    """Class frequencies of ``sample_size`` samples per prefix by
    ``model.predict(E(x), target="mean", sample_size=S)``: ``(N, V)``."""
    X = prefix_features(embedding, prefixes)  # (N, L*d)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for start in range(0, X.shape[0], config.chunk):
            pred = model.predict(X[start:start + config.chunk], target="mean", sample_size=config.sample_size)
            out.append(torch.as_tensor(pred).to(torch.float64).cpu())
    return torch.cat(out).numpy()


def multinomial_kl(truth: np.ndarray, frequencies: np.ndarray, sample_size: int,
                   *, pseudo_count: float = 0.1) -> dict[str, np.ndarray]:
    """KL(m* || p-hat) per row when p-hat are the frequencies of S multinomial draws.

    The frequencies are smoothed, p = (S f + a) / (S + a V) with a = ``pseudo_count``
    (no zero probabilities), and the second-order Monte Carlo bias of the plug-in
    KL, E[-log p-hat_v] - (-log p_v) ~ Var(p-hat_v) / (2 p_v^2), i.e.
    b = sum_v m*_v (1 - p_v) / (2 S p_v), is subtracted. The Monte Carlo standard
    error is the delta method with the multinomial covariance:
    Var(sum_v a_v p-hat_v) = (sum_v a_v^2 p_v - (sum_v a_v p_v)^2) / S, a_v = m*_v / p_v.

    The expansion needs S p_v well above 1 wherever m*_v is not negligible; a class
    the model gives far less than 1/S is mostly unseen and its term is not
    corrected reliably (it is large anyway: the fit misses mass the truth has).
    Checked by simulation (tests): with a = 0.1 the corrected KL is unbiased within
    Monte Carlo error from S = 400 up; a = 0.5 over-shrinks at S <= 2000.

    Returns ``kl`` (bias-corrected), ``kl_plugin``, ``bias``, ``mc_se``, each ``(N,)``,
    and ``probs`` ``(N, V)``, the smoothed frequencies.
    """
    m = np.asarray(truth, dtype=np.float64)
    f = np.asarray(frequencies, dtype=np.float64)
    if m.shape != f.shape or m.ndim != 2:
        raise ValueError(f"truth {m.shape} and frequencies {f.shape} are invalid; allowed: equal (N, V) shapes")
    S = int(sample_size)
    if S < 1:
        raise ValueError(f"sample_size={sample_size!r} is invalid; allowed: an integer >= 1")
    V = m.shape[1]
    p = (S * f + pseudo_count) / (S + pseudo_count * V)  # (N, V) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(m > 0, m * (np.log(m) - np.log(p)), 0.0)
    plugin = terms.sum(1)
    bias = (m * (1 - p) / (2 * S * p)).sum(1)
    a = m / p
    var = ((a ** 2 * p).sum(1) - (a * p).sum(1) ** 2) / S
    return {"kl": plugin - bias, "kl_plugin": plugin, "bias": bias, "mc_se": np.sqrt(np.maximum(var, 0.0)),
            "probs": p}
