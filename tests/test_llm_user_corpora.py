"""A user's own corpora (issue 14, DESIGN §8): a folder of text files, JSONL, parquet, a save_to_disk folder.

Every corpus is written to tmp_path by the test; the tokenizer is a small BPE trained on local text;
nothing is downloaded. The ``datasets`` tests run only where that package is installed.
"""
from __future__ import annotations

import json
import random
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simstudy.llm import CorpusNotFoundError, check_corpora, load_corpus, make_pairs  # noqa: E402
from simstudy.llm.corpora import Corpus, split_documents  # noqa: E402
from simstudy.llm.tiny import local_texts, train_bpe_tokenizer  # noqa: E402
from simstudy.llm.user_corpora import (PairCorpus, UserCorpus, UserCorpusError, corpus_source,  # noqa: E402
                                       load_user_corpus)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L, C = 8, 6
WORDS = ("the cat dog house tree river stone light green small quick brown jumps over under near far "
         "old new red blue water fire earth wind").split()


def sentences(n: int, seed: int = 0, words: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(local_texts(max_chars=30_000) + sentences(50), vocab_size=300)


@pytest.fixture(scope="module")
def docs():
    return sentences(120)


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs):
    """The same 120 documents as JSONL (column body, with ids), parquet, a folder of .txt files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpora")
    rows = [{"id": f"doc{i}", "body": t, "other": i} for i, t in enumerate(docs)]
    with (root / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps(row) + "\n" + ("\n" if i % 10 == 0 else ""))  # blank lines are skipped
        fh.write(json.dumps({"id": "empty", "body": "  ", "other": -1}) + "\n")  # empty texts are dropped
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("id", "body", "other")}), root / "docs.parquet")
    folder = root / "docs"
    (folder / "sub").mkdir(parents=True)
    for i, t in enumerate(docs):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    (folder / "notes.md").write_text("markdown is not read by default", encoding="utf-8")
    (folder / "blank.txt").write_text("\n", encoding="utf-8")
    return root


# ---- the formats ------------------------------------------------------------------------------------------------
def test_jsonl_parquet_and_folder_read_the_same_documents(files, docs):
    jsonl = load_corpus(UserCorpus(path=str(files / "docs.jsonl"), format="jsonl", text="body"))
    assert isinstance(jsonl, Corpus) and jsonl.texts == docs and jsonl.keys == docs  # key: the text itself
    keyed = load_corpus(UserCorpus(path=str(files / "docs.jsonl"), text="body", key="id"))  # format inferred
    assert keyed.keys == [f"doc{i}" for i in range(len(docs))] and keyed.texts == docs
    parquet = load_user_corpus({"path": str(files / "docs.parquet"), "text": "body", "key": "id"})  # a table
    assert parquet.texts == docs and parquet.keys == keyed.keys
    folder = load_corpus(UserCorpus(path=str(files / "docs")))
    assert folder.keys == sorted(folder.keys) and len(folder) == len(docs)
    assert "notes.md" not in folder.keys and "blank.txt" not in folder.keys
    assert dict(zip(folder.keys, folder.texts))["sub/doc001.txt"] == docs[1]
    assert sorted(folder.texts) == sorted(docs)
    md = load_corpus(UserCorpus(path=str(files / "docs"), glob="*.md", name="notes"))
    assert md.keys == ["notes.md"] and md.name == "notes"


def test_splits_are_deterministic_disjoint_and_independent_of_row_order(files, docs, tokenizer, tmp_path):
    spec = UserCorpus(path=str(files / "docs.jsonl"), text="body")
    corpus = load_corpus(spec)
    parts = {s: set(split_documents(corpus, s)) for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == len(docs) and not parts["train"] & parts["test"]
    lines = (files / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(1).shuffle(lines)
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shuffled = load_corpus(UserCorpus(path=str(tmp_path / "shuffled.jsonl"), text="body"))
    for split in ("train", "test"):
        a = make_pairs(corpus, tokenizer, split=split, prompt_len=L, continuation_len=C, max_pairs=12)
        b = make_pairs(load_corpus(spec), tokenizer, split=split, prompt_len=L, continuation_len=C, max_pairs=12)
        c = make_pairs(shuffled, tokenizer, split=split, prompt_len=L, continuation_len=C, max_pairs=12)
        assert a.x.shape == (12, L) and a.y.shape == (12, C)
        assert a.x.equal(b.x) and a.y.equal(b.y) and a.x.equal(c.x) and a.y.equal(c.y), split
    # the same machinery as the built-in corpora: a Corpus of the same keys and texts gives the same pairs
    same = Corpus("x", list(corpus.keys), list(corpus.texts), "memory")
    ref = make_pairs(same, tokenizer, split="train", prompt_len=L, continuation_len=C, max_pairs=12)
    assert ref.x.equal(make_pairs(corpus, tokenizer, split="train", prompt_len=L, continuation_len=C,
                                  max_pairs=12).x)
    other = make_pairs(corpus, tokenizer, split="train", prompt_len=L, continuation_len=C, max_pairs=12, seed=1)
    assert not other.x.equal(ref.x)  # the split seed salts the hash


def test_prompt_and_continuation_columns_give_ready_made_pairs(tmp_path, tokenizer):
    rows = [{"q": " ".join(["cat"] * (2 + i % 12)), "a": " dog" * (3 + i % 9)} for i in range(80)]
    rows.append({"q": "short", "a": " x"})  # a continuation shorter than C tokens is dropped
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = load_corpus(UserCorpus(path=str(path), prompt="q", continuation="a"))
    assert isinstance(corpus, PairCorpus) and len(corpus) == 81
    pairs = make_pairs(corpus, tokenizer, split="train", prompt_len=L, continuation_len=C)
    eos = tokenizer.eos_token_id
    order = [i for i in split_documents(corpus, "train")]
    kept = [i for i in order if len(tokenizer(corpus.continuations[i], add_special_tokens=False)["input_ids"]) >= C]
    assert len(pairs) == len(kept) > 20
    for row, i in enumerate(kept):
        p = tokenizer(corpus.prompts[i], add_special_tokens=False)["input_ids"]
        want = ([eos] * max(0, L - len(p)) + p)[-L:]  # left-padded with the end-of-text token, or cut on the left
        assert pairs.x[row].tolist() == want
        assert pairs.y[row].tolist() == tokenizer(corpus.continuations[i], add_special_tokens=False)["input_ids"][:C]
    assert (pairs.x[:, 0] == eos).any() and (pairs.x[:, 0] != eos).any()
    again = make_pairs(load_corpus(UserCorpus(path=str(path), prompt="q", continuation="a")), tokenizer,
                       split="train", prompt_len=L, continuation_len=C, max_pairs=5)
    assert again.x.equal(pairs.x[:5]) and again.y.equal(pairs.y[:5])


def test_a_save_to_disk_dataset_and_a_dataset_dict(tmp_path, docs):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": docs, "id": [f"doc{i}" for i in range(len(docs))]})
    ds.save_to_disk(str(tmp_path / "one"))
    one = load_corpus(UserCorpus(path=str(tmp_path / "one"), text="body", key="id"))  # format inferred
    assert one.texts == docs and one.keys[0] == "doc0"
    datasets.DatasetDict({"train": ds, "extra": ds.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    extra = load_corpus(UserCorpus(path=str(tmp_path / "dict"), format="datasets", text="body",
                                   dataset_split="extra"))
    assert extra.texts == docs[:5]
    with pytest.raises(UserCorpusError, match=r"train\.dataset_split=None is invalid .*allowed: one of train, extra"):
        load_corpus(UserCorpus(path=str(tmp_path / "dict"), format="datasets", text="body", where="train"))
    with pytest.raises(UserCorpusError, match=r"train\.text='content' is not a column .*allowed: body, id"):
        load_corpus(UserCorpus(path=str(tmp_path / "one"), text="content", where="train"))


def test_without_the_datasets_package_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    spec = UserCorpus(path=str(tmp_path / "saved"), where="ood.mine")
    assert spec.format == "datasets"
    with pytest.raises(UserCorpusError) as err:
        load_corpus(spec)
    assert str(err.value) == ("ood.mine.format='datasets' needs the datasets package; install it: "
                              "pip install datasets")


# ---- bad input: one line naming the key and what is allowed ------------------------------------------------------
@pytest.mark.parametrize("table, match", [
    ({"path": "F/docs.jsonl", "format": "csv"}, r"train\.format='csv' is unknown; allowed: folder, jsonl, parquet"),
    ({"path": "F/docs.jsonl", "colum": "body"}, r"train\.colum is an unknown key; allowed: path, format, text"),
    ({"format": "jsonl"}, r"train\.path is missing"),
    ({"path": "F/docs.jsonl", "prompt": "q"}, r"train\.prompt and train\.continuation go together"),
    ({"path": "F/docs.jsonl", "text": "body", "prompt": "q", "continuation": "a"}, r"train\.text='body' is set"),
    ({"path": "F/docs", "text": "body"}, r"allowed with format='folder': path, glob, name"),
    ({"path": "F/docs.jsonl", "dataset_split": "train"}, r"train\.dataset_split is set for format='jsonl'"),
    ({"path": "F/missing.txt"}, r"train\.path='.*missing.txt' does not exist"),
    ({"path": "F/docs.jsonl", "text": 3}, r"train\.text=3 is invalid; allowed: a non-empty string"),
])
def test_bad_tables_raise_one_line_naming_the_key(files, table, match):
    table = {k: (v.replace("F", str(files)) if k == "path" else v) for k, v in table.items()}
    with pytest.raises(UserCorpusError, match=match) as err:
        corpus_source(table, "train")
    assert "\n" not in str(err.value)


def test_bad_files_and_columns_raise_one_line_naming_the_key(files, tmp_path):
    def fails(spec, match, error=UserCorpusError):
        with pytest.raises(error, match=match) as err:
            load_corpus(spec)
        assert "\n" not in str(err.value)

    fails(UserCorpus(path=str(files / "docs.jsonl"), format="jsonl", where="train"),
          r"train\.text='text' is not a column of .*docs.jsonl; allowed: id, body, other")
    fails(UserCorpus(path=str(files / "docs.parquet"), text="body", key="name", where="train"),
          r"train\.key='name' is not a column of .*; allowed: id, body, other")
    fails(UserCorpus(path=str(tmp_path / "gone.jsonl"), format="jsonl", where="ood.x"),
          r"ood\.x\.path='.*gone.jsonl' does not exist; allowed: an existing file", CorpusNotFoundError)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    fails(UserCorpus(path=str(tmp_path / "bad.jsonl"), where="train"), r"train\.path: line 2 of .* is not JSON")
    (tmp_path / "list.jsonl").write_text('["a"]\n', encoding="utf-8")
    fails(UserCorpus(path=str(tmp_path / "list.jsonl"), where="train"), r"line 1 of .* is a list, not an object")
    (tmp_path / "num.jsonl").write_text('{"text": "a"}\n{"text": 5}\n', encoding="utf-8")
    fails(UserCorpus(path=str(tmp_path / "num.jsonl"), where="train"), r"train\.text: row 1 holds a int, not text")
    (tmp_path / "fake.parquet").write_text("not parquet", encoding="utf-8")
    fails(UserCorpus(path=str(tmp_path / "fake.parquet"), where="train"), r"train\.path: .* is not a parquet file")
    fails(UserCorpus(path=str(files / "docs"), format="jsonl", where="train"),
          r"train\.path=.* is a folder; allowed for format='jsonl': a file")
    fails(UserCorpus(path=str(files / "docs"), glob="*.csv", where="train"), r"train\.glob='\*\.csv' matches no")
    with pytest.raises(CorpusNotFoundError, match=r"ood\.x\.path=.*does not exist") as err:  # all at once
        check_corpora([UserCorpus(path=str(tmp_path / "gone.jsonl"), format="jsonl", where="ood.x"),
                       UserCorpus(path=str(files / "docs.jsonl"), where="train")])
    assert "train.text='text' is not a column" in str(err.value) and "\n" not in str(err.value)


# ---- in an llm-shift study file --------------------------------------------------------------------------------
STUDY = """
[study]
kind = "llm-shift"
replicates = 1
seed = 3

[model]
name = "tiny-gpt2"
lora = {{ r = 2, alpha = 4.0 }}

[data]
train = {{ path = "{root}/docs.jsonl", format = "jsonl", text = "body" }}
ood = {{ mine = {{ path = "{root}/docs", format = "folder" }}, code = "python-stdlib" }}
prompt_len = 8
continuation_len = 6
n_train = 8
n_eval = 4
n_generate = 0

[evaluation]
iwae_draws = 2
batch_size = 4
mauve = false
generation = false

[methods.mle]
sgd = {{ steps = 2, batch_size = 4, lr = 0.01, validation_fraction = 0.0 }}
"""


def test_a_study_file_trains_and_evaluates_on_the_users_corpora(files):
    pytest.importorskip("rouge_score")
    from simstudy.studies import spec
    import simstudy.studies.llm_shift as llm_shift

    text = textwrap.dedent(STUDY.format(root=files))
    sf = spec.parse_study_text(text)
    data = llm_shift.from_table(llm_shift.DataConfig, dict(sf.tables["data"]), "data")
    assert isinstance(data.train, UserCorpus) and data.train.text == "body"
    assert isinstance(data.ood["mine"], UserCorpus) and data.ood["code"] == "python-stdlib"
    study = spec.build_study(sf)
    table = study.run(n_jobs=1, progress=False).table
    assert list(table["status"]) == ["ok"], table["message"].tolist()
    for split in ("id", "mine", "code"):
        assert np.isfinite(table[f"ppl_{split}"]).all(), split


@pytest.mark.parametrize("old, new, match", [
    ('format = "jsonl", text = "body"', 'format = "csv", text = "body"',
     r"^data: train\.format='csv' is unknown; allowed: folder, jsonl, parquet, datasets$"),
    ('text = "body"', 'text = "content"', r"^train\.text='content' is not a column of .*; allowed: id, body, other$"),
    ('docs.jsonl', 'nothing.jsonl', r"^train\.path='.*nothing.jsonl' does not exist; allowed: an existing file$"),
    ('code = "python-stdlib"', 'code = "klingon"', r"^data: ood\.code='klingon' is unknown; allowed: a built-in"),
])
def test_a_bad_corpus_table_in_a_study_file_is_one_line(files, old, new, match):
    from simstudy.studies import spec

    text = textwrap.dedent(STUDY.format(root=files)).replace(old, new)
    with pytest.raises(spec.SpecError, match=match):
        spec.build_study(spec.parse_study_text(text))


def test_the_command_line_refuses_a_missing_column_with_one_line(files, tmp_path, capsys):
    from simstudy.cli import main

    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent(STUDY.format(root=files)).replace('text = "body"', 'text = "content"'))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.text='content' is not a column" in err[0], err


def test_editing_a_users_corpus_makes_a_different_study(files, tmp_path):
    """The study's fingerprint holds the corpus's contents: an edited file is never resumed into the old store."""
    import shutil

    from simstudy.studies import spec
    import simstudy.studies.llm_shift  # noqa: F401  (registers the kind)

    root = tmp_path / "copy"
    shutil.copytree(files, root)
    text = textwrap.dedent(STUDY.format(root=root))
    before = spec.build_study(spec.parse_study_text(text)).fingerprint
    assert spec.build_study(spec.parse_study_text(text)).fingerprint == before  # deterministic
    with (root / "docs.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "new", "body": "one more document", "other": 0}) + "\n")
    assert spec.build_study(spec.parse_study_text(text)).fingerprint != before
    folder = UserCorpus(path=str(root / "docs"))
    digest = folder.content_digest()
    (root / "docs" / "notes.md").write_text("not read: the glob is **/*.txt", encoding="utf-8")
    assert folder.content_digest() == digest  # a file the corpus does not read changes nothing
    (root / "docs" / "doc000.txt").write_text("edited", encoding="utf-8")
    assert folder.content_digest() != digest
