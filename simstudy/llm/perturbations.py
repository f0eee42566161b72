"""Perturbation maps G_phi for a real LLM's prompt embeddings (DESIGN §2, §8).

The maps of :mod:`simstudy.models.perturbations` (linear, mlp, gaussian, neftune,
none) are used unchanged, with defaults scaled to the model's embeddings by
:func:`make_llm_perturbation`; the discrete baseline needs its own large-vocabulary
form, :class:`NeighbourSubstitution` (the (V, V) kernel of the synthetic map would
not fit). :class:`simstudy.llm.PerturbedCausalLM` applies any of them to the
prompt's ``inputs_embeds``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import draws
from ..models.perturbations import Perturbation, make_perturbation
from ..validation import check_choice, check_int

__all__ = ["LLM_PERTURBATIONS", "NeighbourSubstitution", "embedding_scale", "make_llm_perturbation"]

LLM_PERTURBATIONS = ("linear", "mlp", "mlp-conditional", "gaussian", "neftune", "discrete", "none")


# ---- the discrete baseline at LLM scale ------------------------------------------------------
class NeighbourSubstitution(Perturbation):
    """Discrete baseline (arXiv 2605.04344) for a large vocabulary (DESIGN §2).

    Each prompt token is replaced with probability ``rho`` by a token drawn from
    k(u | v) proportional to exp(-||E_u - E_v||^2 / h), truncated to the
    ``num_neighbours`` nearest tokens of v (v itself included): the (V, V)
    kernel of :class:`simstudy.models.DiscreteSubstitution` would take 9.7 GB at
    V = 49152. Kernel rows are computed on first use, per token, and cached.
    The bandwidth h defaults to the median, over 512 evenly spaced token ids, of
    the squared distance to the nearest other token. The latent is the
    substituted prompt itself, ``(B, K, L)`` token ids.
    """

    learnable = False
    gaussian_latent = False
    perturb_at_eval = True

    def __init__(self, *, embedding: nn.Embedding, prefix_len: int, rho: float = 0.3,
                 bandwidth: float | None = None, num_neighbours: int = 32) -> None:
        super().__init__(prefix_len=prefix_len, embed_dim=embedding.weight.shape[1])
        if not 0 <= rho <= 1:
            raise ValueError(f"rho={rho} is invalid; allowed: a probability in [0, 1]")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth={bandwidth} is invalid; allowed: a float > 0 or None (automatic)")
        V = embedding.weight.shape[0]
        check_int("num_neighbours", num_neighbours, 1, maximum=V)
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: never trained or saved
        self.rho, self.num_neighbours = float(rho), int(num_neighbours)
        self.latent_shape = (int(prefix_len),)
        dev = embedding.weight.device
        self.register_buffer("_known", torch.zeros(V, dtype=torch.bool, device=dev), persistent=False)
        self.register_buffer("_nbr_idx", torch.zeros(V, self.num_neighbours, dtype=torch.long, device=dev),
                             persistent=False)
        self.register_buffer("_nbr_prob", torch.zeros(V, self.num_neighbours, device=dev), persistent=False)
        self.bandwidth = float(bandwidth) if bandwidth is not None else self._auto_bandwidth()

    @torch.no_grad()
    def _sq_dist(self, ids: torch.Tensor) -> torch.Tensor:
        E = self._embedding.weight.float()  # (V, d)
        rows = E[ids]  # (U, d)
        return ((rows * rows).sum(1, keepdim=True) - 2 * rows @ E.T + (E * E).sum(1)[None]).clamp_min(0)  # (U, V)

    @torch.no_grad()
    def _auto_bandwidth(self) -> float:
        V = self._embedding.weight.shape[0]
        probe = torch.linspace(0, V - 1, min(512, V), device=self._embedding.weight.device).long().unique()
        d2 = self._sq_dist(probe)
        d2[torch.arange(probe.numel()), probe] = math.inf
        h = float(d2.min(1).values.median())
        return h if h > 0 else 1.0

    @torch.no_grad()
    def _fill(self, ids: torch.Tensor) -> None:
        todo = ids.unique()
        todo = todo[~self._known[todo]]
        for start in range(0, todo.numel(), 1024):
            chunk = todo[start:start + 1024]
            d2 = self._sq_dist(chunk)  # (U, V)
            top = torch.topk(-d2, self.num_neighbours, dim=1)  # nearest first; v itself at distance 0
            self._nbr_idx[chunk] = top.indices
            self._nbr_prob[chunk] = torch.softmax(top.values / self.bandwidth, dim=1)
            self._known[chunk] = True

    def kernel_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour ids and kernel probabilities of the tokens ``ids``: two ``(*ids.shape, k)`` tensors."""
        self._fill(ids.reshape(-1))
        return self._nbr_idx[ids], self._nbr_prob[ids]

    @torch.no_grad()
    def sample_latent(self, x, num_draws, generator=None, dtype=torch.float32):
        B, L = x.shape
        K = int(num_draws)
        idx, prob = self.kernel_rows(x)  # (B, L, k)
        rows = prob[:, None].expand(B, K, L, -1).reshape(B * K * L, -1)  # (B*K*L, k)
        pick = draws.multinomial(rows, 1, generator=generator).view(B, K, L, 1)
        neighbours = idx[:, None].expand(B, K, L, -1).gather(-1, pick).squeeze(-1)  # (B, K, L)
        replace = draws.rand((B, K, L), generator=generator, device=x.device) < self.rho
        return torch.where(replace, neighbours, x[:, None].expand(B, K, L))  # (B, K, L) token ids

    def forward(self, prefix_embeds, latent, x=None):
        return self._embedding(latent).to(prefix_embeds.dtype)  # (B, K, L, d)

    def describe(self) -> dict:
        return {"perturbation": type(self).__name__, "rho": self.rho, "bandwidth": self.bandwidth,
                "num_neighbours": self.num_neighbours}


# ---- builders -----------------------------------------------------------------------------------------
def embedding_scale(base) -> float:
    """The standard deviation of the input embedding entries (the natural unit for perturbation sizes)."""
    return float(base.get_input_embeddings().weight.detach().float().std())


def make_llm_perturbation(kind: str, base, *, prompt_len: int, latent_dim: int = 4, seed: int = 0,
                          **options) -> Perturbation:
    """A perturbation map for ``base`` (embed_dim = hidden size, prefix_len = ``prompt_len``).

    Defaults are set relative to s, the standard deviation of the embedding entries
    (:func:`embedding_scale`; 0.136 for SmolLM2-135M): ``linear`` and ``mlp`` start with a
    per-entry shift of standard deviation about 0.1 s (init_scale = 0.1 s / sqrt(q); never
    zero, a stationary point, DESIGN §2); ``gaussian`` uses sigma = 0.1 s; ``neftune`` keeps
    alpha = 5 (Jain et al. 2023); ``discrete`` is :class:`NeighbourSubstitution`. ``options``
    override any of these.
    """
    check_choice("perturbation", kind, LLM_PERTURBATIONS, word="unknown")
    check_int("prompt_len", prompt_len, 1)
    embedding = base.get_input_embeddings()
    d = int(embedding.weight.shape[1])
    s = embedding_scale(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "discrete":
            pert = NeighbourSubstitution(embedding=embedding, prefix_len=prompt_len, **options)
        else:
            if kind in ("linear", "mlp", "mlp-conditional"):
                options.setdefault("init_scale", 0.1 * s / math.sqrt(latent_dim))
            elif kind == "gaussian":
                options.setdefault("sigma", 0.1 * s)
            pert = make_perturbation(kind, prefix_len=prompt_len, embed_dim=d, latent_dim=latent_dim, **options)
    return pert.to(embedding.weight.device)
