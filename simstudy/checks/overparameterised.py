"""Paper check 6 of DESIGN §6: ``overparameterised``.

Claim (DESIGN §6.6): a transformer student with far more parameters than data
still shows falling error in n. The study: data from the "five-token" reference
model (DESIGN §3; any DGM via ``--set``; the data by :func:`simstudy.domain.make_generate`), a
small nanoGPT-style transformer student (:class:`simstudy.models.TransformerNetwork` through
``dgm.make_student`` with the options of a :class:`simstudy.domain.PerturbationMethod`, float32,
a learned linear perturbation) fitted by the stochastic solver (:func:`simstudy.domain.fit_student`,
i.e. :func:`simstudy.fit.fit_sgd`: Adam, fresh latent draws each step, a step budget that grows
with n, early stopping on a held-out split) on an estimating equation (``ps-exact`` by default:
exact posterior draws, the consistent likelihood equations), over a grid of n with a fresh draw
of the data and of the student's initialisation in every replicate. Each fit records ID and OOS
KL(m* || m-hat) (quadrature over z, :func:`simstudy.domain.evaluate_student`) and the parameter
count.

Decision rule (OVERPARAMETERISED_RULE): the WLS slope of log mean ID KL on log n
(replicate-level MCSE weights; :meth:`simstudy.engine.StudyResult.rate`) has its
95% upper limit below 0. The settings must be over-parameterised: at least
``min_ratio`` (10) times as many trainable parameters as the largest n, else a
ValueError. OOS KL is reported with its own slope, not judged: the teacher's
behaviour out of support is not identified by a non-parametric student.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..domain import PerturbationMethod, ReplicateData, evaluate_student, fit_student, make_generate
from ..engine import Study, StudyResult
from ..engine.plots import rate_plot
from ..equations import parse_label
from ..fit import SGDConfig
from ..models import TransformerConfig
from .asymptotic_statistics import mean_table, ok_rows
from .asymptotic_study import REGION_METRICS
from .base import CheckContext, CheckResult, register
from .common import comma_list, dgm_settings, saved, study_store

OVERPARAMETERISED_CLAIM = ("A transformer student with far more parameters than data, fitted by SGD on a consistent "
                           "estimating equation, still shows falling ID error in n (DESIGN §6.6).")
OVERPARAMETERISED_RULE = ("The WLS slope of log mean ID KL(m* || m-hat) on log n over the grid (weights from "
                          "replicate-level MCSEs; StudyResult.rate) has its 95% upper limit below 0. The student must "
                          "have at least min_ratio (default 10) times as many trainable parameters as the largest n. "
                          "Reported: the slope with its interval, the OOS slope, parameters / n.")
_VERSION = 1


@dataclass(frozen=True)
class OverparameterisedSettings:
    """What determines the study's rows (its repr enters the config hash)."""

    design: str
    dgm: tuple
    transformer: tuple  # sorted TransformerConfig fields
    equation: str
    sgd: tuple  # sorted SGDConfig fields
    n_grid: tuple
    replicates: int
    study_seed: int
    version: int = _VERSION

    def dgm_options(self) -> dict:
        return dict(self.dgm)

    def method(self) -> PerturbationMethod:
        """The fitted method: a transformer student with a learned linear perturbation, sgd on ``equation``
        (a registry name or a short label such as ``is-8``)."""
        name, options = parse_label(self.equation)
        return PerturbationMethod(name=self.equation, equation=name, equation_options=options, network="transformer",
                                  transformer=dict(self.transformer), sgd=dict(self.sgd))


def overparameterised_settings(context: CheckContext) -> OverparameterisedSettings:
    """Read the study's parameters from ``context``; ValueError when the student is not over-parameterised."""
    design = context.param("design", "five-token")
    options = dgm_settings(context, design)
    transformer = TransformerConfig(n_layer=context.param("n_layer", 1, 2), n_head=context.param("n_head", 2, 4),
                                    n_embd=context.param("n_embd", 32, 64),
                                    max_len=max(16, options["prefix_len"] + options["observations"] - 1))
    equation = context.param("equation", "ps-exact")
    parse_label(equation)  # validates the name now
    sgd = SGDConfig(lr=context.param("lr", 0.003), passes=context.param("passes", 20.0, 50.0),
                    batch_size=context.param("batch_size", 256), min_steps=context.param("min_steps", 60, 200),
                    max_steps=context.param("max_steps", 20000), eval_every=context.param("eval_every", 30, 100))
    n_grid = tuple(sorted({int(n) for n in comma_list(context.param("n", [125, 500, 1250],
                                                                     [250, 500, 1000, 2000, 4000]))}))
    if len(n_grid) < 2 or n_grid[0] < 20:
        raise ValueError(f"--set n={','.join(map(str, n_grid))} is invalid; allowed: at least two sizes >= 20")
    replicates = context.param("replicates", 3, 10)
    if replicates < 2:
        raise ValueError(f"--set replicates={replicates} is invalid; allowed: an integer >= 2 (MCSEs need spread)")
    settings = OverparameterisedSettings(
        design=design, dgm=tuple(sorted(options.items())), transformer=tuple(sorted(asdict(transformer).items())),
        equation=equation, sgd=tuple(sorted(asdict(sgd).items())), n_grid=n_grid, replicates=replicates,
        study_seed=context.param("study_seed", 20240606))
    settings.method()  # validates the equation's options and the sgd settings now, not inside a replicate
    min_ratio = context.param("min_ratio", 10.0)
    params = transformer.num_parameters(vocab_size=options["vocab_size"], embed_dim=options["embed_dim"])
    params += options["prefix_len"] * options["embed_dim"] * options["latent_dim"]  # the perturbation A
    if params < min_ratio * max(n_grid):
        raise ValueError(f"a transformer with {params} parameters is not over-parameterised for n up to "
                         f"{max(n_grid)}; allowed: at least min_ratio={min_ratio:g} x n parameters (raise n_embd or "
                         "n_layer, or lower n)")
    return settings


def _analyse(data: ReplicateData, cond: dict, *, settings: OverparameterisedSettings) -> dict:
    """Fit the transformer student by SGD (:func:`simstudy.domain.fit_student`) and measure its marginal
    against the truth (:func:`simstudy.domain.evaluate_student`)."""
    method = settings.method()
    student = data.dgm.make_student(seed=data.student_seed, dtype=torch.float32, **method.student_options())
    fit = fit_student(student, method, data.x, data.y, seed=data.student_seed)
    evaluation = evaluate_student(student, data, recovery=False)
    out = {k: evaluation[k] for k in REGION_METRICS}
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    out.update(n_parameters=float(n_params), parameters_per_datum=n_params / int(cond["n"]),
               fit_steps=float(fit.stats["steps"]), fit_best_step=float(fit.stats["best_step"]),
               fit_stopped_early=float(fit.stats["stopped_early"]), fit_seconds=float(fit.stats["seconds"]))
    return out


def build_study(settings: OverparameterisedSettings) -> Study:
    """n grid x one method x replicates; a fresh draw of the data and of the student's initialisation each."""
    return Study(design={"n": list(settings.n_grid)},
                 generate=make_generate({"design": settings.design, **settings.dgm_options()}),
                 analyse={settings.equation: functools.partial(_analyse, settings=settings)},
                 replicates=settings.replicates, seed=settings.study_seed, name="overparameterised",
                 options={"description": "transformer student by SGD (DESIGN §6.6)"})


def _rate_figure(rates: dict, path: Path, params: float) -> str:
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, len(rates))
    for ax, (label, rate) in zip(np.atleast_1d(axes), rates.items()):
        rate_plot(rate, ax=ax, title=f"{label} KL, transformer with {int(params)} parameters (bars +-1.96 MCSE)")
    return saved(fig, path)


@register("overparameterised", OVERPARAMETERISED_CLAIM)
def run_overparameterised(context: CheckContext) -> CheckResult:
    """DESIGN §6.6 (rule: OVERPARAMETERISED_RULE)."""
    name = "overparameterised"
    settings = overparameterised_settings(context)
    study = build_study(settings)
    store = study_store(Path(context.out) / "studies", name, study)
    result: StudyResult = context.record(study.run(n_jobs=context.n_jobs, store=store, progress=False))
    folder = context.folder(name)
    rate_id = result.rate("kl_id", x="n", by=["method"])
    rate_oos = result.rate("kl_oos", x="n", by=["method"])
    fit, fit_oos = rate_id.fits.iloc[0], rate_oos.fits.iloc[0]
    ok = ok_rows(result)
    params = float(ok["n_parameters"].iloc[0]) if len(ok) else math.nan
    holds = bool(np.isfinite(fit["slope_high"]) and fit["slope_high"] < 0)
    means = pd.concat([mean_table(result, m).assign(metric=m) for m in ("kl_id", "kl_oos")], ignore_index=True)
    steps = ok.groupby("n")[["fit_steps", "fit_best_step", "fit_stopped_early", "fit_seconds"]].mean().reset_index()
    statistics = {
        "slope_id": {"estimate": fit["slope"], "se": fit["slope_se"], "ci95": [fit["slope_low"], fit["slope_high"]],
                     "lack_of_fit_p": fit["lack_of_fit_p"]},
        "slope_oos": {"estimate": fit_oos["slope"], "se": fit_oos["slope_se"],
                      "ci95": [fit_oos["slope_low"], fit_oos["slope_high"]]},
        "mean_kl_id_by_n": {int(r.n): {"estimate": r.mean, "mcse": r.mcse}
                            for r in means[means["metric"] == "kl_id"].itertuples()},
        "mean_kl_oos_by_n": {int(r.n): {"estimate": r.mean, "mcse": r.mcse}
                             for r in means[means["metric"] == "kl_oos"].itertuples()},
        "n_parameters": params, "parameters_over_n_max": params / max(settings.n_grid),
        "failures": int((result.table["status"] != "ok").sum()), "holds": holds}
    figures = [_rate_figure({"ID": rate_id, "OOS": rate_oos}, folder / "kl_rate.png", params)]
    summary = (f"{int(params)} parameters ({params / max(settings.n_grid):.0f} x n_max={max(settings.n_grid)}), "
               f"R={settings.replicates}: ID KL slope {fit['slope']:.3f} [{fit['slope_low']:.3f}, "
               f"{fit['slope_high']:.3f}]; OOS slope {fit_oos['slope']:.3f} [{fit_oos['slope_low']:.3f}, "
               f"{fit_oos['slope_high']:.3f}] (not judged)")
    settings_out = asdict(settings)
    settings_out.update(dgm=settings.dgm_options(), transformer=dict(settings.transformer), sgd=dict(settings.sgd),
                        n_grid=list(settings.n_grid), n_jobs=context.n_jobs)
    return CheckResult(name=name, claim=OVERPARAMETERISED_CLAIM, decision_rule=OVERPARAMETERISED_RULE,
                       decision="pass" if holds else "fail", statistics=statistics, summary=summary,
                       tables={"mean_kl": means, "fits": steps, "replicates": result.table}, figures=figures,
                       settings=settings_out)
