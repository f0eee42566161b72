"""The LLM path on several architectures, saving and reloading, peft conventions (issue 14, DESIGN §8).

Every model is a tiny random one built from a transformers config class (hidden size 32, 2 layers,
vocabulary 96, seeded): nothing is downloaded.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simstudy.llm import LoRAConfig, PerturbedCausalLM, build_perturbed_lm, generate  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
V, L, C = 96, 6, 5
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0,
              eos_token_id=0, pad_token_id=0)
#: config class, model class, settings: each architecture with what its CausalLM.forward does after the head
#: set away from 1 (Granite divides by logits_scaling, Cohere multiplies by logit_scale, Gemma2 soft-caps)
ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                   initializer_range=0.3, bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(COMMON, logits_scaling=8.0, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.3)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(COMMON, logit_scale=0.0625)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=8, final_logit_softcapping=1.5,
                                                         attn_logit_softcapping=20.0, query_pre_attn_scalar=8)),
}


def tiny_model(arch: str, seed: int = 0):
    """A tiny random CausalLM of ``arch`` (frozen, eval mode); skipped when transformers lacks the class."""
    import transformers

    config_name, model_name, settings = ARCHITECTURES[arch]
    if not hasattr(transformers, config_name):
        pytest.skip(f"{config_name} is not in the installed transformers {transformers.__version__}")
    config = getattr(transformers, config_name)(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def randomise_adapters(lm, seed: int = 1) -> None:
    """Non-trivial LoRA B matrices (peft starts them at 0), so the checks cover the adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def data(B: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, L), generator=gen), torch.randint(1, V, (B, C), generator=gen)


# ---- any AutoModelForCausalLM, computed right ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_unperturbed_log_likelihood_is_the_models_own_loss(arch):
    lm = build_perturbed_lm(tiny_model(arch), perturbation="none", prompt_len=L, lora=LoRAConfig(r=2), seed=0)
    randomise_adapters(lm)
    x, y = data()
    ids = torch.cat([x, y], 1)  # (B, L + c)
    labels = torch.cat([torch.full_like(x, -100), y], 1)  # the model shifts labels itself; -100: not scored
    with torch.no_grad():
        ll = lm.log_lik(x, y, None)[:, 0]  # (B,) sum over the c continuation tokens
        loss = lm.causal_lm(input_ids=ids, labels=labels).loss  # mean NLL over the B * c scored tokens
        assert torch.allclose(-ll.sum() / ll.new_tensor(y.numel()), loss.float(), atol=1e-5, rtol=1e-5), arch
        for b in range(x.shape[0]):  # per datum too
            own = lm.causal_lm(input_ids=ids[b:b + 1], labels=labels[b:b + 1]).loss
            assert torch.allclose(-ll[b] / C, own.float(), atol=1e-5, rtol=1e-5), (arch, b)
        # log_probs are the log-softmax of the model's own logits at the c predicting positions
        logp = lm.log_probs(x, y, None)[:, 0]  # (B, c, V)
        own_logits = lm.causal_lm(input_ids=ids[:, :-1]).logits[:, L - 1:].float()
        assert torch.allclose(logp, torch.log_softmax(own_logits, -1), atol=1e-5), arch
        # the checkpointed chunks of data rows compute the same likelihoods
        lm.head_chunk_elements = C * V
        assert torch.allclose(lm.log_lik(x, y, None)[:, 0], ll, atol=1e-5), arch


@pytest.mark.parametrize("arch", ["granite", "cohere", "gemma2"])
def test_sampling_draws_from_the_models_own_next_token_distribution(arch):
    lm = build_perturbed_lm(tiny_model(arch), perturbation="none", prompt_len=L, lora=LoRAConfig(r=0))
    x, _ = data(B=1)
    S = 64
    ours = generate(lm, x, max_new_tokens=1, num_samples=S, generator=torch.Generator().manual_seed(3))[0, :, 0]
    with torch.no_grad():
        probs = torch.softmax(lm.causal_lm(input_ids=x).logits[:, -1].float(), -1).expand(S, V)
    theirs = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert torch.equal(ours, theirs), arch


def test_a_model_without_inputs_embeds_is_refused_with_one_line():
    from simstudy.llm import make_llm_perturbation

    base = tiny_model("llama")

    class IdsOnly(torch.nn.Module):  # a causal LM whose forward takes token ids only
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.base_model_prefix = inner, inner.config, "inner"

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids=None, labels=None):
            return self.inner(input_ids=input_ids, labels=labels)

    pert = make_llm_perturbation("linear", base, prompt_len=L, latent_dim=2)
    with pytest.raises(ValueError, match="inputs_embeds") as err:
        PerturbedCausalLM(base=IdsOnly(base), perturbation=pert)
    assert "\n" not in str(err.value)


# ---- save, reload, share ------------------------------------------------------------------------------------------
#: (label, architecture, perturbation, LoRA rank, options)
SAVED = [("linear", "gpt2", "linear", 4, {}), ("mlpc", "granite", "mlp-conditional", 2, {"hidden": 5}),
         ("gauss", "llama", "gaussian", 2, {}), ("discrete", "gpt2", "discrete", 0, {"num_neighbours": 4})]


def _saved_model(arch, kind, r, options, seed=0):
    lm = build_perturbed_lm(tiny_model(arch), perturbation=kind, prompt_len=L, latent_dim=3, lora=LoRAConfig(r=r),
                            seed=seed, perturbation_options=options or None)
    randomise_adapters(lm)
    with torch.no_grad():  # a "trained" perturbation: weights away from their initialisation
        for p in lm.perturbation.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return lm


RELOAD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_llm_models import tiny_model
from simstudy.llm import PerturbedCausalLM
inputs = torch.load({inputs!r})
out = {{}}
for label, arch in {archs!r}:
    lm = PerturbedCausalLM.from_pretrained(tiny_model(arch), {root!r} + "/" + label)
    x, y, z = inputs[label]
    with torch.no_grad():
        out[label] = (lm.token_log_lik(x, y, z), lm.log_probs(x, y, z))
torch.save(out, {result!r})
"""


def test_save_and_reload_in_a_fresh_process_gives_bitwise_the_same_log_likelihoods(tmp_path):
    expected, inputs = {}, {}
    for label, arch, kind, r, options in SAVED:
        lm = _saved_model(arch, kind, r, options)
        x, y = data()
        z = lm.sample_latent(x, 4, torch.Generator().manual_seed(5))
        with torch.no_grad():
            expected[label] = (lm.token_log_lik(x, y, z), lm.log_probs(x, y, z))
        inputs[label] = (x, y, z)
        folder = lm.save_pretrained(tmp_path / label)
        settings = json.loads((folder / "perturbation_config.json").read_text())
        assert settings["perturbation"]["kind"] == kind and settings["perturbation"]["prompt_len"] == L
        assert settings["perturbation"]["latent_dim"] == (None if kind in ("gaussian", "discrete") else 3)
        assert (folder / "perturbation.safetensors").is_file()
        if r:  # the adapter in peft's own format, with peft's task type
            adapter = json.loads((folder / "adapter_config.json").read_text())
            assert adapter["task_type"] == "CAUSAL_LM" and adapter["r"] == r
        else:
            assert not (folder / "adapter_config.json").exists()
    torch.save(inputs, tmp_path / "inputs.pt")
    script = RELOAD.format(tests=str(ROOT / "tests"), inputs=str(tmp_path / "inputs.pt"), root=str(tmp_path),
                           archs=[(s[0], s[1]) for s in SAVED], result=str(tmp_path / "out.pt"))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for label, *_ in SAVED:
        for mine, theirs in zip(expected[label], got[label]):
            assert torch.equal(mine, theirs), label  # bitwise


def test_from_pretrained_accepts_the_peft_model_of_the_saved_adapter_and_refuses_others(tmp_path):
    from peft import PeftModel, PeftModelForCausalLM

    lm = _saved_model("llama", "linear", 2, {})
    folder = lm.save_pretrained(tmp_path / "m")
    x, y = data()
    z = lm.sample_latent(x, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = lm.token_log_lik(x, y, z)
    # peft alone loads the adapter (a PeftModelForCausalLM: task_type CAUSAL_LM), and simstudy accepts it
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(folder))
    assert isinstance(peft_model, PeftModelForCausalLM)
    again = PerturbedCausalLM.from_pretrained(peft_model, folder)
    assert again.lora.r == 2 and not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        assert torch.equal(again.token_log_lik(x, y, z), want)
    # the constructor takes a PeftModel too: its adapter is used as it is
    wrapped = PerturbedCausalLM(base=PeftModel.from_pretrained(tiny_model("llama"), str(folder)),
                                perturbation=again.perturbation)
    with torch.no_grad():
        assert torch.equal(wrapped.token_log_lik(x, y, z), want)
    # trainable on request: the adapter and the perturbation get gradients
    trained = PerturbedCausalLM.from_pretrained(tiny_model("llama"), folder, is_trainable=True)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert "perturbation.A" in names and any("lora_B" in n for n in names)
    # a PeftModel with another adapter, a base of other sizes, a missing folder: one line each
    other = build_perturbed_lm(tiny_model("llama"), perturbation="none", prompt_len=L, lora=LoRAConfig(r=2), seed=9)
    for base, needle in [(other.lm, "not the one saved"), (_shrunk_gpt2(), "hidden_size=16")]:
        with pytest.raises(ValueError, match=needle) as err:
            PerturbedCausalLM.from_pretrained(base, folder)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="perturbation_config.json"):
        PerturbedCausalLM.from_pretrained(tiny_model("llama"), tmp_path / "nothing")


def _shrunk_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()


# ---- peft conventions, no process-wide changes ---------------------------------------------------------------------
def test_no_imports_from_peft_internal_modules():
    offenders = []
    for path in sorted((ROOT / "simstudy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("peft.")]
    assert not offenders, offenders


def test_importing_simstudy_llm_and_loading_a_model_leave_the_environment_unchanged():
    script = textwrap.dedent("""
        import importlib, os, pkgutil
        before = dict(os.environ)
        import simstudy.llm
        for module in pkgutil.iter_modules(simstudy.llm.__path__):  # every submodule
            importlib.import_module("simstudy.llm." + module.name)
        from simstudy.llm import load_base_model
        load_base_model("tiny-gpt2", device="cpu")
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        assert not changed, changed
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- the llm-shift study keeps its fits when asked -----------------------------------------------------------------
STUDY = """
[study]
kind = "llm-shift"
replicates = 1
seed = 3

[model]
name = "tiny-gpt2"
lora = {{ r = 2, alpha = 4.0 }}
{save}
[data]
train = "python-stdlib"
ood = {{}}
prompt_len = 6
continuation_len = 4
n_train = 8
n_eval = 4
n_generate = 0

[evaluation]
iwae_draws = 2
batch_size = 4
mauve = false

[defaults]
latent_dim = 2
sgd = {{ steps = 2, batch_size = 4, lr = 0.01, validation_fraction = 0.0 }}

[methods.mle]
[methods.aug]
"""


def test_the_llm_shift_study_keeps_each_fit_when_asked(tmp_path):
    import copy

    import simstudy.studies.llm_shift as llm_shift
    from simstudy.llm import iwae_perplexity
    from simstudy.studies import spec

    keep = tmp_path / "fitted"
    study = spec.build_study(spec.parse_study_text(STUDY.format(save=f"save_fitted = {str(keep)!r}")))
    plain = spec.build_study(spec.parse_study_text(STUDY.format(save="")))
    assert study.config_hash == plain.config_hash  # where fits are kept changes no result
    table = study.run(n_jobs=1, progress=False).table
    assert list(table["status"]) == ["ok", "ok"], table["message"].tolist()
    runs = sorted(keep.glob("*/seed-*/*"))
    assert [p.name for p in runs] == ["aug", "mle"] and runs[0].parent.parent.name == "n_train=8"
    settings = json.loads((runs[0] / "perturbation_config.json").read_text())["perturbation"]
    assert (settings["kind"], settings["latent_dim"], settings["prompt_len"]) == ("linear", 2, 6)
    # the kept mle fit, reloaded, gives the perplexity the study reported (exact for mle: no latent)
    base, _ = llm_shift.base_model(llm_shift.ModelConfig(name="tiny-gpt2"))
    mle = PerturbedCausalLM.from_pretrained(copy.deepcopy(base), runs[1])
    data_ = llm_shift.DataConfig(train="python-stdlib", ood={}, prompt_len=6, continuation_len=4, n_train=8,
                                 n_eval=4, n_generate=0)
    x, y = llm_shift.token_pairs(data_, llm_shift.ModelConfig(name="tiny-gpt2"), "python-stdlib", ("test",), 4)
    with torch.no_grad():
        ppl = iwae_perplexity(mle, x, y, num_draws=2, batch_size=4)
    assert ppl.perplexity == pytest.approx(float(table.loc[table["method"] == "mle", "ppl_id"].iloc[0]), rel=1e-9)
    with pytest.raises(spec.SpecError, match="save_fitted"):
        spec.build_study(spec.parse_study_text(STUDY.format(save="save_fitted = 3")))
