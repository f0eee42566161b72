"""Next-token logits of blocks of distinct prefixes at every quadrature node, and the back-propagation of a
given logit gradient (DESIGN §3 "Solving the equations"; used by :mod:`simstudy.fit.blocked_likelihood`).

A *logit source* is built once per objective evaluation from a model, the nodes (M, q) and the
trainable parameters; then, for each block of b distinct prefixes,

    logits = source.forward(x, need_grad)   # (V, b*M), column u*M + m: prefix u of the block, node m
    grads  = source.backward(grad)          # {id(param): dF/dparam} from dF/dlogits (V, b*M)

and ``source.finish()`` adds what is shared across blocks. Logits are feature-major (V rows of b*M
columns) so that every reduction over the vocabulary and every broadcast over it runs along long
contiguous rows, and they live in one buffer reused by every block (fresh memory is slow to write).

* :class:`AutogradLogits`: any model, through :func:`node_logits` and autograd.
* :class:`WindowLogits`: a :class:`~simstudy.models.PerturbedLM` with a linear perturbation and an MLP
  or linear window network (the suite's students), by hand. The first layer of the perturbed window
  E(x) + A z is W1 E(x) + b1 + (W1 A) z: a per-prefix part (H, b) plus a per-node part (H, M) computed
  once per evaluation, so no (b, M, L d) window is ever built. For the MLP, tanh(a) = 2 sigmoid(2a) - 1
  is folded into the head (logits = 2 W2 s + b2 - W2 1 with s = sigmoid(2a): the same function, and
  sigmoid is several times cheaper than tanh on the CPU); the head's forward and backward are three
  matrix products in all, without autograd. As s lies in (0, 1), the head's weights bound every
  logit; when the bounds span less than ``SAFE_EXP_RANGE`` the logits come shifted by the upper
  bound (``bounded``), so that their exponentials need no per-column maximum.
"""
from __future__ import annotations

import torch

from ..models import LinearNetwork, LinearPerturbation, MLPNetwork, PerturbedLM

__all__ = ["AutogradLogits", "SAFE_EXP_RANGE", "WindowLogits", "logit_source", "node_logits"]

#: A spread of logits whose exponentials, shifted by the largest, stay normal numbers.
SAFE_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def node_logits(model, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Unnormalised next-token logits of prefixes ``x`` (b, L) at latent nodes ``latent`` (b, M, q): (b, M, V).

    A :class:`~simstudy.models.PerturbedLM` gives its network's logits (the input of its log_softmax);
    any other model its ``log_probs`` (normalised logits of the same softmax)."""
    b, M = latent.shape[:2]
    if not isinstance(model, PerturbedLM):
        return model.log_probs(x, None, latent)[:, :, 0]  # (b, M, V)
    perturbed = model.perturbation(model.embedding[x], latent, x)  # (b, M, L, d)
    flat = perturbed.reshape(b * M, model.prefix_len, model.embed_dim)  # (b*M, L, d)
    return model.network(flat, None, model.continuation).view(b, M, model.vocab_size)  # (b*M, 1, V) -> (b, M, V)


def _add(grads: dict, tensors: list, values) -> None:
    for t, g in zip(tensors, values):
        if g is not None:
            grads[id(t)] = g if id(t) not in grads else grads[id(t)] + g


class AutogradLogits:
    """Any model: :func:`node_logits` under autograd; ``backward`` is ``torch.autograd.grad``."""

    bounded = False  # the logits are not shifted into a safe range for exp

    def __init__(self, model, nodes: torch.Tensor, params: list, capacity: int) -> None:
        self.model, self.nodes, self.params = model, nodes, params  # nodes (M, q)
        self.buffer = torch.empty(model.vocab_size * capacity, dtype=nodes.dtype, device=nodes.device)

    def forward(self, x: torch.Tensor, need_grad: bool) -> torch.Tensor:
        b, M, V = x.shape[0], self.nodes.shape[0], self.model.vocab_size
        with torch.set_grad_enabled(need_grad):
            self.logits = node_logits(self.model, x, self.nodes[None].expand(b, -1, -1))  # (b, M, V)
        out = self.buffer[:V * b * M].view(V, b * M)
        return out.copy_(self.logits.detach().reshape(b * M, V).T)  # (V, b*M)

    def backward(self, grad: torch.Tensor) -> dict:  # grad (V, b*M)
        grads: dict = {}
        g = grad.T.reshape(self.logits.shape)  # (b, M, V)
        _add(grads, self.params, torch.autograd.grad(self.logits, self.params, g, allow_unused=True))
        return grads

    def finish(self) -> dict:
        return {}


class WindowLogits:
    """A linear perturbation under an MLP or linear window network, by hand (see the module docstring)."""

    @staticmethod
    def applies(model) -> bool:
        return (isinstance(model, PerturbedLM) and isinstance(model.perturbation, LinearPerturbation)
                and isinstance(model.network, (MLPNetwork, LinearNetwork)))

    def __init__(self, model, nodes: torch.Tensor, params: list, capacity: int) -> None:
        net = model.network
        self.model, self.mlp, self.M = model, isinstance(net, MLPNetwork), nodes.shape[0]
        self.first = net.hidden if self.mlp else net.head  # W1 (H, L*d), b1 (H,)
        self.scale = float(net.logit_scale)
        self.need = {id(p) for p in params}
        with torch.set_grad_enabled(bool(params)):
            self.node_part = (nodes @ model.perturbation.A.T) @ self.first.weight.T  # (M, H): W1 A z_m
        H, V = self.first.weight.shape[0], model.vocab_size
        W1, b1 = self.first.weight.detach(), self.first.bias.detach()
        # MLP: the first layer's output enters as 2 a (s = sigmoid(2 a)); linear: as scale * a
        factor = 2.0 if self.mlp else self.scale
        self.W1, self.b1 = factor * W1, (factor * b1)[:, None]  # (H, L*d), (H, 1)
        self.shared = factor * self.node_part.detach().T.contiguous()  # (H, M)
        self.grads: dict = {}  # accumulated over blocks: first layer and shared part, in the working dtype
        self.shared_grad = torch.zeros_like(self.shared)
        self.features = torch.empty((H + 1) * capacity, dtype=nodes.dtype, device=nodes.device)
        self.bounded = False  # whether the logits come shifted into SAFE_EXP_RANGE (the MLP, below)
        if self.mlp:  # logits = [2 scale W2, scale (b2 - W2 1)] @ [s; 1]
            W2, b2 = net.head.weight.detach(), net.head.bias.detach()  # (V, H), (V,)
            self.head = 2 * self.scale * W2  # (V, H)
            self.head_offset = torch.cat([self.head, (self.scale * (b2 - W2.sum(1)))[:, None]], dim=1)  # (V, H + 1)
            self.buffer = torch.empty(V * capacity, dtype=nodes.dtype, device=nodes.device)
            self.grad_features = torch.empty(H * capacity, dtype=nodes.dtype, device=nodes.device)
            # s in (0, 1): every logit of row v lies in offset_v + [sum of its negative, positive weights]
            head, offset = self.head_offset[:, :H], self.head_offset[:, H]
            high, low = offset + head.clamp(min=0).sum(1), offset + head.clamp(max=0).sum(1)  # (V,)
            self.bounded = float(high.max() - low.min()) < SAFE_EXP_RANGE[nodes.dtype]
            if self.bounded:  # shift every logit by the largest bound: exp stays in (exp(-range), 1]
                self.head_offset[:, H] -= high.max()
        self.last_columns = -1

    def forward(self, x: torch.Tensor, need_grad: bool) -> torch.Tensor:
        model, b = self.model, x.shape[0]
        N = b * self.M
        self.windows = model.embedding[x].reshape(b, -1)  # (b, L*d)
        prefix_part = torch.addmm(self.b1, self.W1, self.windows.T)  # (H, b)
        H = prefix_part.shape[0]
        pre = self.features[:H * N].view(H, N)
        torch.add(prefix_part[:, :, None], self.shared[:, None, :], out=pre.view(H, b, self.M))  # (H, b, M)
        if not self.mlp:
            return pre  # (V, N): scale (W E(x) + b + W A z)
        self.s = pre.sigmoid_()  # (H, N): s = sigmoid(2 a), tanh(a) = 2 s - 1
        self.s_one = self.features[:(H + 1) * N].view(H + 1, N)  # (H + 1, N): [s; 1]
        if N != self.last_columns:  # the row of ones moves with the number of columns
            self.s_one[H].fill_(1.0)
            self.last_columns = N
        out = self.buffer[:self.head.shape[0] * N].view(-1, N)
        return torch.mm(self.head_offset, self.s_one, out=out)  # (V, N)

    def backward(self, grad: torch.Tensor) -> dict:  # grad (V, N) -> gradient of the first layer's input
        grads: dict = {}
        if self.mlp:
            head, H = self.model.network.head, self.s.shape[0]
            products = grad @ self.s_one.T  # (V, H + 1): [grad s^T, grad 1]
            if id(head.weight) in self.need:  # d/dW2 of scale (W2 (2 s - 1) + b2)
                grads[id(head.weight)] = self.scale * (2 * products[:, :H] - products[:, H:])  # (V, H)
            if id(head.bias) in self.need:
                grads[id(head.bias)] = self.scale * products[:, H]  # (V,)
            g = self.grad_features[:self.s.numel()].view_as(self.s)  # (H, N)
            torch.mm(self.head.T, grad, out=g)  # dF/ds
            g.mul_(self.s).addcmul_(g, self.s, value=-1.0)  # dF/ds s (1 - s) = dF/d(2a)
            g = g.view(g.shape[0], -1, self.M)  # (H, b, M)
            factor = 2.0
        else:
            g, factor = grad.view(grad.shape[0], -1, self.M), self.scale  # (V, b, M)
        self.shared_grad += g.sum(1)  # (H, M)
        grad_prefix = factor * g.sum(2)  # (H, b): dF/da summed over the nodes
        self._first(grad_prefix @ self.windows, grad_prefix.sum(1))
        return grads

    def _first(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        for t, g in ((self.first.weight, weight), (self.first.bias, bias)):
            if id(t) in self.need:
                self.grads[id(t)] = g if id(t) not in self.grads else self.grads[id(t)] + g

    def finish(self) -> dict:
        grads = dict(self.grads)
        factor = 2.0 if self.mlp else self.scale
        inputs = [t for t in (self.model.perturbation.A, self.first.weight) if id(t) in self.need]
        if inputs:
            found = torch.autograd.grad(self.node_part, inputs, factor * self.shared_grad.T, allow_unused=True)
            _add(grads, inputs, found)
        return grads


def logit_source(model, nodes: torch.Tensor, params: list, capacity: int):
    """The fastest logit source for ``model`` (:class:`WindowLogits` where it applies), with a buffer
    of ``capacity`` columns (V x capacity)."""
    kind = WindowLogits if WindowLogits.applies(model) else AutogradLogits
    return kind(model, nodes, params, capacity)
