"""Per-process caches of an llm-shift study: the base model, the corpora, the token pairs (DESIGN §7, §8).

Every worker process loads the frozen base model once (one base per process: loading
another drops the previous one first) and tokenises each split once; every replicate
and method of a condition then reuses them. The caches are
:class:`simstudy.domain.BuildCache` objects, the package's one cache of built objects.
"""
from __future__ import annotations

import torch

from ...domain import BuildCache
from .config import DataConfig, ModelConfig

__all__ = ["base_model", "condition_pairs", "token_pairs"]

_BASES = BuildCache(max_size=1)  # one base model per process
_CORPORA = BuildCache(max_size=16)
_PAIRS = BuildCache(max_size=256)


def base_model(config: ModelConfig):
    """``(model, tokenizer)`` of ``config``, loaded once per process (frozen; never modified: methods copy it)."""
    key = (config.name, config.device, config.dtype, config.cache_dir)
    return _BASES.get(key, lambda: _load_base(config))


def _load_base(config: ModelConfig):
    from ...llm import load_base_model  # lazily: transformers is imported only when a model is needed

    _BASES.clear()  # free the previous base before loading the next one
    return load_base_model(config.name, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)


def _corpus(name: str, root):
    from ...llm import load_corpus

    return _CORPORA.get((name, None if root is None else str(root)), lambda: load_corpus(name, root=root))


def token_pairs(data: DataConfig, model: ModelConfig, corpus: str, splits: tuple, n: int, *, what: str = "n"):
    """The first ``n`` (prompt, continuation) pairs of ``corpus``, taken from ``splits`` in turn (each in hash
    order): ``(x (n, L), y (n, c))``, cached per process. Too few pairs raise ValueError naming ``what``."""
    root = data.roots.get(corpus)
    key = (corpus, None if root is None else str(root), tuple(splits), n, data.prompt_len, data.continuation_len,
           data.split_seed, data.fractions, data.pack, model.name, model.cache_dir)
    return _PAIRS.get(key, lambda: _make_pairs(data, model, corpus, root, tuple(splits), n, what))


def _make_pairs(data: DataConfig, model: ModelConfig, corpus: str, root, splits: tuple, n: int, what: str):
    from ...llm import make_pairs

    _, tokenizer = base_model(model)
    xs, ys, have = [], [], 0
    for split in splits:
        try:
            pairs = make_pairs(_corpus(corpus, root), tokenizer, split=split, prompt_len=data.prompt_len,
                               continuation_len=data.continuation_len, max_pairs=n - have,
                               fractions=data.fractions, seed=data.split_seed, pack=data.pack)
        except ValueError:  # an empty split (e.g. a zero fraction) adds nothing
            continue
        xs.append(pairs.x)  # (b, L)
        ys.append(pairs.y)  # (b, c)
        have += len(pairs)
        if have >= n:
            break
    if have < n:
        raise ValueError(f"{what}={n} is invalid: corpus {corpus!r} ({'+'.join(splits)}) holds only {have} "
                         f"pairs of {data.prompt_len}+{data.continuation_len} tokens; allowed: {what} <= {have}")
    return torch.cat(xs), torch.cat(ys)  # (n, L), (n, c)


def condition_pairs(d: DataConfig, model: ModelConfig):
    """``(x, y, evals)`` of a condition: the training pairs (the pool of ``train_pool`` pairs when set) and
    ``label -> (x, y)`` of every evaluation split."""
    pool, what = (d.train_pool, "train_pool") if d.train_pool else (d.n_train, "n_train")
    x, y = token_pairs(d, model, d.train, ("train",), pool, what=what)  # (pool, L), (pool, c)
    evals = {label: token_pairs(d, model, corpus, splits, d.n_eval, what="n_eval")
             for label, (corpus, splits) in d.splits.items()}
    return x, y, evals
