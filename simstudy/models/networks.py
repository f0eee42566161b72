"""Networks f_theta: a sequence of embeddings -> next-token logits (DESIGN §2).

All networks share one call:

    logits = net(prefix_embeds, continuation_embeds, continuation)   # (N, c, V)

``prefix_embeds`` ``(N, L, d)`` is the (perturbed) prefix, ``continuation_embeds``
``(N, c - 1, d)`` the unperturbed earlier continuation tokens, ``continuation``
either ``"iid"`` (each of the c observations is predicted from the prefix alone,
conditionally independent given z) or ``"autoregressive"`` (token j is predicted
from the prefix and y_<j). Row ``j`` of the output predicts observation ``j``.

* ``linear`` and ``mlp`` see a window of the last L embeddings (flattened L d);
* ``transformer`` is a small causal decoder that takes inputs_embeds, written
  in the manner of nanoGPT, sized to be over-parameterised.

``logit_scale`` (a buffer, 1 for students) lets a teacher's entropy be set
without leaving the family, so a student of the same family is well specified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NETWORKS = ("linear", "mlp", "transformer")
CONTINUATIONS = ("iid", "autoregressive")


class Network(nn.Module):
    """Base class holding the shared sizes and the logit scale."""

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} is invalid; allowed: an integer >= 2")
        self.vocab_size, self.prefix_len, self.embed_dim = int(vocab_size), int(prefix_len), int(embed_dim)
        self.register_buffer("logit_scale", torch.tensor(1.0))

    def forward(self, prefix_embeds: torch.Tensor, continuation_embeds: torch.Tensor | None = None,
                continuation: str = "iid") -> torch.Tensor:
        raise NotImplementedError


class WindowNetwork(Network):
    """A network of the flattened window of the last L embeddings."""

    def window_logits(self, windows: torch.Tensor) -> torch.Tensor:  # (N, c, L*d) -> (N, c, V)
        raise NotImplementedError

    def forward(self, prefix_embeds, continuation_embeds=None, continuation="iid"):
        N, L, d = prefix_embeds.shape
        num_prev = 0 if continuation_embeds is None else continuation_embeds.shape[1]
        c = num_prev + 1
        if continuation == "iid" or num_prev == 0:
            logits = self.window_logits(prefix_embeds.reshape(N, 1, L * d))  # (N, 1, V)
            return self.logit_scale * logits.expand(N, c, self.vocab_size)
        if continuation != "autoregressive":
            raise ValueError(f"continuation={continuation!r} is unknown; allowed: {', '.join(CONTINUATIONS)}")
        seq = torch.cat([prefix_embeds, continuation_embeds], dim=1)  # (N, L + c - 1, d)
        windows = seq.unfold(1, L, 1).transpose(-1, -2).reshape(N, c, L * d)  # (N, c, L*d)
        return self.logit_scale * self.window_logits(windows)


class LinearNetwork(WindowNetwork):
    """f(u) = W u + b on the flattened window u (multinomial logistic regression)."""

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int) -> None:
        super().__init__(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
        self.head = nn.Linear(prefix_len * embed_dim, vocab_size)

    def window_logits(self, windows):
        return self.head(windows)

    def first_layer(self) -> torch.Tensor:
        return self.head.weight


class MLPNetwork(WindowNetwork):
    """f(u) = W2 tanh(W1 u + b1) + b2: the tanh teacher family of DESIGN §4."""

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int, hidden: int = 16) -> None:
        super().__init__(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
        if hidden < 1:
            raise ValueError(f"hidden={hidden} is invalid; allowed: an integer >= 1")
        self.hidden = nn.Linear(prefix_len * embed_dim, hidden)  # W1, b1
        self.head = nn.Linear(hidden, vocab_size)  # W2, b2

    def window_logits(self, windows):
        return self.head(torch.tanh(self.hidden(windows)))

    def first_layer(self) -> torch.Tensor:
        """W1: the identifiable perturbation covariance is W1 A A^T W1^T (DESIGN §3)."""
        return self.hidden.weight


@dataclass
class TransformerConfig:
    """Size of the small decoder-only transformer student (nanoGPT-style)."""

    n_layer: int = field(default=2, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=64, metadata={"help": "residual width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on attention and MLP outputs"})
    max_len: int = field(default=16, metadata={"help": "longest input (prefix + continuation - 1)"})

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "max_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; allowed: an integer >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} is invalid; allowed: a float in [0, 1)")


class Block(nn.Module):
    """Pre-LayerNorm block: causal self-attention then an MLP."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, T, C = h.shape
        q, k, v = self.qkv(self.ln_1(h)).split(C, dim=2)  # each (N, T, C)
        q, k, v = (t.view(N, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (N, nh, T, hs)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)  # (N, nh, T, hs)
        h = h + F.dropout(self.proj(att.transpose(1, 2).reshape(N, T, C)), self.dropout, self.training)
        return h + F.dropout(self.fc_out(F.gelu(self.fc(self.ln_2(h)))), self.dropout, self.training)


class TransformerNetwork(Network):
    """Small causal decoder on inputs_embeds: project d -> width, add learned
    positions, blocks, final LayerNorm, linear head to V logits."""

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int,
                 config: TransformerConfig | None = None) -> None:
        super().__init__(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
        self.config = config or TransformerConfig()
        C = self.config.n_embd
        self.input_proj = nn.Linear(embed_dim, C)
        self.position = nn.Parameter(0.02 * torch.randn(self.config.max_len, C))
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(self.config.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, vocab_size)

    def forward(self, prefix_embeds, continuation_embeds=None, continuation="iid"):
        N, L, _ = prefix_embeds.shape
        num_prev = 0 if continuation_embeds is None else continuation_embeds.shape[1]
        c = num_prev + 1
        iid = continuation == "iid" or num_prev == 0
        if not iid and continuation != "autoregressive":
            raise ValueError(f"continuation={continuation!r} is unknown; allowed: {', '.join(CONTINUATIONS)}")
        seq = prefix_embeds if iid else torch.cat([prefix_embeds, continuation_embeds], dim=1)  # (N, T, d)
        T = seq.shape[1]
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.config.max_len} of the transformer")
        h = self.input_proj(seq) + self.position[:T]  # (N, T, C)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h[:, L - 1:])  # (N, 1 or c, C): positions that predict the observations
        logits = self.logit_scale * self.head(h)  # (N, 1 or c, V)
        return logits.expand(N, c, self.vocab_size) if iid else logits

    def first_layer(self) -> torch.Tensor:
        return self.input_proj.weight


def make_network(kind: str, *, vocab_size: int, prefix_len: int, embed_dim: int, hidden: int = 16,
                 transformer: TransformerConfig | dict | None = None) -> Network:
    """Build a network by name (see ``NETWORKS``)."""
    if kind == "linear":
        return LinearNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
    if kind == "mlp":
        return MLPNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim, hidden=hidden)
    if kind == "transformer":
        config = TransformerConfig(**transformer) if isinstance(transformer, dict) else transformer
        return TransformerNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim, config=config)
    raise ValueError(f"network={kind!r} is unknown; allowed: {', '.join(NETWORKS)}")
