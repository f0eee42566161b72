"""The study-file builder of the ``llm-shift`` kind and its environment check (DESIGN §7, §8).

:func:`build_study` reads ``[model]``, ``[data]``, ``[evaluation]``, ``[defaults]`` and
``[methods.*]`` (see the package docstring), and before any replicate runs it checks the
environment (:func:`check_environment`: the ``llm`` extra, every corpus, the device, the model
on disk) and tokenises every split of every condition, so a missing corpus or a split too short
for ``n_train`` / ``n_eval`` is one line, not a failed replicate.
"""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import fields, replace
from pathlib import Path

from ...engine import Study
from .. import spec
from .analysis import make_analyse, make_generate
from .caches import condition_pairs
from .config import DESIGN_KEYS, DataConfig, EvalConfig, ModelConfig, condition_data
from .methods import METHOD_KEYS, LLMMethod, method_from_table

__all__ = ["FIGURE_HOOK", "KIND", "LLM_EXTRA", "VERSION", "build_study", "check_environment", "default_headline",
           "from_table"]

KIND = "llm-shift"
#: enters the code fingerprint of every study of this kind (the config hash of its store)
VERSION = "llm-shift/1"
LLM_EXTRA = "pip install 'simstudy[llm]' (transformers, peft, tokenizers, gguf, rouge-score, mauve-text)"
#: the figure hook stored in the manifest of every result of this kind
FIGURE_HOOK = "simstudy.studies.llm_shift:shift_figures"


def from_table(cls, table: dict, where: str):
    """``cls(**table)`` for a settings dataclass, its keys checked; errors as one-line SpecError."""
    allowed = {f.name for f in fields(cls)}
    spec.check_keys(table, allowed, where)
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"{where}: {str(exc).splitlines()[0]}") from None


def check_environment(model: ModelConfig, data: DataConfig, evaluation: EvalConfig) -> None:
    """Stop before any work when the llm extra, a corpus or the model is missing (one line each)."""
    needed = ["transformers", "peft", "tokenizers", "rouge_score"] + (["mauve"] if evaluation.mauve else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise spec.SpecError(f"the llm extra is not installed (missing {', '.join(missing)}); install it: {LLM_EXTRA}")
    from ...llm import CorpusNotFoundError, check_corpora, resolve_device  # lazily: after the extra is checked

    corpora = list(dict.fromkeys([data.train, *data.ood.values()]))
    try:
        check_corpora(corpora, roots=data.roots)
    except CorpusNotFoundError as exc:
        raise spec.SpecError(str(exc).splitlines()[0]) from None
    try:
        resolve_device(model.device)
    except ValueError as exc:
        raise spec.SpecError(f"model.{str(exc).splitlines()[0]}") from None
    from ...llm.model import SMOLLM2, default_cache_dir, smollm2_gguf_path

    if model.name == SMOLLM2:
        folder = (Path(model.cache_dir) if model.cache_dir else default_cache_dir()) / SMOLLM2
        if not (folder / "config.json").is_file():
            try:
                smollm2_gguf_path()
            except FileNotFoundError as exc:
                raise spec.SpecError(str(exc).splitlines()[0]) from None
    elif model.name != "tiny-gpt2":
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(model.name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise spec.SpecError(f"model.name={model.name!r} is not on disk and downloads are off ("
                                 f"{str(exc).splitlines()[0][:120]}); allowed: smollm2-135m, tiny-gpt2, or a "
                                 "local model folder / a Hugging Face id in the local cache") from None


def default_headline(data: DataConfig, evaluation: EvalConfig) -> list[str]:
    """The metrics ``simstudy run`` prints when ``[evaluation] headline`` is not set."""
    ood = list(data.ood)
    out = ["ppl_id"] + [f"ppl_{k}" for k in ood] + (["ppl_ood"] if ood else [])
    if evaluation.generation and data.n_generate:
        out += ["rouge1_id"] + (["rouge1_ood"] if ood else [])
        if evaluation.mauve:
            out += ["mauve_id"] + (["mauve_ood"] if ood else [])
    return out


def _design_levels(design) -> list[dict]:
    """The conditions of ``[design]`` (a factorial table) or ``[[conditions]]`` (a list)."""
    if isinstance(design, list):
        return design
    return [dict(zip(design, combo)) for combo in itertools.product(
        *[(v if isinstance(v, list) else [v]) for v in design.values()])]


def _methods(t: dict) -> dict[str, LLMMethod]:
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise spec.SpecError("methods is missing; allowed: one table [methods.NAME] per method "
                             f"(NAME one of {', '.join(LLMMethod.known_names())})")
    defaults = dict(t.get("defaults", {}))
    spec.check_keys(defaults, METHOD_KEYS, "defaults")
    methods = {}
    for name, table in methods_t.items():
        if not isinstance(table, dict):
            raise spec.SpecError(f"methods.{name} has the wrong type; allowed: a table [methods.{name}]")
        methods[name] = method_from_table(name, table, defaults)
    return methods


def build_study(sf: spec.StudyFile) -> Study:
    """The :class:`~simstudy.engine.Study` of an ``llm-shift`` study file (registered builder of the kind)."""
    t = sf.tables
    for name in ("model", "data", "evaluation", "defaults"):
        if not isinstance(t.get(name, {}), dict):
            raise spec.SpecError(f"{name} has the wrong type; allowed: a table [{name}]")
    model = from_table(ModelConfig, dict(t.get("model", {})), "model")
    data = from_table(DataConfig, dict(t.get("data", {})), "data")
    evaluation = from_table(EvalConfig, dict(t.get("evaluation", {})), "evaluation")
    design = sf.design if sf.design is not None else {"n_train": [data.n_train]}
    factors = set(design) if isinstance(design, dict) else {k for c in design for k in c}
    spec.check_keys({k: None for k in factors}, set(DESIGN_KEYS), "design")
    levels = _design_levels(design)
    for cond in levels:  # every condition's data settings are valid now, not inside a replicate
        try:
            condition_data(data, cond)  # dataclasses.replace re-runs the validation
        except (TypeError, ValueError) as exc:
            raise spec.SpecError(f"design: {str(exc).splitlines()[0]}") from None
    methods = _methods(t)
    train_corpora = {c.get("train", data.train) for c in levels}
    check_environment(model, data, evaluation)
    for corpus in train_corpora - {data.train}:
        check_environment(model, replace(data, train=corpus), evaluation)
    for cond in levels:  # enough pairs in every split: tokenise now (cached), not inside a replicate
        try:
            condition_pairs(condition_data(data, cond), model)
        except ValueError as exc:
            raise spec.SpecError(f"data: {str(exc).splitlines()[0]}") from None
    analyse = {name: make_analyse(m, model, data, evaluation) for name, m in methods.items()}
    options = sf.options()
    options["figures"] = list(options.get("figures", [])) + [FIGURE_HOOK]
    options["headline"] = evaluation.headline or default_headline(data, evaluation)
    options["splits"] = list(data.splits)
    # where fitted models are kept changes no result: left out, so a run may resume with it turned on or off
    hashed = dict(t)
    if "model" in t:
        hashed["model"] = {k: v for k, v in t["model"].items() if k != "save_fitted"}
    # a user's corpus enters by its contents too: editing the file makes a new study, never a mixed store
    contents = sorted((str(c), c.content_digest()) for c in [data.train, *data.ood.values()]
                      if hasattr(c, "content_digest"))
    fingerprint = sf.fingerprint or (repr((VERSION, sorted((k, repr(v)) for k, v in hashed.items()), repr(design)))
                                     + (repr(contents) if contents else ""))
    return Study(design=design, generate=make_generate(model, data, evaluation), analyse=analyse,
                 replicates=sf.replicates, seed=sf.seed, name=sf.name, fingerprint=fingerprint, options=options,
                 task_per_method=True)  # a fit takes minutes: progress, resume and the workers' load move by method
