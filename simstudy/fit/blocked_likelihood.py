"""The exact solver's likelihood objective, blockwise with its analytic gradient (DESIGN §3 "Solving the equations").

For iid continuations (or c = 1) every datum's observations are predicted from its prefix alone, so
the objective

    F = sum_d w_d log sum_m exp(log w_m + sum_j log p(y_dj | u_d, z_m)),    w_d = count_d / n,

needs the logits l(u, m, .) of each *distinct prefix* u at each quadrature node z_m once. With
pi_dm = softmax_m(log w_m + sum_j log p(y_dj | u_d, z_m)), the datum's posterior weights over the
nodes, and p(. | u, z_m) = softmax(l(u, m, .)), its gradient with respect to those logits is

    dF / dl(u, m, v) = sum_{d at u} w_d pi_dm (count_d(v) - c p(v | u, z_m))

(log-softmax-then-gather: one-hot minus softmax). :func:`blocked_log_likelihood` evaluates F in
blocks of b distinct prefixes: each block computes its logits (V, b*M) (:mod:`simstudy.fit.node_logits`),
reduces them to its share of F and of dF / dl, and back-propagates that logit gradient towards the
parameters at once (one forward and one backward per block; the sums over blocks are taken to the
parameters once per evaluation). No (prefixes, M, V) tensor is stored and autograd never sees the
log-softmax or the gather. The value comes back as a scalar whose ``backward`` hands the accumulated
parameter gradient to autograd, so ``exact_objective(...).backward()`` works as before (no double
backward). Logits, log-sum-exps and log-likelihoods are in base 2 (``exp2`` is about three times faster
than ``exp`` on the CPU); F is returned in nats. The block's index tensors are built once per
:class:`PrefixPlan` and block size, so a solve (hundreds of evaluations of one plan) builds them once.

``precision="float32"`` runs the network and the (V, b*M) tensors in float32 on float32 casts of the
parameters (no model copy for the suite's students); the datum-level work (log w_m + sum_j log p(y_dj |
u_d, z_m): logits and log-sum-exps of up to ``SAFE_EXP_RANGE`` cancel there) and the objective are in the
model's dtype, the gradient's sums over blocks in float32. Its objective differs from the float64 one by about
1e-8 and its gradient by about 1e-4 of the largest component, 1e-4 of the gradient's norm near the
capped root (identified design, experiments/benchmarks/bench_exact_solver.py).

Any model works: a :class:`~simstudy.models.PerturbedLM` through its network's logits, any other
host of ``log_probs`` through its log-probabilities (a log-softmax is itself a valid set of logits).
Autoregressive continuations with c > 1 are not handled here (token j's distribution depends on
y_<j, so prefixes cannot be shared): :func:`simstudy.fit.exact_objective` keeps its autograd path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import quadrature
from ..models import PerturbedLM
from ..validation import check_choice
from .node_logits import LOG2E, logit_source

__all__ = ["BLOCK_BYTES", "PRECISIONS", "PrefixPlan", "blocked_log_likelihood", "plan_prefixes"]

#: Bytes of logits (distinct prefixes x nodes x vocabulary) per block on the CPU: a block's few (V, b M)
#: tensors stay in the last-level cache, and blocks are few enough that the per-operation overhead of the
#: many small tensor operations stays small (on one thread, 1 to 4 MiB were equally fast; smaller
#: blocks were slower). A GPU takes 64 times more.
BLOCK_BYTES = 3 * 2 ** 20
PRECISIONS = ("float64", "float32")
TINY = {torch.float64: 1e-280, torch.float32: 1e-30}  # a likelihood m(y | x) below this is summed after a shift


@dataclass
class PrefixPlan:
    """Distinct data sorted by their distinct prefix (DESIGN §3 "Solving the equations").

    ``prefixes`` (U, L) the distinct prefixes; ``tokens`` (D, c) the distinct data's observations,
    ``weights`` (D,) their frequencies (summing to one) and ``owner`` (D,) the index of their prefix,
    all sorted by ``owner``; ``offsets`` where each prefix's data start (U + 1 ints). ``blocks`` caches
    the per-block index tensors of each block size (built on first use, reused by every evaluation).
    """

    prefixes: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    owner: torch.Tensor
    offsets: list
    blocks: dict = field(default_factory=dict, repr=False)

    def block_list(self, step: int) -> list:
        """The blocks of ``step`` distinct prefixes: :class:`_Block` each, in order."""
        if step not in self.blocks:
            U, c = self.prefixes.shape[0], self.tokens.shape[1]
            found = []
            for start in range(0, U, step):
                stop = min(U, start + step)
                lo, hi = self.offsets[start], self.offsets[stop]
                local = self.owner[lo:hi] - start  # (D_b,)
                rows = (self.tokens[lo:hi].T * (stop - start) + local).reshape(-1)  # (c*D_b,): row of (y_dj, u_d)
                found.append(_Block(start, stop, local, rows, self.weights[lo:hi], c))
            self.blocks = {step: found}  # one block size at a time
        return self.blocks[step]


@dataclass
class _Block:
    """Distinct prefixes ``start:stop`` and their data: ``local`` (D_b,) each datum's prefix within the
    block, ``rows`` (c*D_b,) the row v*b + u of each observation (j-major), ``weights`` (D_b,)."""

    start: int
    stop: int
    local: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    c: int


def plan_prefixes(xu: torch.Tensor, yu: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> PrefixPlan:
    """Group distinct data ``xu`` (D, L), ``yu`` (D, c) with ``counts`` (D,) by their distinct prefix."""
    prefixes, owner = torch.unique(xu, dim=0, return_inverse=True)  # (U, L), (D,)
    order = torch.argsort(owner, stable=True)
    owner = owner[order]
    per_prefix = torch.bincount(owner, minlength=prefixes.shape[0])  # (U,)
    offsets = [0] + torch.cumsum(per_prefix, 0).tolist()
    weights = counts[order].to(dtype) / counts.sum()
    return PrefixPlan(prefixes=prefixes, tokens=yu[order].contiguous(), weights=weights, owner=owner,
                      offsets=offsets)


def _block(logits: torch.Tensor, block: _Block, log2_w: torch.Tensor, need_grad: bool, bounded: bool):
    """One block's share of F / ln 2 (a scalar in the dtype of the weights) and dF / dl (None unless
    ``need_grad``).

    logits (V, b*M) in base 2 (``log2(e) l``) and the working dtype, column u*M + m for prefix u of the
    block at node m, overwritten (by the gradient with respect to the natural logits l when
    ``need_grad``); ``bounded``: they are already shifted into a range whose exponentials neither
    overflow nor underflow (else each column is shifted by its maximum); log2_w (M,) the rule's
    log2-weights in the model's dtype. Everything is in base 2 (exp2 and log2 are the fast ones)."""
    V, N = logits.shape
    M, c, local, weights = log2_w.shape[0], block.c, block.local, block.weights
    dtype, b = weights.dtype, N // M
    by_row = logits.view(V * b, M)  # row v*b + u: token v of prefix u at every node
    picked = by_row.index_select(0, block.rows).view(c, -1, M)  # (c, D_b, M): l2(u_d, m, y_dj)
    observed = picked[0].to(dtype, copy=True)  # (D_b, M): sum_j l2(u_d, m, y_dj)
    for j in range(1, c):
        observed += picked[j]
    top = None if bounded else logits.amax(0)  # (N,)
    e = (logits if bounded else logits.sub_(top)).exp2_()  # (V, N): p times s
    s = e.sum(0)  # (N,)
    lse = torch.log2(s.to(dtype))  # (N,): log2 sum_v 2^l2(u, m, v)
    if not bounded:
        lse += top
    base = lse.view(b, M).mul_(-c).add_(log2_w)  # (b, M): log2 w_m - c lse2(u, m)
    log_joint = observed.add_(base.index_select(0, local))  # (D_b, M): log2 (w_m p(y_d | u_d, z_m)) <= 0
    posterior = torch.exp2(log_joint)  # (D_b, M): w_m p(y_d | u_d, z_m), pi_dm times its sum
    total = posterior.sum(1)  # (D_b,): m(y_d | u_d)
    if float(total.min()) > TINY[dtype]:
        log_m = total.log2()  # (D_b,)
    else:  # some m(y_d | u_d) underflows: shift each datum by its largest term
        peak = log_joint.amax(1, keepdim=True)  # (D_b, 1)
        posterior = log_joint.sub_(peak).exp2_()
        total = posterior.sum(1)
        log_m = peak.squeeze(1) + total.log2()
    value = weights @ log_m  # sum_d w_d log2 m(y_d | u_d)
    if not need_grad:
        return value, None
    wpi = posterior.mul_((weights / total)[:, None])  # (D_b, M): w_d pi_dm
    mass = torch.zeros(b, M, dtype=dtype, device=logits.device).index_add_(0, local, wpi)  # (b, M)
    grad = e.mul_(mass.view(-1).div_(s).mul_(-c).to(e.dtype))  # (V, N): -c sum_d w_d pi_dm p(v | u, z_m)
    wpi = wpi.to(e.dtype)
    for rows in block.rows.view(c, -1):
        by_row.index_add_(0, rows, wpi)  # + sum_d w_d pi_dm count_d(v)
    return value, grad


def working_dtype(model, precision: str) -> torch.dtype:
    """The dtype the blocks run in: float32 for ``precision="float32"`` and a PerturbedLM, else the model's."""
    return torch.float32 if precision == "float32" and isinstance(model, PerturbedLM) else model.dtype


def block_size(plan: PrefixPlan, M: int, V: int, dtype: torch.dtype, block_elements: int = 0) -> int:
    """Distinct prefixes per block: ``block_elements`` logits (or :data:`BLOCK_BYTES` of them) per block."""
    device = plan.prefixes.device
    budget = block_elements or BLOCK_BYTES * (1 if device.type == "cpu" else 64) // dtype.itemsize
    return max(1, min(plan.prefixes.shape[0], budget // (M * V)))


def _evaluate(model, plan: PrefixPlan, rule: quadrature.Rule, need_grad: bool, precision: str,
              block_elements: int):
    """F and (when ``need_grad``) its gradient with respect to each trainable parameter (None where unused)."""
    device, dtype = plan.prefixes.device, model.dtype
    params = [p for p in model.parameters() if p.requires_grad] if need_grad else []
    nodes = torch.as_tensor(rule.nodes, dtype=working_dtype(model, precision), device=device)  # (M, q)
    log2_w = torch.as_tensor(rule.log_weights * LOG2E, dtype=dtype, device=device)  # (M,)
    M, V = nodes.shape[0], model.vocab_size
    step = block_size(plan, M, V, nodes.dtype, block_elements)
    source = logit_source(model, plan.prefixes, nodes, params, step * M)
    value = torch.zeros((), dtype=dtype, device=device)
    for block in plan.block_list(step):
        logits = source.forward(block.start, block.stop, need_grad)  # (V, b*M), base 2
        part, grad = _block(logits, block, log2_w, need_grad, source.bounded)
        value += part
        if need_grad:
            source.backward(grad, block.start, block.stop)
    value *= 1.0 / LOG2E  # log m = ln 2 log2 m
    grads = source.finish() if need_grad else {}
    return value, [grads.get(id(p)) for p in params]


class _WithGradient(torch.autograd.Function):
    """A scalar computed together with its gradient: ``backward`` scales the stored gradient."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *[None if g is None else g * grad_output for g in ctx.grads])


def blocked_log_likelihood(model, plan: PrefixPlan, rule: quadrature.Rule, *, precision: str = "float64",
                           block_elements: int | None = None) -> torch.Tensor:
    """F = sum_d w_d log m(y_d | u_d) by ``rule`` over z, in blocks of distinct prefixes: a scalar.

    Differentiable with respect to the model's trainable parameters when grad mode is on (the
    gradient is computed with the value, block by block, and handed to autograd by ``backward``;
    no double backward). ``precision`` is that of the network and the (V, b*M) tensors
    ("float64" or "float32"). Needs iid observations or c = 1 (see the module docstring).
    """
    precision = check_choice("precision", precision, PRECISIONS, word="unknown")
    params = [p for p in model.parameters() if p.requires_grad]
    need_grad = torch.is_grad_enabled() and bool(params)
    value, grads = _evaluate(model, plan, rule, need_grad, precision, block_elements or 0)
    if not need_grad:
        return value
    return _WithGradient.apply(value, grads, *params)
