"""Settings of an llm-shift study: ``[model]``, ``[data]``, ``[evaluation]`` (DESIGN §8).

Each table is a typed dataclass whose fields carry their help text and are validated
where they enter (one-line ``ValueError`` naming the key, the value and what is allowed),
so a malformed study file stops before any replicate runs. :func:`condition_data`
applies a design condition's factors (:data:`DESIGN_KEYS`) to ``[data]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ...validation import check_bool, check_choice, check_int

if TYPE_CHECKING:
    from ...llm.user_corpora import UserCorpus

__all__ = ["DESIGN_KEYS", "EVAL_SCOPES", "DataConfig", "EvalConfig", "ModelConfig", "condition_data"]

#: perplexity bound per "token", per "datum", or each method's own training scope ("method")
EVAL_SCOPES = ("method", "datum", "token")
#: ``[data]`` keys a ``[design]`` may vary
DESIGN_KEYS = ("n_train", "prompt_len", "continuation_len", "train")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class ModelConfig:
    """The frozen base model and the LoRA defaults (``[model]``)."""

    name: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-gpt2, or a folder / HF id on disk"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    cache_dir: str | None = field(default=None, metadata={"help": "converted-model cache (default ~/.cache/simstudy)"})
    lora: dict = field(default_factory=dict, metadata={"help": "LoRAConfig fields"})
    max_rows: int = field(default=64, metadata={"help": "rows per evaluation forward pass"})
    head_chunk_elements: int = field(default=2 ** 27, metadata={"help": "logits per pass; above: checkpointed chunks"})
    save_fitted: str | None = field(default=None, metadata={
        "help": "folder to keep every fitted adapter and perturbation in (save_pretrained; default: none kept)"})

    def __post_init__(self) -> None:
        from ...llm.model import DTYPES, LoRAConfig  # lazily: the llm extra is checked before it is needed

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is invalid; allowed: smollm2-135m, tiny-gpt2, or a model folder")
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
        if not isinstance(self.lora, dict):
            raise ValueError(f"lora={self.lora!r} is invalid; allowed: a table of LoRAConfig fields")
        LoRAConfig(**self.lora)
        check_int("max_rows", self.max_rows, 1)
        check_int("head_chunk_elements", self.head_chunk_elements, 1)
        if self.save_fitted is not None and (not isinstance(self.save_fitted, str) or not self.save_fitted):
            raise ValueError(f"save_fitted={self.save_fitted!r} is invalid; allowed: a folder path, or leave it out")


@dataclass
class DataConfig:
    """Corpora and (prompt, continuation) pairs (``[data]``)."""

    train: str | UserCorpus = field(default="wiki-en", metadata={
        "help": "in-domain corpus: a built-in name, or a table { path, format, text } (simstudy.llm.user_corpora)"})
    ood: dict = field(default_factory=lambda: {"de_fortunes": "fortunes-de", "de_reference": "debian-reference-de",
                                               "code": "python-stdlib"},
                      metadata={"help": "out-of-domain label -> corpus (a name or a table)"})
    prompt_len: int = field(default=32, metadata={"help": "L, prompt tokens"})
    continuation_len: int = field(default=32, metadata={"help": "c, continuation tokens"})
    n_train: int = field(default=256, metadata={"help": "training pairs"})
    train_pool: int = field(default=0, metadata={
        "help": "pairs of the train split each replicate draws its n_train from without replacement (0: the same "
                "n_train pairs in every replicate)"})
    n_eval: int = field(default=32, metadata={"help": "pairs per evaluation split"})
    n_generate: int = field(default=16, metadata={"help": "generation prompts per split (<= n_eval)"})
    split_seed: int = field(default=0, metadata={"help": "salt of the document hash"})
    fractions: tuple = field(default=(0.8, 0.1, 0.1), metadata={"help": "train, validation, test shares"})
    pack: bool = field(default=True, metadata={"help": "join documents with the end-of-text token"})
    ood_splits: tuple = field(default=("test",), metadata={"help": "splits of the out-of-domain corpora, in turn"})
    roots: dict = field(default_factory=dict, metadata={"help": "corpus -> folder"})

    def __post_init__(self) -> None:
        from ...llm.corpora import CORPORA, SPLITS

        if isinstance(self.ood, (list, tuple)):
            self.ood = {str(c).replace("-", "_"): c for c in self.ood}
        if not isinstance(self.ood, dict):
            raise ValueError(f"ood={self.ood!r} is invalid; allowed: a table label = corpus, or a list of corpora")
        from ...llm.user_corpora import corpus_source  # a built-in name, or a user's corpus table

        self.train = corpus_source(self.train, "train")
        self.ood = {label: corpus_source(v, f"ood.{label}") for label, v in self.ood.items()}
        for label in self.ood:
            if not _LABEL.match(str(label)) or label in ("id", "ood"):
                raise ValueError(f"ood label {label!r} is invalid; allowed: lower-case letters, digits and _, "
                                 "starting with a letter, not 'id' or 'ood'")
        for name, low in (("prompt_len", 1), ("continuation_len", 1), ("n_train", 1), ("n_eval", 2),
                          ("n_generate", 0), ("split_seed", 0)):
            check_int(name, getattr(self, name), low)
        check_int("train_pool", self.train_pool, 0)
        if 0 < self.train_pool < self.n_train:
            raise ValueError(f"train_pool={self.train_pool} is invalid; allowed: 0 (no resampling) or an integer >= "
                             f"n_train={self.n_train}")
        if self.n_generate == 1 or self.n_generate > self.n_eval:
            raise ValueError(f"n_generate={self.n_generate} is invalid; allowed: 0, or an integer in "
                             f"[2, n_eval={self.n_eval}]")
        self.fractions = tuple(float(f) for f in self.fractions)
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-9:
            raise ValueError(f"fractions={list(self.fractions)} is invalid; allowed: three shares >= 0 summing to 1")
        if isinstance(self.ood_splits, str) or not self.ood_splits or any(v not in SPLITS for v in self.ood_splits) \
                or len(set(self.ood_splits)) != len(self.ood_splits):
            raise ValueError(f"ood_splits={self.ood_splits!r} is invalid; allowed: a list of distinct splits among "
                             f"{', '.join(SPLITS)}")
        self.ood_splits = tuple(self.ood_splits)
        check_bool("pack", self.pack)
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
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of generation (0: greedy)"})
    top_k: int | None = field(default=None, metadata={"help": "generation keeps the k most likely tokens (None: all)"})
    top_p: float | None = field(default=None, metadata={"help": "generation keeps the nucleus of mass p (None: all)"})
    stop_at_eos: bool = field(default=False, metadata={"help": "a continuation ends at its first end-of-sequence"})
    mauve_buckets: int | str = field(default="auto", metadata={"help": "'auto' (max(2, n // 10)) or >= 2"})
    batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch"})
    seed: int = field(default=0, metadata={"help": "offset of the evaluation draws' seed"})
    headline: list | None = field(default=None, metadata={"help": "metrics printed by simstudy run"})

    def __post_init__(self) -> None:
        check_int("iwae_draws", self.iwae_draws, 1)
        check_int("num_samples", self.num_samples, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_choice("scope", self.scope, EVAL_SCOPES)
        check_bool("generation", self.generation)
        check_bool("mauve", self.mauve)
        from ...llm.generate import GenerationOptions  # its validation of the sampling keys, one line each

        GenerationOptions(max_new_tokens=1, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          stop_at_eos=self.stop_at_eos)
        if self.mauve_buckets != "auto":
            check_int("mauve_buckets", self.mauve_buckets, 2)
        if self.headline is not None and not (isinstance(self.headline, list)
                                              and all(isinstance(m, str) for m in self.headline)):
            raise ValueError(f"headline={self.headline!r} is invalid; allowed: a list of metric names")


def condition_data(data: DataConfig, cond: dict) -> DataConfig:
    """``[data]`` with a design condition's factors (:data:`DESIGN_KEYS`) applied, validated again."""
    over = {k: cond[k] for k in DESIGN_KEYS if k in cond}
    return replace(data, **over) if over else data
