"""Saving and reloading a :class:`~simstudy.llm.PerturbedCausalLM` (DESIGN §8).

A saved model is a folder of three parts, the frozen base model never among them:

* the LoRA adapter in peft's own format (``adapter_config.json``, ``adapter_model.safetensors``,
  written by ``PeftModel.save_pretrained``), so ``PeftModel.from_pretrained(base, folder)`` loads
  it without simstudy; absent when the model has no adapters (``r = 0``);
* ``perturbation.safetensors``: the perturbation's state dict (``A`` of a linear map, the MLP's
  weights; empty for the fixed maps);
* ``perturbation_config.json``: the perturbation's settings (kind, prompt length, latent
  dimension, its options), the LoRA settings and the base model's sizes.

:func:`from_pretrained` rebuilds the perturbation from its settings, loads its weights, and
loads the adapter onto ``base`` with peft's ``PeftModel.from_pretrained``, or accepts ``base``
when it already is the ``PeftModel`` of exactly this adapter (same settings, bitwise the same
weights). Log-likelihoods of the reloaded model on the same base equal the saved model's
bitwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.perturbations import (GaussianPerturbation, LinearPerturbation, MLPPerturbation, NEFTunePerturbation,
                                    NoPerturbation)
from .model import LoRAConfig, is_peft_model, peft_lora_config
from .perturbations import NeighbourSubstitution, make_llm_perturbation

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "from_pretrained", "perturbation_settings", "save_pretrained"]

CONFIG_NAME = "perturbation_config.json"
WEIGHTS_NAME = "perturbation.safetensors"
FORMAT = "simstudy-perturbed-causal-lm"
FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def perturbation_settings(p) -> dict:
    """``{"kind", "prompt_len", "latent_dim", "options"}`` of a map :func:`make_llm_perturbation` builds.

    The learned weights are not settings (they are saved as tensors); any other map type raises one line.
    """
    kind, options = None, {}
    t = type(p)
    if t is LinearPerturbation:
        kind = "linear"
    elif t is MLPPerturbation:
        kind = "mlp-conditional" if p.conditional else "mlp"
        options = {"hidden": int(p.hidden.out_features)}
    elif t is GaussianPerturbation:
        kind, options = "gaussian", {"sigma": float(p.sigma)}
    elif t is NEFTunePerturbation:
        kind, options = "neftune", {"alpha": float(p.alpha)}
    elif t is NeighbourSubstitution:
        kind = "discrete"
        options = {"rho": p.rho, "bandwidth": p.bandwidth, "num_neighbours": p.num_neighbours}
    elif t is NoPerturbation:
        kind = "none"
    if kind is None:
        raise ValueError(f"perturbation={t.__name__} cannot be saved; allowed: the maps of make_llm_perturbation "
                         "(linear, mlp, mlp-conditional, gaussian, neftune, discrete, none)")
    latent_dim = int(p.latent_shape[0]) if kind in ("linear", "mlp", "mlp-conditional") else None
    return {"kind": kind, "prompt_len": int(p.prefix_len), "latent_dim": latent_dim, "options": options}


def save_pretrained(lm, directory) -> Path:
    """Write ``lm``'s adapter, perturbation weights and settings to ``directory`` (created); returns it.

    Parameters
    ----------
    lm : a :class:`~simstudy.llm.PerturbedCausalLM`.
    directory : the folder; files of an earlier save there are overwritten.
    """
    from safetensors.torch import save_file

    settings = perturbation_settings(lm.perturbation)  # refuses before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter = None
    if is_peft_model(lm.lm):
        name = lm.lm.active_adapter
        # save_embedding_layers=False: the base (embeddings included) is frozen, and "auto" would ask the Hub
        lm.lm.save_pretrained(str(directory), selected_adapters=[name], save_embedding_layers=False)
        adapter = {"name": name, "folder": "." if name == "default" else name}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lm.perturbation.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = lm.causal_lm.config
    payload = {
        "format": FORMAT, "version": FORMAT_VERSION, "perturbation": settings,
        "lora": {"r": lm.lora.r, "alpha": lm.lora.alpha, "dropout": lm.lora.dropout,
                 "target_modules": None if lm.lora.target_modules is None else list(lm.lora.target_modules)},
        "adapter": adapter, "max_rows": lm.max_rows, "head_chunk_elements": lm.head_chunk_elements,
        "base": {"model_type": config.model_type, "name_or_path": getattr(config, "_name_or_path", "") or "",
                 "vocab_size": lm.vocab_size, "hidden_size": lm.embed_dim},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; allowed: a folder written by "
                                "PerturbedCausalLM.save_pretrained")
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({str(exc).splitlines()[0]}); allowed: the JSON save_pretrained "
                         "wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} config of version {FORMAT_VERSION}; allowed: a folder written "
                         "by PerturbedCausalLM.save_pretrained")
    return payload


def _check_sizes(base_model, payload: dict, directory: Path) -> None:
    want = payload["base"]
    have = {"vocab_size": int(base_model.get_output_embeddings().weight.shape[0]),
            "hidden_size": int(base_model.get_input_embeddings().weight.shape[1])}
    for key, value in have.items():
        if value != want[key]:
            raise ValueError(f"base has {key}={value}, but {directory} was saved from a model with {key}="
                             f"{want[key]} ({want['model_type']} {want['name_or_path']!r}); allowed: that base model")


def _same_adapter(peft_model, folder: Path, lora: LoRAConfig) -> bool:
    """Whether ``peft_model``'s one adapter has ``lora``'s settings and bitwise the weights saved in ``folder``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    have = peft_lora_config(peft_model, None)
    if (have.r, have.alpha, have.dropout) != (lora.r, lora.alpha, lora.dropout):
        return False
    if lora.target_modules is not None and set(have.target_modules) != set(lora.target_modules):
        return False
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    current = get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter,
                                        save_embedding_layers=False)
    return set(saved) == set(current) and all(torch.equal(saved[k], current[k].detach().to(saved[k].device))
                                              for k in saved)


def from_pretrained(model_class, base, directory, *, is_trainable: bool = False, max_rows: int | None = None,
                    head_chunk_elements: int | None = None):
    """The :class:`~simstudy.llm.PerturbedCausalLM` saved in ``directory``, rebuilt on ``base``.

    Parameters
    ----------
    model_class : :class:`~simstudy.llm.PerturbedCausalLM` (or a subclass): what to build (the classmethod
        ``PerturbedCausalLM.from_pretrained`` passes itself, so this module never imports it).
    base : the base model it was trained on (frozen; peft injects the adapter into it in place, so it backs
        this one model), or a ``PeftModel`` already holding exactly the saved adapter (e.g. from
        ``PeftModel.from_pretrained(base, directory)``).
    directory : a folder written by :func:`save_pretrained`.
    is_trainable : False (default, as peft's ``from_pretrained``): every parameter frozen, for evaluation and
        generation; True: the adapter and the perturbation train on.
    max_rows, head_chunk_elements : override the saved values.
    """
    directory = Path(directory)
    payload = _read_config(directory)
    lora = LoRAConfig(**payload["lora"])
    adapter = payload.get("adapter")
    inner = base.get_base_model() if is_peft_model(base) else base
    _check_sizes(inner, payload, directory)
    if adapter is None and is_peft_model(base):
        raise ValueError(f"base is a PeftModel, but {directory} holds no LoRA adapter (r=0); allowed: the base model")
    if adapter is not None:
        folder = directory / adapter["folder"]
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder / ADAPTER_WEIGHTS} or {ADAPTER_CONFIG} is missing; allowed: the folder "
                                    "save_pretrained wrote, complete")
        if is_peft_model(base):
            if not _same_adapter(base, folder, lora):
                raise ValueError(f"base is a PeftModel whose adapter is not the one saved in {folder}; allowed: the "
                                 f"base model alone, or PeftModel.from_pretrained(base, {str(folder)!r})")
        else:
            if any(hasattr(m, "lora_A") for m in base.modules()):
                raise ValueError("base already carries LoRA adapters (peft injects them in place); allowed: a fresh "
                                 "base from load_base_model or copy.deepcopy(base)")
            import warnings

            from peft import PeftModel
            with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                base = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter["name"],
                                                 is_trainable=is_trainable)
    settings = payload["perturbation"]
    options = dict(settings["options"])
    if settings["kind"] in ("linear", "mlp", "mlp-conditional"):
        options["latent_dim"] = settings["latent_dim"]
    pert = make_llm_perturbation(settings["kind"], inner, prompt_len=settings["prompt_len"], **options)
    from safetensors.torch import load_file
    state = load_file(str(directory / WEIGHTS_NAME), device=str(inner.get_input_embeddings().weight.device))
    pert.load_state_dict(state, strict=True)
    for p in pert.parameters():
        p.requires_grad_(bool(is_trainable))
    lm = model_class(base=base, perturbation=pert, lora=None if adapter is not None else LoRAConfig(r=0),
                           max_rows=payload["max_rows"] if max_rows is None else max_rows,
                           head_chunk_elements=(payload["head_chunk_elements"] if head_chunk_elements is None
                                                else head_chunk_elements))
    if not is_trainable:
        for p in lm.parameters():
            p.requires_grad_(False)
    return lm.eval()
