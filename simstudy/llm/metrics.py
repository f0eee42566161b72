"""Text metrics of the LLM path: IWAE perplexity, ROUGE-1, MAUVE (DESIGN §5, §8).

* Perplexity: exp of minus the mean per-token log m(y | x), log m estimated by
  the K-sample IWAE bound log (1/K) sum_k p(y | x, z_k), z_k prior draws. It is
  a stochastic lower bound of log m (so perplexity is an upper bound) that
  tightens as K grows: always report K. ``scope="datum"`` bounds the whole
  continuation's marginal (one z per datum, DESIGN §2); ``scope="token"`` sums
  per-position bounds of m(y_j | x, y_<j) (the per-token model); the draws are
  shared across positions, which leaves each position's bound valid. A model
  without a latent at evaluation (mle, NEFTune) is evaluated exactly (K = 1).
  The estimate is the package's one IWAE estimate,
  :func:`simstudy.metrics.iwae_log_marginal`, taken in batches of data.
  The standard error is that of the mean over data (it includes the Monte Carlo
  noise of the bound); the perplexity's is by the delta method.
* ROUGE-1 F1 (``rouge-score``) of generated continuations against the reference
  continuations. rouge-score's default tokenizer keeps only [a-z0-9] runs, which
  drops umlauts and most code; the default here (``tokenizer="unicode"``) splits on
  Unicode word characters (``\\w+``, lower-cased) instead; ``"default"`` restores it.
* MAUVE (``mauve-text``, Pillutla et al. 2021) between generated and reference
  continuations, on features from the BASE model's hidden states (last layer,
  mean over the continuation tokens, the prompt as context, adapters off, no
  perturbation): mauve's own featuriser would download GPT-2 large.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..metrics import has_eval_latent, iwae_log_marginal
from ..validation import check_choice, check_int
from .generate import GenerationOptions, sample_continuations
from .perturbed import PerturbedCausalLM

SCOPES = ("datum", "token")


# ---- perplexity ---------------------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    """Perplexity from the K-sample IWAE bound, with its standard error."""

    perplexity: float
    perplexity_se: float
    log_lik_per_token: float
    log_lik_per_token_se: float
    num_data: int
    num_tokens: int
    num_draws: int
    scope: str
    exact: bool
    values: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (N,) log m per datum

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "values"}

    def summary(self) -> str:
        how = "exact (no latent at evaluation)" if self.exact else f"IWAE bound, K = {self.num_draws}, {self.scope}"
        return (f"perplexity {self.perplexity:.3f} +- {self.perplexity_se:.3f} ({how}; {self.num_data} data, "
                f"{self.num_tokens} tokens; log-lik/token {self.log_lik_per_token:.4f} "
                f"+- {self.log_lik_per_token_se:.4f})")


@torch.no_grad()
def datum_log_marginals(model: PerturbedCausalLM, x: torch.Tensor, y: torch.Tensor, *, num_draws: int = 16,
                        scope: str = "datum", batch_size: int = 16,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """IWAE estimates of log m for each datum, ``(N,)`` float64 on the CPU (token scope: the sum of the
    per-position bounds), by :func:`simstudy.metrics.iwae_log_marginal` in batches of ``batch_size`` data."""
    check_int("num_draws", num_draws, 1)
    check_choice("scope", scope, SCOPES)
    check_int("batch_size", batch_size, 1)
    values = iwae_log_marginal(model, x, y, num_draws=num_draws, scope=scope, batch_size=batch_size,
                               generator=generator)  # (N,) or (N, c)
    return (values if scope == "datum" else values.sum(-1)).double().cpu()


def iwae_perplexity(model: PerturbedCausalLM, x: torch.Tensor, y: torch.Tensor, *, num_draws: int = 16,
                    scope: str = "datum", batch_size: int = 16,
                    generator: torch.Generator | None = None) -> PerplexityResult:
    """Perplexity of the continuations y given the prompts x (see the module docstring)."""
    values = datum_log_marginals(model, x, y, num_draws=num_draws, scope=scope, batch_size=batch_size,
                                 generator=generator)  # (N,)
    n, c = y.shape
    per_token = float(values.sum()) / (n * c)
    se = float(values.std(unbiased=True)) / math.sqrt(n) / c if n > 1 else float("nan")
    ppl = math.exp(-per_token)
    exact = not has_eval_latent(model)
    return PerplexityResult(perplexity=ppl, perplexity_se=ppl * se, log_lik_per_token=per_token,
                            log_lik_per_token_se=se, num_data=n, num_tokens=n * c,
                            num_draws=1 if exact else num_draws, scope=scope, exact=exact, values=values)


# ---- ROUGE-1 -------------------------------------------------------------------------------------------------
class UnicodeWordTokenizer:
    """Lower-cased runs of Unicode word characters (keeps umlauts, identifiers, digits)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


@dataclass
class RougeResult:
    rouge1: float
    rouge1_se: float
    precision: float
    recall: float
    num_pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def rouge1(predictions: list[str], references: list[str], *, tokenizer: str = "unicode") -> RougeResult:
    """Mean ROUGE-1 F1 (and precision, recall) of ``predictions`` against ``references``, pair by pair."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) are invalid; "
                         "allowed: two non-empty lists of equal length")
    if tokenizer not in ("unicode", "default"):
        raise ValueError(f"tokenizer={tokenizer!r} is invalid; allowed: unicode, default")
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False,
                                      tokenizer=UnicodeWordTokenizer() if tokenizer == "unicode" else None)
    scores = [scorer.score(ref, pred)["rouge1"] for pred, ref in zip(predictions, references)]
    f1 = np.array([s.fmeasure for s in scores])
    se = float(f1.std(ddof=1) / math.sqrt(len(f1))) if len(f1) > 1 else float("nan")
    return RougeResult(rouge1=float(f1.mean()), rouge1_se=se, precision=float(np.mean([s.precision for s in scores])),
                       recall=float(np.mean([s.recall for s in scores])), num_pairs=len(f1))


# ---- MAUVE -----------------------------------------------------------------------------------------------------
@dataclass
class MauveResult:
    mauve: float
    frontier_integral: float
    num_buckets: int
    num_p: int
    num_q: int

    def as_dict(self) -> dict:
        return asdict(self)


def mauve_score(p_features, q_features, *, num_buckets: int | str = "auto", seed: int = 25,
                kmeans_num_redo: int = 5, kmeans_max_iter: int = 500) -> MauveResult:
    """MAUVE between two feature samples ``(n_p, d)`` and ``(n_q, d)`` (mauve-text, given features only).

    ``num_buckets="auto"`` uses max(2, min(n_p, n_q) // 10) clusters (mauve's n/10 rule, floored at 2).
    """
    import mauve

    p = np.asarray(p_features.detach().cpu() if isinstance(p_features, torch.Tensor) else p_features, dtype=np.float32)
    q = np.asarray(q_features.detach().cpu() if isinstance(q_features, torch.Tensor) else q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1] or min(len(p), len(q)) < 2:
        raise ValueError(f"features of shapes {p.shape} and {q.shape} are invalid; allowed: (n, d) arrays with "
                         "the same d and n >= 2")
    if num_buckets == "auto":
        num_buckets = max(2, min(len(p), len(q)) // 10)
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 2:
        raise ValueError(f"num_buckets={num_buckets!r} is invalid; allowed: 'auto' or an integer >= 2")
    out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                              kmeans_num_redo=kmeans_num_redo, kmeans_max_iter=kmeans_max_iter, verbose=False)
    return MauveResult(mauve=float(out.mauve), frontier_integral=float(out.frontier_integral),
                       num_buckets=int(num_buckets), num_p=len(p), num_q=len(q))


# ---- everything on one set of pairs ---------------------------------------------------------------------------
@dataclass
class GenerationResult:
    rouge: RougeResult
    mauve: MauveResult | None
    generated: list[str]
    references: list[str]


@torch.no_grad()
def generation_metrics(model: PerturbedCausalLM, x: torch.Tensor, y: torch.Tensor, tokenizer, *,
                       num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, stop_at_eos: bool = False, batch_size: int = 16,
                       with_mauve: bool = True, rouge_tokenizer: str = "unicode", mauve_options: dict | None = None,
                       generator: torch.Generator | None = None) -> GenerationResult:
    """Generate c = y.shape[1] tokens per prompt (ancestrally), then ROUGE-1 and MAUVE against y.

    With ``stop_at_eos`` a continuation ends at its first end-of-sequence token: its text is the tokens
    before it, and its MAUVE features are pooled over the tokens up to and including it
    (:meth:`PerturbedCausalLM.base_features` with ``lengths``)."""
    n, c = y.shape
    options = GenerationOptions(max_new_tokens=c, num_samples=num_samples, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_at_eos=stop_at_eos)
    tokens, lengths = [], []
    for s in range(0, n, batch_size):
        out = sample_continuations(model, x[s:s + batch_size], options, generator=generator)
        tokens.append(out.tokens)  # (b, S, c)
        lengths.append(out.lengths)  # (b, S)
    flat = torch.cat(tokens).reshape(n * num_samples, c)  # (N*S, c)
    flat_lengths = torch.cat(lengths).reshape(n * num_samples)  # (N*S,)
    kept = [row[:int(k)] for row, k in zip(flat.tolist(), flat_lengths.tolist())] if stop_at_eos else flat.tolist()
    generated = tokenizer.batch_decode(kept, skip_special_tokens=True)
    references = tokenizer.batch_decode(y.tolist(), skip_special_tokens=True)
    rouge = rouge1(generated, [r for r in references for _ in range(num_samples)], tokenizer=rouge_tokenizer)
    mauve_result = None
    if with_mauve:
        p = model.base_features(x.repeat_interleave(num_samples, dim=0), flat,
                                lengths=flat_lengths if stop_at_eos else None)  # (N*S, d)
        q = model.base_features(x, y)  # (N, d)
        mauve_result = mauve_score(p, q, **(mauve_options or {}))
    return GenerationResult(rouge=rouge, mauve=mauve_result, generated=generated, references=references)


def evaluate_pairs(model: PerturbedCausalLM, x: torch.Tensor, y: torch.Tensor, tokenizer, *, num_draws: int = 16,
                   scope: str = "datum", num_samples: int = 1, with_generation: bool = True, with_mauve: bool = True,
                   batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """All metrics on one split, as a flat dict (for a results table): perplexity (with K), ROUGE-1, MAUVE."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    ppl = iwae_perplexity(model, x, y, num_draws=num_draws, scope=scope, batch_size=batch_size, generator=gen)
    row = {"perplexity": ppl.perplexity, "perplexity_se": ppl.perplexity_se, "log_lik_per_token": ppl.log_lik_per_token,
           "log_lik_per_token_se": ppl.log_lik_per_token_se, "iwae_draws": ppl.num_draws, "num_pairs": ppl.num_data}
    if with_generation:
        res = generation_metrics(model, x, y, tokenizer, num_samples=num_samples, batch_size=batch_size,
                                 with_mauve=with_mauve, generator=gen)
        row.update({"rouge1": res.rouge.rouge1, "rouge1_se": res.rouge.rouge1_se})
        if res.mauve is not None:
            row.update({"mauve": res.mauve.mauve, "mauve_buckets": res.mauve.num_buckets})
    return row
