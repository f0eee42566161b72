"""Extrapolation check (DESIGN §6.7): does learned perturbation fitted by the
likelihood equations beat mle and the fixed perturbations out of support?

Study (on the engine, DESIGN §7). Conditions: the two reference designs of
DESIGN §4, "identified" (q = 2, tangent direction, c = 2 iid, n = 5000) and
"weakly-identified" (q = 1, random direction, c = 1, n = 10000), V = 41, a
16-unit tanh teacher, a fresh teacher per replicate. In every replicate every
method sees the same data and the same student initialisation seed, so method
differences are paired (common random numbers). Methods (labels as in the
tables):

* ``ps-exact (exact solver)``: the empirical likelihood equations, the common
  root of ps-exact and ps-mh (both are unbiased estimating functions of
  grad log m, DESIGN §3), solved deterministically: expectations over z by a
  trapezoid rule (q <= 2), L-BFGS (:func:`simstudy.fit.fit_exact`, objective
  "likelihood") with a fixed iteration budget; its gradient norm at the end is
  recorded (``fit_grad_norm``), so how close to the root it got is on record;
* ``mle (exact solver)``: the unperturbed model's likelihood, same solver;
* ``q2 (exact solver)``: the Brier root (objective "brier"); off by default (one
  evaluation of that objective cost about 14 s at the identified design, 3.5
  times the likelihood's, on a shared core), ``q2 (sgd)`` is run instead;
* stochastic fits (:func:`simstudy.fit.fit_sgd`, Adam, fresh draws every step,
  early stopping on a held-out 10 % scored by the held-out log marginal):
  ``ps-exact (sgd)`` (rejection sampler, genuinely stochastic; E[1/m] = V^c
  proposals per datum, so it runs at a smaller scale: fewer replicates, in a
  second study on the same data; from a random initialisation a datum can need
  more than the sampler's budget (``ps_exact_max_proposals``, 10^5), which is
  recorded as a failure, never dropped: in the identified design (V = 41, c = 2)
  a run with a budget of 2 x 10^6 still failed after 280 s on a datum with
  log m = -13.3, so it is not run by default at full scale either; ask for it
  with ``--set small_methods=ps-exact-sgd``), ``ps-mh (sgd)`` (B = 100 independence steps),
  ``q2 (sgd)``, ``aug (sgd)``, ``mle (sgd)``, and the fixed baselines of DESIGN §2
  trained with aug: ``gaussian (sgd)`` (sigma = 0.3), ``neftune (sgd)``
  (alpha = 1), ``discrete (sgd)`` (rho = 0.3, h = 0.1);
* ``engression (peer)``: engression 1.1.0's GEM on (E(x), one-hot y) when the
  package is importable (:mod:`simstudy.checks.peers`), else skipped with a note.

Metrics per fit (DESIGN §5): KL(m* || m-hat) averaged over the in-support (ID)
and out-of-support (OOS) prefixes, OOS KL by distance bin (the extrapolation
curve), TV, perturbation recovery (``scale_ratio`` = ||W1 A|| / ||W1* A*||, with
``cov_error`` and ``cov_spectrum_error``). Marginals by
quadrature when the latent allows it; Monte Carlo marginals (the 6-dimensional
fixed Gaussian, the peer's samples) have their second-order Monte Carlo bias of
the KL removed and their Monte Carlo standard error of the KL recorded
(``mc_se_kl_id``, ``mc_se_kl_oos``).

Statistics. For method M and reference R in design D, the paired differences
d_r = KL(M, r) - KL(R, r) over replicates r: mean, MCSE = sd / sqrt(n_pairs),
95 % interval mean +- t_{n-1, 0.975} MCSE. ID margin: ``margin_fraction`` (10 %)
of R's mean ID KL in that design.

Decision rule: PASS when, in the identified design, the primary pair
(``ps-exact (exact solver)`` against ``mle (exact solver)`` by default) has the
paired OOS difference's 95 % interval entirely below 0 AND the paired ID
difference's upper 95 % limit below the margin; FAIL otherwise; REPORTED when
the identified design or the primary pair was not run. Every other comparison
(each method against mle, ps against the fixed perturbations, the weakly
identified design, the peer) is reported as a finding: "beats" (interval below
0), "worse" (above 0) or "no decisive difference".

The check's parts, one concept a module: :mod:`.extrapolation_claim` (claim and decision
rule), :mod:`.extrapolation_methods` (the methods, their settings, fit and evaluation on
the domain library :mod:`simstudy.domain`), :mod:`.extrapolation_statistics` (paired
differences, findings, curves), :mod:`.extrapolation_report` (the result, from a run or
from stores), :mod:`.extrapolation_figures`; this module runs the study.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd

from ..dgm import DESIGNS, dgm_defaults, dgm_keywords
from ..domain import make_generate
from ..engine import Study
from ..metrics import mc_marginal_kl
from ..validation import check_choice
from . import peers
from .base import CheckContext, CheckResult, register
from .common import NOT_SETTABLE, study_store
from .extrapolation_claim import CLAIM, NAME, REFERENCE_DESIGNS
from .extrapolation_methods import DEFAULT_PRIMARY, METHODS, MethodEntry, MethodSettings, Skipped, make_method
from .extrapolation_report import FIXED_BASELINES, report, report_from_stores
from .extrapolation_statistics import findings, paired_differences, verdict

__all__ = ["CLAIM", "DEFAULT_PRIMARY", "FIXED_BASELINES", "METHODS", "NAME", "REFERENCE_DESIGNS", "STUDY_VERSION",
           "MethodEntry", "MethodSettings", "Skipped", "findings", "make_method", "mc_marginal_kl",
           "paired_differences", "report", "report_from_stores", "run", "verdict"]

#: Bump when what a replicate computes changes: stored runs of another version are not resumed.
STUDY_VERSION = 1
#: DGM keywords a ``--set`` may override: the DGM's signature less the labels, sample sizes and the seed
#: (the check's own ``seed``; the teacher's is drawn per replicate or is that seed).
DGM_KEYS = tuple(k for k in dgm_keywords() if k not in NOT_SETTABLE + ("seed",))


def _dgm_overrides(context: CheckContext) -> dict:
    """The DGM keywords the user set (``vocab_size`` always: 11 at smoke scale), typed like the identified
    design's value or else the DGM's default; the reference design of each condition supplies the rest."""
    template = {**dgm_defaults(), **DESIGNS["identified"]}
    options = {}
    for key in DGM_KEYS:
        if key == "vocab_size":
            options[key] = context.param(key, 11, template[key])
        elif key in context.overrides:
            options[key] = context.param(key, template[key])
    return options


def _method_settings(context: CheckContext) -> MethodSettings:
    """The solver settings of the run (smoke and full defaults, ``--set`` overrides)."""
    sgd = {"passes": context.param("sgd_passes", 6.0, 50.0), "batch_size": context.param("sgd_batch_size", 128, 256),
           "lr": context.param("sgd_lr", 0.02), "min_steps": context.param("sgd_min_steps", 60, 200),
           "eval_every": context.param("sgd_eval_every", 20, 100), "patience": context.param("sgd_patience", 5, 10)}
    return MethodSettings(
        sgd=sgd, ps_mh_steps=context.param("ps_mh_steps", 20, 100), q2_draws=context.param("q2_draws", 2),
        ps_exact_max_proposals=context.param("ps_exact_max_proposals", 100_000),
        exact_max_iter=context.param("exact_max_iter", 150, 1000), exact_nodes=context.param("exact_nodes", 21, 31),
        exact_nodes_q1=context.param("exact_nodes_q1", 41, 81), num_bins=context.param("num_bins", 3, 5),
        mc_draws=context.param("mc_draws", 4096, 8192), eval_nodes=context.param("eval_nodes", 21, 31),
        exact_device=context.param("exact_device", "cpu"),
        engression={"num_epochs": context.param("engression_epochs", 40, 300),
                    "batch_size": context.param("engression_batch_size", 500, 1000),
                    "hidden_dim": context.param("engression_hidden", 100),
                    "sample_size": context.param("engression_sample_size", 4000, 10000)})


def _fingerprint(settings: dict) -> str:
    """The study's identity for the store: its settings and :data:`STUDY_VERSION`
    (not the source, so that a change to the reporting code keeps a finished run)."""
    return json.dumps({"version": STUDY_VERSION, **settings}, sort_keys=True, default=str)


@register(NAME, CLAIM)
def run(context: CheckContext) -> CheckResult:
    """The extrapolation check of DESIGN §6.7 (module docstring: study, statistics, decision rule)."""
    full = context.scale == "full"
    designs = list(context.param("designs", list(REFERENCE_DESIGNS)))
    for d in designs:
        check_choice("designs", d, REFERENCE_DESIGNS)
    dgm_options = _dgm_overrides(context)
    n_by_design = {"identified": context.param("n_identified", 400, DESIGNS["identified"]["n"]),
                   "weakly-identified": context.param("n_weakly_identified", 800, DESIGNS["weakly-identified"]["n"])}
    replicates = context.param("replicates", 3, 16)
    seed = context.param("seed", 2605)
    fresh_teacher = context.param("fresh_teacher", True)
    default_methods = (["mle-exact", "ps-exact", "mle-sgd", "ps-mh-sgd", "gaussian-sgd", "engression"] if not full
                       else ["mle-exact", "ps-exact", "mle-sgd", "ps-mh-sgd", "q2-sgd", "aug-sgd", "gaussian-sgd",
                             "neftune-sgd", "discrete-sgd", "engression"])
    method_keys = list(context.param("methods", default_methods))
    small_keys = list(context.param("small_methods", ["ps-exact-sgd"], ["none"]))
    small_replicates = context.param("small_replicates", 2, 4)
    if small_keys == ["none"] or small_keys == [""]:
        small_keys = []
    for key in method_keys + small_keys:
        check_choice("methods", key, METHODS, word="unknown")
    settings = _method_settings(context)
    margin_fraction = context.param("margin_fraction", 0.10)
    primary = tuple(METHODS[check_choice(key, context.param(key, default), METHODS, word="unknown")].label
                    for key, default in zip(("primary_method", "primary_reference"), DEFAULT_PRIMARY))

    notes = []
    if not peers.engression_available():
        for keys in (method_keys, small_keys):
            if "engression" in keys:
                keys.remove("engression")
                notes.append(peers.ENGRESSION_HINT)
    conditions = [{"design": d, "n": int(n_by_design[d])} for d in designs]
    # the condition's design selects the reference design; without a fresh teacher the seed is the teacher's
    generate = make_generate(dgm_options if fresh_teacher else {**dgm_options, "seed": seed},
                             fresh_teacher=fresh_teacher)
    recorded = {"designs": designs, "n": n_by_design, "dgm_overrides": dgm_options, "replicates": replicates,
                "seed": seed, "fresh_teacher": fresh_teacher, "methods": [METHODS[k].label for k in method_keys],
                "small_methods": [METHODS[k].label for k in small_keys], "small_replicates": small_replicates,
                "method_settings": asdict(settings), "margin_fraction": margin_fraction,
                "primary": list(primary), "notes": notes}
    folder = context.folder(NAME)
    tables = []
    for keys, reps, tag in ((method_keys, replicates, "main"), (small_keys, small_replicates, "small")):
        if not keys:
            continue
        study = Study(design=conditions, generate=generate,
                      analyse={METHODS[k].label: make_method(METHODS[k], settings) for k in keys},
                      replicates=reps, seed=seed, name=f"{NAME}-{tag}", copy_data=False, seed_torch=True,
                      fingerprint=_fingerprint({"dgm_overrides": dgm_options, "fresh_teacher": fresh_teacher,
                                                "method_settings": asdict(settings),
                                                "methods": [METHODS[k].label for k in keys]}))
        result = context.record(study.run(n_jobs=context.n_jobs, store=study_store(folder, "store", study),
                                          progress=False))
        tables.append(result.table.assign(study=tag))
    table = pd.concat(tables, ignore_index=True, sort=False)
    return report(table, primary=primary, margin_fraction=margin_fraction, folder=folder, designs=designs,
                  settings=recorded, notes=notes)
