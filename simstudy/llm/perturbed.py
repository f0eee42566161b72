"""A frozen causal LM with LoRA adapters and a perturbed prompt: p(y | x, z) (DESIGN §2, §8).

:class:`PerturbedCausalLM` exposes the interface of the synthetic
:class:`simstudy.models.PerturbedLM` (``vocab_size``, ``perturbation``,
``prefix_len``, ``dtype``, ``continuation``, ``sample_latent``, ``log_probs``,
``token_log_lik``, ``log_lik``, ``quadrature_log_lik``), so every estimating
equation of :mod:`simstudy.equations` runs on a real LLM unchanged.

The model, for a prompt x of exactly L tokens and a continuation y of c tokens:

    p(y | x, z) = prod_j softmax(logits([E(x) + G_phi(z), E(y_<j)]))_{y_j}

where ``logits`` is the CausalLM's own forward pass on ``inputs_embeds`` (see below).

The perturbation G_phi acts on the prompt's input embeddings only (through
``inputs_embeds``); the continuation tokens enter unperturbed. B data times K
latent draws go through the network as ONE forward pass of B*K rows.

The logits are the model's own: every pass is the CausalLM's ``forward(inputs_embeds=...)``
(with ``logits_to_keep`` where the model takes it), so whatever an architecture does after
its output layer (Gemma2's ``final_logit_softcapping``, Granite's ``logits_scaling``,
Cohere's ``logit_scale``) enters every likelihood. A model whose forward takes no
``inputs_embeds`` is refused.

Fixed prompt length. A perturbation map has a fixed shape L x d, so every prompt
has exactly ``prefix_len`` tokens. The corpus windows of :mod:`simstudy.llm.corpora`
always do (prompts are cut from packed token streams, never padded); free text
is left-truncated to its last L tokens or left-padded with the end-of-text token
(a document boundary the model has seen in training) by :func:`encode_prompts`.
No attention mask is therefore ever needed.

Precision. The base may run in bfloat16 (the default on CUDA); the perturbation,
the latent draws and every log-probability are float32 (``dtype``), logits are
upcast before the softmax.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ..models.latent_likelihood import LatentLikelihood
from ..models.perturbations import Perturbation
from ..validation import check_int
from .model import LoRAConfig, add_lora, is_peft_model, peft_lora_config
from .perturbations import LLM_PERTURBATIONS, NeighbourSubstitution, embedding_scale, make_llm_perturbation

__all__ = ["LLM_PERTURBATIONS", "NeighbourSubstitution", "PerturbedCausalLM", "build_perturbed_lm",
           "embedding_scale", "encode_prompts", "make_llm_perturbation"]


# ---- the model --------------------------------------------------------------------------------
class PerturbedCausalLM(LatentLikelihood, nn.Module):
    """A frozen causal LM + LoRA adapters + a prompt perturbation G_phi (DESIGN §2, §8).

    Parameters
    ----------
    base : a transformers ``AutoModelForCausalLM`` model (see :func:`simstudy.llm.load_base_model`);
        its weights are frozen and stay bitwise unchanged. Or a peft ``PeftModel`` carrying one LoRA adapter
        (e.g. ``PeftModel.from_pretrained(base, folder)``): its adapter is used as it is (``lora`` must be None).
    perturbation : a :class:`simstudy.models.Perturbation` with ``embed_dim`` = the model's hidden size
        and ``prefix_len`` = the prompt length L (:func:`make_llm_perturbation` builds one).
    lora : LoRA settings (``None`` or ``r = 0``: no adapters).
    seed : seeds the LoRA initialisation (peft draws A at random, B = 0).
    max_rows : rows (data times draws) per forward pass when no gradient is needed (evaluation is
        chunked to bound memory; with autograd the whole B*K batch is one pass).
    head_chunk_elements : bound on the logits (rows * c * V) of one pass of :meth:`token_log_lik`: a larger
        batch goes through the model in chunks of data rows (with all their K draws), each recomputed in the
        backward pass (activation checkpointing of the whole forward), so the (B*K*c, V) logits are never all
        held at once; below it, one plain pass. The default 2^27 (512 MiB of float32) leaves CPU-sized
        batches on the plain path.

    :meth:`save_pretrained` writes the adapter (peft's own format), the perturbation's weights and its
    settings; :meth:`from_pretrained` reads them back (see :mod:`simstudy.llm.saving`).
    """

    continuation = "autoregressive"

    def __init__(self, *, base, perturbation: Perturbation, lora: LoRAConfig | None = None, seed: int = 0,
                 max_rows: int = 64, head_chunk_elements: int = 2 ** 27) -> None:
        super().__init__()
        if not isinstance(perturbation, Perturbation):
            raise ValueError(f"perturbation={type(perturbation).__name__} is invalid; allowed: a "
                             "simstudy.models.Perturbation")
        hidden = base.get_input_embeddings().weight.shape[1]
        if perturbation.embed_dim != hidden:
            raise ValueError(f"perturbation.embed_dim={perturbation.embed_dim} is invalid; allowed: the model's "
                             f"hidden size {hidden}")
        max_rows = check_int("max_rows", max_rows, 1)
        self.head_chunk_elements = check_int("head_chunk_elements", head_chunk_elements, 1)
        if is_peft_model(base):
            lm, lora = base, peft_lora_config(base, lora)
            for name, p in lm.named_parameters():
                if "lora_" not in name:
                    p.requires_grad_(False)
        else:
            if any(hasattr(m, "lora_A") for m in base.modules()):
                raise ValueError("base already carries LoRA adapters (peft injects them in place, so a base backs one "
                                 "PerturbedCausalLM); allowed: a fresh base from load_base_model, copy.deepcopy(base), "
                                 "or the PeftModel that holds them")
            for p in base.parameters():
                p.requires_grad_(False)
            lora = lora or LoRAConfig(r=0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = add_lora(base, lora)
        self.lm = lm
        params = inspect.signature(self.causal_lm.forward).parameters
        if "inputs_embeds" not in params:
            raise ValueError(f"model {type(self.causal_lm).__name__} is refused: its forward takes no inputs_embeds, "
                             "so the prompt cannot be perturbed; allowed: a transformers AutoModelForCausalLM")
        self._keeps_logits = "logits_to_keep" in params
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.perturbation = perturbation.to(self.device)
        self.lora = lora
        self.max_rows = max_rows

    # ---- parts of the underlying transformers model (properties: never registered twice) ----------
    @property
    def causal_lm(self):
        """The transformers CausalLM (LoRA layers injected in place when adapters are on)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def body(self):
        """The decoder stack: ``inputs_embeds (N, T, d) -> last_hidden_state (N, T, d)`` (final norm applied)."""
        causal = self.causal_lm
        return getattr(causal, causal.base_model_prefix)

    @property
    def head(self):
        return self.causal_lm.get_output_embeddings()

    @property
    def embedding(self) -> nn.Embedding:
        return self.causal_lm.get_input_embeddings()

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        head = self.head
        return int(head.weight.shape[0]) if head is not None else int(self.causal_lm.config.vocab_size)

    @property
    def embed_dim(self) -> int:
        return int(self.embedding.weight.shape[1])

    @property
    def prefix_len(self) -> int:
        return self.perturbation.prefix_len

    @property
    def dtype(self) -> torch.dtype:
        """float32: the dtype of the perturbation, the latent draws and every log-probability."""
        return torch.float32

    @property
    def base_dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA and perturbation parameters (everything else is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors only (a few MB, where ``state_dict`` holds the whole base)."""
        names = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"state holds unknown parameters {unknown[:3]}; allowed: names from trainable_state_dict")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    # ---- the forward pass -----------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.prefix_len:
            raise ValueError(f"x of shape {tuple(x.shape)} is invalid; allowed: (B, {self.prefix_len}) token ids "
                             "(prompts have exactly prefix_len tokens)")
        if y is not None and (y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] < 1):
            raise ValueError(f"y of shape {tuple(y.shape)} is invalid; allowed: (B={x.shape[0]}, c >= 1) token ids")

    def sample_latent(self, x: torch.Tensor, num_draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior draws of the latent, ``(B, K, *latent_shape)`` (on the generator's device, moved to x's)."""
        if int(num_draws) < 1:
            raise ValueError(f"num_draws={num_draws} is invalid; allowed: an integer >= 1")
        xs = x if generator is None or generator.device == x.device else x.to(generator.device)
        return self.perturbation.sample_latent(xs, int(num_draws), generator, dtype=self.dtype).to(x.device)

    def prompt_embeds(self, x: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """Perturbed prompt embeddings E(x) + G_phi(z): ``(B, K, L, d)`` float32 (latent None: K = 1, unperturbed)."""
        embeds = self.embedding(x).to(self.dtype)  # (B, L, d)
        if latent is None:
            return embeds[:, None]  # (B, 1, L, d)
        if latent.dtype.is_floating_point:
            latent = latent.to(self.dtype)
        return self.perturbation(embeds, latent, x)  # (B, K, L, d)

    def hidden(self, inputs_embeds: torch.Tensor, **kwargs):
        """Run the decoder stack on ``inputs_embeds`` (cast to the base dtype); returns its output object
        (hidden states only: features, never likelihoods, which come from :meth:`model_logits`)."""
        return self.body(inputs_embeds=inputs_embeds.to(self.base_dtype), **kwargs)

    def model_logits(self, inputs_embeds: torch.Tensor, keep: int, **kwargs):
        """The CausalLM's own forward on ``inputs_embeds`` ``(N, T, d)``: ``(logits, output)``, the logits of
        the last ``keep`` positions in float32 ``(N, keep, V)``, every post-head transform of the model included."""
        kwargs.setdefault("use_cache", False)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = keep
        out = self.causal_lm(inputs_embeds=inputs_embeds.to(self.base_dtype), **kwargs)
        logits = out.logits if self._keeps_logits else out.logits[:, -keep:]
        return logits.float(), out

    def next_token_logits(self, inputs_embeds: torch.Tensor, cache=None, use_cache: bool = False):
        """Logits of the token after ``inputs_embeds`` ``(N, T, d)``: ``((N, V) float32, cache or None)``; with
        ``cache`` (from a previous call with ``use_cache=True``) the rows continue those sequences."""
        kwargs = {"use_cache": use_cache}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        logits, out = self.model_logits(inputs_embeds, 1, **kwargs)
        if not use_cache:
            return logits[:, -1], None
        found = getattr(out, "cache", None)
        return logits[:, -1], found if found is not None else getattr(out, "past_key_values", None)

    def continuation_logits(self, x: torch.Tensor, y: torch.Tensor | None, latent: torch.Tensor | None
                            ) -> tuple[torch.Tensor, int]:
        """Logits at the c positions that predict y: ``((B*K, c, V) float32, K)``, one pass of B*K rows."""
        self._check(x, y)
        B, L = x.shape
        prompt = self.prompt_embeds(x, latent)  # (B, K, L, d)
        K = prompt.shape[1]
        inputs = prompt.reshape(B * K, L, self.embed_dim)  # (B*K, L, d)
        c = 1 if y is None else y.shape[1]
        if c > 1:
            previous = self.embedding(y[:, :-1]).to(self.dtype)  # (B, c-1, d): unperturbed continuation
            previous = previous[:, None].expand(B, K, c - 1, self.embed_dim).reshape(B * K, c - 1, self.embed_dim)
            inputs = torch.cat([inputs, previous], dim=1)  # (B*K, L+c-1, d)
        logits, _ = self.model_logits(inputs, c)
        return logits, K  # (B*K, c, V)

    def _chunked(self, fn, x, y, latent, K_hint: int) -> torch.Tensor:
        """Apply ``fn`` to the whole batch with autograd, or in row chunks without it (concatenated on dim 0)."""
        if torch.is_grad_enabled() or x.shape[0] * K_hint <= self.max_rows:
            return fn(x, y, latent)
        step = max(1, self.max_rows // max(K_hint, 1))
        parts = [fn(x[s:s + step], None if y is None else y[s:s + step], None if latent is None else latent[s:s + step])
                 for s in range(0, x.shape[0], step)]
        return torch.cat(parts, dim=0)

    def log_probs(self, x: torch.Tensor, y: torch.Tensor | None, latent: torch.Tensor | None) -> torch.Tensor:
        """Log next-token distributions of every continuation token and draw: ``(B, K, c, V)`` float32.

        x : (B, L) prompts; y : (B, c) continuations (None: c = 1, the token after the prompt);
        latent : (B, K, ...) draws (None: the unperturbed prompt, K = 1).
        """
        def fn(xb, yb, lb):
            logits, K = self.continuation_logits(xb, yb, lb)  # (b*K, c, V)
            return torch.log_softmax(logits, dim=-1).view(xb.shape[0], K, logits.shape[1], -1)
        return self._chunked(fn, x, y, latent, 1 if latent is None else latent.shape[1])

    def token_log_lik(self, x: torch.Tensor, y: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """log p(y_j | x, y_<j, z_k): ``(B, K, c)``, without materialising the (B, K, c, V) log-probabilities."""
        if y is None:
            raise ValueError("y=None is invalid for token_log_lik; allowed: a (B, c) tensor of continuation ids")
        return self._chunked(self._token_log_lik, x, y, latent, 1 if latent is None else latent.shape[1])

    def _token_log_lik(self, x: torch.Tensor, y: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """:meth:`token_log_lik` of one batch, in checkpointed chunks of data rows above ``head_chunk_elements``."""
        B, c = y.shape
        K = 1 if latent is None else latent.shape[1]
        rows = max(1, self.head_chunk_elements // (K * c * self.vocab_size))  # data rows per pass
        if B <= rows:
            return self._token_log_lik_pass(x, y, latent)
        from torch.utils.checkpoint import checkpoint
        grad = torch.is_grad_enabled()
        parts = []
        for s in range(0, B, rows):
            args = (x[s:s + rows], y[s:s + rows], None if latent is None else latent[s:s + rows])
            parts.append(checkpoint(self._token_log_lik_pass, *args, use_reentrant=False) if grad
                         else self._token_log_lik_pass(*args))
        return torch.cat(parts)

    def _token_log_lik_pass(self, x: torch.Tensor, y: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        logits, K = self.continuation_logits(x, y, latent)  # (b*K, c, V)
        b, c = y.shape
        target = y[:, None].expand(b, K, c).reshape(-1)  # (b*K*c,)
        nll = F.cross_entropy(logits.reshape(b * K * c, -1), target, reduction="none")  # (b*K*c,)
        return -nll.view(b, K, c)

    @torch.no_grad()
    def base_features(self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled last hidden layer of the BASE model (adapters off, no perturbation) over the
        continuation tokens, read with the prompt as context: ``(B, d)`` float32 (MAUVE features, DESIGN §8).
        ``lengths`` (B,) pools each row over its first ``lengths`` tokens only (a continuation stopped at its
        end-of-sequence token; at least one token is pooled)."""
        self._check(x, y)
        step = max(1, self.max_rows)
        feats = []
        for s in range(0, x.shape[0], step):
            tokens = torch.cat([x[s:s + step], y[s:s + step]], dim=1)  # (b, L+c)
            with self.adapters_disabled():
                h = self.hidden(self.embedding(tokens), use_cache=False).last_hidden_state  # (b, L+c, d)
            h = h[:, self.prefix_len:].float()  # (b, c, d)
            if lengths is None:
                feats.append(h.mean(1))
            else:
                keep = lengths[s:s + step].to(h.device).clamp(min=1)  # (b,)
                mask = (torch.arange(h.shape[1], device=h.device)[None] < keep[:, None]).float()  # (b, c)
                feats.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(feats, dim=0)

    # ---- save and reload (simstudy.llm.saving) ----------------------------------------------------------
    def save_pretrained(self, directory):
        """Write the LoRA adapter (peft's ``save_pretrained``), the perturbation's weights (safetensors) and
        the settings (JSON) to ``directory``; returns its path (see :func:`simstudy.llm.saving.save_pretrained`)."""
        from .saving import save_pretrained
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, base, directory, **options) -> "PerturbedCausalLM":
        """Rebuild a saved model on ``base`` (a fresh base model, or the ``PeftModel`` of the saved adapter);
        see :func:`simstudy.llm.saving.from_pretrained` for ``options``."""
        from .saving import from_pretrained
        return from_pretrained(cls, base, directory, **options)

    def adapters_disabled(self):
        """Context manager under which the LoRA adapters are off (the base model alone)."""
        if hasattr(self.lm, "disable_adapter"):
            return self.lm.disable_adapter()
        import contextlib
        return contextlib.nullcontext()

    def describe(self) -> dict:
        n_lora = sum(p.numel() for n, p in self.lm.named_parameters() if p.requires_grad)
        n_pert = sum(p.numel() for p in self.perturbation.parameters() if p.requires_grad)
        return {"model": getattr(self.causal_lm.config, "_name_or_path", "") or self.causal_lm.config.model_type,
                "model_type": self.causal_lm.config.model_type, "perturbation": type(self.perturbation).__name__,
                "prefix_len": self.prefix_len, "latent_dim": self.perturbation.latent_dim, "lora_r": self.lora.r,
                "lora_parameters": n_lora, "perturbation_parameters": n_pert, "base_dtype": str(self.base_dtype)}


# ---- builders -----------------------------------------------------------------------------------------
def build_perturbed_lm(base, *, perturbation: str = "linear", prompt_len: int = 32, latent_dim: int = 4,
                       lora: LoRAConfig | None = None, seed: int = 0, max_rows: int = 64,
                       head_chunk_elements: int = 2 ** 27,
                       perturbation_options: dict | None = None) -> PerturbedCausalLM:
    """``PerturbedCausalLM`` with a named perturbation (see :func:`make_llm_perturbation`) and LoRA adapters
    (``lora=None``: the default :class:`LoRAConfig`, rank 8). ``perturbation="none"`` is LoRA-only (mle)."""
    pert = make_llm_perturbation(perturbation, base, prompt_len=prompt_len, latent_dim=latent_dim, seed=seed,
                                 **(perturbation_options or {}))
    return PerturbedCausalLM(base=base, perturbation=pert, lora=LoRAConfig() if lora is None else lora, seed=seed,
                             max_rows=max_rows, head_chunk_elements=head_chunk_elements)


def encode_prompts(texts: list[str], tokenizer, prompt_len: int) -> torch.Tensor:
    """Token ids ``(N, prompt_len)`` of free-text prompts: the last ``prompt_len`` tokens of each, left-padded
    with the end-of-text token when shorter (see the module docstring)."""
    check_int("prompt_len", prompt_len, 1)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has neither an eos nor a pad token; allowed: a tokenizer with one of them")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    rows = [([pad] * max(0, prompt_len - len(t)) + list(t))[-prompt_len:] for t in ids]
    return torch.tensor(rows, dtype=torch.long)
