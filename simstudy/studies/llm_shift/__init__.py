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
  corpus (its ``ood_splits`` in turn, ``test`` by default). Without
  ``train_pool`` the data are the same in every replicate: a replicate's random
  stream only seeds what is random in a fit (minibatch order, LoRA and
  perturbation initialisation, latent draws) and in its evaluation (IWAE draws,
  sampled tokens), so the MCSEs measure training and evaluation randomness on
  fixed data. With ``train_pool = N`` each replicate draws its own ``n_train``
  training pairs from the first N, so they cover the training data's variation
  too. The evaluation pairs stay fixed: their own error is measured within each
  replicate (``nll_S_se``; for a paired difference, :func:`evaluation_error`
  from the per-pair NLLs a stored run keeps as artifacts).
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
  only (the default is each equation's class fact ``llm_scope``). q2 per datum is refused for autoregressive continuations. ps-exact is
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
    head_chunk_elements = 134217728   # logits of one pass; a larger batch runs in checkpointed chunks
    save_fitted = "fitted"  # optional: keep every fit (adapter, perturbation, settings: save_pretrained) in
                            # fitted/<condition>/seed-<seed>/<method>, relative to the working directory;
                            # off by default; not part of the store's hash (a run resumes with it on or off)

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

    [methods.mle]           # a baseline (mle, neftune, gaussian, discrete), an equation name, or an
                            # equation's short label (is-8, q2-K4, ps-mh-B20)
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

The package, one concept a module:

* :mod:`.config` -- :class:`ModelConfig`, :class:`DataConfig`, :class:`EvalConfig` (``[model]``,
  ``[data]``, ``[evaluation]``);
* :mod:`.methods` -- :class:`LLMMethod` (the shared :class:`~simstudy.domain.MethodSpec` plus
  latent_dim, lora, eval_scope) and its ``[methods.NAME]`` tables;
* :mod:`.caches` -- the per-process base model, corpora and token pairs;
* :mod:`.analysis` -- ``generate`` and ``analyse``;
* :mod:`.build` -- the study-file builder and the environment check;
* :mod:`.figures` -- :func:`shift_figures`, the figure hook, and :func:`paired_panels` (the report's paired
  intervals drawn);
* :mod:`.pairs` -- :func:`evaluation_error`, the evaluation set's own error in a paired comparison
  (from the per-pair NLLs every method of a stored run keeps as artifacts), and
  :func:`checkpoint_sensitivity`, how a paired difference goes with the checkpoints early stopping kept.
"""
from .. import spec
from .analysis import (EQUATION_STATS, RejectionBudget, ShiftData, build_model, eval_scope, make_analyse,
                       make_generate, perturbation_rms)
from .build import (FIGURE_HOOK, KIND, LLM_EXTRA, VERSION, build_study, check_environment, default_headline,
                    from_table)
from .caches import base_model, condition_pairs, token_pairs
from .config import DESIGN_KEYS, EVAL_SCOPES, DataConfig, EvalConfig, ModelConfig, condition_data
from .figures import method_panels, paired_panels, shift_figures
from .methods import BASELINES, METHOD_KEYS, LLMMethod, list_methods, method_from_table
from .pairs import checkpoint_sensitivity, evaluation_error

__all__ = [
    "BASELINES", "DESIGN_KEYS", "EQUATION_STATS", "EVAL_SCOPES", "FIGURE_HOOK", "KIND", "LLM_EXTRA", "METHOD_KEYS",
    "VERSION", "DataConfig", "EvalConfig", "LLMMethod", "ModelConfig", "RejectionBudget", "ShiftData",
    "base_model", "build_model", "build_study", "check_environment", "condition_data", "condition_pairs",
    "checkpoint_sensitivity", "default_headline", "eval_scope", "evaluation_error", "from_table", "list_methods", "make_analyse", "make_generate",
    "method_from_table", "method_panels", "paired_panels", "perturbation_rms", "shift_figures", "token_pairs",
]

spec.register_kind(KIND, build_study, tables=("model", "data", "evaluation", "defaults", "methods"),
                   description="a real LLM fine-tuned in one domain with LoRA and prompt perturbations, evaluated in "
                               "and out of domain: perplexity, ROUGE-1, MAUVE (DESIGN §8)")
spec.register_listing("LLM shift methods", list_methods)
