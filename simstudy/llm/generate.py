"""Ancestral generation from a perturbed LLM (DESIGN §2, §8).

Per datum (the default): draw z ~ prior, perturb the prompt's embeddings once,
then sample the continuation token by token from p(y_j | x, y_<j, z) with a KV
cache, so a sample of c tokens costs one prompt pass plus c one-token steps.
Each of the ``num_samples`` samples per prompt has its own z (returned in
:attr:`Generation.latent`); all B * S sequences advance together in one batch.

Per token (``scope="token"``, the predecessor's hierarchy of DESIGN §2): each
token is drawn given a freshly perturbed prompt, which invalidates the cache,
so every step is a full forward pass (c passes of growing length).

Maps that perturb only while training (NEFTune) and the unperturbed model
generate from the plain prompt.

Options (:class:`GenerationOptions`). Temperature, top-k and top-p are applied by
transformers' own logits warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, in that order, as ``model.generate`` does), on float32 logits;
the defaults (1, None, None) apply none of them, which is ancestral sampling from
the model's own distribution. ``temperature=0`` is greedy decoding (the argmax of the
raw logits, as ``model.generate(do_sample=False)``). With ``stop_at_eos`` a sequence
stops at its first end-of-sequence token (kept), every later position holds the pad
token, and :attr:`Generation.lengths` counts the tokens up to and including the EOS;
generation ends early once every sequence has stopped. The output always has
``max_new_tokens`` columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..validation import check_bool, check_choice, check_float, check_int, is_integer
from .perturbed import PerturbedCausalLM

__all__ = ["SCOPES", "Generation", "GenerationOptions", "generate", "sample_continuations"]

SCOPES = ("datum", "token")


@dataclass(frozen=True)
class GenerationOptions:
    """How continuations are sampled (see the module docstring)."""

    max_new_tokens: int = field(metadata={"help": "T, tokens per continuation (the output's width)"})
    num_samples: int = field(default=1, metadata={"help": "S samples per prompt, each with its own latent draw"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 1: the model's own, 0: greedy"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k most likely tokens per step (None: all)"})
    top_p: float | None = field(default=None, metadata={"help": "keep the smallest set of mass >= p (None: all)"})
    stop_at_eos: bool = field(default=False, metadata={"help": "stop each sequence at its first EOS, pad after it"})
    eos_token_id: int | tuple | None = field(default=None, metadata={
        "help": "EOS id(s) (None: the model's generation_config / config eos_token_id)"})
    pad_token_id: int | None = field(default=None, metadata={
        "help": "fills positions after the EOS (None: the model's pad_token_id, else the first EOS id)"})
    scope: str = field(default="datum", metadata={"help": "datum: one z per sample; token: a fresh z per token"})
    perturb: bool | None = field(default=None, metadata={
        "help": "draw latents (None: the perturbation's perturb_at_eval)"})

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("num_samples", self.num_samples, 1)
        check_float("temperature", self.temperature, low=0.0)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True, high_open=False)
        check_bool("stop_at_eos", self.stop_at_eos)
        if self.eos_token_id is not None:
            ids = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)
            if not ids or not all(is_integer(i) and i >= 0 for i in ids):
                raise ValueError(f"eos_token_id={self.eos_token_id!r} is invalid; allowed: a token id >= 0, a list "
                                 "of them, or None (the model's)")
            if not self.stop_at_eos:
                raise ValueError(f"eos_token_id={self.eos_token_id!r} is set but stop_at_eos=False; allowed: "
                                 "stop_at_eos=True with it, or leave eos_token_id out")
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in ids))
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, 0)
        check_choice("scope", self.scope, SCOPES)
        if self.perturb is not None:
            check_bool("perturb", self.perturb)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self):
        """transformers' ``LogitsProcessorList`` of the sampling options (empty for the defaults and greedy)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        out = LogitsProcessorList()
        if self.greedy:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k is not None:
            out.append(TopKLogitsWarper(top_k=int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=float(self.top_p)))
        return out


@dataclass
class Generation:
    """Sampled continuations of B prompts, S samples each."""

    tokens: torch.Tensor  # (B, S, T) long; after a sequence's EOS: the pad id
    lengths: torch.Tensor  # (B, S) long: tokens up to and including the EOS (T without one)
    finished: torch.Tensor  # (B, S) bool: the sequence stopped at an EOS
    #: the latent of each sample: (B, S, *latent_shape) per datum, (B, S, steps, *latent_shape) per token
    #: (steps <= T: the steps run); None when nothing was perturbed
    latent: torch.Tensor | None


def _eos_ids(model: PerturbedCausalLM, options: GenerationOptions) -> tuple[tuple[int, ...], int]:
    """The EOS ids and the pad id of ``options`` on ``model`` (one-line ValueError when it has none)."""
    lm = model.causal_lm
    configs = [getattr(lm, "generation_config", None), getattr(lm, "config", None)]
    eos = options.eos_token_id
    for cfg in configs:
        if eos is None and getattr(cfg, "eos_token_id", None) is not None:
            found = cfg.eos_token_id
            eos = tuple(found) if isinstance(found, (list, tuple)) else (found,)
    if not eos:
        raise ValueError("stop_at_eos=True but the model has no eos_token_id; allowed: pass eos_token_id=ID "
                         "(e.g. tokenizer.eos_token_id)")
    pad = options.pad_token_id
    for cfg in configs:
        if pad is None and getattr(cfg, "pad_token_id", None) is not None:
            pad = int(cfg.pad_token_id)
    return tuple(int(i) for i in eos), eos[0] if pad is None else pad


def _pick(logits: torch.Tensor, ids: torch.Tensor, options: GenerationOptions, warpers, generator) -> torch.Tensor:
    """One token per row of ``logits`` (N, V) given the ids so far ``ids`` (N, L + t): ``(N,)`` long."""
    if options.greedy:
        return logits.argmax(-1)
    scores = warpers(ids, logits) if len(warpers) else logits  # (N, V); filtered entries are -inf
    probs = torch.softmax(scores, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_continuations(model: PerturbedCausalLM, x: torch.Tensor, options: GenerationOptions, *,
                         generator: torch.Generator | None = None) -> Generation:
    """Sample continuations of the prompts ``x`` ``(B, L)`` under ``options``; ``generator`` draws the
    latents and the tokens."""
    if not isinstance(options, GenerationOptions):
        raise ValueError(f"options={options!r} is invalid; allowed: a GenerationOptions")
    model._check(x, None)
    p = model.perturbation
    perturb = bool(p.perturb_at_eval and p.latent_dim > 0) if options.perturb is None else options.perturb
    B, L = x.shape
    S, d, T = options.num_samples, model.embed_dim, options.max_new_tokens
    warpers = options.warpers()
    eos, pad = _eos_ids(model, options) if options.stop_at_eos else ((), 0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=x.device)
    latents: list[torch.Tensor] = []

    def prompt() -> torch.Tensor:  # (B*S, L, d): a fresh latent for every sample
        latent = model.sample_latent(x, S, generator) if perturb else None  # (B, S, ...)
        if latent is not None:
            latents.append(latent)
        embeds = model.prompt_embeds(x, latent)  # (B, S or 1, L, d)
        return embeds.expand(B, S, L, d).reshape(B * S, L, d)

    ids = x.repeat_interleave(S, dim=0)  # (B*S, L): the prompt and, as they come, the sampled tokens
    out = torch.full((B * S, T), pad, dtype=torch.long, device=x.device)
    finished = torch.zeros(B * S, dtype=torch.bool, device=x.device)
    lengths = torch.zeros(B * S, dtype=torch.long, device=x.device)
    cache = None
    for t in range(T):
        if options.scope == "datum":
            if t == 0:
                logits, cache = model.next_token_logits(prompt(), use_cache=True)  # (B*S, V)
            else:
                step = model.embedding(ids[:, -1:]).to(model.dtype)  # (B*S, 1, d)
                logits, cache = model.next_token_logits(step, cache=cache, use_cache=True)
        else:
            inputs = prompt()
            if t:
                inputs = torch.cat([inputs, model.embedding(ids[:, L:]).to(model.dtype)], dim=1)
            logits, _ = model.next_token_logits(inputs)  # (B*S, V)
        token = _pick(logits, ids, options, warpers, generator)  # (B*S,)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out[:, t] = token
        lengths += (~finished).long()
        if options.stop_at_eos:
            finished |= torch.isin(token, eos_t)
            if bool(finished.all()):
                break
        ids = torch.cat([ids, token[:, None]], dim=1)
    latent = None
    if latents:
        latent = latents[0] if options.scope == "datum" else torch.stack(latents, dim=2)  # (B, S, [steps,] ...)
    return Generation(tokens=out.view(B, S, T), lengths=lengths.view(B, S), finished=finished.view(B, S),
                      latent=latent)


def generate(model: PerturbedCausalLM, x: torch.Tensor, *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_at_eos: bool = False, eos_token_id: int | tuple | None = None, pad_token_id: int | None = None,
             scope: str = "datum", perturb: bool | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``(B, S, T)`` of :func:`sample_continuations` with these :class:`GenerationOptions`."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                                top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, scope=scope, perturb=perturb)
    return sample_continuations(model, x, options, generator=generator).tokens
