"""Methods of the perturbation domain: one spec for what every client fits (ADEMP "methods", DESIGN §3, §7).

:class:`MethodSpec` holds the fields every method shares, on the synthetic models
and on an LLM alike: the estimating equation and its options, the perturbation map
and its options, and the sgd settings. A *baseline* is a named preset of these
fields (``mle``: no perturbation; ``gaussian``, ``neftune``, ``discrete``: a fixed
perturbation trained with ``aug``); any equation name is a method too (a learned
perturbation fitted by that equation). Each domain's subclass adds its own fields
and its own baseline presets: :class:`PerturbationMethod` here, ``LLMMethod`` in
the LLM study.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from ..equations import EQUATIONS, Equation, is_label, label_forms, make_equation, parse_label
from ..fit import SGDConfig

__all__ = ["MethodSpec", "PerturbationMethod", "SOLVERS", "describe_method"]

SOLVERS = ("sgd", "exact")
#: option tables merged (not replaced) when a method's table overrides a preset or the defaults
MERGED_KEYS = ("equation_options", "perturbation_options", "sgd")


@dataclass
class MethodSpec:
    """The fields every method shares (the equation, the perturbation map, their options, sgd settings)."""

    name: str = field(metadata={"help": "label in the results table"})
    equation: str = field(default="ps-exact", metadata={"help": "estimating equation (simstudy.equations)"})
    equation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the equation"})
    perturbation: str = field(default="linear", metadata={"help": "the student's perturbation map"})
    perturbation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the map"})
    sgd: dict = field(default_factory=dict, metadata={"help": "SGDConfig fields"})

    #: baseline name -> preset of fields (each domain sets its own)
    baselines: ClassVar[dict[str, dict]] = {}

    def __post_init__(self) -> None:
        for key in MERGED_KEYS:
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid; allowed: a table")
        if isinstance(self.equation, str) and self.equation not in EQUATIONS and is_label(self.equation):
            # a short label (is-8, q2-K8, ps-mh-B20): its registry name, and the option it fixes wins
            self.equation, fixed = parse_label(self.equation)
            self.equation_options = {**self.equation_options, **fixed}
        if self.equation not in EQUATIONS:
            raise ValueError(f"equation={self.equation!r} is unknown; allowed: {', '.join(sorted(EQUATIONS))} "
                             f"(or a short label: {label_forms()})")
        SGDConfig(**self.sgd)  # validates the keys and values now, not inside a replicate

    @property
    def equation_class(self) -> type[Equation]:
        """The equation's class: its facts (root_objective, audit_expectation, llm_scope) live there."""
        return EQUATIONS[self.equation]

    def make_equation(self) -> Equation:
        """A fresh equation object with this method's options."""
        return make_equation(self.equation, **self.equation_options)

    def sgd_config(self) -> SGDConfig:
        return SGDConfig(**self.sgd)

    @classmethod
    def known_names(cls) -> list[str]:
        """Method names that need no ``equation =``: the baselines and the equations (and their short labels)."""
        return sorted(set(cls.baselines) | set(EQUATIONS))

    @classmethod
    def is_known(cls, name: str) -> bool:
        """A baseline, an equation name or an equation's short label (``is-8``)."""
        return name in cls.baselines or name in EQUATIONS or is_label(name)

    @classmethod
    def from_name(cls, name: str, **options) -> "MethodSpec":
        """A method by name: a baseline of this domain or an equation name; ``options`` override the preset
        (option tables are merged)."""
        base = dict(cls.baselines.get(name, {}))
        if not cls.is_known(name):
            raise ValueError(f"method={name!r} is unknown; allowed: {', '.join(cls.known_names())}, "
                             f"{label_forms()} (or set equation=)")
        if not base:
            base = {"equation": name}
        for key in MERGED_KEYS:
            if key in options and key in base:
                options[key] = {**base[key], **options[key]}
        base.update(options)
        return cls(name=name, **base)


@dataclass
class PerturbationMethod(MethodSpec):
    """A method of the synthetic perturbation domain (DGMs of :mod:`simstudy.dgm`), DESIGN §3.

    Adds the student's network and its size (``hidden`` None: the DGM's ``student_hidden``, itself
    the teacher's width by default), the solver (``sgd``: :func:`~simstudy.fit.fit_sgd`;
    ``exact``: :func:`~simstudy.fit.fit_exact`, which solves the equation's ``root_objective``)
    and the perturbation's initial scale (``init_scale`` None: the DGM's ``student_init_scale``).
    """

    network: str | None = field(default=None, metadata={"help": "student network; None: the teacher's family"})
    hidden: int | None = field(default=None, metadata={"help": "MLP width; None: the DGM's student_hidden"})
    transformer: dict | None = field(default=None, metadata={"help": "TransformerConfig fields"})
    solver: str = field(default="sgd", metadata={"help": "sgd or exact"})
    init_scale: float | None = field(default=None, metadata={"help": "scale of the perturbation's random init; "
                                                             "None: the DGM's student_init_scale (0.05)"})
    scale_passes_with_n: bool = field(default=True, metadata={"help": "step budget grows with n (passes fixed)"})

    baselines: ClassVar[dict[str, dict]] = {
        "mle": dict(equation="mle", perturbation="none"),
        "gaussian": dict(equation="aug", perturbation="gaussian", perturbation_options={"sigma": 0.3}),
        # NEFTune's alpha = 5 was set for LLM embeddings of width in the thousands; its per-element noise
        # alpha / sqrt(L d) would swamp the O(1) embeddings of the synthetic DGM (L d = 6), so alpha = 1 here.
        "neftune": dict(equation="aug", perturbation="neftune", perturbation_options={"alpha": 1.0}),
        "discrete": dict(equation="aug", perturbation="discrete",
                         perturbation_options={"rho": 0.3, "bandwidth": 0.1}),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if self.solver == "exact" and self.equation_class.root_objective is None:
            solvable = [n for n, c in EQUATIONS.items() if c.root_objective is not None]
            raise ValueError(f"solver='exact' does not solve equation={self.equation!r}; "
                             f"allowed: {', '.join(solvable)}")
        self.make_equation()

    def student_options(self) -> dict:
        """Keyword arguments of ``dgm.make_student`` (without the seed)."""
        return dict(network=self.network, hidden=self.hidden, perturbation=self.perturbation,
                    transformer=self.transformer, init_scale=self.init_scale, **self.perturbation_options)


def describe_method(spec: MethodSpec) -> dict:
    """Flat description of a method for the report."""
    return {k: (repr(v) if isinstance(v, dict) else v) for k, v in asdict(spec).items()}
