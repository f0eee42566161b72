"""Benchmark of the study engine (issue 3; DESIGN §7).

Measures, in one run:

1. speedup of 2 loky workers over 1 on replicates of about 1 s of CPU work
   (goal >= 1.9; warm pool, i.e. worker start-up excluded, and cold), and
   the average number of busy workers (time spent inside replicates over
   wall time), which isolates the engine's dispatch from other load;
2. runner overhead per replicate against calling the bare replicate function
   in a loop (goal <= 2%), on the same 1 s replicates, in wall and CPU time;
   (best of interleaved repeats);
3. the absolute engine cost per replicate, from replicates that do nothing
   (in-process and with a store), which bounds the overhead for any
   replicate length.

Usage::

    python experiments/benchmarks/bench_engine.py [--seconds 1.0] [--replicates 8]

The machine's load average is printed before and after: on a shared machine
(load above the number of cores) the timings are contaminated by other work.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from simstudy.engine import Study  # noqa: E402


def burn(n: int, x: float) -> float:
    """About ``n`` pure-Python multiply-adds: deterministic CPU work with no threads."""
    s = 0.0
    for i in range(n):
        s += (i * x) % 7.0
    return s


def generate(cond, rng):
    return rng.random()


def work(data, cond):
    return {"value": burn(cond["iters"], data)}


def nothing(data, cond):
    return {"value": data}


def calibrate(seconds: float) -> int:
    n = 200_000
    while True:
        t0 = time.perf_counter()
        burn(n, 0.5)
        dt = time.perf_counter() - t0
        if dt > 0.2:
            return int(n * seconds / dt)
        n *= 2


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per replicate")
    p.add_argument("--replicates", type=int, default=8, help="replicates of the timed runs (even)")
    p.add_argument("--noop-replicates", type=int, default=4000, help="replicates of the no-op runs")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the overhead measurement")
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    iters = calibrate(args.seconds)
    R = args.replicates
    study = Study(design={"iters": [iters]}, generate=generate, analyse={"work": work}, replicates=R, seed=1)

    def bare():
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return [work(generate({"iters": iters}, study.rng(0, r)), {"iters": iters}) for r in range(R)]

    seq, w_seq, _ = timed(lambda: study.run(n_jobs=1, progress=False))
    _, w_cold, _ = timed(lambda: Study(design={"iters": [iters]}, generate=generate, analyse={"work": work},
                                       replicates=2, seed=2).run(n_jobs=2, progress=False))   # starts the pool
    par, w_par, _ = timed(lambda: study.run(n_jobs=2, progress=False))
    assert seq.table.equals(par.table), "tables differ between n_jobs=1 and 2"
    # overhead: bare loop and engine (in-process) interleaved, best of `repeats` (robust to load spikes)
    walls_bare, cpus_bare, walls_eng, cpus_eng = [], [], [], []
    for _ in range(args.repeats):
        _, w, c = timed(bare)
        walls_bare.append(w), cpus_bare.append(c)
        _, w, c = timed(lambda: study.run(n_jobs=1, progress=False))
        walls_eng.append(w), cpus_eng.append(c)
    w_bare, c_bare, w_eng, c_eng = min(walls_bare), min(cpus_bare), min(walls_eng), min(cpus_eng)

    noop = Study(design={"k": [0]}, generate=generate, analyse={"nothing": nothing}, replicates=args.noop_replicates,
                 seed=3)
    _, w_noop, _ = timed(lambda: noop.run(n_jobs=1, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        _, w_noop_store, _ = timed(lambda: noop.run(n_jobs=1, progress=False, store=Path(tmp) / "s"))
    load1 = os.getloadavg()

    per_rep = w_eng / R
    print(f"replicate: {iters} iterations, {w_bare / R:.3f} s wall each (bare loop); {R} replicates")
    print(f"speedup 2 workers over 1 (warm pool): {w_seq / w_par:.3f}   (goal >= 1.9; n_jobs=1 {w_seq:.2f} s, "
          f"n_jobs=2 {w_par:.2f} s)")
    busy = float(par.timings["seconds"].sum()) / w_par
    print(f"average busy workers during the n_jobs=2 run: {busy:.3f} of 2   (time inside replicates / wall: the "
          "speedup the engine's dispatch allows, insensitive to other load slowing the replicates themselves)")
    print(f"speedup including pool start-up (cold): {w_seq / (w_par + w_cold - w_par * 2 / R):.3f}   "
          f"(pool start + 2 replicates took {w_cold:.2f} s)")
    print(f"runner overhead vs bare function: wall {100 * (w_eng / w_bare - 1):+.2f}%, CPU "
          f"{100 * (c_eng / c_bare - 1):+.2f}%   (goal <= 2%; best of {args.repeats} interleaved runs; engine "
          f"{per_rep:.4f} s, bare {w_bare / R:.4f} s per replicate)")
    print(f"engine cost of a no-op replicate: {1e6 * w_noop / args.noop_replicates:.0f} us in-process, "
          f"{1e6 * w_noop_store / args.noop_replicates:.0f} us with a store "
          f"(= {100 * w_noop / args.noop_replicates / per_rep:.3f}% / "
          f"{100 * w_noop_store / args.noop_replicates / per_rep:.3f}% of a {per_rep:.2f} s replicate)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} on {cores} cores"
          + ("  -> CONTAMINATED: other processes competed for the CPUs" if max(load0[0], load1[0]) > cores - 0.5
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
