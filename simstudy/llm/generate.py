"""Ancestral generation from a perturbed LLM (DESIGN §2, §8).

Per datum (the default): draw z ~ prior, perturb the prompt's embeddings once,
then sample the continuation token by token from p(y_j | x, y_<j, z) with a KV
cache, so a sample of c tokens costs one prompt pass plus c one-token steps.
Each of the ``num_samples`` samples per prompt has its own z; all B * S
sequences advance together in one batch.

Per token (``scope="token"``, the predecessor's hierarchy of DESIGN §2): each
token is drawn given a freshly perturbed prompt, which invalidates the cache,
so every step is a full forward pass (c passes of growing length).

Maps that perturb only while training (NEFTune) and the unperturbed model
generate from the plain prompt.
"""
from __future__ import annotations

import torch

from ..validation import check_int
from .perturbed import PerturbedCausalLM

SCOPES = ("datum", "token")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row of ``logits`` (N, V): ``(N,)`` long."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: PerturbedCausalLM, x: torch.Tensor, *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, scope: str = "datum", perturb: bool | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample continuations of the prompts ``x`` ``(B, L)``: token ids ``(B, S, T)``.

    Parameters
    ----------
    max_new_tokens : T, the continuation length (no early stop: every sample has T tokens).
    num_samples : S samples per prompt, each with its own latent draw.
    temperature : softmax temperature (1: the model's own distribution, ancestral sampling; 0: greedy).
    top_k : keep only the k most likely tokens at each step (None: all; ancestral sampling needs None).
    scope : "datum" (one z per sample) or "token" (a fresh z for every token).
    perturb : draw latents (default: ``model.perturbation.perturb_at_eval``).
    generator : torch.Generator for the latents and the tokens.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("num_samples", num_samples, 1)
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} is invalid; allowed: a float >= 0")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid; allowed: an integer >= 1 or None")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid; allowed: {', '.join(SCOPES)}")
    model._check(x, None)
    p = model.perturbation
    perturb = bool(p.perturb_at_eval and p.latent_dim > 0) if perturb is None else bool(perturb)
    B, L = x.shape
    S, d = num_samples, model.embed_dim

    def prompt() -> torch.Tensor:  # (B*S, L, d): a fresh latent for every sample
        latent = model.sample_latent(x, S, generator) if perturb else None
        embeds = model.prompt_embeds(x, latent)  # (B, S or 1, L, d)
        return embeds.expand(B, S, L, d).reshape(B * S, L, d)

    out_tokens = torch.empty(B * S, max_new_tokens, dtype=torch.long, device=x.device)
    if scope == "datum":
        logits, cache = model.next_token_logits(prompt(), use_cache=True)  # (B*S, V): the model's own logits
        for t in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)  # (B*S,)
            out_tokens[:, t] = token
            if t + 1 < max_new_tokens:
                step = model.embedding(token[:, None]).to(model.dtype)  # (B*S, 1, d)
                logits, cache = model.next_token_logits(step, cache=cache, use_cache=True)
    else:
        for t in range(max_new_tokens):
            inputs = prompt()
            if t:
                inputs = torch.cat([inputs, model.embedding(out_tokens[:, :t]).to(model.dtype)], dim=1)
            logits, _ = model.next_token_logits(inputs)  # (B*S, V)
            out_tokens[:, t] = _sample(logits, temperature, top_k, generator)
    return out_tokens.view(B, S, max_new_tokens)
