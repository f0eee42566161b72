"""A user's own corpora: a folder of text files, JSONL, parquet, a ``datasets`` folder (DESIGN §8).

A :class:`UserCorpus` says where the text is and how to read it; :func:`load_user_corpus`
reads it into the same :class:`~simstudy.llm.corpora.Corpus` as the built-in corpora, so the
deterministic splits and the (prompt, continuation) pairs of :mod:`simstudy.llm.corpora`
apply unchanged (:func:`~simstudy.llm.corpora.load_corpus` and ``make_pairs`` accept a
:class:`UserCorpus` and call its ``load``, and a :class:`PairCorpus`'s ``token_pairs``).

Formats (``format``; inferred from ``path`` when left out):

* ``folder``: every file under ``path`` matching ``glob`` (default ``**/*.txt``), one
  document per file, key = its path relative to the folder.
* ``jsonl``: one JSON object per line (``.jsonl``, ``.ndjson``).
* ``parquet``: a parquet file (``.parquet``, ``.pq``), read with pyarrow.
* ``datasets``: a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` with ``dataset_split`` naming the split when it has several); needs the
  ``datasets`` package (``pip install datasets``).

Rows (jsonl, parquet, datasets) are documents of the ``text`` column (default ``"text"``),
or, with ``prompt`` and ``continuation`` columns, ready-made pairs: the prompt's last
``prompt_len`` tokens, left-padded with the end-of-text token when shorter (as
:func:`~simstudy.llm.perturbed.encode_prompts`), and the continuation's first
``continuation_len`` tokens, rows with a shorter continuation dropped; prompt and continuation
are tokenised separately, and ``pack`` and ``stride`` do not apply. A row's key is its ``key``
column when given, else its own text, so the split of a row depends on neither the file order
nor the other rows (duplicates share a split). Empty texts are dropped. Relative paths are read
from the working directory.

Every problem (a missing file, an unknown format or key, a missing column, a malformed line)
is one line naming the key (``where``, e.g. ``train.text``) and what is allowed:
:class:`UserCorpusError` (a ``ValueError``), or :class:`~simstudy.llm.corpora.CorpusNotFoundError`
for a path that does not exist.

In an llm-shift study file::

    [data]
    train = { path = "my_corpus.jsonl", format = "jsonl", text = "body" }
    ood = { mine = { path = "other_docs", format = "folder" }, de_fortunes = "fortunes-de" }
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..validation import check_int
from .corpora import CORPORA, DEFAULT_FRACTIONS, Corpus, CorpusNotFoundError, TokenPairs, split_documents

__all__ = ["FORMATS", "PairCorpus", "UserCorpus", "UserCorpusError", "corpus_source", "load_user_corpus",
           "make_prompt_pairs"]

FORMATS = ("folder", "jsonl", "parquet", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
DATASETS_INSTALL = "pip install datasets"


class UserCorpusError(ValueError):
    """A user's corpus cannot be read as configured; the message is one line naming the key."""


@dataclass(frozen=True)
class UserCorpus:
    """Where a user's corpus is and how to read it (a table of a study file; see the module docstring)."""

    path: str = field(metadata={"help": "a folder of text files, a .jsonl / .parquet file, a save_to_disk folder"})
    format: str | None = field(default=None, metadata={"help": "folder, jsonl, parquet, datasets (None: inferred)"})
    text: str | None = field(default=None, metadata={"help": "column of the documents (default 'text')"})
    prompt: str | None = field(default=None, metadata={"help": "column of ready-made prompts (with continuation)"})
    continuation: str | None = field(default=None, metadata={"help": "column of their continuations"})
    key: str | None = field(default=None, metadata={"help": "column naming each row (default: its text)"})
    glob: str = field(default="**/*.txt", metadata={"help": "folder: the files read"})
    dataset_split: str | None = field(default=None, metadata={"help": "datasets: the split of a DatasetDict"})
    name: str | None = field(default=None, metadata={"help": "the corpus's name in results (default: the path)"})
    where: str = field(default="corpus", compare=False, repr=False, metadata={"help": "key named in errors"})

    def __post_init__(self) -> None:
        w = self.where
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "path" and value is None:
                continue
            if not isinstance(value, str) or not value:
                raise UserCorpusError(f"{w}.{f.name}={value!r} is invalid; allowed: a non-empty string")
        fmt = self.format if self.format is not None else _infer_format(Path(self.path).expanduser(), w)
        if fmt not in FORMATS:
            raise UserCorpusError(f"{w}.format={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
        object.__setattr__(self, "format", fmt)
        if (self.prompt is None) != (self.continuation is None):
            raise UserCorpusError(f"{w}.prompt and {w}.continuation go together; allowed: both columns, or "
                                  f"neither (a text column)")
        if self.prompt is not None and self.text is not None:
            raise UserCorpusError(f"{w}.text={self.text!r} is set with prompt/continuation; allowed: a text column "
                                  "or prompt and continuation columns, not both")
        if fmt == "folder" and any(v is not None for v in (self.text, self.prompt, self.key)):
            raise UserCorpusError(f"{w}: text, prompt, continuation and key are columns; allowed with "
                                  f"format='folder': path, glob, name (one document per file)")
        if self.dataset_split is not None and fmt != "datasets":
            raise UserCorpusError(f"{w}.dataset_split is set for format={fmt!r}; allowed: only with "
                                  "format='datasets'")

    @classmethod
    def from_table(cls, table: dict, where: str = "corpus") -> "UserCorpus":
        """A :class:`UserCorpus` from a study-file table; unknown keys and ``path`` missing are one line."""
        allowed = [f.name for f in fields(cls) if f.name != "where"]
        for k in table:
            if k not in allowed:
                raise UserCorpusError(f"{where}.{k} is an unknown key; allowed: {', '.join(allowed)}")
        if "path" not in table:
            raise UserCorpusError(f"{where}.path is missing; allowed: a table with path = \"...\" (and format, "
                                  "text or prompt/continuation, key, glob, dataset_split, name)")
        return cls(**table, where=where)

    @property
    def label(self) -> str:
        return self.name or self.path

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns read, the ``key`` column last when given."""
        cols = (self.prompt, self.continuation) if self.prompt is not None else (self.text or "text",)
        return cols + ((self.key,) if self.key is not None else ())

    def __str__(self) -> str:
        return self.label

    def load(self) -> Corpus:
        """:func:`load_user_corpus` of this corpus (what :func:`~simstudy.llm.corpora.load_corpus` calls)."""
        return load_user_corpus(self)

    def content_digest(self) -> str:
        """SHA-256 of what is read: the file, or every file of the folder (``glob`` for a ``folder``, all of
        them for a ``datasets`` folder) with its relative path, in sorted order. A study's fingerprint holds
        it, so a corpus edited between two runs is a different study, never resumed into the same store
        ("missing" when the path does not exist yet: the study's environment check reports that)."""
        path = Path(self.path).expanduser()
        if not path.exists():
            return "missing"
        digest = hashlib.sha256()
        if path.is_dir():
            pattern = self.glob if self.format == "folder" else "**/*"
            files = sorted(p for p in path.glob(pattern) if p.is_file())
        else:
            files = [path]
        for p in files:
            digest.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            digest.update(b"\0")
            with open(p, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        return digest.hexdigest()


def corpus_source(value, where: str):
    """A study file's corpus: a built-in name (str, checked against ``CORPORA``) or a :class:`UserCorpus`
    (from a table); anything else is a one-line ValueError naming ``where``."""
    if isinstance(value, UserCorpus):
        return value
    if isinstance(value, dict):
        return UserCorpus.from_table(value, where)
    if isinstance(value, str) and value in CORPORA:
        return value
    raise UserCorpusError(f"{where}={value!r} is unknown; allowed: a built-in corpus ({', '.join(CORPORA)}) or "
                          "a table { path = \"...\", format = \"folder|jsonl|parquet|datasets\", text = \"...\" }")


def _infer_format(path: Path, where: str) -> str:
    if not path.exists():
        raise UserCorpusError(f"{where}.path={str(path)!r} does not exist; allowed: an existing folder, "
                              ".jsonl or .parquet file (or give format)")
    if path.is_dir():
        marks = ("state.json", "dataset_dict.json")
        return "datasets" if any((path / m).is_file() for m in marks) else "folder"
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise UserCorpusError(f"{where}.format is missing and path={str(path)!r} does not tell it; allowed: format = "
                          f"{' | '.join(FORMATS)}, or a folder / .jsonl / .parquet path")


# ---- readers: column -> list of values ---------------------------------------------------------------------
def _check_columns(spec: UserCorpus, have, path: Path) -> None:
    have = list(have)
    for attr in ("text", "prompt", "continuation", "key"):
        col = getattr(spec, attr) or ("text" if attr == "text" and spec.prompt is None else None)
        if col is not None and col not in have:
            raise UserCorpusError(f"{spec.where}.{attr}={col!r} is not a column of {path}; allowed: "
                                  f"{', '.join(map(str, have)) or '(no columns)'}")


def _read_jsonl(spec: UserCorpus, path: Path) -> dict[str, list]:
    rows, names = [], {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserCorpusError(f"{spec.where}.path: line {i} of {path} is not JSON ({exc.msg}); allowed: "
                                      "one JSON object per line") from None
            if not isinstance(row, dict):
                raise UserCorpusError(f"{spec.where}.path: line {i} of {path} is a {type(row).__name__}, not an "
                                      "object; allowed: one JSON object per line")
            names.update(dict.fromkeys(row))
            rows.append(row)
    _check_columns(spec, names, path)
    return {c: [row.get(c) for row in rows] for c in spec.columns}


def _read_parquet(spec: UserCorpus, path: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserCorpusError(f"{spec.where}.format='parquet' needs pyarrow; install it: pip install pyarrow") \
            from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise UserCorpusError(f"{spec.where}.path: {path} is not a parquet file ({str(exc).splitlines()[0]}); "
                              "allowed: a parquet file") from None
    _check_columns(spec, schema.names, path)
    return pq.read_table(path, columns=list(spec.columns)).to_pydict()


def _read_datasets(spec: UserCorpus, path: Path) -> dict[str, list]:
    try:
        import datasets
    except ImportError:
        raise UserCorpusError(f"{spec.where}.format='datasets' needs the datasets package; install it: "
                              f"{DATASETS_INSTALL}") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UserCorpusError(f"{spec.where}.path: {path} is not a save_to_disk folder ("
                              f"{str(exc).splitlines()[0][:120]}); allowed: a folder written by save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = spec.dataset_split if spec.dataset_split is not None else (names[0] if len(names) == 1 else None)
        if split not in ds:
            raise UserCorpusError(f"{spec.where}.dataset_split={spec.dataset_split!r} is invalid for {path}; "
                                  f"allowed: one of {', '.join(names)}")
        ds = ds[split]
    elif spec.dataset_split is not None:
        raise UserCorpusError(f"{spec.where}.dataset_split={spec.dataset_split!r} is set but {path} holds one "
                              "Dataset, not a DatasetDict; allowed: leave dataset_split out")
    _check_columns(spec, ds.column_names, path)
    return {c: list(ds[c]) for c in spec.columns}


def _as_text(value, spec: UserCorpus, attr: str, row: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserCorpusError(f"{spec.where}.{attr}: row {row} holds a {type(value).__name__}, not text; "
                              "allowed: a column of strings")
    return value


@dataclass
class PairCorpus(Corpus):
    """Ready-made (prompt, continuation) rows of a user's corpus; ``texts[i]`` is their concatenation."""

    prompts: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)

    def token_pairs(self, tokenizer, **options) -> TokenPairs:
        """:func:`make_prompt_pairs` of these rows (what :func:`~simstudy.llm.corpora.make_pairs` calls)."""
        return make_prompt_pairs(self, tokenizer, **options)


def load_user_corpus(spec: UserCorpus | dict) -> Corpus:
    """Read a user's corpus (a :class:`UserCorpus` or its table): a :class:`Corpus`, or a
    :class:`PairCorpus` for prompt/continuation columns (see the module docstring)."""
    if isinstance(spec, dict):
        spec = UserCorpus.from_table(spec)
    if not isinstance(spec, UserCorpus):
        raise UserCorpusError(f"corpus={spec!r} is invalid; allowed: a UserCorpus or a table with path = ...")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise CorpusNotFoundError(f"{spec.where}.path={spec.path!r} does not exist; allowed: an existing "
                                  f"{'folder' if spec.format in ('folder', 'datasets') else 'file'}")
    if (spec.format in ("folder", "datasets")) != path.is_dir():
        raise UserCorpusError(f"{spec.where}.path={spec.path!r} is {'a folder' if path.is_dir() else 'a file'}; "
                              f"allowed for format={spec.format!r}: "
                              f"{'a folder' if spec.format in ('folder', 'datasets') else 'a file'}")
    if spec.format == "folder":
        files = sorted(p for p in path.glob(spec.glob) if p.is_file())
        keys, texts = [], []
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                keys.append(p.relative_to(path).as_posix())
                texts.append(text)
        if not texts:
            raise UserCorpusError(f"{spec.where}.glob={spec.glob!r} matches no non-empty file under {path}; "
                                  "allowed: a pattern of its text files (e.g. '**/*.md')")
        return Corpus(spec.label, keys, texts, str(path))
    read = {"jsonl": _read_jsonl, "parquet": _read_parquet, "datasets": _read_datasets}[spec.format]
    table = read(spec, path)
    n = len(next(iter(table.values()))) if table else 0
    keys, texts, prompts, continuations = [], [], [], []
    for i in range(n):
        if spec.prompt is not None:
            pr = _as_text(table[spec.prompt][i], spec, "prompt", i)
            co = _as_text(table[spec.continuation][i], spec, "continuation", i)
            if not co.strip():
                continue
            prompts.append(pr)
            continuations.append(co)
            text = pr + co
            own = pr + "\x1f" + co
        else:
            text = own = _as_text(table[spec.text or "text"][i], spec, "text", i)
            if not text.strip():
                continue
        texts.append(text)
        keys.append(str(table[spec.key][i]) if spec.key is not None else own)
    if not texts:
        raise UserCorpusError(f"{spec.where}.path={spec.path!r} holds no non-empty text in column(s) "
                              f"{', '.join(spec.columns)}; allowed: a file with text in them")
    if spec.prompt is not None:
        return PairCorpus(spec.label, keys, texts, str(path), prompts=prompts, continuations=continuations)
    return Corpus(spec.label, keys, texts, str(path))


def make_prompt_pairs(corpus: PairCorpus, tokenizer, *, split: str = "train", prompt_len: int = 32,
                      continuation_len: int = 32, max_pairs: int | None = None, fractions=DEFAULT_FRACTIONS,
                      seed: int = 0) -> TokenPairs:
    """Token pairs of the ready-made rows of ``split`` (hash order): prompts left-padded / cut to their last
    ``prompt_len`` tokens, continuations cut to ``continuation_len``, shorter continuations dropped."""
    from .perturbed import encode_prompts

    check_int("prompt_len", prompt_len, 1)
    check_int("continuation_len", continuation_len, 1)
    if max_pairs is not None:
        check_int("max_pairs", max_pairs, 1)
    order = split_documents(corpus, split, fractions=fractions, seed=seed)
    kept, ys, used = [], [], 0
    limit = max_pairs if max_pairs is not None else len(order)
    for start in range(0, len(order), 64):
        rows = order[start:start + 64]
        conts = tokenizer([corpus.continuations[i] for i in rows], add_special_tokens=False)["input_ids"]
        for i, ids in zip(rows, conts):
            if len(ys) >= limit:
                break
            used += 1
            if len(ids) >= continuation_len:
                kept.append(i)
                ys.append(ids[:continuation_len])
        if len(ys) >= limit:
            break
    if not ys:
        raise ValueError(f"corpus {corpus.name!r} split {split!r} has no continuation of {continuation_len} "
                         "tokens; allowed: a shorter continuation_len")
    x = encode_prompts([corpus.prompts[i] for i in kept], tokenizer, prompt_len)  # (N, L)
    return TokenPairs(x, torch.tensor(ys, dtype=torch.long), corpus.name, split, used)  # y: (N, c)
