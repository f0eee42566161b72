"""The exact solver's likelihood objective, blockwise with its analytic gradient (DESIGN §3 "Solving the equations").

For iid continuations (or c = 1) every datum's observations are predicted from its prefix alone, so
the objective

    F = sum_d w_d log sum_m exp(log w_m + sum_j log p(y_dj | u_d, z_m)),    w_d = count_d / n,

needs the logits l(u, m, .) of each *distinct prefix* u at each quadrature node z_m once. With
pi_dm = softmax_m(log w_m + sum_j log p(y_dj | u_d, z_m)), the datum's posterior weights over the
nodes, and p(. | u, z_m) = softmax(l(u, m, .)), its gradient with respect to those logits is

    dF / dl(u, m, v) = sum_{d at u} w_d pi_dm (count_d(v) - c p(v | u, z_m))

(log-softmax-then-gather: one-hot minus softmax). :func:`blocked_log_likelihood` evaluates F in
blocks of b distinct prefixes small enough to stay in cache: each block computes its logits
(V, b*M) (:mod:`simstudy.fit.node_logits`), reduces them to its share of F and of dF / dl, and
back-propagates that logit gradient to the parameters at once (one forward and one backward per
block). No (prefixes, M, V) tensor is stored and autograd never sees the log-softmax or the gather.
The value comes back as a scalar whose ``backward`` hands the accumulated parameter gradient to
autograd, so ``exact_objective(...).backward()`` works as before (no double backward).

``precision="float32"`` runs the network and the (V, b*M) tensors in float32 (a float32 copy of a
float64 model, made at every call); the reductions over tokens, nodes and data, the objective and
the accumulated gradient stay in the model's dtype. Its objective differs from the float64 one by
about 5e-8 and its gradient by about 1e-6 relative (identified design, experiments/benchmarks/
bench_exact_solver.py).

Any model works: a :class:`~simstudy.models.PerturbedLM` through its network's logits, any other
host of ``log_probs`` through its log-probabilities (a log-softmax is itself a valid set of logits).
Autoregressive continuations with c > 1 are not handled here (token j's distribution depends on
y_<j, so prefixes cannot be shared): :func:`simstudy.fit.exact_objective` keeps its autograd path.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import quadrature
from ..models import PerturbedLM
from ..validation import check_choice
from .node_logits import logit_source

__all__ = ["BLOCK_BYTES", "PRECISIONS", "PrefixPlan", "blocked_log_likelihood", "plan_prefixes"]

#: Bytes of logits (distinct prefixes x nodes x vocabulary) per block on the CPU: a block's few (V, b M)
#: tensors stay in the last-level cache (2^18 float64 or 2^19 float32 elements). A GPU takes 64 times more.
BLOCK_BYTES = 2 ** 21
PRECISIONS = ("float64", "float32")
TINY = {torch.float64: 1e-280, torch.float32: 1e-30}  # a likelihood m(y | x) below this is summed after a shift


@dataclass
class PrefixPlan:
    """Distinct data sorted by their distinct prefix (DESIGN §3 "Solving the equations").

    ``prefixes`` (U, L) the distinct prefixes; ``tokens`` (D, c) the distinct data's observations,
    ``weights`` (D,) their frequencies (summing to one) and ``owner`` (D,) the index of their prefix,
    all sorted by ``owner``; ``offsets`` where each prefix's data start (U + 1 ints).
    """

    prefixes: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    owner: torch.Tensor
    offsets: list


def plan_prefixes(xu: torch.Tensor, yu: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> PrefixPlan:
    """Group distinct data ``xu`` (D, L), ``yu`` (D, c) with ``counts`` (D,) by their distinct prefix."""
    prefixes, owner = torch.unique(xu, dim=0, return_inverse=True)  # (U, L), (D,)
    order = torch.argsort(owner, stable=True)
    owner = owner[order]
    per_prefix = torch.bincount(owner, minlength=prefixes.shape[0])  # (U,)
    offsets = [0] + torch.cumsum(per_prefix, 0).tolist()
    weights = counts[order].to(dtype) / counts.sum()
    return PrefixPlan(prefixes=prefixes, tokens=yu[order], weights=weights, owner=owner, offsets=offsets)


def _block(logits: torch.Tensor, tokens: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
           log_w: torch.Tensor, need_grad: bool, bounded: bool):
    """One block's share of F (a scalar in the dtype of ``weights``) and dF / dl (None unless ``need_grad``).

    logits (V, b*M) in the working dtype, column u*M + m for prefix u of the block at node m,
    overwritten (by the gradient when ``need_grad``); ``bounded``: they are already shifted into a
    range whose exponentials neither overflow nor underflow (else each column is shifted by its
    maximum); tokens (D_b, c); local (D_b,) each datum's prefix within the block; weights (D_b,)
    and log_w (M,) in the model's dtype."""
    V, N = logits.shape
    M = log_w.shape[0]
    c, dtype = tokens.shape[1], weights.dtype
    b = N // M
    by_row = logits.view(V * b, M)  # row v*b + u: token v of prefix u at every node
    rows = (tokens.T * b + local).contiguous()  # (c, D_b): the row of (y_dj, u_d)
    picked = by_row.index_select(0, rows.view(-1)).view(c, -1, M)  # (c, D_b, M): l(u_d, m, y_dj)
    observed = picked[0].to(dtype)  # (D_b, M)
    for j in range(1, c):
        observed += picked[j]
    top = None if bounded else logits.amax(0)  # (N,)
    e = (logits if bounded else logits.sub_(top)).exp_()  # (V, N): p times s
    s = e.sum(0).to(dtype)  # (N,)
    lse = torch.log(s)  # (N,): log sum_v exp l(u, m, v)
    base = (lse if bounded else lse.add_(top)).view(-1, M).mul_(-c).add_(log_w)  # (b, M): log w_m - c lse(u, m)
    log_joint = observed.add_(base.index_select(0, local))  # (D_b, M): log w_m + sum_j log p(y_dj | u_d, z_m)
    posterior = torch.exp(log_joint)  # (D_b, M): w_m p(y_d | u_d, z_m), pi_dm times its sum; log_joint <= 0
    total = posterior.sum(1)  # (D_b,): m(y_d | u_d)
    if float(total.min()) > TINY[dtype]:
        log_m = total.log()  # (D_b,)
    else:  # some m(y_d | u_d) underflows: shift each datum by its largest term
        peak = log_joint.amax(1, keepdim=True)  # (D_b, 1)
        posterior = log_joint.sub_(peak).exp_()
        total = posterior.sum(1)
        log_m = peak.squeeze(1) + total.log()
    value = (weights * log_m).sum()  # sum_d w_d log m(y_d | u_d)
    if not need_grad:
        return value, None
    wpi = posterior.mul_((weights / total)[:, None])  # (D_b, M): w_d pi_dm
    mass = torch.zeros(b, M, dtype=dtype, device=logits.device).index_add_(0, local, wpi)  # (b, M)
    grad = e.mul_((-c * mass.view(-1) / s).to(e.dtype))  # (V, N): -c sum_d w_d pi_dm p(v | u, z_m)
    wpi = wpi.to(e.dtype)
    for j in range(c):
        by_row.index_add_(0, rows[j], wpi)  # + sum_d w_d pi_dm count_d(v)
    return value, grad


def _working_model(model, precision: str):
    """The model the blocks run (``model`` itself, or a float32 copy of a float64 PerturbedLM) and its
    trainable parameters, in the order of ``model``'s."""
    if precision == "float32" and isinstance(model, PerturbedLM) and model.dtype != torch.float32:
        work = copy.deepcopy(model).to(torch.float32)
    else:
        work = model
    return work, [p for p in work.parameters() if p.requires_grad]


def _evaluate(model, plan: PrefixPlan, rule: quadrature.Rule, need_grad: bool, precision: str,
              block_elements: int):
    """F and (when ``need_grad``) its gradient with respect to each trainable parameter (None where unused)."""
    device, dtype = plan.prefixes.device, model.dtype
    work, params = _working_model(model, precision)
    params = params if need_grad else []
    nodes = torch.as_tensor(rule.nodes, dtype=work.dtype, device=device)  # (M, q)
    log_w = torch.as_tensor(rule.log_weights, dtype=dtype, device=device)  # (M,)
    M, V, U = nodes.shape[0], model.vocab_size, plan.prefixes.shape[0]
    budget = block_elements or BLOCK_BYTES * (1 if device.type == "cpu" else 64) // nodes.element_size()
    step = max(1, min(U, budget // (M * V)))
    source = logit_source(work, nodes, params, step * M)
    value = torch.zeros((), dtype=dtype, device=device)
    grads: dict = {}
    for start in range(0, U, step):
        stop = min(U, start + step)
        lo, hi = plan.offsets[start], plan.offsets[stop]
        logits = source.forward(plan.prefixes[start:stop], need_grad)  # (V, b*M)
        part, grad = _block(logits, plan.tokens[lo:hi], plan.owner[lo:hi] - start, plan.weights[lo:hi], log_w,
                            need_grad, source.bounded)
        value = value + part
        if need_grad:
            _accumulate(grads, source.backward(grad), dtype)
    if need_grad:
        _accumulate(grads, source.finish(), dtype)
    return value, [grads.get(id(p)) for p in params]


def _accumulate(total: dict, part: dict, dtype: torch.dtype) -> None:
    for key, g in part.items():
        g = g.to(dtype)
        total[key] = g if key not in total else total[key] + g


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
