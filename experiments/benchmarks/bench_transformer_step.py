"""Training-step benchmark of the transformer student with K latent draws batched (DESIGN §3, §6 check 6).

What one step is: a ``PerturbedLM`` (transformer student, ``LinearPerturbation``,
float32) evaluates log p(y | x, z_k) for B data times K prior draws in ONE forward
pass of B*K rows, the is-K (IWAE) surrogate -mean_b logmeanexp_k log p(y | x, z_k)
is formed inline, then backward and an Adam step.

What it prints, all measured in this one run (torch threads = 2):
* for each width in ``--widths`` (default 256, 128, 64): the step's FLOPs
  (``torch.utils.flop_counter.FlopCounterMode``: the matmuls of forward and
  backward) divided by the step's time, as a fraction of this machine's fp32
  matmul rate (a 2048 x 2048 x 2048 ``torch.matmul``, best of 6). Goal >= 0.5.
  Other processes share the cores, so the ratio is measured in ``--repeats``
  rounds, each pairing a fresh matmul-rate measurement with the best of
  ``--reps`` step timings; it prints the best ratio (fastest step against the
  fastest matmul) and the per-round median with its range. The 1-minute load
  average is printed at the start and the end: read the figures against it.
  A one-thread ratio timed by process CPU time, which other processes disturb far
  less, is printed beside it as a check;
* the time per draw (step time / K) at K = 1, 4, 16 with the same B, for the
  first width, and, for contrast, a per-draw Python loop (K forward passes of B
  rows, one backward).

Default configuration, the over-parameterised student for the reference designs of
DESIGN §4 (identified design: V = 41, d = 3, L = 2, q = 2, c = 2 iid, so T = 2
tokens and the MLP and projection matmuls dominate): 2 layers, 4 heads, width 256
(1,595,689 parameters, over 300 times n = 5000 prefixes and 50 times n = 32000),
B = 256 data x K = 16 draws = 4096 rows, float32. Width 128 (404,649 parameters)
and width 64 (104,041, the ``TransformerConfig`` default) are measured beside it.

    python experiments/benchmarks/bench_transformer_step.py            # full run, a few minutes
    python experiments/benchmarks/bench_transformer_step.py --quick    # fewer repeats
    python experiments/benchmarks/bench_transformer_step.py --profile  # torch.profiler table first
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from simstudy.models import LinearPerturbation, PerturbedLM, TransformerConfig, TransformerNetwork


def matmul_rate(size: int = 2048, tries: int = 6) -> float:
    """This machine's fp32 matmul rate in FLOP/s: best of ``tries`` size^3 products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


class StepBench:
    """One student + perturbation + Adam, and the two ways of running a training step."""

    def __init__(self, *, width: int, n_layer: int, n_head: int, vocab_size: int, embed_dim: int,
                 prefix_len: int, latent_dim: int, num_obs: int, continuation: str, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        config = TransformerConfig(n_layer=n_layer, n_head=n_head, n_embd=width,
                                   max_len=max(TransformerConfig.max_len, prefix_len + num_obs - 1))
        net = TransformerNetwork(vocab_size=vocab_size, prefix_len=prefix_len, embed_dim=embed_dim, config=config)
        perturbation = LinearPerturbation(prefix_len=prefix_len, embed_dim=embed_dim, latent_dim=latent_dim)
        self.lm = PerturbedLM(embedding=torch.randn(vocab_size, embed_dim), network=net,
                              perturbation=perturbation, continuation=continuation)  # float32
        self.num_parameters = net.num_parameters()
        self.config = config
        self.optimizer = torch.optim.Adam([p for p in self.lm.parameters() if p.requires_grad], lr=1e-4)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randint(vocab_size, (batch, prefix_len), generator=self.generator)  # (B, L)
        self.y = torch.randint(vocab_size, (batch, num_obs), generator=self.generator)  # (B, c)

    def _update(self, log_lik: torch.Tensor) -> float:
        """is-K surrogate on (B, K) log-likelihoods, backward, Adam step."""
        K = log_lik.shape[1]
        loss = -(torch.logsumexp(log_lik, dim=1) - math.log(K)).mean()  # -mean_b logmeanexp_k log p(y|x,z_k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def step(self, K: int) -> float:
        """K draws batched: one forward pass of B*K rows."""
        z = self.lm.sample_latent(self.x, K, self.generator)  # (B, K, q), prior draws, no gradient
        return self._update(self.lm.log_lik(self.x, self.y, z))  # (B, K)

    def loop_step(self, K: int) -> float:
        """Contrast: a Python loop over draws, K forward passes of B rows, one backward."""
        z = self.lm.sample_latent(self.x, K, self.generator)  # (B, K, q)
        log_lik = torch.cat([self.lm.log_lik(self.x, self.y, z[:, k:k + 1]) for k in range(K)], dim=1)  # (B, K)
        return self._update(log_lik)

    def flops(self, K: int) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step(K)
        return counter.get_total_flops()

    def time(self, fn, K: int, reps: int) -> float:
        """Best of ``reps`` timings of one step, in seconds (after one warm-up step)."""
        fn(K)
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(K)
            best = min(best, time.perf_counter() - t0)
        return best


def cpu_time_ratio(bench: StepBench, K: int, repeats: int) -> float:
    """One-thread ratio by process CPU time: step FLOPs / CPU seconds over the matmul's FLOPs / CPU seconds.

    CPU time counts only this process's own work, so other processes on the cores
    change it far less than wall time (with one thread there is no waiting at a
    barrier for a descheduled partner). Best of ``repeats`` for each.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = bench.flops(K)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        mm, step = math.inf, math.inf
        for _ in range(repeats):
            t0 = time.process_time()
            a @ b
            mm = min(mm, time.process_time() - t0)
            t0 = time.process_time()
            bench.step(K)
            step = min(step, time.process_time() - t0)
        return (flops / step) / (2 * 2048 ** 3 / mm)
    finally:
        torch.set_num_threads(threads)


def flop_ratio(bench: StepBench, K: int, repeats: int, reps: int) -> tuple[list[float], int, list[float], list[float]]:
    """Per round: (step FLOPs / step time) / matmul rate, each round measuring both afresh."""
    flops = bench.flops(K)
    ratios, rates, times = [], [], []
    for _ in range(repeats):
        rate = matmul_rate()
        t = bench.time(bench.step, K, reps)
        rates.append(rate)
        times.append(t)
        ratios.append(flops / t / rate)
    return ratios, flops, rates, times


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return (f"median {fmt.format(statistics.median(values))} "
            f"(min {fmt.format(min(values))}, max {fmt.format(max(values))}, {len(values)} rounds)")


def profile(bench: StepBench, K: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for _ in range(2):
        bench.step(K)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            bench.step(K)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                              max_name_column_width=40, max_shapes_column_width=60))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--widths", default="256,128,64",
                        help="student widths n_embd whose FLOP-rate ratio is measured; the first is the "
                             "student of the per-draw timings")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=41)
    parser.add_argument("--embed-dim", type=int, default=3)
    parser.add_argument("--prefix-len", type=int, default=2)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--num-obs", type=int, default=2, help="observations per datum, c")
    parser.add_argument("--continuation", default="iid", choices=["iid", "autoregressive"])
    parser.add_argument("--batch", type=int, default=256, help="data per step, B")
    parser.add_argument("--draws", type=int, default=16, help="K for the FLOP-rate ratio; B*K should be >= 4096")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of (matmul rate, step time)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per round (best taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the step first")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.reps = 3, 3
    widths = [int(w) for w in args.widths.split(",")]
    torch.set_num_threads(args.threads)
    common = dict(n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab_size, embed_dim=args.embed_dim,
                  prefix_len=args.prefix_len, latent_dim=args.latent_dim, num_obs=args.num_obs,
                  continuation=args.continuation, batch=args.batch)
    B, K = args.batch, args.draws
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32; "
          f"1-minute load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes share them)")
    print(f"data: V={args.vocab_size} d={args.embed_dim} L={args.prefix_len} q={args.latent_dim} "
          f"c={args.num_obs} {args.continuation}; step: B={B} x K={K} = {B * K} rows in one forward pass, "
          f"is-K surrogate, backward, Adam")
    benches = {w: StepBench(width=w, **common) for w in widths}
    main_bench = benches[widths[0]]
    if args.profile:
        profile(main_bench, K)

    print(f"\nachieved FLOP rate / fp32 matmul rate ({args.repeats} rounds, each a fresh 2048^3 matmul rate "
          f"(best of 6) and the best of {args.reps} steps; goal >= 0.5):")
    for w, bench in benches.items():
        ratios, flops, rates, times = flop_ratio(bench, K, args.repeats, args.reps)
        best = flops / min(times) / max(rates)  # least-disturbed step against least-disturbed matmul
        print(f"  width {w:>4} ({bench.config.n_layer} layers, {bench.config.n_head} heads, "
              f"{bench.num_parameters:>9,} parameters, {flops / 1e9:6.2f} GFLOP/step): "
              f"ratio best {best:.3f}; per round {spread(ratios)}")
        print(f"{'':14}step {spread([t * 1e3 for t in times], '{:.1f}')} ms; "
              f"matmul {spread([r / 1e9 for r in rates], '{:.0f}')} GFLOP/s")

    print("\ncontention check: the same ratio with 1 thread, timed by process CPU time (best of "
          f"{args.repeats}): " + ", ".join(f"width {w} {cpu_time_ratio(b, K, args.repeats):.3f}"
                                        for w, b in benches.items()))

    print(f"\ntime per draw (step time / K), width {widths[0]}, B = {B}, ms: median over {args.repeats} rounds "
          f"of the best of {args.reps} steps [min, max]")
    print(f"{'K':>4} {'rows':>6} {'batched (one pass)':>24} {'per-draw loop (K passes)':>26} {'loop / batched':>15}")
    bench = main_bench
    for k in (1, 4, 16):
        batched = [bench.time(bench.step, k, args.reps) / k * 1e3 for _ in range(args.repeats)]
        looped = [bench.time(bench.loop_step, k, args.reps) / k * 1e3 for _ in range(args.repeats)]
        mb, ml = statistics.median(batched), statistics.median(looped)
        print(f"{k:>4} {B * k:>6} {mb:>9.2f} [{min(batched):.2f}, {max(batched):.2f}]"
              f" {ml:>11.2f} [{min(looped):.2f}, {max(looped):.2f}] {ml / mb:>15.2f}")
    print(f"\n1-minute load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
