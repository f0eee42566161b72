"""``generate`` and ``analyse`` of an llm-shift study: fit a method, evaluate it in and out of domain (DESIGN §5, §8).

* :func:`make_generate`: the condition's fixed (prompt, continuation) pairs (cached per
  process) and, from the replicate's stream, the seed of every fit and of the evaluation;
* :func:`make_analyse`: fit the method by :func:`~simstudy.fit.fit_sgd` on a copy of the
  cached base model, then per evaluation split the IWAE perplexity (K reported), ROUGE-1 and
  MAUVE of generated continuations, and the fit's diagnostics (the metrics of the package
  docstring). Every method of a replicate uses the same evaluation streams, so differences
  between methods are paired.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...equations import RejectionBudgetExceeded
from ...fit import fit_sgd
from .caches import base_model, condition_pairs
from .config import DataConfig, EvalConfig, ModelConfig, condition_data
from .methods import LLMMethod

__all__ = ["EQUATION_STATS", "PAIR_NLL_PREFIX", "RejectionBudget", "ShiftData", "build_model", "eval_scope", "fitted_folder",
           "make_analyse", "make_generate", "perturbation_rms"]

#: artifact file of a split's per-pair NLL per token (``nll_<label>.npy``; :mod:`.pairs` reads them)
PAIR_NLL_PREFIX = "nll_"
#: equation statistics reported (means over the fit's steps), as ``fit_<name>``.
EQUATION_STATS = ("acceptance_rate", "ess_fraction", "K_mean", "estimate_sd")


class RejectionBudget(RuntimeError):
    """ps-exact gave up (its cost grows like 1/m(y | x)); recorded by the engine with this status."""

    status = "rejection-budget"


@dataclass
class ShiftData:
    """What ``generate`` hands to every method of a replicate (token ids on the CPU)."""

    x: torch.Tensor  # (n_train, L)
    y: torch.Tensor  # (n_train, c)
    evals: dict  # label -> (x (n_eval, L), y (n_eval, c))
    seed: int  # seeds the fit: minibatch order, LoRA and perturbation init, latent draws
    eval_seed: int  # seeds the evaluation: IWAE draws, generation


def make_generate(model: ModelConfig, data: DataConfig, evaluation: EvalConfig):
    """``generate(cond, rng)``: the condition's pairs and seeds drawn from the replicate's stream (DESIGN §8).

    With ``[data] train_pool`` the replicate draws its ``n_train`` training pairs from that many pairs of the
    train split (after the seed, so a study without a pool draws the same seeds as before)."""

    def generate(cond: dict, rng: np.random.Generator) -> ShiftData:
        d = condition_data(data, cond)
        x, y, evals = condition_pairs(d, model)
        seed = int(rng.integers(2 ** 31 - 1))
        if d.train_pool:  # each replicate its own training pairs: the MCSE covers data variation too
            rows = torch.as_tensor(np.sort(rng.choice(d.train_pool, size=d.n_train, replace=False)))  # (n_train,)
            x, y = x[rows], y[rows]
        return ShiftData(x=x, y=y, evals=evals, seed=seed, eval_seed=seed + evaluation.seed + 1)

    return generate


def eval_scope(method: LLMMethod, evaluation: EvalConfig) -> str:
    """The scope of the method's perplexity bound: its own ``eval_scope``, else ``[evaluation] scope``
    (``"method"``: the scope it was trained with)."""
    scope = method.eval_scope or evaluation.scope
    return method.scope if scope == "method" else scope


def build_model(method: LLMMethod, model: ModelConfig, data: DataConfig, seed: int):
    """A fresh :class:`~simstudy.llm.PerturbedCausalLM` for ``method`` on a copy of the cached base."""
    from ...llm import LoRAConfig, build_perturbed_lm

    base, _ = base_model(model)
    options = dict(method.perturbation_options)
    return build_perturbed_lm(copy.deepcopy(base), perturbation=method.perturbation, prompt_len=data.prompt_len,
                              latent_dim=method.latent_dim, lora=LoRAConfig(**{**model.lora, **method.lora}),
                              seed=seed, max_rows=model.max_rows, head_chunk_elements=model.head_chunk_elements,
                              perturbation_options=options or None)


def fitted_folder(root, cond: dict, seed: int, method: str) -> Path:
    """Where ``[model] save_fitted`` keeps one fit: ``root/<condition>/seed-<replicate seed>/<method>``
    (the condition as ``key=value`` pairs joined by ``,``; the seed is the replicate's fit seed)."""
    label = ",".join(f"{k}={v}" for k, v in sorted(cond.items())) or "default"
    return Path(root) / re.sub(r"[^A-Za-z0-9_.,=+-]", "_", label) / f"seed-{seed}" / method


def perturbation_rms(lm) -> float | None:
    """Root mean square of G(z) per prompt-embedding entry over the prior, in units of the embedding entries'
    standard deviation: ||A||_F / sqrt(L d) / s for a linear map, a Monte Carlo estimate for an MLP map."""
    from ...llm import embedding_scale

    p = lm.perturbation
    if not getattr(p, "learnable", False):
        return None
    s = embedding_scale(lm.causal_lm)
    L, d = lm.prefix_len, lm.embed_dim
    if hasattr(p, "A"):
        return float(p.A.detach().float().norm()) / math.sqrt(L * d) / s
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        x = torch.zeros(1, L, dtype=torch.long, device=lm.device)
        z = lm.sample_latent(x, 256, gen)  # (1, 256, q)
        embeds = lm.prompt_embeds(x, None)[:, 0]  # (1, L, d)
        shift = lm.prompt_embeds(x, z) - embeds[:, None]  # (1, 256, L, d)
        return float(shift.pow(2).mean().sqrt()) / s


def _summaries(out: dict, d: DataConfig, scope: str, fit, lm) -> None:
    """The out-of-domain aggregates, the bound's scope, the fit's diagnostics and the model's sizes."""
    ood = list(d.ood)
    if ood:  # the geometric mean of the out-of-domain perplexities
        out["ppl_ood"] = math.exp(float(np.mean([out[f"nll_{k}"] for k in ood])))
    for metric in ("rouge1", "mauve"):
        values = [out[f"{metric}_{k}"] for k in ood if f"{metric}_{k}" in out]
        if values:
            out[f"{metric}_ood"] = float(np.mean(values))
    out["iwae_token_scope"] = float(scope == "token" and out["iwae_draws"] > 1)
    for key in ("steps", "final_loss", "best_step"):
        if key in fit.stats:
            out[f"fit_{key}"] = float(fit.stats[key])
    for key in EQUATION_STATS:  # equation diagnostics, means over steps: ps-mh's acceptance, is-K's ESS, ...
        value = fit.stats.get(f"eq_{key}")
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"fit_{key}"] = float(value)
    out["n_trainable"] = float(sum(p.numel() for p in lm.trainable_parameters()))
    rms = perturbation_rms(lm)
    if rms is not None:
        out["perturbation_rms"] = rms


def make_analyse(method: LLMMethod, model: ModelConfig, data: DataConfig, evaluation: EvalConfig):
    """``analyse(data, cond)`` for the engine: fit ``method`` on the training pairs, return its metrics."""

    def analyse(shift: ShiftData, cond: dict, ctx=None) -> dict:
        from ...llm import generation_metrics, iwae_perplexity

        d = condition_data(data, cond)
        _, tokenizer = base_model(model)
        lm = build_model(method, model, d, shift.seed)
        device = lm.device
        generator = torch.Generator().manual_seed(shift.seed)  # on the CPU: the equations move draws to the model
        try:
            fit = fit_sgd(lm, method.make_equation(), shift.x.to(device), shift.y.to(device),
                          config=method.sgd_config(), generator=generator)
        except RejectionBudgetExceeded as exc:
            raise RejectionBudget(str(exc).splitlines()[0]) from None
        if model.save_fitted:  # the adapter (peft format), the perturbation and its settings (DESIGN §8)
            lm.save_pretrained(fitted_folder(model.save_fitted, cond, shift.seed, method.name))
        scope = eval_scope(method, evaluation)
        out: dict[str, float] = {}
        mauve_options = {"num_buckets": evaluation.mauve_buckets}
        lm.eval()
        for i, (label, (x, y)) in enumerate(shift.evals.items()):
            x, y = x.to(device), y.to(device)  # (n_eval, L), (n_eval, c)
            # one stream per split and purpose, the same for every method of the replicate (paired comparisons)
            gen = torch.Generator().manual_seed(shift.eval_seed + 2 * i)
            ppl = iwae_perplexity(lm, x, y, num_draws=evaluation.iwae_draws, scope=scope,
                                  batch_size=evaluation.batch_size, generator=gen)
            out[f"ppl_{label}"] = ppl.perplexity
            out[f"nll_{label}"] = -ppl.log_lik_per_token
            out[f"nll_{label}_se"] = ppl.log_lik_per_token_se  # the split's own sampling error, within the replicate
            if ctx is not None and ctx.root is not None:  # per-pair NLL per token: paired errors across methods
                np.save(ctx.artifact_dir / f"{PAIR_NLL_PREFIX}{label}.npy", (-ppl.values / y.shape[1]).numpy())
            out["iwae_draws"] = float(ppl.num_draws)
            if evaluation.generation and d.n_generate:
                n = d.n_generate
                gen = torch.Generator().manual_seed(shift.eval_seed + 2 * i + 1)
                res = generation_metrics(lm, x[:n], y[:n], tokenizer, num_samples=evaluation.num_samples,
                                         temperature=evaluation.temperature, top_k=evaluation.top_k,
                                         top_p=evaluation.top_p, stop_at_eos=evaluation.stop_at_eos,
                                         batch_size=evaluation.batch_size, with_mauve=evaluation.mauve,
                                         mauve_options=mauve_options, generator=gen)
                out[f"rouge1_{label}"] = res.rouge.rouge1
                if res.mauve is not None:
                    out[f"mauve_{label}"] = res.mauve.mauve
        _summaries(out, d, scope, fit, lm)
        return out

    return analyse
