"""Methods of an llm-shift study: :class:`LLMMethod` and its ``[methods.NAME]`` tables (DESIGN §2, §3, §8).

An :class:`LLMMethod` is the shared :class:`~simstudy.domain.MethodSpec` (equation, perturbation
map, their options, sgd settings) plus what an LLM needs: the latent dimension, the LoRA settings
over ``[model] lora``, and the scope of its evaluation bound. Its baselines are fixed or no
perturbations whose LoRA adapters are trained with the named equation; every equation name (and
short label such as ``is-8``) is a method with a learned linear perturbation. The default latent
scope of an equation is the equation's own fact ``llm_scope`` (DESIGN §2): per token where g is a
sum of per-token terms, per datum for posterior sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from ...domain import MethodSpec
from ...domain.methods import MERGED_KEYS
from ...equations import EQUATIONS, Q2, PosteriorExact, label_forms
from ...validation import check_choice, check_int
from .. import spec
from .config import EVAL_SCOPES

__all__ = ["BASELINES", "LLMMethod", "METHOD_KEYS", "list_methods", "method_from_table"]


@dataclass
class LLMMethod(MethodSpec):
    """One method of an LLM shift study: an equation, a perturbation map, and their settings."""

    equation: str = field(default="is-K", metadata={"help": "estimating equation (simstudy.equations)"})
    perturbation: str = field(default="linear", metadata={"help": "simstudy.llm.LLM_PERTURBATIONS"})
    latent_dim: int = field(default=4, metadata={"help": "q, the latent dimension of a Gaussian-latent map"})
    lora: dict = field(default_factory=dict, metadata={"help": "LoRAConfig fields over [model] lora"})
    eval_scope: str | None = field(default=None, metadata={"help": "perplexity scope (None: [evaluation] scope)"})

    #: baselines: fixed or no perturbation; their LoRA adapters are trained with the named equation.
    baselines: ClassVar[dict[str, dict]] = {
        "mle": dict(equation="mle", perturbation="none"),
        "neftune": dict(equation="aug", perturbation="neftune"),
        "gaussian": dict(equation="aug", perturbation="gaussian"),
        "discrete": dict(equation="aug", perturbation="discrete"),
    }

    def __post_init__(self) -> None:
        from ...llm.model import LoRAConfig  # lazily: the llm extra is checked before it is needed
        from ...llm.perturbations import LLM_PERTURBATIONS

        super().__post_init__()  # the equation, the option tables, the sgd settings
        check_choice("perturbation", self.perturbation, LLM_PERTURBATIONS, word="unknown")
        if not isinstance(self.lora, dict):
            raise ValueError(f"lora={self.lora!r} is invalid; allowed: a table")
        self.equation_options = {"scope": self.equation_class.llm_scope, **self.equation_options}
        eq = self.make_equation()
        if isinstance(eq, Q2) and eq.scope == "datum":  # its joint form needs conditionally iid continuations
            raise ValueError("scope='datum' for q2 is invalid with autoregressive continuations; allowed: token")
        if self.perturbation == "none" and self.equation_class.audit_expectation != "no latent":
            raise ValueError(f"perturbation='none' with equation={self.equation!r} is invalid; allowed: "
                             "equation='mle' (without a latent every equation is mle)")
        check_int("latent_dim", self.latent_dim, 1)
        LoRAConfig(**self.lora)
        if self.eval_scope is not None:
            check_choice("eval_scope", self.eval_scope, EVAL_SCOPES)

    @property
    def scope(self) -> str:
        """The latent scope the method is trained with (DESIGN §2)."""
        return self.equation_options.get("scope", "datum")


BASELINES = LLMMethod.baselines
#: keys of a ``[methods.NAME]`` table (and of ``[defaults]``)
METHOD_KEYS = frozenset(f.name for f in fields(LLMMethod)) - {"name"}
#: option tables merged (not replaced) when a method's table overrides ``[defaults]``
_MERGED = (*MERGED_KEYS, "lora")


def method_from_table(name: str, table: dict, defaults: dict) -> LLMMethod:
    """A method from its ``[methods.NAME]`` table over ``[defaults]``.

    A baseline (:attr:`LLMMethod.baselines`) keeps its own equation and map, and takes
    ``equation_options`` / ``perturbation_options`` from its own table only (those of ``[defaults]`` are
    meant for the learned perturbations); an equation name or short label needs no ``equation =``; any
    other label needs one. Errors are one-line :class:`~simstudy.studies.spec.SpecError`.
    """
    spec.check_keys(table, METHOD_KEYS, f"methods.{name}")
    options = {**defaults, **table}
    for key in _MERGED:
        if key in defaults and key in table:
            options[key] = {**defaults[key], **table[key]}
    try:
        if name in LLMMethod.baselines:
            base = LLMMethod.baselines[name]
            for key in ("equation", "perturbation"):
                if key in table and table[key] != base[key]:
                    raise spec.SpecError(f"methods.{name}.{key}={table[key]!r} is invalid for the baseline "
                                         f"{name!r}; allowed: {base[key]!r} (or give the method another label)")
                options.pop(key, None)  # the preset's, over [defaults]
            for key in ("equation_options", "perturbation_options"):
                options[key] = dict(table.get(key, {}))
            return LLMMethod.from_name(name, **options)
        if "equation" not in table:
            if not LLMMethod.is_known(name):
                raise spec.SpecError(f"methods.{name} is unknown; allowed: {', '.join(LLMMethod.known_names())}, "
                                     f"a short label ({label_forms()}), or any label with "
                                     "equation = '...'")
            options.pop("equation", None)
            return LLMMethod.from_name(name, **options)
        return LLMMethod(name=name, **options)
    except spec.SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"methods.{name}: {str(exc).splitlines()[0]}") from None


def list_methods() -> dict[str, str]:
    """``simstudy list`` section: the baselines and the learned-perturbation methods with their scope."""
    maps = {"none": "no perturbation (LoRA only)", "neftune": "NEFTune noise while training",
            "gaussian": "fixed Gaussian perturbation", "discrete": "neighbour-substitution perturbation"}
    out = {name: f"baseline: {maps[b['perturbation']]}, LoRA trained with {b['equation']}"
           for name, b in BASELINES.items()}
    for name, cls in EQUATIONS.items():
        if name in BASELINES:
            continue
        # exact posterior draws by rejection cost E[1/m(y|x)] proposals: e^(c * NLL per token) on a continuation
        cost = " (impractical: cost ~ 1/m(y|x))" if issubclass(cls, PosteriorExact) else ""
        out[name] = f"learned linear perturbation + LoRA, equation {name}, scope {cls.llm_scope}{cost}"
    return out
