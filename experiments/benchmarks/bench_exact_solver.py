"""Benchmark: the exact solver's likelihood objective, the old autograd implementation against the blocked one
with its analytic gradient (DESIGN §3 "Solving the equations"; issue 11: at least 15 times faster, an exact ps
solve in the identified design in 20 s or less on one thread, the same root to the solver's tolerance).

Design: the identified design (``PerturbedNextToken.reference("identified", seed=0)``), n = 5000 data,
the default student (float64, linear perturbation, q = 2), rule ``pruned_trapezoid(31, 2)`` (509
nodes), the objective "likelihood" (the root of ps-exact). Everything runs in ONE process on ONE
thread (``torch.set_num_threads(1)``), old and new in the same run, the evaluations interleaved so
that every ratio is measured under the same load. Times are given as wall seconds and as CPU seconds
of this process (``time.process_time``): on a shared machine the CPU seconds are the steadier measure
(they leave out the time the process waited for a core, not the slowdown from sharing caches and
memory bandwidth); the load average is printed at the start and the end.

It prints

1. the time per objective + gradient evaluation (median and minimum over ``--reps`` interleaved
   repetitions) of the reference copy of the old implementation (below: (D, M, c) token
   log-likelihoods by autograd through log_softmax and a gather) and of
   :func:`simstudy.fit.exact_objective` in float64 and float32, the ratios old / new (median of the
   per-repetition ratios), and the differences of the objective and of its gradient from the old ones
   at the initialisation;
2. full solves (L-BFGS, ``max_refinements=0`` as in the extrapolation check): the old solver at
   ``--old-max-iter`` (its full 300-iteration solve takes 15 minutes or more) beside the new one
   in float64 and "mixed" precision at the same cap (their roots agree with the old one there), then
   the new solver at ``--max-iter`` (300, the check's cap) in float64, in float64 from an
   initialisation moved by a relative 1e-12 (how much the capped solve depends on its path: the
   yardstick for any comparison of roots), and in "mixed" precision: seconds (wall and CPU; the old one
   split into its L-BFGS iterations and the quadrature-error check), evaluations, objective, gradient
   norm, quadrature error, and the root differences (objective, max and mean abs difference of the
   fitted marginals on all 1681 prefixes); the old full solve's time is estimated from its seconds per
   L-BFGS evaluation;
3. a node-doubling check at the mixed-precision root: the objective with ``pruned_trapezoid(k, 2)``
   for k = 21, 31, 61 (the solver's quadrature tolerance is 1e-7).

    python experiments/benchmarks/bench_exact_solver.py [--reps 5] [--max-iter 300] [--old-max-iter 30]
    (about 10 minutes on one idle core, mostly the old solve and the 300-iteration solves)
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

from simstudy import quadrature
from simstudy.dgm import PerturbedNextToken
from simstudy.fit import exact_objective, fit_exact
from simstudy.fit.exact import group_data


# ---- the reference: today's implementation (simstudy/fit/exact.py before issue 11) ----------------------
def reference_objective(model, grouped, rule) -> torch.Tensor:
    """The old ``exact_objective(objective="likelihood")``: (D, M, c) token log-likelihoods by autograd."""
    xu, yu, counts = grouped
    weights = counts.to(model.dtype) / counts.sum()
    log_w = torch.as_tensor(rule.log_weights, dtype=model.dtype)  # (M,)
    nodes = torch.as_tensor(rule.nodes, dtype=model.dtype)  # (M, q)
    if model.continuation == "iid" or yu.shape[1] == 1:
        prefixes, inv = torch.unique(xu, dim=0, return_inverse=True)
        logp = model.log_probs(prefixes, None, nodes[None].expand(prefixes.shape[0], -1, -1))[:, :, 0]  # (U, M, V)
        token = logp.permute(0, 2, 1)[inv[:, None], yu].permute(0, 2, 1)  # (D, M, c)
    else:
        token = model.token_log_lik(xu, yu, nodes[None].expand(xu.shape[0], -1, -1))  # (D, M, c)
    log_m = torch.logsumexp(token.sum(-1) + log_w, dim=1)  # (D,)
    return (log_m * weights).sum()


def reference_group(x, y):
    rows = torch.cat([x, y], dim=1)
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    return unique[:, :x.shape[1]], unique[:, x.shape[1]:], counts


def reference_fit(model, x, y, rule, *, max_iter: int) -> dict:
    """The old ``fit_exact(objective="likelihood", max_refinements=0)``."""
    grouped = reference_group(x, y)
    params = [q for q in model.parameters() if q.requires_grad]
    evaluations = []

    def closure():
        for q in params:
            q.grad = None
        loss = -reference_objective(model, grouped, rule)
        loss.backward()
        evaluations.append(float(loss.detach()))
        return loss

    started = time.perf_counter()
    torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                      history_size=50, line_search_fn="strong_wolfe").step(closure)
    iterating = time.perf_counter() - started
    with torch.no_grad():
        coarse = reference_objective(model, grouped, rule)
        fine = reference_objective(model, grouped, quadrature.refined(rule))
    value = -reference_objective(model, grouped, rule)
    grad = torch.autograd.grad(value, params)
    return {"objective": -float(value.detach()), "grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in grad))),
            "evaluations": len(evaluations), "quadrature_error": abs(float(fine - coarse)),
            "seconds": time.perf_counter() - started, "lbfgs_seconds": iterating}


# ---- measurements --------------------------------------------------------------------------------------
def value_and_grad(fn, model):
    params = [q for q in model.parameters() if q.requires_grad]
    value = fn()
    grads = torch.autograd.grad(value, params)
    return float(value.detach()), torch.cat([g.reshape(-1) for g in grads])


def time_evaluations(student, x, y, rule, reps: int) -> dict:
    grouped_old, grouped_new = reference_group(x, y), group_data(x, y)
    cases = {
        "old (autograd, float64)": lambda: reference_objective(student, grouped_old, rule),
        "new (blocked, float64)": lambda: exact_objective(student, x, y, rule=rule, grouped=grouped_new),
        "new (blocked, float32)": lambda: exact_objective(student, x, y, rule=rule, grouped=grouped_new,
                                                          precision="float32"),
    }
    reference = value_and_grad(cases["old (autograd, float64)"], student)
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: the plan's index tensors, first-call allocations
        value_and_grad(fn, student)
    for _ in range(reps):  # interleaved: every case sees the same load
        for key, fn in cases.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            value_and_grad(fn, student)
            wall[key].append(time.perf_counter() - started)
            cpu[key].append(time.process_time() - started_cpu)
    old_wall, old_cpu = np.array(wall["old (autograd, float64)"]), np.array(cpu["old (autograd, float64)"])
    print(f"objective + gradient at the initialisation, {reps} interleaved repetitions (seconds per evaluation; "
          "ratio: median over repetitions of old / new)")
    print(f"{'implementation':<26} {'wall med':>8} {'min':>7} {'ratio':>6} {'cpu med':>8} {'min':>7} {'ratio':>6} "
          f"{'|dF|':>9} {'max|dgrad|':>11} {'rel dgrad':>9}")
    ratios = {}
    for key, fn in cases.items():
        value, grad = value_and_grad(fn, student)
        diff = float((grad - reference[1]).abs().max())
        w, c = np.array(wall[key]), np.array(cpu[key])
        ratios[key] = (float(np.median(old_wall / w)), float(np.median(old_cpu / c)))
        print(f"{key:<26} {np.median(w):8.3f} {w.min():7.3f} {ratios[key][0]:6.1f} {np.median(c):8.3f} {c.min():7.3f} "
              f"{ratios[key][1]:6.1f} {abs(value - reference[0]):9.1e} {diff:11.1e} "
              f"{diff / float(reference[1].abs().max()):9.1e}")
    return ratios


def marginals(model, prefixes: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.marginal(prefixes, num_nodes=31).probs


def solve(label, student, fitter, prefixes, *, nudge: float = 0.0):
    model = copy.deepcopy(student)
    if nudge:  # every parameter times (1 + nudge N(0, 1))
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + nudge * torch.randn(p.shape, generator=g, dtype=p.dtype))
    started_cpu = time.process_time()
    stats = dict(fitter(model))
    stats["cpu_seconds"] = time.process_time() - started_cpu
    probs = marginals(model, prefixes)
    print(f"{label:<40} {stats['seconds']:8.1f} {stats['cpu_seconds']:8.1f} {stats['evaluations']:6d} "
          f"{stats['objective']:17.12f} {stats['grad_norm']:10.2e} {stats['quadrature_error']:9.1e}", flush=True)
    return stats, probs, model


def compare(label, a, b) -> None:
    diff = np.abs(a[1] - b[1])
    print(f"  {label:<52} objective {a[0]['objective'] - b[0]['objective']:+.2e}, marginals max {diff.max():.2e}, "
          f"mean {diff.mean():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each evaluation")
    parser.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations of the new full solves")
    parser.add_argument("--old-max-iter", type=int, default=30, help="L-BFGS iterations of the old solve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # its first construction imports torch._dynamo (seconds)
    dgm = PerturbedNextToken.reference("identified", seed=args.seed)
    x, y = dgm.sample(5000, np.random.default_rng(args.seed)).tensors()
    student = dgm.make_student(seed=args.seed + 1)
    rule = quadrature.pruned_trapezoid(31, 2)
    prefixes = torch.as_tensor(dgm.prefixes("all"))
    print(f"identified design, n = 5000 ({group_data(x, y).xu.shape[0]} distinct data, "
          f"{torch.unique(x, dim=0).shape[0]} distinct prefixes), {rule.size} nodes, V = {dgm.vocab_size}, "
          f"one thread; load average at the start {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)\n")
    ratios = time_evaluations(student, x, y, rule, args.reps)

    def new(precision, max_iter):
        return lambda m: fit_exact(m, x, y, rule=rule, max_iter=max_iter, max_refinements=0,
                                   precision=precision).stats

    print(f"\nfull solves (L-BFGS, max_refinements=0); marginals on all {len(prefixes)} prefixes")
    print(f"{'solve':<40} {'wall s':>8} {'cpu s':>8} {'evals':>6} {'objective':>17} {'grad norm':>10} "
          f"{'quad err':>9}")
    k = args.old_max_iter
    old_short = solve(f"old, max_iter={k}", student, lambda m: reference_fit(m, x, y, rule, max_iter=k), prefixes)
    short64 = solve(f"new float64, max_iter={k}", student, new("float64", k), prefixes)
    short_mixed = solve(f"new mixed, max_iter={k}", student, new("mixed", k), prefixes)
    full64 = solve(f"new float64, max_iter={args.max_iter}", student, new("float64", args.max_iter), prefixes)
    nudged = solve(f"new float64, init x (1 + 1e-12 N(0,1)), {args.max_iter}", student,
                   new("float64", args.max_iter), prefixes, nudge=1e-12)
    mixed = solve(f"new mixed, max_iter={args.max_iter}", student, new("mixed", args.max_iter), prefixes)
    print(f"  (old, max_iter={k}: {old_short[0]['lbfgs_seconds']:.1f} s of L-BFGS, "
          f"{old_short[0]['seconds'] - old_short[0]['lbfgs_seconds']:.1f} s of quadrature-error check)")
    print("roots:")
    compare(f"new float64 - old (max_iter={k})", short64, old_short)
    compare(f"new mixed - old (max_iter={k})", short_mixed, old_short)
    compare(f"new float64 nudged - new float64 (max_iter={args.max_iter})", nudged, full64)
    compare(f"new mixed - new float64 (max_iter={args.max_iter})", mixed, full64)
    per_eval_old = old_short[0]["lbfgs_seconds"] / old_short[0]["evaluations"]
    check_old = old_short[0]["seconds"] - old_short[0]["lbfgs_seconds"]
    for label, res in (("float64", full64), ("mixed", mixed)):
        estimate = per_eval_old * res[0]["evaluations"] + check_old
        print(f"  new {label} full solve {res[0]['seconds']:.1f} s wall ({res[0]['cpu_seconds']:.1f} s CPU); old at "
              f"{per_eval_old:.2f} s per evaluation + its check: about {estimate:.0f} s for {res[0]['evaluations']} "
              f"evaluations (ratio {estimate / res[0]['seconds']:.1f})")

    print("\nnode doubling at the mixed-precision root (pruned trapezoid, k nodes per dimension):")
    model = mixed[2]
    grouped = group_data(x, y)
    with torch.no_grad():
        values = {k: float(exact_objective(model, x, y, rule=quadrature.pruned_trapezoid(k, 2), grouped=grouped))
                  for k in (21, 31, 61)}
    for k, v in values.items():
        print(f"  k = {k:2d} ({quadrature.pruned_trapezoid(k, 2).size:4d} nodes): objective {v:.12f}, "
              f"difference from k = 61 {v - values[61]:+.1e}")
    wall64, cpu64 = ratios["new (blocked, float64)"]
    wall32, cpu32 = ratios["new (blocked, float32)"]
    print(f"\nsummary: one evaluation old / new {wall64:.1f}x (float64), {wall32:.1f}x (float32) in wall time, "
          f"{cpu64:.1f}x and {cpu32:.1f}x in CPU time; a {args.max_iter}-iteration solve {mixed[0]['seconds']:.1f} s "
          f"wall ({mixed[0]['cpu_seconds']:.1f} s CPU) mixed, {full64[0]['seconds']:.1f} s wall "
          f"({full64[0]['cpu_seconds']:.1f} s CPU) float64; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
