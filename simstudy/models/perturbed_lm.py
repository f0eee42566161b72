"""The perturbed language model p(y | x, z) and its marginal m(y | x) (DESIGN §2, §5).

``PerturbedLM`` joins a frozen embedding matrix E, a perturbation map G_phi and a
network f_theta. Its one workhorse, :meth:`PerturbedLM.log_probs`, evaluates B data
times K latent draws in one forward pass of B*K rows; every estimating equation,
metric and sampler in simstudy goes through it (or through :meth:`log_lik`).

The same interface (``vocab_size``, ``perturbation``, ``sample_latent``,
``log_probs``) is what the estimating equations need, so an LLM wrapper that
provides it (simstudy.llm) reuses them unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import quadrature
from .latent_likelihood import LatentLikelihood
from .networks import CONTINUATIONS, Network
from .perturbations import DiscreteSubstitution, NoPerturbation, Perturbation


@dataclass
class Marginal:
    """A model marginal m(. | x) over the next token for N prefixes.

    ``probs`` ``(N, V)``; ``error`` ``(N, V)``: the absolute change when the
    quadrature nodes are doubled, or the Monte Carlo standard error; ``method``
    names the rule and its size.
    """

    probs: np.ndarray
    error: np.ndarray
    method: str

    @property
    def max_error(self) -> float:
        return float(np.max(self.error)) if self.error.size else 0.0


#: |logit| below which exp neither overflows nor underflows, with room for a sum over a vocabulary of up to
#: e^100 (float64) or e^28 (float32) tokens: :func:`softmax_rows` then needs no per-row maximum.
EXP_SAFE = {torch.float64: 600.0, torch.float32: 60.0}


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``logits`` (N, V), freshly allocated.

    When every logit lies in ``(-EXP_SAFE, EXP_SAFE)`` (the usual case) it is exp(l) / sum exp(l), about 1.7
    times faster on the CPU than ``torch.softmax`` over short rows (which reduces each row twice: maximum
    and sum) and equal to it to rounding (1e-16); otherwise ``torch.softmax``.
    """
    bound = EXP_SAFE.get(logits.dtype)
    if bound is not None and logits.numel():
        low, high = torch.aminmax(logits)
        if -bound < float(low) and float(high) < bound:
            e = logits.exp()
            return e.div_(e.sum(-1, keepdim=True))
    return torch.softmax(logits, dim=-1)


class PerturbedLM(LatentLikelihood, nn.Module):
    """p(y | x, z) = prod_j softmax(f_theta([E(x) + G_phi(z), E(y_<j)]))_{y_j} (DESIGN §2).

    Parameters
    ----------
    embedding : tensor (V, d)
        Token embeddings E, frozen (a buffer, never trained).
    network : Network
        f_theta.
    perturbation : Perturbation
        G_phi; ``NoPerturbation`` gives the unperturbed model.
    continuation : {"iid", "autoregressive"}
        How the c observations of a datum depend on each other given z.
    """

    def __init__(self, *, embedding: torch.Tensor, network: Network, perturbation: Perturbation,
                 continuation: str = "iid") -> None:
        super().__init__()
        if continuation not in CONTINUATIONS:
            raise ValueError(f"continuation={continuation!r} is unknown; allowed: {', '.join(CONTINUATIONS)}")
        self.register_buffer("embedding", embedding.detach().clone())  # (V, d), frozen
        self.network = network
        self.perturbation = perturbation
        self.continuation = continuation

    # ---- sizes -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def prefix_len(self) -> int:
        return self.perturbation.prefix_len

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    # ---- sampling and likelihood -------------------------------------------------
    def sample_latent(self, x: torch.Tensor, num_draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior draws of the latent, ``(B, K, *latent_shape)``."""
        return self.perturbation.sample_latent(x, num_draws, generator, dtype=self.dtype)

    def _logits(self, x: torch.Tensor, y: torch.Tensor | None, latent: torch.Tensor | None):
        """The network's logits for every observation and draw, one forward pass: ``(logits (B*K, c, V), K)``
        (iid observations share one row: an expanded view). Arguments as :meth:`log_probs`."""
        B = x.shape[0]
        if latent is None:
            perturbed = self.embedding[x][:, None]  # (B, 1, L, d)
        else:
            perturbed = self.perturbation(self.embedding[x], latent, x)  # (B, K, L, d)
        K = perturbed.shape[1]
        c = 1 if y is None else y.shape[1]
        flat = perturbed.reshape(B * K, self.prefix_len, self.embed_dim)  # (B*K, L, d)
        previous = None
        if c > 1 and self.continuation == "autoregressive":
            previous = self.embedding[y[:, :-1]]  # (B, c-1, d)
            previous = previous[:, None].expand(B, K, c - 1, self.embed_dim).reshape(B * K, c - 1, self.embed_dim)
        elif c > 1:
            previous = flat.new_zeros(B * K, c - 1, self.embed_dim)  # shapes only: iid ignores them
        return self.network(flat, previous, self.continuation), K  # (B*K, c, V)

    def log_probs(self, x: torch.Tensor, y: torch.Tensor | None, latent: torch.Tensor | None) -> torch.Tensor:
        """Log next-token distributions for every observation and draw, one forward pass.

        x : (B, L) prefix token ids; y : (B, c) observations (None: c = 1, the next token);
        latent : (B, K, ...) draws (None: the unperturbed prefix, K = 1).
        Returns (B, K, c, V) log-probabilities, log_softmax of the logits.
        """
        logits, K = self._logits(x, y, latent)  # (B*K, c, V)
        B, c = x.shape[0], logits.shape[1]
        if c > 1 and logits.stride(1) == 0:  # iid observations share one row (an expanded view): normalise it once
            logp = torch.log_softmax(logits[:, :1], dim=-1)  # (B*K, 1, V)
            return logp.view(B, K, 1, self.vocab_size).expand(B, K, c, self.vocab_size)
        return torch.log_softmax(logits, dim=-1).view(B, K, c, self.vocab_size)

    def next_token_probs(self, x: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """p(. | x, z_k) of the next token: ``(B, K, V)``, the softmax of :meth:`log_probs`' logits
        (:func:`softmax_rows`, not log_softmax then exp). x : (B, L); latent : (B, K, ...) or None."""
        logits, K = self._logits(x, None, latent)  # (B*K, 1, V)
        return softmax_rows(logits[:, 0]).view(x.shape[0], K, self.vocab_size)

    def token_log_lik(self, x: torch.Tensor, y: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """log p(y_j | x, y_<j, z_k) for every observation: (B, K, c)."""
        logp = self.log_probs(x, y, latent)  # (B, K, c, V)
        index = y[:, None, :, None].expand(-1, logp.shape[1], -1, 1)  # (B, K, c, 1)
        return logp.gather(-1, index).squeeze(-1)

    def can_integrate(self) -> bool:
        """True when the marginal can be computed by deterministic quadrature (or, for the discrete
        substitution kernel, by enumerating the substituted prefixes)."""
        if isinstance(self.perturbation, DiscreteSubstitution):
            return self.vocab_size ** self.prefix_len <= 200_000
        return super().can_integrate()

    def quadrature_token_log_marginals(self, x: torch.Tensor, y: torch.Tensor | None,
                                       rule: quadrature.Rule) -> torch.Tensor:
        """Per-token log marginals log E_z p(y_j = . | x, y_<j, z): (B, c, V).

        The per-token marginal of DESIGN §2 (latent scope "per-token"), differentiable.
        """
        nodes = torch.as_tensor(rule.nodes, dtype=self.dtype, device=x.device)  # (M, q)
        log_w = torch.as_tensor(rule.log_weights, dtype=self.dtype, device=x.device)  # (M,)
        latent = nodes[None].expand(x.shape[0], -1, -1)  # (B, M, q)
        logp = self.log_probs(x, y, latent)  # (B, M, c, V)
        return torch.logsumexp(logp + log_w[None, :, None, None], dim=1)  # (B, c, V)

    @torch.no_grad()
    def log_marginal_nodes(self, x: torch.Tensor, y: torch.Tensor | None, rule: quadrature.Rule,
                           max_rows: int = 2_000_000) -> torch.Tensor:
        """:meth:`quadrature_token_log_marginals` without autograd, in chunks of data: (B, c, V)."""
        chunk = max(1, max_rows // (rule.size * max(self.vocab_size, 1) // 64 + 1))
        out = [self.quadrature_token_log_marginals(x[s:s + chunk], None if y is None else y[s:s + chunk], rule)
               for s in range(0, x.shape[0], chunk)]
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def weighted_marginals(self, x: torch.Tensor, nodes: np.ndarray, weights: np.ndarray,
                           element_budget: int = 4_000_000) -> np.ndarray:
        """sum_u weights[u, r] p(. | x, z_u) for every weight column r: ``(N, R, V)``.

        Several rules over shared nodes (:func:`simstudy.quadrature.shared_nodes`) in
        one sweep; B * (node block) rows per forward pass, chunked to ``element_budget``.
        """
        V, q = self.vocab_size, nodes.shape[1]
        nodes_t = torch.as_tensor(nodes, dtype=self.dtype, device=x.device)
        W_t = torch.as_tensor(weights, dtype=self.dtype, device=x.device)
        node_block = max(1, min(len(nodes), element_budget // V))
        rows = max(1, element_budget // (node_block * V))
        out = torch.zeros(len(x), W_t.shape[1], V, dtype=self.dtype, device=x.device)
        for i in range(0, len(x), rows):
            xb = x[i:i + rows]
            for k in range(0, len(nodes), node_block):
                latent = nodes_t[k:k + node_block][None].expand(len(xb), -1, q)  # (b, M, q)
                probs = self.next_token_probs(xb, latent)  # (b, M, V)
                out[i:i + rows] += torch.matmul(W_t[k:k + node_block].T, probs)  # (R, M) @ (b, M, V) -> (b, R, V)
        return out.cpu().numpy()

    @torch.no_grad()
    def marginal(self, x: torch.Tensor, *, method: str = "auto", num_nodes: int | None = None,
                 num_draws: int = 1000, generator: torch.Generator | None = None) -> Marginal:
        """The next-token marginal m(. | x) for N prefixes, ``(N, V)``, with its error.

        method : "auto" (quadrature when possible, else Monte Carlo), "quadrature"
            (trapezoid, error by doubling the nodes), "gauss-hermite", or "mc"
            (K-sample Monte Carlo with its standard error).
        """
        p = self.perturbation
        if isinstance(p, NoPerturbation) or not p.perturb_at_eval:
            probs = self.log_probs(x, None, None)[:, 0, 0].exp()
            return Marginal(probs.cpu().numpy(), np.zeros(tuple(probs.shape)), "exact (no perturbation)")
        if method == "auto":
            method = "quadrature" if self.can_integrate() else "mc"
        if isinstance(p, DiscreteSubstitution) and method != "mc":
            return self._discrete_marginal(x)
        if method in ("quadrature", "trapezoid", "gauss-hermite"):
            if not (p.gaussian_latent and p.latent_dim <= 3):
                raise ValueError(f"method={method!r} needs a Gaussian latent of dimension <= 3; use method='mc'")
            name = "gauss-hermite" if method == "gauss-hermite" else "trapezoid"
            if num_nodes is None:
                rule = quadrature.default_rule(p.latent_dim)
                if name == "gauss-hermite":
                    rule = quadrature.gauss_hermite(rule.num_nodes_per_dim, p.latent_dim)
            else:
                rule = quadrature.make_rule(name, num_nodes, p.latent_dim)
            nodes, W = quadrature.shared_nodes([rule, quadrature.refined(rule)])
            est = self.weighted_marginals(x, nodes, W)  # (N, 2, V): coarse, refined
            err = np.abs(est[:, 1] - est[:, 0])
            return Marginal(est[:, 1], err, f"{name} ({quadrature.refined(rule).size} nodes)")
        if method != "mc":
            raise ValueError(f"method={method!r} is unknown; allowed: auto, quadrature, gauss-hermite, mc")
        probs_sum = torch.zeros(x.shape[0], self.vocab_size, dtype=self.dtype, device=x.device)
        sq_sum = torch.zeros_like(probs_sum)
        batch = max(1, min(num_draws, 2_000_000 // max(1, x.shape[0] * self.vocab_size)))
        done = 0
        while done < num_draws:
            k = min(batch, num_draws - done)
            probs = self.next_token_probs(x, self.sample_latent(x, k, generator))  # (N, k, V)
            probs_sum += probs.sum(1)
            sq_sum += (probs ** 2).sum(1)
            done += k
        mean = probs_sum / num_draws
        var = (sq_sum / num_draws - mean ** 2).clamp_min(0) * num_draws / max(num_draws - 1, 1)
        return Marginal(mean.cpu().numpy(), (var / num_draws).sqrt().cpu().numpy(), f"monte carlo (K={num_draws})")

    def _discrete_marginal(self, x: torch.Tensor) -> Marginal:
        """Exact marginal of the discrete substitution model by enumerating prefixes."""
        p: DiscreteSubstitution = self.perturbation
        V, L = self.vocab_size, self.prefix_len
        all_prefixes = torch.cartesian_prod(*[torch.arange(V, device=x.device)] * L).view(-1, L)  # (V^L, L)
        probs_all = self.log_probs(all_prefixes, None, None)[:, 0, 0].exp()  # (V^L, V)
        P = p.transition().to(self.dtype)  # (V, V): P[v, u] = P(u | v)
        weights = torch.ones(x.shape[0], 1, dtype=self.dtype, device=x.device)
        for l in range(L):  # weight of each substituted prefix, position by position
            weights = (weights[:, :, None] * P[x[:, l]][:, None, :]).reshape(x.shape[0], -1)  # (N, V^(l+1))
        probs = weights @ probs_all  # (N, V)
        return Marginal(probs.cpu().numpy(), np.zeros(tuple(probs.shape)), "exact (enumeration)")

    def describe(self) -> dict:
        return {"network": type(self.network).__name__, "perturbation": type(self.perturbation).__name__,
                "continuation": self.continuation, "num_parameters": sum(p.numel() for p in self.parameters())}
