"""Next-token logits of blocks of distinct prefixes at every quadrature node, and the back-propagation of a
given logit gradient (DESIGN §2 "The model", §3 "Solving the equations"; used by
:mod:`simstudy.fit.blocked_likelihood`).

A *logit source* is built once per objective evaluation from a model, the distinct prefixes (U, L), the
nodes (M, q) in the working dtype and the trainable parameters; then, for each block of distinct
prefixes ``start:stop`` (b = stop - start of them),

    logits = source.forward(start, stop)        # (V, b*M), column u*M + m: prefix start + u, node m
    source.backward(grad, start, stop)          # accumulates dF/dparam from dF/dl (V, b*M)

and ``source.finish()`` returns {id(param): dF/dparam} in the model's dtype. Logits come in base 2
(``log2(e) l``: ``exp2`` is about three times faster than ``exp`` on the CPU), feature-major (V rows of
b*M columns) so that every reduction over the vocabulary and every broadcast over it runs along long
contiguous rows, in one buffer reused by every block (fresh memory is slow to write); the gradient
handed to ``backward`` is with respect to the natural logits l.

* :class:`AutogradLogits`: any model, through :func:`node_logits` and autograd (a float32 working
  dtype runs a float32 copy of the model).
* :class:`WindowLogits`: a :class:`~simstudy.models.PerturbedLM` with a linear perturbation and an MLP
  or linear window network (the suite's students), by hand, on casts of the parameters to the working
  dtype (no model copy). The first layer of the perturbed window E(x) + A z is W1 E(x) + b1 + (W1 A) z:
  a per-prefix part (H, U) for all distinct prefixes plus a per-node part (H, M), both computed once per
  evaluation, so the (H, b, M) pre-activation of a block is one outer sum and no (b, M, L d) window is
  ever built; their gradients are summed over the blocks and taken back to W1, b1 and A once, in
  :meth:`WindowLogits.finish`. For the MLP, tanh(a) = 2 sigmoid(2a) - 1 is folded into the head
  (logits = 2 W2 s + b2 - W2 1 with s = sigmoid(2a): the same function, and sigmoid is several times
  cheaper than tanh on the CPU); a block's head is three matrix products in all (forward, dF/ds and
  dF/dW2). As s lies in (0, 1), the head's weights bound every logit; when the bounds span less than
  ``SAFE_EXP_RANGE`` the logits come shifted by the upper bound (``bounded``), so that their
  exponentials need no per-column maximum.
"""
from __future__ import annotations

import copy
import math

import torch

from ..models import LinearNetwork, LinearPerturbation, MLPNetwork, PerturbedLM

__all__ = ["AutogradLogits", "LOG2E", "SAFE_EXP_RANGE", "WindowLogits", "logit_source", "node_logits"]

#: A spread of logits (in nats) whose exponentials, shifted by the largest, stay normal numbers.
SAFE_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}
LOG2E = 1.0 / math.log(2.0)  # natural logits times LOG2E: base-2 logits


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


class AutogradLogits:
    """Any model: :func:`node_logits` under autograd (on a copy in the working dtype where it differs)."""

    bounded = False  # the logits are not shifted into a safe range for exp

    def __init__(self, model, prefixes: torch.Tensor, nodes: torch.Tensor, params: list, capacity: int) -> None:
        self.dtype, self.prefixes, self.nodes = model.dtype, prefixes, nodes  # prefixes (U, L), nodes (M, q)
        self.work, self.params = model, params
        if isinstance(model, PerturbedLM) and nodes.dtype != model.dtype:
            self.work = copy.deepcopy(model).to(nodes.dtype)
            position = {id(p): i for i, p in enumerate(model.parameters())}
            copied = list(self.work.parameters())
            self.params = [copied[position[id(p)]] for p in params]
        self.keys, self.grads = [id(p) for p in params], [None] * len(params)  # keyed by the model's own
        self.buffer = torch.empty(model.vocab_size * capacity, dtype=nodes.dtype, device=nodes.device)

    def forward(self, start: int, stop: int, need_grad: bool) -> torch.Tensor:
        b, M, V = stop - start, self.nodes.shape[0], self.work.vocab_size
        with torch.set_grad_enabled(need_grad):
            self.logits = node_logits(self.work, self.prefixes[start:stop],
                                      self.nodes[None].expand(b, -1, -1))  # (b, M, V)
        out = self.buffer[:V * b * M].view(V, b * M)
        return torch.mul(self.logits.detach().reshape(b * M, V).T, LOG2E, out=out)  # (V, b*M), base 2

    def backward(self, grad: torch.Tensor, start: int, stop: int) -> None:  # grad (V, b*M)
        g = grad.T.reshape(self.logits.shape)  # (b, M, V)
        found = torch.autograd.grad(self.logits, self.params, g, allow_unused=True)
        for i, part in enumerate(found):
            if part is not None:
                part = part.to(self.dtype)
                self.grads[i] = part if self.grads[i] is None else self.grads[i] + part

    def finish(self) -> dict:
        return {key: g for key, g in zip(self.keys, self.grads) if g is not None}


class WindowLogits:
    """A linear perturbation under an MLP or linear window network, by hand (see the module docstring)."""

    @staticmethod
    def applies(model) -> bool:
        return (isinstance(model, PerturbedLM) and isinstance(model.perturbation, LinearPerturbation)
                and isinstance(model.network, (MLPNetwork, LinearNetwork)))

    def __init__(self, model, prefixes: torch.Tensor, nodes: torch.Tensor, params: list, capacity: int) -> None:
        net, work, self.dtype = model.network, nodes.dtype, model.dtype
        self.mlp, self.M, self.nodes = isinstance(net, MLPNetwork), nodes.shape[0], nodes  # nodes (M, q)
        self.first, self.A = (net.hidden if self.mlp else net.head), model.perturbation.A  # W1 (H, L*d), A (L*d, q)
        self.head_layer, self.scale = net.head, float(net.logit_scale)
        self.need = {id(p) for p in params}
        W1, b1 = self.first.weight.detach().to(work), self.first.bias.detach().to(work)
        U, H, V = prefixes.shape[0], W1.shape[0], model.vocab_size
        # MLP: the first layer's output enters as 2 a (s = sigmoid(2 a)); linear: as log2(e) scale a (base-2 logits)
        self.factor = 2.0 if self.mlp else LOG2E * self.scale
        self.windows = model.embedding[prefixes].reshape(U, -1).to(work)  # (U, L*d)
        self.prefix_part = torch.addmm(b1[:, None], W1, self.windows.T).mul_(self.factor)  # (H, U)
        self.shared = (W1 @ self.A.detach().to(work) @ nodes.T).mul_(self.factor)  # (H, M): W1 A z_m
        self.features = torch.empty((H + 1) * capacity, dtype=work, device=nodes.device)
        self.shared_grad = torch.zeros(H, self.M, dtype=work, device=nodes.device)  # summed over the blocks
        self.prefix_grad = torch.zeros(H, U, dtype=work, device=nodes.device)
        self.bounded = False  # whether the logits come shifted into SAFE_EXP_RANGE (the MLP, below)
        if self.mlp:  # base-2 logits = LOG2E [2 scale W2, scale (b2 - W2 1)] @ [s; 1]
            W2, b2 = net.head.weight.detach().to(work), net.head.bias.detach().to(work)  # (V, H), (V,)
            self.head = 2 * self.scale * W2  # (V, H): dF/ds = head^T dF/dl
            offset = self.scale * (b2 - W2.sum(1))  # (V,)
            # s in (0, 1): every logit of row v lies in offset_v + [sum of its negative, positive weights]
            high, low = offset + self.head.clamp(min=0).sum(1), offset + self.head.clamp(max=0).sum(1)  # (V,)
            self.bounded = float(high.max() - low.min()) < SAFE_EXP_RANGE[work]
            if self.bounded:  # shift every logit by the largest bound: exp stays in (exp(-range), 1]
                offset = offset - high.max()
            self.head_offset = torch.cat([self.head, offset[:, None]], dim=1).mul_(LOG2E)  # (V, H + 1), base 2
            self.buffer = torch.empty(V * capacity, dtype=work, device=nodes.device)
            self.grad_features = torch.empty(H * capacity, dtype=work, device=nodes.device)
            self.head_grad = torch.zeros(V, H + 1, dtype=work, device=nodes.device)  # sum of grad @ [s; 1]^T
        self.last_columns = -1

    def forward(self, start: int, stop: int, need_grad: bool) -> torch.Tensor:
        b, H = stop - start, self.shared.shape[0]
        N = b * self.M
        pre = self.features[:H * N].view(H, N)
        torch.add(self.prefix_part[:, start:stop, None], self.shared[:, None, :], out=pre.view(H, b, self.M))
        if not self.mlp:
            return pre  # (V, N): log2(e) scale (W E(x) + b + W A z)
        self.s = pre.sigmoid_()  # (H, N): s = sigmoid(2 a), tanh(a) = 2 s - 1
        self.s_one = self.features[:(H + 1) * N].view(H + 1, N)  # (H + 1, N): [s; 1]
        if N != self.last_columns:  # the row of ones moves with the number of columns
            self.s_one[H].fill_(1.0)
            self.last_columns = N
        out = self.buffer[:self.head.shape[0] * N].view(-1, N)
        return torch.mm(self.head_offset, self.s_one, out=out)  # (V, N)

    def backward(self, grad: torch.Tensor, start: int, stop: int) -> None:  # grad (V, N): dF/dl
        if self.mlp:
            if id(self.head_layer.weight) in self.need or id(self.head_layer.bias) in self.need:
                self.head_grad.addmm_(grad, self.s_one.T)  # (V, H + 1): [grad s^T, grad 1]
            g = self.grad_features[:self.s.numel()].view_as(self.s)  # (H, N)
            torch.mm(self.head.T, grad, out=g)  # dF/ds
            g.mul_(self.s).addcmul_(g, self.s, value=-1.0)  # dF/ds s (1 - s) = dF/d(2a)
        else:
            g = grad  # (V, N): dF/dl
        g = g.view(g.shape[0], stop - start, self.M)  # (H, b, M)
        self.shared_grad += g.sum(1)  # (H, M)
        self.prefix_grad[:, start:stop] = g.sum(2)  # (H, b): summed over the nodes

    def finish(self) -> dict:
        """{id(param): dF/dparam} in the model's dtype: the head's from the summed products, W1, b1 and A
        from the pre-activation's per-prefix and per-node parts (F depends on W1 through both)."""
        grads: dict = {}
        factor = 2.0 if self.mlp else self.scale  # d(first layer's input to sigmoid or logits) / da
        if self.mlp:
            products = self.head_grad.to(self.dtype)  # d/dW2 of scale (W2 (2 s - 1) + b2)
            grads[id(self.head_layer.weight)] = self.scale * (2 * products[:, :-1] - products[:, -1:])  # (V, H)
            grads[id(self.head_layer.bias)] = self.scale * products[:, -1]  # (V,)
        prefix = factor * self.prefix_grad.to(self.dtype)  # (H, U): dF/d(W1 E(x) + b1)
        shared = factor * self.shared_grad.to(self.dtype)  # (H, M): dF/d(W1 A z_m)
        nodes, A, W1 = self.nodes.to(self.dtype), self.A.detach(), self.first.weight.detach()
        grads[id(self.first.weight)] = prefix @ self.windows.to(self.dtype) + (shared @ nodes) @ A.T  # (H, L*d)
        grads[id(self.first.bias)] = prefix.sum(1)  # (H,)
        grads[id(self.A)] = W1.T @ (shared @ nodes)  # (L*d, q)
        return {key: g for key, g in grads.items() if key in self.need}


def logit_source(model, prefixes: torch.Tensor, nodes: torch.Tensor, params: list, capacity: int):
    """The fastest logit source for ``model`` (:class:`WindowLogits` where it applies) on the distinct
    ``prefixes`` (U, L) at ``nodes`` (M, q, in the working dtype), with a buffer of ``capacity`` columns."""
    kind = WindowLogits if WindowLogits.applies(model) else AutogradLogits
    return kind(model, prefixes, nodes, params, capacity)
