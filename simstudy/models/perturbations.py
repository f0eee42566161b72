"""Perturbation maps G_phi of the prefix embeddings (DESIGN §2).

Every map is a module with the same small interface, so that a model, an
estimating equation or a study can swap one for another:

* ``sample_latent(x, num_draws, generator)`` draws the latent for each datum:
  a tensor ``(B, K, *latent_shape)``;
* ``forward(prefix_embeds, latent, x)`` returns the perturbed prefix
  embeddings ``(B, K, L, d)``.

Attributes say what a caller may do with the map: ``gaussian_latent`` (the latent
is N(0, I_q), so quadrature over it is valid), ``learnable`` (it has
parameters), ``perturb_at_eval`` (the model's predictive distribution is the
marginal over the perturbation; NEFTune perturbs only while training).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import draws
from ..validation import check_float, check_int, check_positive

PERTURBATIONS = ("linear", "mlp", "mlp-conditional", "gaussian", "neftune", "discrete", "none")


class Perturbation(nn.Module):
    """Base class: the interface of DESIGN §2 perturbation maps."""

    gaussian_latent: bool = True
    learnable: bool = True
    perturb_at_eval: bool = True
    latent_shape: tuple[int, ...] = ()

    def __init__(self, *, prefix_len: int, embed_dim: int) -> None:
        super().__init__()
        self.prefix_len = check_int("prefix_len", prefix_len, 1)
        self.embed_dim = check_int("embed_dim", embed_dim, 1)

    @property
    def latent_dim(self) -> int:
        return int(math.prod(self.latent_shape))

    def sample_latent(self, x: torch.Tensor, num_draws: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Prior draws ``(B, K, *latent_shape)`` for the prefixes ``x`` ``(B, L)``."""
        shape = (x.shape[0], int(num_draws), *self.latent_shape)
        return draws.randn(shape, generator=generator, dtype=dtype, device=x.device)

    def forward(self, prefix_embeds: torch.Tensor, latent: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"perturbation": type(self).__name__}


class LinearPerturbation(Perturbation):
    """G(z) = reshape(A z), A in R^{(L d) x q} (the default map, DESIGN §2).

    A = 0 is a stationary point of every objective (z -> -z leaves m unchanged), so
    A is initialised small and random, never at zero.
    """

    def __init__(self, *, prefix_len: int, embed_dim: int, latent_dim: int, init_scale: float = 0.05) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embed_dim)
        latent_dim = check_int("latent_dim", latent_dim, 1)
        init_scale = check_positive("init_scale", init_scale)  # never 0: A = 0 is a stationary point
        self.latent_shape = (latent_dim,)
        self.A = nn.Parameter(init_scale * torch.randn(prefix_len * embed_dim, latent_dim))  # (L*d, q)

    def forward(self, prefix_embeds, latent, x=None):
        B, K = latent.shape[:2]
        shift = (latent @ self.A.T).view(B, K, self.prefix_len, self.embed_dim)  # (B, K, L, d)
        return prefix_embeds[:, None] + shift  # (B, K, L, d)

    def covariance(self) -> torch.Tensor:
        """A A^T, the identifiable covariance of the perturbation (DESIGN §3)."""
        return self.A @ self.A.T


class MLPPerturbation(Perturbation):
    """G(z) = W2 tanh(W1 [z, E(x)] + b1) + b2: a small MLP of z, optionally
    conditioned on the prefix embeddings (heteroscedastic perturbation)."""

    def __init__(self, *, prefix_len: int, embed_dim: int, latent_dim: int, hidden: int = 16,
                 conditional: bool = False, init_scale: float = 0.05) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embed_dim)
        latent_dim = check_int("latent_dim", latent_dim, 1)
        hidden = check_int("hidden", hidden, 1)
        self.latent_shape = (latent_dim,)
        self.conditional = bool(conditional)
        n_in = latent_dim + (prefix_len * embed_dim if conditional else 0)
        self.hidden = nn.Linear(n_in, hidden)
        self.out = nn.Linear(hidden, prefix_len * embed_dim, bias=False)
        nn.init.normal_(self.out.weight, std=init_scale)

    def forward(self, prefix_embeds, latent, x=None):
        B, K = latent.shape[:2]
        inputs = latent  # (B, K, q)
        if self.conditional:
            context = prefix_embeds.flatten(1)[:, None].expand(B, K, -1)  # (B, K, L*d)
            inputs = torch.cat([latent, context], dim=-1)
        shift = self.out(torch.tanh(self.hidden(inputs)))  # (B, K, L*d)
        return prefix_embeds[:, None] + shift.view(B, K, self.prefix_len, self.embed_dim)


class GaussianPerturbation(Perturbation):
    """Fixed baseline: sigma * eps, eps ~ N(0, I_{L d}); nothing to learn."""

    learnable = False

    def __init__(self, *, prefix_len: int, embed_dim: int, sigma: float = 0.3) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embed_dim)
        self.sigma = check_float("sigma", sigma, low=0.0)
        self.latent_shape = (prefix_len * embed_dim,)

    def forward(self, prefix_embeds, latent, x=None):
        B, K = latent.shape[:2]
        return prefix_embeds[:, None] + self.sigma * latent.view(B, K, self.prefix_len, self.embed_dim)


class NEFTunePerturbation(Perturbation):
    """NEFTune (Jain et al. 2023): uniform noise on [-1, 1] scaled by alpha / sqrt(L d),
    added while training only (``perturb_at_eval = False``)."""

    learnable = False
    gaussian_latent = False
    perturb_at_eval = False

    def __init__(self, *, prefix_len: int, embed_dim: int, alpha: float = 5.0) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embed_dim)
        self.alpha = check_float("alpha", alpha, low=0.0)
        self.latent_shape = (prefix_len * embed_dim,)

    def sample_latent(self, x, num_draws, generator=None, dtype=torch.float64):
        shape = (x.shape[0], int(num_draws), *self.latent_shape)
        return 2 * draws.rand(shape, generator=generator, dtype=dtype, device=x.device) - 1

    def forward(self, prefix_embeds, latent, x=None):
        B, K = latent.shape[:2]
        scale = self.alpha / math.sqrt(self.prefix_len * self.embed_dim)
        return prefix_embeds[:, None] + scale * latent.view(B, K, self.prefix_len, self.embed_dim)


class DiscreteSubstitution(Perturbation):
    """Discrete baseline (arXiv 2605.04344): each prefix token is replaced with
    probability ``rho`` by a token from the kernel k(u | v) ~ exp(-||E_u - E_v||^2 / h).

    The latent is the substituted prefix itself, ``(B, K, L)`` token ids.
    """

    learnable = False
    gaussian_latent = False

    def __init__(self, *, embedding: torch.Tensor, prefix_len: int, rho: float = 0.3, bandwidth: float = 0.1) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embedding.shape[1])
        self.rho = check_float("rho", rho, low=0.0, high=1.0, high_open=False)
        self.bandwidth = check_positive("bandwidth", bandwidth)
        self.latent_shape = (prefix_len,)
        sq_dist = torch.cdist(embedding, embedding) ** 2  # (V, V)
        self.register_buffer("kernel", torch.softmax(-sq_dist / bandwidth, dim=1))  # rows: k(. | v)
        self.register_buffer("embedding", embedding)

    def sample_latent(self, x, num_draws, generator=None, dtype=torch.float64):
        B, L = x.shape
        K = int(num_draws)
        rows = self.kernel[x].unsqueeze(1).expand(B, K, L, -1).reshape(B * K * L, -1)  # (B*K*L, V)
        neighbours = draws.multinomial(rows, 1, generator=generator).view(B, K, L)
        replace = draws.rand((B, K, L), generator=generator, device=x.device) < self.rho
        return torch.where(replace, neighbours, x[:, None].expand(B, K, L))  # (B, K, L) token ids

    def forward(self, prefix_embeds, latent, x=None):
        return self.embedding[latent].to(prefix_embeds.dtype)  # (B, K, L, d)

    def transition(self) -> torch.Tensor:
        """Per-position substitution matrix P(u | v) = (1 - rho) 1{u = v} + rho k(u | v)."""
        V = self.kernel.shape[0]
        eye = torch.eye(V, dtype=self.kernel.dtype, device=self.kernel.device)
        return (1 - self.rho) * eye + self.rho * self.kernel


class NoPerturbation(Perturbation):
    """The unperturbed model (mle): one trivial draw."""

    learnable = False
    gaussian_latent = False
    perturb_at_eval = False
    latent_shape = (0,)

    def sample_latent(self, x, num_draws, generator=None, dtype=torch.float64):
        return torch.zeros((x.shape[0], 1, 0), dtype=dtype, device=x.device)

    def forward(self, prefix_embeds, latent, x=None):
        return prefix_embeds[:, None].expand(-1, latent.shape[1], -1, -1)


def make_perturbation(kind: str, *, prefix_len: int, embed_dim: int, latent_dim: int = 1,
                      embedding: torch.Tensor | None = None, **options) -> Perturbation:
    """Build a perturbation map by name (see ``PERTURBATIONS``)."""
    if kind == "linear":
        return LinearPerturbation(prefix_len=prefix_len, embed_dim=embed_dim, latent_dim=latent_dim, **options)
    if kind in ("mlp", "mlp-conditional"):
        return MLPPerturbation(prefix_len=prefix_len, embed_dim=embed_dim, latent_dim=latent_dim,
                               conditional=kind == "mlp-conditional", **options)
    if kind == "gaussian":
        return GaussianPerturbation(prefix_len=prefix_len, embed_dim=embed_dim, **options)
    if kind == "neftune":
        return NEFTunePerturbation(prefix_len=prefix_len, embed_dim=embed_dim, **options)
    if kind == "discrete":
        if embedding is None:
            raise ValueError("perturbation='discrete' needs the embedding matrix")
        return DiscreteSubstitution(embedding=embedding, prefix_len=prefix_len, **options)
    if kind == "none":
        return NoPerturbation(prefix_len=prefix_len, embed_dim=embed_dim)
    raise ValueError(f"perturbation={kind!r} is unknown; allowed: {', '.join(PERTURBATIONS)}")
