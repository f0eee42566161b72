"""The perturbation domain plugged into the generic engine (DESIGN §7).

A *perturbation study* draws data from :class:`~simstudy.dgm.PerturbedNextToken`
and fits each method to the same data in every replicate:

* a method is an estimating equation (DESIGN §3) with a learned perturbation
  (``linear`` by default), or a baseline: ``mle`` (no perturbation), ``gaussian``
  (fixed N(0, sigma^2) noise, trained with aug), ``neftune`` (uniform noise while
  training only), ``discrete`` (token substitution by the embedding-neighbour
  kernel, arXiv 2605.04344);
* the solver is ``sgd`` (:func:`~simstudy.fit.fit_sgd`) or ``exact``
  (:func:`~simstudy.fit.fit_exact`, q <= 2);
* every method returns the metrics of DESIGN §5 for its replicate: KL and TV of
  the truth's marginal against the fit in and out of support, OOS KL by distance
  bin (the extrapolation curve), perturbation recovery, and fit diagnostics.

Every method in a replicate sees the same data and the same student
initialisation seed (common random numbers), so differences between methods
are paired.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from .. import metrics
from ..dgm import PerturbedNextToken
from ..equations import EQUATIONS, make_equation
from ..fit import SGDConfig, fit_exact, fit_sgd

BASELINES: dict[str, dict] = {
    "mle": dict(equation="mle", perturbation="none"),
    "gaussian": dict(equation="aug", perturbation="gaussian", perturbation_options={"sigma": 0.3}),
    # NEFTune's alpha = 5 was set for LLM embeddings of width in the thousands; its per-element noise
    # alpha / sqrt(L d) would swamp the O(1) embeddings of the synthetic DGM (L d = 6), so alpha = 1 here.
    "neftune": dict(equation="aug", perturbation="neftune", perturbation_options={"alpha": 1.0}),
    "discrete": dict(equation="aug", perturbation="discrete", perturbation_options={"rho": 0.3, "bandwidth": 0.1}),
}
SOLVERS = ("sgd", "exact")
EXACT_OBJECTIVE = {"ps-exact": "likelihood", "ps-mh": "likelihood", "sumo": "likelihood", "is-K": "likelihood",
                   "q2": "brier", "mle": "mle"}


@dataclass
class MethodSpec:
    """One method of a perturbation study (a row of the ADEMP "methods")."""

    name: str = field(metadata={"help": "label in the results table"})
    equation: str = field(default="ps-exact", metadata={"help": "estimating equation (simstudy.equations)"})
    equation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the equation"})
    perturbation: str = field(default="linear", metadata={"help": "student's perturbation map"})
    perturbation_options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the map"})
    network: str | None = field(default=None, metadata={"help": "student network; None: the teacher's family"})
    hidden: int | None = field(default=None, metadata={"help": "MLP width; None: the teacher's"})
    transformer: dict | None = field(default=None, metadata={"help": "TransformerConfig fields"})
    solver: str = field(default="sgd", metadata={"help": "sgd or exact"})
    sgd: dict = field(default_factory=dict, metadata={"help": "SGDConfig fields"})
    init_scale: float = field(default=0.05, metadata={"help": "scale of the perturbation's random init"})
    scale_passes_with_n: bool = field(default=True, metadata={"help": "step budget grows with n (passes fixed)"})

    def __post_init__(self) -> None:
        if self.equation not in EQUATIONS:
            raise ValueError(f"equation={self.equation!r} is unknown; allowed: {', '.join(sorted(EQUATIONS))}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if self.solver == "exact" and self.equation not in EXACT_OBJECTIVE:
            raise ValueError(f"solver='exact' does not solve equation={self.equation!r}; "
                             f"allowed: {', '.join(EXACT_OBJECTIVE)}")
        SGDConfig(**self.sgd)  # validates the keys and values now, not inside a replicate
        make_equation(self.equation, **self.equation_options)

    @classmethod
    def from_name(cls, name: str, **options) -> "MethodSpec":
        """A method by name: a baseline (mle, gaussian, neftune, discrete) or an equation name."""
        base = dict(BASELINES.get(name, {}))
        if not base and name not in EQUATIONS:
            known = sorted(set(BASELINES) | set(EQUATIONS))
            raise ValueError(f"method={name!r} is unknown; allowed: {', '.join(known)} (or set equation=)")
        if not base:
            base = {"equation": name}
        for key in ("perturbation_options", "equation_options", "sgd"):
            if key in options and key in base:
                options[key] = {**base[key], **options[key]}
        base.update(options)
        return cls(name=name, **base)


@dataclass
class StudyData:
    """What ``generate`` hands to every method of a replicate."""

    dgm: PerturbedNextToken
    x: torch.Tensor  # (n, L)
    y: torch.Tensor  # (n, c)
    student_seed: int


DGM_KEYS = {f.name for f in fields(MethodSpec)}  # not DGM keys; used to keep the namespaces apart


class DGMCache:
    """Build each distinct DGM once per process (teacher, entropy bisection, exact marginals)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, PerturbedNextToken] = {}

    def get(self, options: dict) -> PerturbedNextToken:
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            design = options.get("design")
            rest = {k: v for k, v in options.items() if k != "design"}
            self._cache[key] = (PerturbedNextToken.reference(design, **rest) if design
                                else PerturbedNextToken(**rest))
        return self._cache[key]


_DGMS = DGMCache()


def make_generate(dgm_options: dict, *, fresh_teacher: bool = False):
    """``generate(cond, rng)`` for the engine: condition keys other than ``n``
    override the DGM options; ``fresh_teacher`` draws a new teacher seed per replicate."""

    def generate(cond: dict, rng: np.random.Generator) -> StudyData:
        options = {**dgm_options, **{k: v for k, v in cond.items() if k != "n"}}
        if fresh_teacher:
            options["seed"] = int(rng.integers(2**31 - 1))
        dgm = _DGMS.get(options)
        data = dgm.sample(int(cond["n"]), rng)
        x, y = data.tensors()
        return StudyData(dgm=dgm, x=x, y=y, student_seed=int(rng.integers(2**31 - 1)))

    return generate


def _distance_bins(dgm: PerturbedNextToken, num_bins: int) -> np.ndarray:
    oos = dgm.distance(dgm.prefixes("oos"))
    return np.linspace(0.0, float(oos.max()) if oos.size else 1.0, num_bins + 1)


def make_analyse(spec: MethodSpec, *, num_bins: int = 4, mc_draws: int = 4096):
    """``analyse(data, cond)`` for the engine: fit ``spec`` and return its metrics."""

    def analyse(data: StudyData, cond: dict) -> dict:
        dgm = data.dgm
        student = dgm.make_student(network=spec.network, hidden=spec.hidden, perturbation=spec.perturbation,
                                   transformer=spec.transformer, init_scale=spec.init_scale, seed=data.student_seed,
                                   **spec.perturbation_options)
        generator = torch.Generator().manual_seed(data.student_seed)
        if spec.solver == "exact":
            fit = fit_exact(student, data.x, data.y, objective=EXACT_OBJECTIVE[spec.equation])
        else:
            equation = make_equation(spec.equation, **spec.equation_options)
            fit = fit_sgd(student, equation, data.x, data.y, config=SGDConfig(**spec.sgd), generator=generator)
        prefixes = dgm.prefixes("all")
        distance = dgm.distance(prefixes)
        evaluation = metrics.evaluate_marginals(
            student, prefixes=prefixes, truth=dgm.exact_marginal(prefixes), distance=distance,
            in_support=distance == 0, num_draws=mc_draws, generator=torch.Generator().manual_seed(0))
        out = evaluation.metrics()
        curve = evaluation.extrapolation_curve(bins=_distance_bins(dgm, num_bins))
        for k, row in enumerate(curve.itertuples(index=False)):
            out[f"kl_oos_bin{k + 1}"] = float(row.kl)
            out[f"distance_bin{k + 1}"] = float(row.distance)
        if hasattr(student.perturbation, "A"):  # recovery is defined for learned linear perturbations only
            out.update(metrics.perturbation_recovery(student, dgm.teacher))
        for key in ("steps", "evaluations", "grad_norm", "quadrature_error"):  # timing lives in the engine's _seconds
            if key in fit.stats:
                out[f"fit_{key}"] = float(fit.stats[key])
        out["n_parameters"] = float(sum(p.numel() for p in student.parameters() if p.requires_grad))
        if not math.isfinite(out["kl_id"]) and not math.isinf(out["kl_id"]):
            raise FloatingPointError("the fitted marginal is not finite")
        return out

    return analyse


def describe_method(spec: MethodSpec) -> dict:
    """Flat description of a method for the report."""
    d = asdict(spec)
    return {k: (repr(v) if isinstance(v, dict) else v) for k, v in d.items()}
