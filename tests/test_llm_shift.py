"""The llm-shift study kind (issue 5, DESIGN §8): a tiny GPT-2 through the study engine, offline.

The tiny model is ``model = "tiny-gpt2"`` (a random GPT-2 and a BPE tokenizer trained on standard-library
text); the in-domain corpus is the Python standard library (always present) and the "German" out-of-domain
corpus is a fortunes folder written to tmp_path (the loader's ``roots``).
"""
from __future__ import annotations

import math
import random
import textwrap

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("rouge_score")
pytest.importorskip("mauve")

import simstudy.studies.llm_shift as llm_shift  # noqa: E402  (registers the kind)
from simstudy.cli import main  # noqa: E402
from simstudy.engine import StudyResult  # noqa: E402
from simstudy.studies import spec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STUDY = """
[study]
kind = "llm-shift"
replicates = 1
seed = 11

[model]
name = "tiny-gpt2"
lora = {{ r = 4, alpha = 8.0 }}

[data]
train = "python-stdlib"
ood = {{ de = "fortunes-de" }}
roots = {{ fortunes-de = "{fortunes}" }}
prompt_len = 8
continuation_len = 6
n_train = 16
n_eval = 8
n_generate = 4

[evaluation]
iwae_draws = 3
batch_size = 4
mauve_buckets = 2

[defaults]
latent_dim = 2
sgd = {{ steps = 3, batch_size = 4, lr = 0.01, validation_fraction = 0.0 }}

[methods.mle]
[methods.q2]
"""


@pytest.fixture(scope="module")
def fortunes(tmp_path_factory):
    """A German fortunes folder: 60 fortunes of two generated sentences each."""
    rng = random.Random(0)
    words = (["Der Hund", "Die Katze", "Ein Mann", "Eine Frau", "Das Kind", "Die Ärztin", "Ein Bäcker"],
             ["isst", "sieht", "kauft", "findet", "liebt", "vergisst", "schreibt"],
             ["einen Apfel", "das Buch", "die Straße", "ein großes Haus", "den Brief", "die Blumen"],
             ["am Morgen.", "im Garten.", "mit großer Freude.", "trotz des Regens.", "über die Brücke."])
    folder = tmp_path_factory.mktemp("fortunes")
    chunks = [" ".join(rng.choice(w) for w in words * 2) for _ in range(60)]
    (folder / "sprueche").write_text("\n%\n".join(chunks) + "\n%\n", encoding="utf-8")
    return folder


def _text(fortunes, **replace):
    text = textwrap.dedent(STUDY.format(fortunes=fortunes))
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def _build(text):
    return spec.build_study(spec.parse_study_text(text))


@pytest.fixture(scope="module")
def result(fortunes):
    """One replicate of mle and q2 through the engine (in process)."""
    study = _build(_text(fortunes))
    return study, study.run(n_jobs=1, progress=False)


def test_one_replicate_of_two_methods_gives_every_metric(result):
    study, res = result
    table = res.table
    assert list(table["method"]) == ["mle", "q2"] and list(table["status"]) == ["ok", "ok"], table["message"].tolist()
    for split in ("id", "de"):
        for metric in ("ppl", "nll", "rouge1", "mauve"):
            assert np.isfinite(table[f"{metric}_{split}"]).all(), (metric, split)
        # perplexity is exp of the NLL per token; a random tiny model is near-uniform over its ~512 tokens
        assert np.allclose(table[f"ppl_{split}"], np.exp(table[f"nll_{split}"]))
        assert (table[f"ppl_{split}"] > 100).all() and (table[f"ppl_{split}"] < 2000).all()
        assert ((table[f"rouge1_{split}"] >= 0) & (table[f"rouge1_{split}"] <= 1)).all()
        assert ((table[f"mauve_{split}"] > 0) & (table[f"mauve_{split}"] <= 1)).all()
    assert np.allclose(table["ppl_ood"], table["ppl_de"]) and np.allclose(table["mauve_ood"], table["mauve_de"])
    mle, q2 = table.iloc[0], table.iloc[1]
    # mle has no latent at evaluation: exact perplexity (K = 1); q2's is the per-token IWAE bound with K = 3
    assert mle["iwae_draws"] == 1 and mle["iwae_token_scope"] == 0
    assert q2["iwae_draws"] == 3 and q2["iwae_token_scope"] == 1
    assert (table["fit_steps"] == 3).all()
    assert q2["n_trainable"] > mle["n_trainable"]  # LoRA + the perturbation's A (L d q = 8 * 32 * 2)
    assert q2["n_trainable"] - mle["n_trainable"] == 8 * 32 * 2
    assert math.isnan(mle["perturbation_rms"]) and q2["perturbation_rms"] > 0
    assert set(res.options["headline"]) >= {"ppl_id", "ppl_de", "ppl_ood", "rouge1_id", "mauve_ood"}


def test_a_replicate_reruns_identically_and_methods_differ(result):
    study, res = result
    again = study.run_replicate(0, 0)
    cols = [c for c in res.table.columns if c not in ("message",)]
    assert res.table[cols].reset_index(drop=True).equals(again[cols].reset_index(drop=True))
    assert res.table.loc[0, "nll_id"] != res.table.loc[1, "nll_id"]


def test_the_figure_hook_draws_perplexity_rouge_mauve_and_no_paired_difference_from_one_replicate(result, tmp_path):
    _, res = result
    out = llm_shift.shift_figures(res, tmp_path)
    names = sorted(p.name for _, p in out)
    # one replicate: a paired difference has no interval, so the figure of paired differences is not drawn
    assert names == ["llm_shift_mauve.png", "llm_shift_perplexity.png", "llm_shift_rouge1.png"]
    assert all(p.stat().st_size > 5000 for _, p in out)
    assert "simstudy.studies.llm_shift:shift_figures" in res.options["figures"]


def test_the_paired_figure_draws_the_reports_intervals_with_each_methods_own_replicates():
    """The bars of llm_shift_nll_vs_mle.png are the report's paired t intervals: a method with fewer finished
    replicates gets its own t_{n-1} quantile (an earlier figure used the largest n for every method)."""
    import pandas as pd

    from simstudy.engine.paired import paired_differences

    rng = np.random.default_rng(3)
    rows = [{"condition": 0, "replicate": r, "method": m, "status": "ok", "nll_de": 4.6 + rng.normal(0, 0.02)}
            for r in range(6) for m in ("mle", "neftune", "is-K") if not (m == "is-K" and r == 5)]
    table = pd.DataFrame(rows)
    fig = llm_shift.paired_panels(table, ["nll_de"], ["de"], reference="mle", ylabel="nats", title="t")
    drawn = {}
    for container in fig.axes[0].containers:  # one ErrorbarContainer a method: (marker, caps, (bar,))
        (start, end), = container.lines[2][0].get_segments()
        drawn[round(float(start[0]))] = sorted([float(start[1]), float(end[1])])
    want = paired_differences(table, metric="nll_de", pairs=[("neftune", "mle"), ("is-K", "mle")], by="condition")
    assert list(want["pairs"]) == [6, 5]
    for pos, (_, row) in enumerate(want.iterrows()):
        assert drawn[pos] == pytest.approx([row["ci_low"], row["ci_high"]], abs=1e-12)
    assert "5-6 replicates" in fig.texts[0].get_text()
    one = table[~((table["method"] == "is-K") & (table["replicate"] > 0))]  # is-K: one pair, no interval
    fig = llm_shift.paired_panels(one, ["nll_de"], ["de"], reference="mle", ylabel="nats", title="t")
    assert len(fig.axes[0].containers) == 1 and "6 replicates" in fig.texts[0].get_text()  # NEFTune only
    two = pd.concat([table, table.assign(condition=1)])
    fig = llm_shift.paired_panels(two, ["nll_de"], ["de"], reference="mle", ylabel="nats", title="t")
    assert len(fig.axes[0].containers) == 4
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["condition 0", "condition 1"]
    assert llm_shift.paired_panels(table[table["replicate"] == 0], ["nll_de"], ["de"], reference="mle",
                                   ylabel="nats", title="t") is None  # one pair: no interval to draw


def test_checkpoint_sensitivity_is_least_squares_on_the_kept_steps_gap():
    """d_r = a + b (step gap) + noise: the intercept and slope are numpy's least squares, their intervals
    cover the truth here, and the equal-checkpoint subgroup is its own mean."""
    import pandas as pd

    rng = np.random.default_rng(11)
    gaps = np.array([0, 0, 50, -50, 0, 100, 0, 50, -50, 0])
    d = -0.01 + 0.0007 * gaps + rng.normal(0, 0.002, gaps.size)
    rows = []
    for r, (g, dr) in enumerate(zip(gaps, d)):
        base = 4.6 + rng.normal(0, 0.02)
        rows += [{"replicate": r, "method": "mle", "status": "ok", "nll_de": base, "fit_best_step": 100},
                 {"replicate": r, "method": "is-K", "status": "ok", "nll_de": base + dr, "fit_best_step": 100 + g}]
    out = llm_shift.checkpoint_sensitivity(pd.DataFrame(rows), method="is-K", reference="mle", metric="nll_de")
    (a, b), *_ = np.linalg.lstsq(np.column_stack([np.ones(gaps.size), gaps]), d, rcond=None)
    assert out["intercept"] == pytest.approx(a, abs=1e-12) and out["slope"] == pytest.approx(b, abs=1e-12)
    assert out["intercept_low"] < -0.01 < out["intercept_high"] and out["slope_low"] < 0.0007 < out["slope_high"]
    assert out["pairs"] == 10 and out["same"] == 5
    assert out["same_difference"] == pytest.approx(d[gaps == 0].mean(), abs=1e-12)
    flat = pd.DataFrame(rows).assign(fit_best_step=100)  # no gap varies: no slope to fit
    assert math.isnan(llm_shift.checkpoint_sensitivity(flat, method="is-K", reference="mle", metric="nll_de")["slope"])
    two = pd.concat([pd.DataFrame(rows).assign(condition=1, nll_de=9.0), pd.DataFrame(rows).assign(condition=0)])
    assert llm_shift.checkpoint_sensitivity(two, method="is-K", reference="mle", metric="nll_de")["slope"] == \
        pytest.approx(b, abs=1e-12)  # one condition's rows, not the first row of any condition
    with pytest.raises(ValueError, match="method='q2'"):
        llm_shift.checkpoint_sensitivity(flat, method="q2", reference="mle", metric="nll_de")


def test_the_study_runs_from_the_command_line_and_resumes(fortunes, tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(_text(fortunes, **{"[methods.q2]\n": ""}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ppl_ood" in printed and (out / "figures" / "llm_shift_perplexity.png").is_file()
    first = StudyResult.load(out).table
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0  # resume: nothing left to run
    assert StudyResult.load(out).table.drop(columns=["message"]).equals(first.drop(columns=["message"]))


def test_a_missing_corpus_stops_the_study_before_any_work(fortunes, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    text = _text(fortunes).replace(str(fortunes), str(empty))
    with pytest.raises(spec.SpecError) as err:
        _build(text)
    message = str(err.value)
    assert "\n" not in message and "fortunes-de" in message and "sudo apt-get install fortunes-de" in message
    path = tmp_path / "missing.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert len(err_line.splitlines()) == 1 and "apt-get install fortunes-de" in err_line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,needle", [
    (("[model]", "[model]\nsize = 3"), "model.size"),
    (("name = \"tiny-gpt2\"", "name = \"tiny-gpt2\"\ndevice = \"tpu\""), "device='tpu'"),
    (("n_generate = 4", "n_generate = 40"), "n_generate=40"),
    (("ood = { de = \"fortunes-de\" }", "ood = { id = \"fortunes-de\" }"), "'id'"),
    (("ood = { de = \"fortunes-de\" }", "ood = { de = \"klingon\" }"), "klingon"),
    (("[methods.q2]", "[methods.q2]\nequation_options = { scope = \"datum\" }"), "q2"),
    (("[methods.q2]", "[methods.q2]\nequation_options = { num_draws = 1 }"), "num_draws"),
    (("[methods.q2]", "[methods.nope]"), "nope"),
    (("[methods.q2]", "[methods.ps-mh]\nequation_options = { scope = \"token\" }"), "scope"),
    (("[methods.q2]", "[methods.gaussian]\nperturbation = \"linear\""), "gaussian"),
    (("[methods.q2]", "[design]\nlr = [1]\n[methods.q2]"), "design.lr"),
    (("iwae_draws = 3", "iwae_draws = 0"), "iwae_draws=0"),
    (("n_eval = 8", "n_eval = 500"), "n_eval=500"),
    (("prompt_len = 8", "prompt_len = 8\nood_splits = [\"dev\"]"), "ood_splits"),
])
def test_malformed_files_give_one_line(fortunes, change, needle):
    with pytest.raises(spec.SpecError) as err:
        _build(_text(fortunes).replace(*change))
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_methods_default_to_their_latent_scope_and_the_preset_files_parse():
    q2 = llm_shift.method_from_table("q2", {}, {"latent_dim": 2})
    psmh = llm_shift.method_from_table("ps-mh", {"equation_options": {"steps": 2}}, {})
    is8 = llm_shift.method_from_table("is-8", {}, {})
    gauss = llm_shift.method_from_table("gaussian", {}, {"perturbation_options": {"init_scale": 0.1}})
    assert (q2.scope, q2.perturbation, q2.latent_dim) == ("token", "linear", 2)
    assert (psmh.scope, psmh.equation_options["steps"]) == ("datum", 2)
    assert (is8.equation, is8.equation_options["num_draws"], is8.scope) == ("is-K", 8, "token")
    assert (gauss.equation, gauss.perturbation, gauss.perturbation_options) == ("aug", "gaussian", {})
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    expected = {"llm_shift.toml": ({"mle", "aug", "is-K"}, {"none", "neftune", "linear"}),  # CPU: 4 methods
                "llm_shift_gpu.toml": ({"mle", "aug", "q2", "is-K", "ps-mh"},
                                       {"none", "neftune", "gaussian", "discrete", "linear"})}
    for name, (equations, perturbations) in expected.items():
        sf = spec.parse_study_text((root / name).read_text(), root / name)
        assert sf.kind == "llm-shift"
        methods = {n: llm_shift.method_from_table(n, t, sf.tables.get("defaults", {})) for n, t in sf.tables["methods"].items()}
        assert {m.equation for m in methods.values()} == equations
        assert {m.perturbation for m in methods.values()} == perturbations


def test_out_of_domain_pairs_can_continue_into_other_splits(fortunes):
    data = llm_shift.DataConfig(train="python-stdlib", ood={"de": "fortunes-de"},
                                roots={"fortunes-de": str(fortunes)}, prompt_len=8, continuation_len=6, n_train=4,
                                n_eval=4, n_generate=0)
    model = llm_shift.ModelConfig(name="tiny-gpt2")
    with pytest.raises(ValueError, match=r"n_eval=400 is invalid: corpus 'fortunes-de' \(test\) holds only") as err:
        llm_shift.token_pairs(data, model, "fortunes-de", ("test",), 400, what="n_eval")
    have = int(err.value.args[0].split("holds only ")[1].split()[0])
    assert have >= 2
    x_test, y_test = llm_shift.token_pairs(data, model, "fortunes-de", ("test",), have)
    x_all, y_all = llm_shift.token_pairs(data, model, "fortunes-de", ("test", "validation", "train"), have + 20)
    assert x_all.shape == (have + 20, 8) and y_all.shape == (have + 20, 6)
    assert (x_all[:have] == x_test).all() and (y_all[:have] == y_test).all()  # the test split first, then the rest


def test_a_training_pool_gives_each_replicate_its_own_pairs(fortunes):
    """``[data] train_pool``: each replicate draws n_train of the pool's pairs (issue 14); 0 keeps them fixed."""
    import torch

    from simstudy.studies.llm_shift.analysis import make_generate

    model = llm_shift.ModelConfig(name="tiny-gpt2")
    kwargs = dict(train="python-stdlib", ood={"de": "fortunes-de"}, roots={"fortunes-de": str(fortunes)},
                  prompt_len=8, continuation_len=6, n_train=6, n_eval=4, n_generate=0)
    evaluation = llm_shift.EvalConfig()
    pooled = make_generate(model, llm_shift.DataConfig(train_pool=40, **kwargs), evaluation)
    fixed = make_generate(model, llm_shift.DataConfig(**kwargs), evaluation)
    pool_x, pool_y = llm_shift.token_pairs(llm_shift.DataConfig(**kwargs), model, "python-stdlib", ("train",), 40)
    pool = {tuple(r) for r in torch.cat([pool_x, pool_y], 1).tolist()}
    draws = [pooled({}, np.random.default_rng(s)) for s in (1, 2)]
    rows = [{tuple(r) for r in torch.cat([d.x, d.y], 1).tolist()} for d in draws]
    assert all(len(r) == 6 and r <= pool for r in rows)  # n_train distinct pairs of the pool
    assert rows[0] != rows[1]  # the replicates differ in their data
    same = [fixed({}, np.random.default_rng(s)) for s in (1, 2)]
    assert torch.equal(same[0].x, same[1].x) and torch.equal(same[0].x, pool_x[:6])  # no pool: the first n_train
    assert draws[0].seed == same[0].seed  # the seed is drawn first, as before
    with pytest.raises(ValueError, match=r"^train_pool=3 is invalid; allowed: 0 \(no resampling\) or an integer >= "):
        llm_shift.DataConfig(train_pool=3, **kwargs)


def test_a_stored_run_keeps_per_pair_nlls_and_gives_the_evaluation_sets_own_error(fortunes, tmp_path):
    """Each method keeps its per-pair NLL per token of every split (artifacts); their mean is the row's nll and
    evaluation_error gives the paired difference's standard error over the evaluation pairs (issue 14)."""
    from simstudy.engine.artifacts import artifact_path

    study = _build(_text(fortunes))
    res = study.run(n_jobs=1, progress=False, store=tmp_path / "s")
    for method in ("mle", "q2"):
        row = res.table[res.table["method"] == method].iloc[0]
        for split in ("id", "de"):
            values = np.load(artifact_path(tmp_path / "s" / "artifacts", 0, 0, method) / f"nll_{split}.npy")
            assert values.shape == (8,) and math.isclose(values.mean(), row[f"nll_{split}"], rel_tol=1e-9)
            assert math.isclose(values.std(ddof=1) / math.sqrt(8), row[f"nll_{split}_se"], rel_tol=1e-9)
    err = llm_shift.evaluation_error(tmp_path / "s", method="q2", reference="mle", split="de")
    t = res.table.set_index("method")
    assert list(err["replicate"]) == [0] and err["pairs"].iloc[0] == 8
    assert math.isclose(err["difference"].iloc[0], t.loc["q2", "nll_de"] - t.loc["mle", "nll_de"], rel_tol=1e-9)
    assert 0 < err["se"].iloc[0] < math.inf
    with pytest.raises(ValueError, match="method='ps-mh' is not a method of the study"):
        llm_shift.evaluation_error(tmp_path / "s", method="ps-mh", reference="mle", split="de")
