"""The GPU preset's code path at tiny size on the CPU (issue 14; DESIGN §8).

``experiments/llm_shift_gpu.toml`` has not run on CUDA in CI (no GPU here). This test runs the preset's own
file, every method table and setting kept (bfloat16 base, LoRA r = 16, persistent ps-mh chains, early stopping
with validation draws, several out-of-domain splits taken in turn, IWAE, generation, ROUGE-1, MAUVE), with
only the sizes, the model (a tiny GPT-2) and the corpora (the standard library and a generated fortunes
folder) swapped by ``--set`` overrides, so a break in the GPU path shows here first.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("rouge_score")
pytest.importorskip("mauve")

import simstudy.studies.llm_shift  # noqa: E402,F401  (registers the kind)
from simstudy.studies import spec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PRESET = Path(__file__).resolve().parents[1] / "experiments" / "llm_shift_gpu.toml"


@pytest.fixture(scope="module")
def fortunes(tmp_path_factory):
    rng = random.Random(1)
    words = (["Der Hund", "Die Katze", "Ein Mann", "Eine Frau"], ["isst", "sieht", "kauft", "findet"],
             ["einen Apfel", "das Buch", "die Straße", "den Brief"], ["am Morgen.", "im Garten.", "trotz des Regens."])
    folder = tmp_path_factory.mktemp("fortunes")
    chunks = [" ".join(rng.choice(w) for w in words * 2) for _ in range(80)]
    (folder / "sprueche").write_text("\n%\n".join(chunks) + "\n%\n", encoding="utf-8")
    return folder


def test_the_gpu_preset_runs_one_replicate_of_every_method_at_tiny_size(fortunes):
    text = PRESET.read_text()
    sf0 = spec.parse_study_text(text, PRESET)
    overrides = [
        'model.name="tiny-gpt2"', 'model.device="cpu"', 'model.dtype="bfloat16"', "model.max_rows=16",
        'data.train="python-stdlib"', f'data.ood={{ de = "fortunes-de" }}',
        f'data.roots={{ fortunes-de = "{fortunes}" }}',
        "data.prompt_len=8", "data.continuation_len=6", "data.n_train=24", "data.n_eval=6", "data.n_generate=4",
        "evaluation.iwae_draws=3", "evaluation.batch_size=4", "evaluation.mauve_buckets=2",
        "defaults.sgd.steps=4", "defaults.sgd.batch_size=4", "defaults.sgd.validation_fraction=0.25",
        "defaults.sgd.eval_every=2", "defaults.sgd.patience=1", "defaults.sgd.validation_draws=2",
        "defaults.latent_dim=2", "study.replicates=1",
    ]
    sf = spec.parse_study_text(text, PRESET, overrides=overrides)
    # what makes it the GPU preset is kept: its method tables, LoRA rank and ps-mh's persistent chains
    assert sf.tables["methods"] == sf0.tables["methods"] and sf.tables["model"]["lora"] == sf0.tables["model"]["lora"]
    assert sf.tables["methods"]["ps-mh"]["equation_options"]["persistent"] is True
    study = spec.build_study(sf)
    table = study.run_replicate(0, 0)
    assert set(table["method"]) == set(sf0.tables["methods"])
    assert (table["status"] == "ok").all(), table.loc[table["status"] != "ok", ["method", "message"]].to_dict("records")
    for column in ("ppl_id", "ppl_de", "nll_de", "rouge1_de", "mauve_de", "fit_steps"):
        values = table[column].to_numpy(float)
        assert all(math.isfinite(v) for v in values), column
    assert (table["fit_steps"] <= 4).all()
