"""Generation options of the LLM path (issue 14, DESIGN §8): EOS stopping, temperature, top-k, top-p.

Tiny random GPT-2 / Llama models built from configs (vocabulary 64, hidden size 32, 2 layers, seeded):
nothing is downloaded. Weights of std 0.5 spread the logits, so top-k / top-p sets are far from ties.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simstudy.llm import (GenerationOptions, LoRAConfig, build_perturbed_lm, generate,  # noqa: E402
                          sample_continuations, tiny_gpt2)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

V, L, T, EOS = 64, 6, 8, 0


def tiny_base(arch: str = "gpt2", initializer_range: float = 0.5):
    if arch == "gpt2":
        return tiny_gpt2(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, seed=0, eos_token_id=EOS,
                         initializer_range=initializer_range)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=initializer_range, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval()


def make_lm(arch: str = "gpt2", kind: str = "linear"):
    return build_perturbed_lm(tiny_base(arch), perturbation=kind, prompt_len=L, latent_dim=2,
                              lora=LoRAConfig(r=2), seed=0,
                              perturbation_options={"init_scale": 1.0} if kind == "linear" else None)


def prompts(B: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(seed))  # (B, L)


def step_logits(lm, x, out) -> torch.Tensor:
    """The logits behind every sampled token, by one full forward pass: ``(B, S, T, V)`` (datum scope)."""
    B, S, _ = out.tokens.shape
    latent = None if out.latent is None else out.latent.reshape(B * S, 1, *out.latent.shape[2:])
    with torch.no_grad():
        logp = lm.log_probs(x.repeat_interleave(S, 0), out.tokens.reshape(B * S, T), latent)  # (B*S, 1, T, V)
    return logp.view(B, S, T, V)  # log-softmax: the ranking and the softmax of the logits


# ---- greedy and top-k = 1 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_eos_stopping_equals_transformers_generate(arch):
    lm = make_lm(arch)
    x = prompts()
    plain = generate(lm, x, max_new_tokens=T, temperature=0.0, perturb=False)[:, 0]  # (B, T)
    eos = int(plain[0, 2])  # the first prompt's third greedy token: it stops there
    ours = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, temperature=0.0, perturb=False,
                                                         stop_at_eos=True, eos_token_id=eos, pad_token_id=EOS))
    theirs = lm.causal_lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=T,
                                   do_sample=False, eos_token_id=eos, pad_token_id=EOS)[:, L:]  # (B, <= T)
    width = theirs.shape[1]
    assert torch.equal(ours.tokens[:, 0, :width], theirs), arch
    assert (ours.tokens[:, 0, width:] == EOS).all()
    assert ours.lengths[0, 0] == 3 and ours.finished[0, 0]
    for scope in ("datum", "token"):  # without an EOS in sight, greedy is model.generate too
        again = generate(lm, x, max_new_tokens=T, temperature=0.0, perturb=False, scope=scope)[:, 0]
        assert torch.equal(again, plain), (arch, scope)


@pytest.mark.parametrize("scope", ["datum", "token"])
def test_sampling_with_top_k_1_is_greedy(scope):
    lm = make_lm()
    x = prompts()
    greedy = generate(lm, x, max_new_tokens=T, temperature=0.0, perturb=False, scope=scope)  # (B, 1, T)
    sampled = generate(lm, x, max_new_tokens=T, num_samples=4, top_k=1, perturb=False, scope=scope,
                       generator=torch.Generator().manual_seed(7))  # (B, 4, T)
    assert torch.equal(sampled, greedy.expand_as(sampled))
    free = generate(lm, x, max_new_tokens=T, num_samples=4, perturb=False, scope=scope,
                    generator=torch.Generator().manual_seed(7))
    assert not torch.equal(free, greedy.expand_as(free))  # power: without top_k the samples differ


def test_greedy_with_the_latent_follows_each_samples_own_perturbed_prompt():
    lm = make_lm()
    x = prompts(B=2)
    out = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, num_samples=3, temperature=0.0),
                               generator=torch.Generator().manual_seed(1))
    assert out.latent.shape == (2, 3, 2)
    assert not torch.equal(out.latent[:, 0], out.latent[:, 1])  # one latent per sample
    assert torch.equal(step_logits(lm, x, out).argmax(-1), out.tokens)  # each token: argmax given its z
    assert not torch.equal(out.tokens[:, :1].expand_as(out.tokens), out.tokens)  # power: the latents matter


# ---- temperature, top-k, top-p ---------------------------------------------------------------------------------
def test_temperature_samples_the_tempered_softmax():
    lm = make_lm(kind="none")
    x = prompts(B=1)
    S = 256
    ours = generate(lm, x, max_new_tokens=1, num_samples=S, temperature=0.5,
                    generator=torch.Generator().manual_seed(3))[0, :, 0]  # (S,)
    with torch.no_grad():
        logits = lm.causal_lm(input_ids=x).logits[:, -1].float()  # (1, V)
    theirs = torch.multinomial(torch.softmax(logits / 0.5, -1).expand(S, V), 1,
                               generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(ours, theirs)
    plain = torch.multinomial(torch.softmax(logits, -1).expand(S, V), 1,
                              generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert not torch.equal(ours, plain)  # power: temperature 1 draws other tokens


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_emits_a_token_outside_the_steps_top_k(k):
    lm = make_lm()
    x = prompts()
    options = GenerationOptions(max_new_tokens=T, num_samples=16, top_k=k)
    out = sample_continuations(lm, x, options, generator=torch.Generator().manual_seed(2))
    logp = step_logits(lm, x, out)  # (B, S, T, V)
    chosen = logp.gather(-1, out.tokens[..., None])[..., 0]  # (B, S, T)
    kth = logp.topk(k, dim=-1).values[..., -1]  # (B, S, T)
    assert (chosen >= kth - 1e-4).all(), k
    free = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, num_samples=16),
                                generator=torch.Generator().manual_seed(2))
    logp_free = step_logits(lm, x, free)
    outside = logp_free.gather(-1, free.tokens[..., None])[..., 0] < logp_free.topk(k, dim=-1).values[..., -1] - 1e-3
    assert outside.any(), k  # power: unrestricted sampling leaves the top k


@pytest.mark.parametrize("top_p", [0.3, 0.8])
def test_top_p_keeps_to_the_nucleus_and_temperature_applies_first(top_p):
    lm = make_lm()
    x = prompts()
    for temperature in (1.0, 0.7):
        options = GenerationOptions(max_new_tokens=T, num_samples=16, top_p=top_p, temperature=temperature)
        out = sample_continuations(lm, x, options, generator=torch.Generator().manual_seed(5))
        probs = torch.softmax(step_logits(lm, x, out) / temperature, -1)  # (B, S, T, V)
        chosen = probs.gather(-1, out.tokens[..., None])  # (B, S, T, 1)
        above = (probs * (probs > chosen)).sum(-1)  # mass of the more likely tokens
        assert (above < top_p + 1e-4).all(), (top_p, temperature)
    free = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, num_samples=16),
                                generator=torch.Generator().manual_seed(5))
    probs = torch.softmax(step_logits(lm, x, free), -1)
    chosen = probs.gather(-1, free.tokens[..., None])
    assert ((probs * (probs > chosen)).sum(-1) > top_p + 1e-2).any()  # power: outside the nucleus without top_p


def test_the_warpers_are_transformers_own_in_its_order():
    names = [type(w).__name__ for w in GenerationOptions(max_new_tokens=1, temperature=0.7, top_k=5,
                                                         top_p=0.9).warpers()]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert len(GenerationOptions(max_new_tokens=1).warpers()) == 0  # ancestral sampling: the model's own
    assert len(GenerationOptions(max_new_tokens=1, temperature=0.0, top_k=3).warpers()) == 0  # greedy


# ---- EOS ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["datum", "token"])
def test_eos_stops_each_sequence_pads_after_it_and_reports_its_length(scope):
    lm = make_lm()
    x = prompts(B=4)
    S, seed = 8, 11
    free = generate(lm, x, max_new_tokens=T, num_samples=S, scope=scope,
                    generator=torch.Generator().manual_seed(seed))  # (B, S, T)
    counts = torch.bincount(free[..., :T // 2].reshape(-1), minlength=V)
    eos = tuple(int(v) for v in counts.topk(3).indices)  # frequent early tokens: many sequences stop
    out = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, num_samples=S, scope=scope,
                                                        stop_at_eos=True, eos_token_id=eos, pad_token_id=63),
                               generator=torch.Generator().manual_seed(seed))
    assert out.tokens.shape == (4, S, T) and out.finished.any() and not out.finished.all()
    for b in range(4):
        for s in range(S):
            row = free[b, s].tolist()
            stop = next((j for j, v in enumerate(row) if v in eos), None)
            n = T if stop is None else stop + 1
            assert out.lengths[b, s] == n and bool(out.finished[b, s]) == (stop is not None)
            assert out.tokens[b, s, :n].tolist() == row[:n]  # the same draws up to and including the EOS
            assert (out.tokens[b, s, n:] == 63).all()  # then the pad


def test_the_models_own_eos_and_pad_are_the_defaults():
    lm = make_lm()
    x = prompts()
    plain = generate(lm, x, max_new_tokens=T, temperature=0.0, perturb=False)[:, 0]  # (B, T)
    eos = int(plain[0, 2])
    assert eos != EOS and lm.causal_lm.config.pad_token_id == EOS
    lm.causal_lm.config.eos_token_id = eos
    lm.causal_lm.generation_config.eos_token_id = [eos]
    out = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, stop_at_eos=True, temperature=0.0,
                                                        perturb=False))
    assert out.lengths[0, 0] == 3 and out.tokens[0, 0, :3].tolist() == plain[0, :3].tolist()
    assert (out.tokens[0, 0, 3:] == EOS).all()  # the config's pad id fills the rest


def test_generation_ends_once_every_sequence_has_stopped():
    lm = make_lm()
    x = prompts(B=1)
    first = int(generate(lm, x, max_new_tokens=1, temperature=0.0, perturb=False)[0, 0, 0])
    calls = []
    original = lm.next_token_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    lm.next_token_logits = counting
    out = sample_continuations(lm, x, GenerationOptions(max_new_tokens=T, temperature=0.0, perturb=False,
                                                        stop_at_eos=True, eos_token_id=first, pad_token_id=EOS))
    assert len(calls) == 1 and out.lengths.tolist() == [[1]] and out.tokens[0, 0, 1:].eq(EOS).all()


# ---- bad input: one line naming the key --------------------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_k": 0}, "top_k=0"),
    ({"temperature": -1.0}, "temperature=-1.0"), ({"scope": "word"}, "scope='word'"),
    ({"eos_token_id": 3}, "stop_at_eos=False"), ({"stop_at_eos": True, "eos_token_id": [-1]}, "eos_token_id"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"), ({"num_samples": 0}, "num_samples=0"),
])
def test_bad_options_raise_one_line(settings, match):
    with pytest.raises(ValueError, match=match) as err:
        GenerationOptions(**{"max_new_tokens": 2, **settings})
    assert "\n" not in str(err.value)


def test_stop_at_eos_on_a_model_without_eos_names_the_option():
    lm = make_lm()
    lm.causal_lm.config.eos_token_id = None
    lm.causal_lm.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id=ID"):
        sample_continuations(lm, prompts(), GenerationOptions(max_new_tokens=2, stop_at_eos=True))


# ---- EOS stopping in the generation metrics and in a study file ------------------------------------------------
def test_features_of_a_stopped_continuation_pool_only_its_tokens():
    """MAUVE features with ``lengths``: each row pooled over its first tokens, equal to the features of the
    continuation cut there (the base model is causal, so later tokens change nothing before them)."""
    lm = make_lm()
    x, y = prompts(3), torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(5))  # (3, L), (3, T)
    lengths = torch.tensor([2, T, 5])
    with torch.no_grad():
        pooled = lm.base_features(x, y, lengths=lengths)  # (3, d)
        for i, k in enumerate(lengths.tolist()):
            cut = lm.base_features(x[i:i + 1], y[i:i + 1, :k])  # (1, d)
            torch.testing.assert_close(pooled[i:i + 1], cut, rtol=1e-5, atol=1e-6)
        assert torch.equal(lm.base_features(x, y, lengths=torch.full((3,), T)), lm.base_features(x, y))


def test_generation_metrics_cut_each_continuation_at_its_eos():
    from simstudy.llm.metrics import generation_metrics

    class Tok:  # token ids as words; the EOS id decodes to nothing (a special token)
        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(f"w{t}" for t in r if not (skip_special_tokens and t == EOS)) for r in rows]

    lm = make_lm()
    x, y = prompts(4), torch.randint(1, V, (4, T), generator=torch.Generator().manual_seed(7))
    kwargs = dict(temperature=1.0, with_mauve=False, batch_size=2)
    stopped = generation_metrics(lm, x, y, Tok(), stop_at_eos=True, generator=torch.Generator().manual_seed(3),
                                 **kwargs)
    out = sample_continuations(lm, x[:2], GenerationOptions(max_new_tokens=T, stop_at_eos=True),
                               generator=torch.Generator().manual_seed(3))
    first = [" ".join(f"w{t}" for t in row[:int(n)] if t != EOS)
             for row, n in zip(out.tokens[:, 0].tolist(), out.lengths[:, 0].tolist())]
    assert stopped.generated[:2] == first  # the same draws, each text ends at its EOS
    assert any(n < T for n in out.lengths[:, 0].tolist())  # at least one sequence stopped early here


@pytest.mark.parametrize("key, value, allowed", [("top_k", "0", "top_k=0"), ("top_p", "1.5", "top_p=1.5"),
                                                 ("temperature", "-1.0", "temperature=-1.0"),
                                                 ("stop_at_eos", '"yes"', "stop_at_eos='yes'")])
def test_generation_keys_of_a_study_file_are_checked_in_one_line(key, value, allowed):
    pytest.importorskip("rouge_score")
    from simstudy.studies import spec
    import simstudy.studies.llm_shift as llm_shift

    good = llm_shift.EvalConfig(temperature=0.7, top_k=20, top_p=0.9, stop_at_eos=True)
    assert (good.temperature, good.top_k, good.top_p, good.stop_at_eos) == (0.7, 20, 0.9, True)
    text = ('[study]\nkind = "llm-shift"\nreplicates = 1\nseed = 0\n[model]\nname = "tiny-gpt2"\n'
            f'[data]\ntrain = "python-stdlib"\nood = {{}}\n[evaluation]\n{key} = {value}\n[methods.mle]\n')
    with pytest.raises(spec.SpecError) as err:
        spec.build_study(spec.parse_study_text(text))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"evaluation: {allowed} is invalid")
