"""Study kind ``llm-shift``: fine-tune a real LLM in one domain, evaluate in and out of it (DESIGN §8, issue 5).

Every method fine-tunes the same frozen causal LM (SmolLM2-135M by default) with
LoRA adapters and, where it has one, a perturbation of the prompt's input
embeddings (:class:`simstudy.llm.PerturbedCausalLM`), on (prompt, continuation)
pairs of an in-domain corpus (English Wikipedia leads), and is then evaluated on
the in-domain test split and on out-of-domain corpora (German, Python code):
IWAE perplexity (DESIGN §5, K reported), ROUGE-1 and MAUVE of ancestrally
generated continuations. It runs through the generic study engine (DESIGN §7), so
replicates run in parallel, resume after a kill, and every number carries an MCSE.

ADEMP:

* data (``generate``): deterministic (prompt, continuation) token pairs from the
  corpora's hash splits (:mod:`simstudy.llm.corpora`): the first ``n_train``
  windows of the train corpus's ``train`` split, the first ``n_eval`` of the
  ``test`` split of the train corpus (label ``id``) and of each out-of-domain
  corpus (its ``ood_splits`` in turn, ``test`` by default). The data are the
  same in every replicate: a replicate's random stream only seeds what is
  random in a fit (minibatch order, LoRA and perturbation initialisation, latent
  draws) and in its evaluation (IWAE draws, sampled tokens). So the MCSEs
  measure training and evaluation randomness on fixed data, not sampling
  variability of the corpora.
* methods (``[methods.NAME]``), all by :func:`simstudy.fit.fit_sgd`, LoRA always on:

  ======== ================= =========================================== ========
  name     perturbation      trained with                                 scope
  ======== ================= =========================================== ========
  mle      none              mle (LoRA-only fine-tuning)                  --
  neftune  NEFTune (train)   aug (LoRA only moves)                        token
  gaussian fixed Gaussian    aug (LoRA only moves)                        token
  discrete neighbour subst.  aug (LoRA only moves)                        token
  q2       learned linear    q2 (Brier score, U-statistic over K >= 2)    token
  is-K     learned linear    is-K (IWAE gradient)                         token
  aug      learned linear    aug (one prior draw)                         token
  ps-mh    learned linear    ps-mh (independence Metropolis-Hastings)     datum
  ======== ================= =========================================== ========

  Latent scope (DESIGN §2): q2, is-K, aug (and sumo) are sums of per-token terms
  and default to ``scope="token"``; posterior sampling (ps-mh) exists per datum
  only. q2 per datum is refused for autoregressive continuations. ps-exact is
  accepted but impractical: its expected number of proposals is 1/m(y | x),
  about exp(c * per-token NLL) (e^96 for c = 32 tokens at 3 nats); it stops at
  ``max_proposals`` and the replicate is recorded with status ``rejection-budget``.
* estimands / performance: one row per (replicate, method) with, per split label
  S (``id`` and each out-of-domain label): ``ppl_S`` (perplexity from the
  K-sample IWAE bound, an upper bound that tightens with K), ``nll_S`` (its log,
  nats per token), ``rouge1_S`` and ``mauve_S`` (of ``n_generate`` generated
  continuations); ``ppl_ood`` = exp(mean of the out-of-domain ``nll_S``),
  ``rouge1_ood`` and ``mauve_ood`` (means over out-of-domain splits);
  ``iwae_draws`` (K, 1 where the model has no latent at evaluation and the
  perplexity is exact: mle, neftune), ``iwae_token_scope`` (1: per-token bound,
  0: per-datum), fit diagnostics (``fit_steps``, ``fit_final_loss``, and the
  equation's own statistics averaged over steps: ``fit_acceptance_rate`` of
  ps-mh, ``fit_ess_fraction`` of is-K, ``fit_K_mean`` and ``fit_estimate_sd`` of sumo),
  ``n_trainable`` and, for learned linear perturbations, ``perturbation_rms``
  (root mean square of G(z) per embedding entry, in units of the embedding
  entries' standard deviation: near 0 is collapse). The engine's summary gives
  the mean of each with its MCSE; :func:`shift_figures` draws them.

Generation is ancestral and per datum (DESIGN §2, §8): draw z, perturb the
prompt once, sample c tokens (temperature 1, no top-k) with a KV cache; maps that
perturb only while training (NEFTune) and mle generate from the plain prompt.
MAUVE uses the base model's hidden states as features (adapters off); with few
samples (16 on the CPU preset: max(2, n // 10) = 2 clusters) it is a coarse
indicator with a large MCSE, and ROUGE-1 of a sampled continuation against the
reference is mostly a measure of shared vocabulary.

A study file of this kind (every table but ``[study]`` and ``[methods.*]`` optional)::

    [study]
    kind = "llm-shift"
    replicates = 4
    seed = 2026

    [design]                # optional; factors override [data] keys: n_train, prompt_len,
    n_train = [256]         # continuation_len, train (default: one condition, n_train of [data])

    [model]
    name = "smollm2-135m"   # or "tiny-gpt2" (tests), or a local folder / HF id already on disk
    device = "auto"         # auto (CUDA when present), cpu, cuda
    dtype = "auto"          # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    cache_dir = "..."       # where the converted SmolLM2 lives (default ~/.cache/simstudy)
    lora = { r = 8, alpha = 16.0, dropout = 0.0, target_modules = ["q_proj", "v_proj"] }
    max_rows = 64           # rows per evaluation forward pass
    head_chunk_elements = 134217728

    [data]
    train = "wiki-en"       # in-domain corpus (simstudy.llm.CORPORA)
    ood = { de_fortunes = "fortunes-de", de_reference = "debian-reference-de", code = "python-stdlib" }
                            # label -> corpus (a list of corpus names uses the names as labels)
    prompt_len = 32         # L
    continuation_len = 32   # c
    n_train = 256           # training pairs
    n_eval = 32             # pairs per evaluation split (perplexity)
    n_generate = 16         # of those, prompts for generation (ROUGE-1, MAUVE); 0: none
    split_seed = 0          # salts the document hash of the splits
    fractions = [0.8, 0.1, 0.1]
    pack = true
    ood_splits = ["test"]   # splits of the out-of-domain corpora, taken in turn (never trained on, so
                            # ["test", "validation", "train"] may be used when the test split is short)
    roots = { fortunes-de = "/path/to/fortunes" }   # corpus folders other than the defaults

    [evaluation]
    iwae_draws = 8          # K of the IWAE bound
    scope = "method"        # perplexity bound per "token", per "datum", or each method's own scope
    generation = true       # ROUGE-1 (and MAUVE) of generated continuations
    mauve = true
    num_samples = 1         # continuations per prompt
    mauve_buckets = "auto"  # or an integer >= 2
    batch_size = 16
    seed = 0                # added to the replicate's seed for the evaluation draws
    headline = ["ppl_id", "ppl_ood"]   # metrics printed by `simstudy run` (default: perplexities, ROUGE-1, MAUVE)

    [defaults]              # optional: method fields shared by every method (a baseline takes
                            # equation_options / perturbation_options from its own table only)
    latent_dim = 4
    sgd = { steps = 64, batch_size = 4, lr = 1e-3, validation_fraction = 0.0 }

    [methods.mle]           # a baseline (mle, neftune, gaussian, discrete) or an equation name
    [methods.q2]
    equation_options = { num_draws = 2 }       # scope defaults as in the table above
    [methods.ps-mh-long]    # any label with equation = "..."
    equation = "ps-mh"
    equation_options = { steps = 20, persistent = true }
    perturbation = "linear"                    # linear, mlp, mlp-conditional (learned); others fixed
    perturbation_options = { init_scale = 0.01 }
    latent_dim = 4
    lora = { r = 16 }                          # overrides [model] lora for this method
    eval_scope = "datum"                       # overrides [evaluation] scope for this method

Nothing runs when a corpus or the model is missing: the builder checks both (and
the ``llm`` extra) and raises a one-line :class:`~simstudy.studies.spec.SpecError`
naming the command that installs it. It then loads the model's tokenizer (the
model, once, in the calling process) and tokenises every split, so a split too
short for ``n_train`` or ``n_eval`` is also refused before any replicate starts.

Cost (CPU, one thread per worker, float32, SmolLM2-135M, L = c = 32, batch 4; CPU seconds
measured): a training step of 4 rows (B data times K draws) of 64 tokens takes 1.3-1.5 s and grows
about linearly with the rows (q2 with K = 2: 3.0 s; is-K with K = 4: 4.9 s); ps-mh adds ``steps``
forward passes without gradient (4 steps: 4.4 s a step). An IWAE evaluation row (one pair, one
draw) takes 0.14 s; generating and scoring 16 continuations of one split about 11 s.
experiments/llm_shift.toml states the arithmetic of the CPU preset.

The model is loaded once per worker process and deep-copied for each method
(peft injects LoRA layers in place, so one base backs one fitted model).
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..engine import Study
from ..equations import EQUATIONS, make_equation
from ..fit import SGDConfig, fit_sgd
from . import spec

KIND = "llm-shift"
VERSION = "llm-shift/1"

#: baselines: fixed or no perturbation; their LoRA adapters are trained with the named equation.
BASELINES: dict[str, dict] = {
    "mle": dict(equation="mle", perturbation="none"),
    "neftune": dict(equation="aug", perturbation="neftune"),
    "gaussian": dict(equation="aug", perturbation="gaussian"),
    "discrete": dict(equation="aug", perturbation="discrete"),
}
#: the default latent scope of each equation (DESIGN §2): per token where the equation is a sum of per-token
#: terms, per datum for posterior sampling.
DEFAULT_SCOPE = {"q2": "token", "is-K": "token", "aug": "token", "sumo": "token", "ps-mh": "datum",
                 "ps-exact": "datum", "mle": "datum"}
EVAL_SCOPES = ("method", "datum", "token")
DESIGN_KEYS = ("n_train", "prompt_len", "continuation_len", "train")
LLM_EXTRA = "pip install 'simstudy[llm]' (transformers, peft, tokenizers, gguf, rouge-score, mauve-text)"
#: equation statistics reported (means over the fit's steps), as ``fit_<name>``.
EQUATION_STATS = ("acceptance_rate", "ess_fraction", "K_mean", "estimate_sd")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


class RejectionBudget(RuntimeError):
    """ps-exact gave up (its cost grows like 1/m(y | x)); recorded by the engine with this status."""

    status = "rejection-budget"


# ---- configuration ------------------------------------------------------------------------------------------
def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")
    return int(value)


@dataclass
class ModelConfig:
    """The frozen base model and the LoRA defaults (``[model]``)."""

    name: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-gpt2, or a folder / HF id on disk"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    cache_dir: str | None = field(default=None, metadata={"help": "converted-model cache (default ~/.cache/simstudy)"})
    lora: dict = field(default_factory=dict, metadata={"help": "LoRAConfig fields"})
    max_rows: int = field(default=64, metadata={"help": "rows per evaluation forward pass"})
    head_chunk_elements: int = field(default=2 ** 27, metadata={"help": "logits per checkpointed head chunk"})

    def __post_init__(self) -> None:
        from ..llm.model import DTYPES, LoRAConfig

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is invalid; allowed: smollm2-135m, tiny-gpt2, or a model folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
        if not isinstance(self.lora, dict):
            raise ValueError(f"lora={self.lora!r} is invalid; allowed: a table of LoRAConfig fields")
        LoRAConfig(**self.lora)
        _int("max_rows", self.max_rows, 1)
        _int("head_chunk_elements", self.head_chunk_elements, 1)


@dataclass
class DataConfig:
    """Corpora and (prompt, continuation) pairs (``[data]``)."""

    train: str = field(default="wiki-en", metadata={"help": "in-domain corpus"})
    ood: dict = field(default_factory=lambda: {"de_fortunes": "fortunes-de", "de_reference": "debian-reference-de",
                                               "code": "python-stdlib"},
                      metadata={"help": "out-of-domain label -> corpus"})
    prompt_len: int = field(default=32, metadata={"help": "L, prompt tokens"})
    continuation_len: int = field(default=32, metadata={"help": "c, continuation tokens"})
    n_train: int = field(default=256, metadata={"help": "training pairs"})
    n_eval: int = field(default=32, metadata={"help": "pairs per evaluation split"})
    n_generate: int = field(default=16, metadata={"help": "generation prompts per split (<= n_eval)"})
    split_seed: int = field(default=0, metadata={"help": "salt of the document hash"})
    fractions: tuple = field(default=(0.8, 0.1, 0.1), metadata={"help": "train, validation, test shares"})
    pack: bool = field(default=True, metadata={"help": "join documents with the end-of-text token"})
    ood_splits: tuple = field(default=("test",), metadata={"help": "splits of the out-of-domain corpora, in turn"})
    roots: dict = field(default_factory=dict, metadata={"help": "corpus -> folder"})

    def __post_init__(self) -> None:
        from ..llm.corpora import CORPORA

        if isinstance(self.ood, (list, tuple)):
            self.ood = {str(c).replace("-", "_"): c for c in self.ood}
        if not isinstance(self.ood, dict):
            raise ValueError(f"ood={self.ood!r} is invalid; allowed: a table label = corpus, or a list of corpora")
        for name in [self.train, *self.ood.values()]:
            if name not in CORPORA:
                raise ValueError(f"corpus={name!r} is unknown; allowed: {', '.join(CORPORA)}")
        for label in self.ood:
            if not _LABEL.match(str(label)) or label in ("id", "ood"):
                raise ValueError(f"ood label {label!r} is invalid; allowed: lower-case letters, digits and _, "
                                 "starting with a letter, not 'id' or 'ood'")
        for name, low in (("prompt_len", 1), ("continuation_len", 1), ("n_train", 1), ("n_eval", 2),
                          ("n_generate", 0), ("split_seed", 0)):
            _int(name, getattr(self, name), low)
        if self.n_generate == 1 or self.n_generate > self.n_eval:
            raise ValueError(f"n_generate={self.n_generate} is invalid; allowed: 0, or an integer in "
                             f"[2, n_eval={self.n_eval}]")
        self.fractions = tuple(float(f) for f in self.fractions)
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-9:
            raise ValueError(f"fractions={list(self.fractions)} is invalid; allowed: three shares >= 0 summing to 1")
        from ..llm.corpora import SPLITS

        if isinstance(self.ood_splits, str) or not self.ood_splits or any(v not in SPLITS for v in self.ood_splits) \
                or len(set(self.ood_splits)) != len(self.ood_splits):
            raise ValueError(f"ood_splits={self.ood_splits!r} is invalid; allowed: a list of distinct splits among "
                             f"{', '.join(SPLITS)}")
        self.ood_splits = tuple(self.ood_splits)
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack={self.pack!r} is invalid; allowed: true or false")
        if not isinstance(self.roots, dict) or any(k not in CORPORA for k in self.roots):
            raise ValueError(f"roots={self.roots!r} is invalid; allowed: a table corpus = folder, corpora among "
                             f"{', '.join(CORPORA)}")

    @property
    def splits(self) -> dict[str, tuple[str, tuple]]:
        """label -> (corpus, splits) of every evaluation split, ``id`` (the train corpus's test split) first."""
        return {"id": (self.train, ("test",)), **{k: (v, tuple(self.ood_splits)) for k, v in self.ood.items()}}


@dataclass
class EvalConfig:
    """Metrics (``[evaluation]``)."""

    iwae_draws: int = field(default=8, metadata={"help": "K of the IWAE bound"})
    scope: str = field(default="method", metadata={"help": "perplexity bound per token, per datum, or the method's"})
    generation: bool = field(default=True, metadata={"help": "ROUGE-1 (and MAUVE) of generated continuations"})
    mauve: bool = field(default=True, metadata={"help": "MAUVE on base-model features"})
    num_samples: int = field(default=1, metadata={"help": "continuations per prompt"})
    mauve_buckets: int | str = field(default="auto", metadata={"help": "'auto' (max(2, n // 10)) or >= 2"})
    batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch"})
    seed: int = field(default=0, metadata={"help": "offset of the evaluation draws' seed"})
    headline: list | None = field(default=None, metadata={"help": "metrics printed by simstudy run"})

    def __post_init__(self) -> None:
        _int("iwae_draws", self.iwae_draws, 1)
        _int("num_samples", self.num_samples, 1)
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed, 0)
        if self.scope not in EVAL_SCOPES:
            raise ValueError(f"scope={self.scope!r} is invalid; allowed: {', '.join(EVAL_SCOPES)}")
        for name in ("generation", "mauve"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: true or false")
        if self.mauve_buckets != "auto":
            _int("mauve_buckets", self.mauve_buckets, 2)
        if self.headline is not None and not (isinstance(self.headline, list)
                                              and all(isinstance(m, str) for m in self.headline)):
            raise ValueError(f"headline={self.headline!r} is invalid; allowed: a list of metric names")


@dataclass
class LLMMethod:
    """One method of an LLM shift study: an equation, a perturbation map, and their settings."""

    name: str = field(metadata={"help": "label in the results table"})
    equation: str = field(default="is-K", metadata={"help": "estimating equation (simstudy.equations)"})
    equation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the equation"})
    perturbation: str = field(default="linear", metadata={"help": "simstudy.llm.LLM_PERTURBATIONS"})
    perturbation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the map"})
    latent_dim: int = field(default=4, metadata={"help": "q, the latent dimension of a Gaussian-latent map"})
    sgd: dict = field(default_factory=dict, metadata={"help": "SGDConfig fields"})
    lora: dict = field(default_factory=dict, metadata={"help": "LoRAConfig fields over [model] lora"})
    eval_scope: str | None = field(default=None, metadata={"help": "perplexity scope (None: [evaluation] scope)"})

    def __post_init__(self) -> None:
        from ..llm.model import LoRAConfig
        from ..llm.perturbed import LLM_PERTURBATIONS

        if self.equation not in EQUATIONS:
            raise ValueError(f"equation={self.equation!r} is unknown; allowed: {', '.join(sorted(EQUATIONS))}")
        if self.perturbation not in LLM_PERTURBATIONS:
            raise ValueError(f"perturbation={self.perturbation!r} is unknown; allowed: {', '.join(LLM_PERTURBATIONS)}")
        for key in ("equation_options", "perturbation_options", "sgd", "lora"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid; allowed: a table")
        self.equation_options = {"scope": DEFAULT_SCOPE.get(self.equation, "datum"), **self.equation_options}
        eq = make_equation(self.equation, **self.equation_options)
        if self.equation == "q2" and eq.scope == "datum":
            raise ValueError("scope='datum' for q2 is invalid with autoregressive continuations; allowed: token")
        if self.perturbation == "none" and self.equation != "mle":
            raise ValueError(f"perturbation='none' with equation={self.equation!r} is invalid; allowed: "
                             "equation='mle' (without a latent every equation is mle)")
        _int("latent_dim", self.latent_dim, 1)
        SGDConfig(**self.sgd)
        LoRAConfig(**self.lora)
        if self.eval_scope is not None and self.eval_scope not in EVAL_SCOPES:
            raise ValueError(f"eval_scope={self.eval_scope!r} is invalid; allowed: {', '.join(EVAL_SCOPES)}")

    @property
    def scope(self) -> str:
        """The latent scope the method is trained with (DESIGN §2)."""
        return self.equation_options.get("scope", "datum")

    @classmethod
    def from_name(cls, name: str, **options) -> "LLMMethod":
        """A method by name: a baseline (mle, neftune, gaussian, discrete) or an equation name."""
        base = dict(BASELINES.get(name, {}))
        if not base and name not in EQUATIONS:
            known = sorted(set(BASELINES) | set(EQUATIONS))
            raise ValueError(f"method={name!r} is unknown; allowed: {', '.join(known)} (or set equation=)")
        if not base:
            base = {"equation": name}
        base.update(options)
        return cls(name=name, **base)


def _from_table(cls, table: dict, where: str):
    allowed = {f.name for f in fields(cls)}
    spec.check_keys(table, allowed, where)
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"{where}: {str(exc).splitlines()[0]}") from None


# ---- per-process caches: the base model, corpora, token pairs ------------------------------------------------
_BASES: dict[tuple, tuple] = {}
_CORPORA: dict[tuple, object] = {}
_PAIRS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def base_model(config: ModelConfig):
    """``(model, tokenizer)`` of ``config``, loaded once per process (frozen; never modified: methods copy it)."""
    from ..llm import load_base_model

    key = (config.name, config.device, config.dtype, config.cache_dir)
    if key not in _BASES:
        _BASES.clear()  # one base per process
        _BASES[key] = load_base_model(config.name, device=config.device, dtype=config.dtype,
                                      cache_dir=config.cache_dir)
    return _BASES[key]


def _corpus(name: str, root):
    from ..llm import load_corpus

    key = (name, None if root is None else str(root))
    if key not in _CORPORA:
        _CORPORA[key] = load_corpus(name, root=root)
    return _CORPORA[key]


def token_pairs(data: DataConfig, model: ModelConfig, corpus: str, splits: tuple, n: int, *, what: str = "n"):
    """The first ``n`` (prompt, continuation) pairs of ``corpus``, taken from ``splits`` in turn (each in hash
    order): ``(x (n, L), y (n, c))``, cached per process. Too few pairs raise ValueError naming ``what``."""
    from ..llm import make_pairs

    root = data.roots.get(corpus)
    key = (corpus, None if root is None else str(root), tuple(splits), n, data.prompt_len, data.continuation_len,
           data.split_seed, data.fractions, data.pack, model.name, model.cache_dir)
    if key not in _PAIRS:
        _, tokenizer = base_model(model)
        xs, ys, have = [], [], 0
        for split in splits:
            try:
                pairs = make_pairs(_corpus(corpus, root), tokenizer, split=split, prompt_len=data.prompt_len,
                                   continuation_len=data.continuation_len, max_pairs=n - have,
                                   fractions=data.fractions, seed=data.split_seed, pack=data.pack)
            except ValueError:  # an empty split (e.g. a zero fraction) adds nothing
                continue
            xs.append(pairs.x)
            ys.append(pairs.y)
            have += len(pairs)
            if have >= n:
                break
        if have < n:
            raise ValueError(f"{what}={n} is invalid: corpus {corpus!r} ({'+'.join(splits)}) holds only {have} "
                             f"pairs of {data.prompt_len}+{data.continuation_len} tokens; allowed: {what} <= {have}")
        _PAIRS[key] = (torch.cat(xs), torch.cat(ys))
    return _PAIRS[key]


def condition_pairs(d: DataConfig, model: ModelConfig):
    """``(x, y, evals)`` of a condition: the training pairs and ``label -> (x, y)`` of every evaluation split."""
    x, y = token_pairs(d, model, d.train, ("train",), d.n_train, what="n_train")
    evals = {label: token_pairs(d, model, corpus, splits, d.n_eval, what="n_eval")
             for label, (corpus, splits) in d.splits.items()}
    return x, y, evals


# ---- generate and analyse -------------------------------------------------------------------------------------
@dataclass
class ShiftData:
    """What ``generate`` hands to every method of a replicate (token ids on the CPU)."""

    x: torch.Tensor  # (n_train, L)
    y: torch.Tensor  # (n_train, c)
    evals: dict  # label -> (x (n_eval, L), y (n_eval, c))
    seed: int  # seeds the fit: minibatch order, LoRA and perturbation init, latent draws
    eval_seed: int  # seeds the evaluation: IWAE draws, generation


def _condition_data(data: DataConfig, cond: dict) -> DataConfig:
    over = {k: cond[k] for k in DESIGN_KEYS if k in cond}
    return replace(data, **over) if over else data


def make_generate(model: ModelConfig, data: DataConfig, evaluation: EvalConfig):
    """``generate(cond, rng)``: the fixed pairs of the condition, and seeds drawn from the replicate's stream."""

    def generate(cond: dict, rng: np.random.Generator) -> ShiftData:
        d = _condition_data(data, cond)
        x, y, evals = condition_pairs(d, model)
        seed = int(rng.integers(2 ** 31 - 1))
        return ShiftData(x=x, y=y, evals=evals, seed=seed, eval_seed=seed + evaluation.seed + 1)

    return generate


def _eval_scope(method: LLMMethod, evaluation: EvalConfig) -> str:
    scope = method.eval_scope or evaluation.scope
    return method.scope if scope == "method" else scope


def build_model(method: LLMMethod, model: ModelConfig, data: DataConfig, seed: int):
    """A fresh :class:`~simstudy.llm.PerturbedCausalLM` for ``method`` on a copy of the cached base."""
    from ..llm import LoRAConfig, build_perturbed_lm

    base, _ = base_model(model)
    options = dict(method.perturbation_options)
    return build_perturbed_lm(copy.deepcopy(base), perturbation=method.perturbation, prompt_len=data.prompt_len,
                              latent_dim=method.latent_dim, lora=LoRAConfig(**{**model.lora, **method.lora}),
                              seed=seed, max_rows=model.max_rows, head_chunk_elements=model.head_chunk_elements,
                              perturbation_options=options or None)


def perturbation_rms(lm) -> float | None:
    """Root mean square of G(z) per prompt-embedding entry over the prior, in units of the embedding entries'
    standard deviation: ||A||_F / sqrt(L d) / s for a linear map, a Monte Carlo estimate for an MLP map."""
    from ..llm import embedding_scale

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
        z = lm.sample_latent(x, 256, gen)
        embeds = lm.prompt_embeds(x, None)[:, 0]  # (1, L, d)
        shift = lm.prompt_embeds(x, z) - embeds[:, None]  # (1, 256, L, d)
        return float(shift.pow(2).mean().sqrt()) / s


def make_analyse(method: LLMMethod, model: ModelConfig, data: DataConfig, evaluation: EvalConfig):
    """``analyse(data, cond)`` for the engine: fit ``method`` on the training pairs, return its metrics."""

    def analyse(shift: ShiftData, cond: dict) -> dict:
        from ..equations import RejectionBudgetExceeded
        from ..llm import generation_metrics, iwae_perplexity

        d = _condition_data(data, cond)
        _, tokenizer = base_model(model)
        lm = build_model(method, model, d, shift.seed)
        device = lm.device
        equation = make_equation(method.equation, **method.equation_options)
        generator = torch.Generator().manual_seed(shift.seed)  # on the CPU: the equations move draws to the model
        try:
            fit = fit_sgd(lm, equation, shift.x.to(device), shift.y.to(device), config=SGDConfig(**method.sgd),
                          generator=generator)
        except RejectionBudgetExceeded as exc:
            raise RejectionBudget(str(exc).splitlines()[0]) from None
        scope = _eval_scope(method, evaluation)
        out: dict[str, float] = {}
        mauve_options = {"num_buckets": evaluation.mauve_buckets}
        lm.eval()
        for i, (label, (x, y)) in enumerate(shift.evals.items()):
            x, y = x.to(device), y.to(device)
            # one stream per split and purpose, the same for every method of the replicate (paired comparisons)
            gen = torch.Generator().manual_seed(shift.eval_seed + 2 * i)
            ppl = iwae_perplexity(lm, x, y, num_draws=evaluation.iwae_draws, scope=scope,
                                  batch_size=evaluation.batch_size, generator=gen)
            out[f"ppl_{label}"] = ppl.perplexity
            out[f"nll_{label}"] = -ppl.log_lik_per_token
            out["iwae_draws"] = float(ppl.num_draws)
            if evaluation.generation and d.n_generate:
                n = d.n_generate
                gen = torch.Generator().manual_seed(shift.eval_seed + 2 * i + 1)
                res = generation_metrics(lm, x[:n], y[:n], tokenizer, num_samples=evaluation.num_samples,
                                         batch_size=evaluation.batch_size, with_mauve=evaluation.mauve,
                                         mauve_options=mauve_options, generator=gen)
                out[f"rouge1_{label}"] = res.rouge.rouge1
                if res.mauve is not None:
                    out[f"mauve_{label}"] = res.mauve.mauve
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
        return out

    return analyse


# ---- the study kind ---------------------------------------------------------------------------------------------
def _method(name: str, table: dict, defaults: dict) -> LLMMethod:
    """A method from its table over ``[defaults]``. A baseline keeps its own equation and map, and takes
    ``equation_options`` / ``perturbation_options`` from its own table only (those of ``[defaults]`` are
    meant for the learned perturbations)."""
    allowed = {f.name for f in fields(LLMMethod)} - {"name"}
    spec.check_keys(table, allowed, f"methods.{name}")
    options = {**defaults, **table}
    for key in ("sgd", "equation_options", "perturbation_options", "lora"):
        if key in defaults and key in table:
            options[key] = {**defaults[key], **table[key]}
    short = re.fullmatch(r"is-(\d+)", name)
    if name in BASELINES:
        base = BASELINES[name]
        for key in ("equation", "perturbation"):
            if key in table and table[key] != base[key]:
                raise spec.SpecError(f"methods.{name}.{key}={table[key]!r} is invalid for the baseline {name!r}; "
                                     f"allowed: {base[key]!r} (or give the method another label)")
        options.update(base)
        for key in ("equation_options", "perturbation_options"):
            options[key] = dict(table.get(key, {}))
    elif "equation" not in table:
        if name not in EQUATIONS and not short:
            known = sorted(set(BASELINES) | set(EQUATIONS))
            raise spec.SpecError(f"methods.{name} is unknown; allowed: {', '.join(known)}, is-<K>, "
                                 "or any label with equation = '...'")
        options["equation"] = name
    if short and options.get("equation") == name:  # is-8: is-K with num_draws = 8
        options["equation"] = "is-K"
        options["equation_options"] = {**options.get("equation_options", {}), "num_draws": int(short.group(1))}
    try:
        return LLMMethod(name=name, **options)
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"methods.{name}: {str(exc).splitlines()[0]}") from None


def _check_environment(model: ModelConfig, data: DataConfig, evaluation: EvalConfig) -> None:
    """Stop before any work when the llm extra, a corpus or the model is missing (one line each)."""
    needed = ["transformers", "peft", "tokenizers", "rouge_score"] + (["mauve"] if evaluation.mauve else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise spec.SpecError(f"the llm extra is not installed (missing {', '.join(missing)}); install it: {LLM_EXTRA}")
    from ..llm import CorpusNotFoundError, check_corpora, resolve_device

    corpora = list(dict.fromkeys([data.train, *data.ood.values()]))
    try:
        check_corpora(corpora, roots=data.roots)
    except CorpusNotFoundError as exc:
        raise spec.SpecError(str(exc).splitlines()[0]) from None
    try:
        resolve_device(model.device)
    except ValueError as exc:
        raise spec.SpecError(f"model.{str(exc).splitlines()[0]}") from None
    from ..llm.model import SMOLLM2, default_cache_dir, smollm2_gguf_path

    if model.name == SMOLLM2:
        folder = (Path(model.cache_dir) if model.cache_dir else default_cache_dir()) / SMOLLM2
        if not (folder / "config.json").is_file():
            try:
                smollm2_gguf_path()
            except FileNotFoundError as exc:
                raise spec.SpecError(str(exc).splitlines()[0]) from None
    elif model.name != "tiny-gpt2":
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(model.name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise spec.SpecError(f"model.name={model.name!r} is not on disk and downloads are off ("
                                 f"{str(exc).splitlines()[0][:120]}); allowed: smollm2-135m, tiny-gpt2, or a "
                                 "local model folder / a Hugging Face id in the local cache") from None


def default_headline(data: DataConfig, evaluation: EvalConfig) -> list[str]:
    ood = list(data.ood)
    out = ["ppl_id"] + [f"ppl_{k}" for k in ood] + (["ppl_ood"] if ood else [])
    if evaluation.generation and data.n_generate:
        out += ["rouge1_id"] + (["rouge1_ood"] if ood else [])
        if evaluation.mauve:
            out += ["mauve_id"] + (["mauve_ood"] if ood else [])
    return out


def _build(sf: spec.StudyFile) -> Study:
    t = sf.tables
    for name in ("model", "data", "evaluation", "defaults"):
        if not isinstance(t.get(name, {}), dict):
            raise spec.SpecError(f"{name} has the wrong type; allowed: a table [{name}]")
    model = _from_table(ModelConfig, dict(t.get("model", {})), "model")
    data = _from_table(DataConfig, dict(t.get("data", {})), "data")
    evaluation = _from_table(EvalConfig, dict(t.get("evaluation", {})), "evaluation")
    design = sf.design if sf.design is not None else {"n_train": [data.n_train]}
    factors = set(design) if isinstance(design, dict) else {k for c in design for k in c}
    spec.check_keys({k: None for k in factors}, set(DESIGN_KEYS), "design")
    levels = design if isinstance(design, list) else [dict(zip(design, combo)) for combo in itertools.product(
        *[(v if isinstance(v, list) else [v]) for v in design.values()])]
    for cond in levels:  # every condition's data settings are valid now, not inside a replicate
        try:
            _condition_data(data, cond)  # dataclasses.replace re-runs the validation
        except (TypeError, ValueError) as exc:
            raise spec.SpecError(f"design: {str(exc).splitlines()[0]}") from None
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise spec.SpecError("methods is missing; allowed: one table [methods.NAME] per method "
                             f"(NAME one of {', '.join(sorted(set(BASELINES) | set(EQUATIONS)))})")
    defaults = dict(t.get("defaults", {}))
    spec.check_keys(defaults, {f.name for f in fields(LLMMethod)} - {"name"}, "defaults")
    methods = {}
    for name, table in methods_t.items():
        if not isinstance(table, dict):
            raise spec.SpecError(f"methods.{name} has the wrong type; allowed: a table [methods.{name}]")
        methods[name] = _method(name, table, defaults)
    train_corpora = {c.get("train", data.train) for c in levels}
    _check_environment(model, data, evaluation)
    for corpus in train_corpora - {data.train}:
        _check_environment(model, replace(data, train=corpus), evaluation)
    for cond in levels:  # enough pairs in every split: tokenise now (cached), not inside a replicate
        try:
            condition_pairs(_condition_data(data, cond), model)
        except ValueError as exc:
            raise spec.SpecError(f"data: {str(exc).splitlines()[0]}") from None
    analyse = {name: make_analyse(m, model, data, evaluation) for name, m in methods.items()}
    options = sf.options()
    options["figures"] = list(options.get("figures", [])) + [f"{__name__}:shift_figures"]
    options["headline"] = evaluation.headline or default_headline(data, evaluation)
    options["splits"] = list(data.splits)
    fingerprint = sf.fingerprint or repr((VERSION, sorted((k, repr(v)) for k, v in t.items()), repr(design)))
    return Study(design=design, generate=make_generate(model, data, evaluation), analyse=analyse,
                 replicates=sf.replicates, seed=sf.seed, name=sf.name, fingerprint=fingerprint, options=options)


# ---- figures ------------------------------------------------------------------------------------------------------
def _split_labels(result, metric: str) -> list[str]:
    columns = [c[len(metric) + 1:] for c in result.table.columns if c.startswith(metric + "_")]
    order = [s for s in result.options.get("splits", []) if s in columns]
    return order + sorted(s for s in columns if s not in order and s != "ood") + (["ood"] if "ood" in columns else [])


def method_panels(table: pd.DataFrame, columns: list[str], titles: list[str], *, ylabel: str, title: str,
                  methods: list[str] | None = None, z: float = 1.96):
    """One panel per column: the mean over replicates per method with +-z MCSE bars (MCSE = sd / sqrt(R)).

    ``methods`` fixes the order and the colours (default: the table's order), so figures of the same study agree.
    """
    from matplotlib.figure import Figure

    from ..engine.plots import _COLORS

    methods = list(methods or dict.fromkeys(table["method"]))
    shown = [m for m in methods if m in set(table["method"])]
    fig = Figure(figsize=(max(6.4, 2.4 * len(columns) + 1.2), 4.2), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column, panel in zip(axes, columns, titles):
        for pos, m in enumerate(shown):
            v = table.loc[table["method"] == m, column].dropna().to_numpy(float)
            if not v.size:
                continue
            mcse = v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
            ax.errorbar([pos], [v.mean()], yerr=[z * mcse], fmt="o", capsize=4, ms=5,
                        color=_COLORS[methods.index(m) % len(_COLORS)])
        ax.set_xticks(range(len(shown)), shown, rotation=60, fontsize=8)
        ax.set_xlim(-0.6, len(shown) - 0.4)
        ax.set_title(panel, fontsize=9)
        ax.grid(True, axis="y", alpha=0.25)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{title}\n(bars: +-{z:g} MCSE over replicates)", fontsize=10)
    return fig


def shift_figures(result, outdir) -> list[tuple[str, Path]]:
    """Figure hook: perplexity, ROUGE-1 and MAUVE per evaluation split by method (MCSE bars), and the paired
    difference of each split's NLL per token from mle's (when the study has mle)."""
    from ..engine.plots import _save

    table = result.table
    ok = table[table["status"] == "ok"] if "status" in table else table
    if ok.empty:
        return []
    outdir = Path(outdir)
    out = []
    names = {"id": "in-domain", "ood": "out-of-domain (all)"}
    methods = list(dict.fromkeys(table["method"]))
    specs = [("ppl", "perplexity (IWAE bound)", "Perplexity by method and split", "llm_shift_perplexity.png"),
             ("rouge1", "ROUGE-1 F1", "ROUGE-1 of generated continuations", "llm_shift_rouge1.png"),
             ("mauve", "MAUVE", "MAUVE of generated continuations (base-model features)", "llm_shift_mauve.png")]
    for metric, ylabel, title, fname in specs:
        labels = _split_labels(result, metric)
        if not labels:
            continue
        fig = method_panels(ok, [f"{metric}_{s}" for s in labels], [names.get(s, s) for s in labels],
                            ylabel=ylabel, title=title, methods=methods)
        out.append((title, _save(fig, outdir / fname)))
    labels = _split_labels(result, "nll")
    if "mle" in set(ok["method"]) and labels:
        key = [c for c in ("condition", "replicate") if c in ok]
        ref = ok[ok["method"] == "mle"].set_index(key)
        diffs = ok[ok["method"] != "mle"].copy()
        if not diffs.empty:
            index = pd.MultiIndex.from_frame(diffs[key]) if len(key) > 1 else pd.Index(diffs[key[0]])
            for s in labels:
                diffs[f"dnll_{s}"] = diffs[f"nll_{s}"].to_numpy() - ref[f"nll_{s}"].reindex(index).to_numpy()
            title = "NLL per token minus mle's, paired by replicate"
            fig = method_panels(diffs, [f"dnll_{s}" for s in labels], [names.get(s, s) for s in labels],
                                ylabel="nats per token (below 0: better than mle)", title=title, methods=methods)
            for ax in fig.axes:
                ax.axhline(0.0, color="0.4", lw=0.8)
            out.append((title, _save(fig, outdir / "llm_shift_nll_vs_mle.png")))
    return out


# ---- registration -------------------------------------------------------------------------------------------------
def _list_llm_methods() -> dict[str, str]:
    maps = {"none": "no perturbation (LoRA only)", "neftune": "NEFTune noise while training",
            "gaussian": "fixed Gaussian perturbation", "discrete": "neighbour-substitution perturbation"}
    out = {name: f"baseline: {maps[b['perturbation']]}, LoRA trained with {b['equation']}"
           for name, b in BASELINES.items()}
    out.update({name: f"learned linear perturbation + LoRA, equation {name}, scope {DEFAULT_SCOPE.get(name, 'datum')}"
                + (" (impractical: cost ~ 1/m(y|x))" if name == "ps-exact" else "")
                for name in EQUATIONS if name not in BASELINES})
    return out


spec.register_kind(KIND, _build, tables=("model", "data", "evaluation", "defaults", "methods"),
                   description="a real LLM fine-tuned in one domain with LoRA and prompt perturbations, evaluated in "
                               "and out of domain: perplexity, ROUGE-1, MAUVE (DESIGN §8)")
spec.register_listing("LLM shift methods", _list_llm_methods)
