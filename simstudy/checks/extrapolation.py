"""Extrapolation check (DESIGN §6.7): does learned perturbation fitted by the
likelihood equations beat mle and the fixed perturbations out of support?

Study (on the engine, DESIGN §7). Conditions: the two reference designs of
DESIGN §4, "identified" (q = 2, tangent direction, c = 2 iid, n = 5000) and
"weakly-identified" (q = 1, random direction, c = 1, n = 10000), V = 41, a
16-unit tanh teacher, a fresh teacher per replicate. In every replicate every
method sees the same data and the same student initialisation seed, so method
differences are paired (common random numbers). Methods (labels as in the
tables):

* one fitting protocol for every stochastic fit (:func:`simstudy.fit.fit_sgd`,
  :data:`~simstudy.checks.extrapolation_methods.PROTOCOL`; DESIGN §4: compare methods only
  when each has reached its own early-stopping point): Adam at lr 5e-3 (constant), batches of
  250, early stopping on a held-out 10 % scored by the held-out log marginal likelihood
  (quadrature) every 2 passes with a patience of 40 passes, at most 300 passes. Every fit
  records the step and pass it stopped at and its best one (``fit_steps``, ``fit_best_step``,
  ``fit_passes_run``, ``fit_best_pass``), whether early stopping fired (``fit_stopped_early``)
  or the budget ran out first (``fit_hit_cap``, flagged in the summary), and its validation
  curve (``fit_validation_curve``, "step:score;..."). Each setting is a ``--set`` key
  (``sgd_lr``, ``sgd_schedule``, ``sgd_final_lr_fraction``, ``sgd_batch_size``,
  ``sgd_max_passes``, ``sgd_validation_fraction``, ``sgd_eval_every_passes``,
  ``sgd_patience_passes``) and, in a study file, a key of a method's ``sgd`` table.
  Methods: ``ps-mh (sgd)`` (B = 100 independence steps), ``ps-exact (sgd)`` (rejection in
  growing rounds with a budget of ``ps_exact_max_proposals`` = 65 536 proposals per datum;
  a datum still unaccepted then gets one draw by importance resampling from its proposals,
  ``ps_exact_fallback = "importance"``, which makes the equation slightly biased: the
  fraction of datum-visits that fell back is recorded per fit, ``fit_eq_fallback_fraction``;
  ``none`` is the strict variant that fails the fit instead; E[1/m] = V^c proposals per
  datum, 1681 in the identified design, so it runs in the second, smaller study),
  ``q2 (sgd)``, ``aug (sgd)``, ``mle (sgd)``, and the fixed baselines of DESIGN §2 trained
  with aug: ``gaussian (sgd)`` (sigma = 0.3), ``neftune (sgd)`` (alpha = 1),
  ``discrete (sgd)`` (rho = 0.3, h = 0.1);
* the empirical roots, reported, never the decided pair: ``likelihood (empirical root)``, the
  root of the empirical likelihood equations that ps-exact and ps-mh both estimate, and
  ``mle (empirical root)``, solved deterministically (quadrature over z, L-BFGS,
  :func:`simstudy.fit.fit_exact`) with an iteration cap (``exact_max_iter``); unregularised,
  so their out-of-support KL depends on that cap (paper_checks/FINDINGS.md); ``q2 (empirical
  root)`` on request;
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

Decision rule (:mod:`.extrapolation_claim`): PASS when, in the identified design, the primary
pair (``ps-mh (sgd)`` against ``mle (sgd)`` by default: the likelihood equation and mle under the
one protocol, paired on the same data) has at least ``min_pairs`` (20) pairs, the paired OOS
difference's 95 % interval entirely below 0 AND the paired ID difference's upper 95 % limit
below the margin; FAIL otherwise; REPORTED when the identified design or the primary pair was
not run or has too few pairs. The rule's pre-registered form decided on the two exact solves;
the rule's text on the results page states it and why it was replaced. Every other comparison
(each method against each mle fit, ps against the fixed perturbations, the weakly identified
design, the peer) is reported as a finding: "beats" (interval below 0), "worse" (above 0) or
"no decisive difference". Where the gain exists, over the factors that decide it, is the
map of :mod:`.extrapolation_map`.

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
from ..domain import cached_dgm, make_generate
from ..engine import Study
from ..metrics import mc_marginal_kl
from ..validation import check_choice
from . import peers
from .base import CheckContext, CheckResult, register
from .common import NOT_SETTABLE, study_store
from .extrapolation_claim import CLAIM, NAME, REFERENCE_DESIGNS
from .extrapolation_methods import (DEFAULT_PRIMARY, METHODS, PROTOCOL, MethodEntry, MethodSettings, Skipped,
                                    make_method, method_settings)
from .extrapolation_report import FIXED_BASELINES, report, report_from_stores
from .extrapolation_statistics import findings, paired_differences, verdict

__all__ = ["CLAIM", "DEFAULT_PRIMARY", "FIXED_BASELINES", "METHODS", "NAME", "REFERENCE_DESIGNS", "STUDY_VERSION",
           "PROTOCOL", "MethodEntry", "MethodSettings", "Skipped", "findings", "make_method", "mc_marginal_kl",
           "paired_differences", "report", "report_from_stores", "run", "verdict"]

#: Bump when what a replicate computes changes: stored runs of another version are not resumed.
STUDY_VERSION = 2  # 2: the one early-stopping protocol (issue 11)
#: DGM keywords a ``--set`` may override: the DGM's signature less the labels, sample sizes and the seed
#: (the check's own ``seed``; the teacher's is drawn per replicate or is that seed).
DGM_KEYS = tuple(k for k in dgm_keywords() if k not in NOT_SETTABLE + ("seed",))


def dgm_overrides(context: CheckContext) -> dict:
    """The DGM keywords the user set (``vocab_size`` always: 11 at smoke scale), typed like the identified
    design's value or else the DGM's default; the reference design of each condition supplies the rest."""
    # a None default types nothing: student_hidden parses as an integer (features stays a string, which
    # PerturbedNextToken splits at commas itself)
    template = {**dgm_defaults(), **DESIGNS["identified"], "student_hidden": DESIGNS["identified"]["hidden"]}
    options = {}
    for key in DGM_KEYS:
        if key == "vocab_size":
            options[key] = context.param(key, 11, template[key])
        elif key in context.overrides:
            options[key] = context.param(key, template[key])
    return options


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
    dgm_options = dgm_overrides(context)
    for d in designs:  # a bad DGM value fails here, in one line, not as a failed row per replicate
        cached_dgm({**dgm_options, "design": d})
    n_by_design = {"identified": context.param("n_identified", 400, DESIGNS["identified"]["n"]),
                   "weakly-identified": context.param("n_weakly_identified", 800, DESIGNS["weakly-identified"]["n"])}
    replicates = context.param("replicates", 3, 20)
    seed = context.param("seed", 2605)
    fresh_teacher = context.param("fresh_teacher", True)
    default_methods = (["mle-sgd", "ps-mh-sgd", "mle-exact", "ps-exact", "gaussian-sgd", "engression"] if not full
                       else ["mle-sgd", "ps-mh-sgd", "mle-exact", "ps-exact", "q2-sgd", "aug-sgd", "gaussian-sgd",
                             "neftune-sgd", "discrete-sgd", "engression"])
    method_keys = list(context.param("methods", default_methods))
    small_keys = list(context.param("small_methods", ["ps-exact-sgd"]))
    small_replicates = context.param("small_replicates", 2, 4)
    if small_keys == ["none"] or small_keys == [""]:
        small_keys = []
    for key in method_keys + small_keys:
        check_choice("methods", key, METHODS, word="unknown")
    settings = method_settings(context)
    margin_fraction = context.param("margin_fraction", 0.10)
    min_pairs = context.param("min_pairs", 2, 20)
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
                "primary": list(primary), "min_pairs": min_pairs, "notes": notes}
    folder = context.folder(NAME)
    tables = []
    for keys, reps, tag in ((method_keys, replicates, "main"), (small_keys, small_replicates, "small")):
        if not keys:
            continue
        study = Study(design=conditions, generate=generate,
                      analyse={METHODS[k].label: make_method(METHODS[k], settings) for k in keys},
                      replicates=reps, seed=seed, name=f"{NAME}-{tag}", copy_data=False, seed_torch=True,
                      fingerprint=_fingerprint({"dgm_overrides": dgm_options, "fresh_teacher": fresh_teacher,
                                                "method_settings": settings.identity(),
                                                "methods": [METHODS[k].label for k in keys]}))
        result = context.record(study.run(n_jobs=context.n_jobs, store=study_store(folder, "store", study),
                                          progress=False))
        tables.append(result.table.assign(study=tag))
    table = pd.concat(tables, ignore_index=True, sort=False)
    return report(table, primary=primary, margin_fraction=margin_fraction, folder=folder, designs=designs,
                  settings=recorded, notes=notes, min_pairs=min_pairs)
