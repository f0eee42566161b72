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

from ..validation import check_float, check_int

NETWORKS = ("linear", "mlp", "transformer")
CONTINUATIONS = ("iid", "autoregressive")


class Network(nn.Module):
    """Base class holding the shared sizes and the logit scale."""

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int) -> None:
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, 2)
        self.prefix_len = check_int("prefix_len", prefix_len, 1)
        self.embed_dim = check_int("embed_dim", embed_dim, 1)
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
            return (self.logit_scale * logits).expand(N, c, self.vocab_size)  # a view: the c rows are one
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
        hidden = check_int("hidden", hidden, 1)
        self.hidden = nn.Linear(prefix_len * embed_dim, hidden)  # W1, b1
        self.head = nn.Linear(hidden, vocab_size)  # W2, b2

    def window_logits(self, windows):
        return self.head(torch.tanh(self.hidden(windows)))

    def first_layer(self) -> torch.Tensor:
        """W1: the identifiable perturbation covariance is W1 A A^T W1^T (DESIGN §3)."""
        return self.hidden.weight


@dataclass
class TransformerConfig:
    """Size of the small decoder-only transformer student (nanoGPT-style, DESIGN §6 check 6).

    Every field is validated on construction (ValueError naming the field).
    ``num_parameters(vocab_size=, embed_dim=)`` gives the student's parameter count
    in closed form, so a study can state that it is over-parameterised (parameters >> n)
    before building anything.
    """

    n_layer: int = field(default=2, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block; must divide n_embd"})
    n_embd: int = field(default=64, metadata={"help": "residual width C (128-256 keeps the matmuls efficient)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input, attention weights and block outputs"})
    max_len: int = field(default=16, metadata={"help": "longest input sequence: prefix_len + continuation length - 1"})

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "max_len"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is invalid; allowed: a multiple of n_head={self.n_head}")
        self.dropout = check_float("dropout", self.dropout, low=0.0, high=1.0)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self, *, vocab_size: int, embed_dim: int) -> int:
        """Trainable parameters of a ``TransformerNetwork`` with this config, in closed form.

        input projection d C + C, positions max_len C, per block 12 C^2 + 13 C
        (two LayerNorms 4 C, qkv 3 C^2 + 3 C, output projection C^2 + C, MLP 8 C^2 + 5 C),
        final LayerNorm 2 C, head C V + V.
        """
        check_int("vocab_size", vocab_size, 2)
        check_int("embed_dim", embed_dim, 1)
        C = self.n_embd
        return ((embed_dim + 1) * C + self.max_len * C + self.n_layer * (12 * C * C + 13 * C)
                + 2 * C + (C + 1) * vocab_size)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (nanoGPT): h + attn(ln_1(h)), then h + mlp(ln_2(h)).

    Causal self-attention uses one fused qkv projection. Sequences here are short
    (T = L + c - 1, often 2), where an explicit loop over query positions beats
    ``F.scaled_dot_product_attention`` by about 3x on CPU; longer ones (T >
    ``loop_max_len``) go through scaled_dot_product_attention. Both give the same
    result (tests/test_transformer.py checks it).
    """

    loop_max_len = 3  # longest sequence whose attention is an explicit loop over query positions

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_size, self.dropout = config.n_head, config.head_size, config.dropout
        C = config.n_embd
        self.ln_1 = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)  # fused query, key, value
        self.proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4 * C)
        self.fc_out = nn.Linear(4 * C, C)

    def forward(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``h`` (N, T, C) -> (N, T - start, C).

        Only positions ``start..T-1`` are computed (they still attend to every
        earlier position): the last block needs just the positions that predict
        observations.
        """
        N, T, C = h.shape
        qkv = self.qkv(self.ln_1(h))  # (N, T, 3C)
        q, k, v = qkv.view(N, T, 3, self.n_head, self.head_size).unbind(2)  # each (N, T, nh, hs)
        att = self.attention(q[:, start:], k, v, start)  # (N, T - start, C)
        h = h[:, start:] + F.dropout(self.proj(att), self.dropout, self.training)  # (N, T - start, C)
        mlp = self.fc_out(F.gelu(self.fc(self.ln_2(h))))  # (N, T - start, C) via (N, T - start, 4C)
        return h + F.dropout(mlp, self.dropout, self.training)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of queries at positions ``start..T-1``: q (N, Tq, nh, hs),
        k and v (N, T, nh, hs) -> (N, Tq, C)."""
        N, Tq, nh, hs = q.shape
        T = k.shape[1]
        p = self.dropout if self.training else 0.0
        if T <= self.loop_max_len:
            rows = []
            for i in range(Tq):  # query position start + i sees keys 0..start + i
                j = start + i + 1
                if j == 1 and p == 0:  # position 0 sees only itself: its softmax weight is 1
                    rows.append(v[:, 0])  # (N, nh, hs)
                    continue
                scores = (q[:, i, None] * k[:, :j]).sum(-1) * hs ** -0.5  # (N, j, nh)
                weights = F.dropout(scores.softmax(dim=1), p, self.training)  # (N, j, nh)
                rows.append((weights[..., None] * v[:, :j]).sum(1))  # (N, nh, hs)
            return torch.stack(rows, dim=1).view(N, Tq, nh * hs)  # (N, Tq, C)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (N, nh, Tq or T, hs)
        mask = None if start == 0 else torch.ones(Tq, T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)  # (N, nh, Tq, hs)
        return y.transpose(1, 2).reshape(N, Tq, nh * hs)  # (N, Tq, C)


class TransformerNetwork(Network):
    """Small causal decoder on inputs_embeds, written like nanoGPT (DESIGN §2, §6 check 6).

    input projection d -> C plus learned positions, ``n_layer`` blocks, final
    LayerNorm, linear head C -> V. The sequence is the (perturbed) prefix, then,
    for an autoregressive continuation, the c - 1 earlier observations:
    T = L (iid) or L + c - 1. Position L - 1 + j predicts observation j, so the
    last block computes only positions L - 1 .. T - 1.

    Parameters
    ----------
    vocab_size, prefix_len, embed_dim : int
        V, L and d.
    config : TransformerConfig or dict, optional
        Layers, heads, width, dropout, max_len; defaults to ``TransformerConfig()``.
    """

    def __init__(self, *, vocab_size: int, prefix_len: int, embed_dim: int,
                 config: TransformerConfig | dict | None = None) -> None:
        super().__init__(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
        if config is None:
            config = TransformerConfig()
        elif isinstance(config, dict):
            known = list(TransformerConfig.__dataclass_fields__)
            unknown = sorted(set(config) - set(known))
            if unknown:
                raise ValueError(f"transformer config keys {unknown} are unknown; allowed: {', '.join(known)}")
            config = TransformerConfig(**config)
        elif not isinstance(config, TransformerConfig):
            raise ValueError(f"config={config!r} is invalid; allowed: a TransformerConfig, a dict or None")
        if prefix_len > config.max_len:
            raise ValueError(f"prefix_len={prefix_len} is invalid; allowed: an integer <= max_len={config.max_len}")
        self.config = config
        C = config.n_embd
        self.input_proj = nn.Linear(embed_dim, C)
        self.position = nn.Parameter(0.02 * torch.randn(config.max_len, C))  # learned positions
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
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
            raise ValueError(f"sequence length {T} (prefix {L} + {T - L} continuation tokens) is invalid; "
                             f"allowed: at most max_len={self.config.max_len}")
        h = F.dropout(self.input_proj(seq) + self.position[:T], self.config.dropout, self.training)  # (N, T, C)
        for block in self.blocks[:-1]:
            h = block(h)  # (N, T, C)
        h = self.blocks[-1](h, start=L - 1)  # (N, T - L + 1, C): the positions that predict observations
        logits = self.logit_scale * self.head(self.ln_f(h))  # (N, 1 or c, V)
        return logits.expand(N, c, self.vocab_size) if iid else logits

    def first_layer(self) -> torch.Tensor:
        return self.input_proj.weight

    def num_parameters(self) -> int:
        """Number of trainable parameters (equals ``config.num_parameters(vocab_size=, embed_dim=)``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def make_network(kind: str, *, vocab_size: int, prefix_len: int, embed_dim: int, hidden: int = 16,
                 transformer: TransformerConfig | dict | None = None) -> Network:
    """Build a network by name (see ``NETWORKS``)."""
    if kind == "linear":
        return LinearNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim)
    if kind == "mlp":
        return MLPNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim, hidden=hidden)
    if kind == "transformer":
        config = transformer  # TransformerNetwork validates a dict itself (one-line ValueError for unknown keys)
        return TransformerNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim, config=config)
    raise ValueError(f"network={kind!r} is unknown; allowed: {', '.join(NETWORKS)}")
