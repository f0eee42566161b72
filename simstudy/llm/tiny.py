"""A tiny GPT-2 and a BPE tokenizer trained on local text, for tests (DESIGN §8).

Nothing here downloads: the tokenizer is trained with ``tokenizers`` on text
given by the caller (or on a few files of the Python standard library, see
:func:`local_texts`), and the model is a randomly initialised
``GPT2LMHeadModel`` built from a config. Dropout is off everywhere, so a
forward pass is a deterministic function of the weights.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from ..validation import check_int

#: stdlib files whose text trains the default tiny tokenizer (prose-heavy docstrings and code).
LOCAL_TEXT_FILES = ("textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "heapq.py", "bisect.py",
                    "fractions.py", "statistics.py")

SPECIAL_TOKEN = "<|endoftext|>"


def local_texts(*, max_chars: int = 200_000) -> list[str]:
    """Text of a fixed list of standard-library files (``LOCAL_TEXT_FILES``), at most ``max_chars`` in all."""
    check_int("max_chars", max_chars, 1)
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, used = [], 0
    for name in LOCAL_TEXT_FILES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: max_chars - used]
        texts.append(text)
        used += len(text)
        if used >= max_chars:
            break
    if not texts:
        raise FileNotFoundError(f"no standard-library sources under {root}; pass texts= explicitly")
    return texts


def train_bpe_tokenizer(texts: list[str], *, vocab_size: int = 512, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` (id 0) is the eos, bos and pad token. Byte-level BPE covers any
    input text (no unknown tokens), so the German and code corpora encode too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is invalid; allowed: an integer >= 260 (256 bytes + merges)")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts is invalid; allowed: a non-empty list of strings")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKEN, bos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN)


def tiny_gpt2(*, vocab_size: int, n_positions: int = 512, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
              seed: int = 0, eos_token_id: int = 0, initializer_range: float = 0.02):
    """A randomly initialised GPT-2 (``GPT2LMHeadModel``) from a config, dropout off, in eval mode.

    ``initializer_range`` is the standard deviation of the initial weights: GPT-2's 0.02 gives a
    nearly uniform next-token distribution; larger values (0.3 to 1) give peaked, latent-sensitive
    distributions, which tests of sampling need.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, value, low in (("vocab_size", vocab_size, 2), ("n_positions", n_positions, 2), ("n_embd", n_embd, 2),
                             ("n_layer", n_layer, 1), ("n_head", n_head, 1)):
        check_int(name, value, low)
    if not initializer_range > 0:
        raise ValueError(f"initializer_range={initializer_range} is invalid; allowed: a float > 0")
    if n_embd % n_head:
        raise ValueError(f"n_head={n_head} is invalid; allowed: a divisor of n_embd={n_embd}")
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                        initializer_range=initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def tiny_model_and_tokenizer(texts: list[str] | None = None, *, vocab_size: int = 512, n_positions: int = 512,
                             n_embd: int = 32, n_layer: int = 2, n_head: int = 2, seed: int = 0):
    """``(model, tokenizer)``: a tiny GPT-2 and a BPE tokenizer trained on ``texts`` (default :func:`local_texts`)."""
    tokenizer = train_bpe_tokenizer(local_texts() if texts is None else texts, vocab_size=vocab_size)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, seed=seed, eos_token_id=tokenizer.eos_token_id)
    return model, tokenizer
