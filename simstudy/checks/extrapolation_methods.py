"""The methods of the extrapolation check (DESIGN §6.7) and the one path that fits and evaluates them.

:data:`METHODS` lists every method the check can run, by its ``--set methods=`` key, with
its label in the tables, its solver kind (``exact``, ``sgd`` or ``peer``) and the
method name of :class:`~simstudy.domain.PerturbationMethod`. :func:`make_method` turns
one entry and the run's :class:`MethodSettings` into the engine's
``analyse(data, cond) -> dict``: build the student (:func:`~simstudy.domain.build_student`),
fit it (:func:`~simstudy.domain.fit_student`: Adam with early stopping, or the
quadrature + L-BFGS root of the equation's own ``root_objective``, DESIGN §3), and
evaluate it against the replicate's truth (:func:`~simstudy.domain.evaluate_student`,
DESIGN §5). The engression peer (:mod:`simstudy.checks.peers`) is scored by the same
region metrics on its Monte Carlo frequencies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import metrics
from ..domain import (PerturbationMethod, ReplicateData, build_student, evaluate_student, fit_statistics,
                      fit_student, region_metrics)
from ..quadrature import pruned_trapezoid
from . import peers

__all__ = ["DEFAULT_PRIMARY", "FIT_STATISTICS", "METHODS", "MethodEntry", "MethodSettings", "Skipped", "make_method",
           "method_spec"]


@dataclass(frozen=True)
class MethodEntry:
    """A method of the extrapolation study: ``key`` (for ``--set methods=``), the ``label`` in the
    tables, the solver ``kind`` (exact, sgd or peer) and the method name
    (:meth:`simstudy.domain.PerturbationMethod.from_name`)."""

    key: str
    label: str
    kind: str
    method: str


METHODS: dict[str, MethodEntry] = {e.key: e for e in [
    MethodEntry("mle-exact", "mle (exact solver)", "exact", "mle"),
    MethodEntry("ps-exact", "ps-exact (exact solver)", "exact", "ps-exact"),
    MethodEntry("q2-exact", "q2 (exact solver)", "exact", "q2"),
    MethodEntry("mle-sgd", "mle (sgd)", "sgd", "mle"),
    MethodEntry("ps-exact-sgd", "ps-exact (sgd)", "sgd", "ps-exact"),
    MethodEntry("ps-mh-sgd", "ps-mh (sgd)", "sgd", "ps-mh"),
    MethodEntry("q2-sgd", "q2 (sgd)", "sgd", "q2"),
    MethodEntry("aug-sgd", "aug (sgd)", "sgd", "aug"),
    MethodEntry("gaussian-sgd", "gaussian (sgd)", "sgd", "gaussian"),
    MethodEntry("neftune-sgd", "neftune (sgd)", "sgd", "neftune"),
    MethodEntry("discrete-sgd", "discrete (sgd)", "sgd", "discrete"),
    MethodEntry("engression", "engression (peer)", "peer", "engression"),
]}
#: The pair the decision rule judges unless ``--set primary_method=/primary_reference=`` (METHODS keys).
DEFAULT_PRIMARY = ("ps-exact", "mle-exact")
#: Solver statistics recorded per fit as ``fit_<key>`` columns (DESIGN §3: report the solve).
FIT_STATISTICS = ("steps", "best_step", "seconds", "evaluations", "grad_norm", "quadrature_error",
                  "eq_proposals_per_accepted", "eq_acceptance_rate", "on_gpu")


class Skipped(RuntimeError):
    """A method that does not apply to a condition (recorded with status "skipped")."""

    status = "skipped"


@dataclass
class MethodSettings:
    """Solver settings shared by the methods of one run (all recorded in the result)."""

    sgd: dict = field(default_factory=dict)  # SGDConfig fields for every sgd method
    ps_mh_steps: int = 100  # B of ps-mh (DESIGN §3: B = 100 unbiased, B = 20 biased)
    ps_exact_max_proposals: int = 100_000  # rejection budget per datum of ps-exact (sgd)
    q2_draws: int = 2  # K of q2
    exact_max_iter: int = 1000  # L-BFGS iterations of the exact solver
    exact_nodes: int = 31  # trapezoid nodes per dimension of the exact solver (pruned), q = 2
    exact_nodes_q1: int = 81  # the same for q = 1
    num_bins: int = 5  # distance bins of the extrapolation curve
    mc_draws: int = 8192  # draws of a Monte Carlo marginal
    eval_nodes: int = 31  # trapezoid nodes per dimension of the fitted marginal for q = 2 (refined: 61)
    exact_device: str = "cpu"  # torch device of the exact solver ("cuda" if available); evaluation is on cpu
    engression: dict = field(default_factory=dict)  # EngressionConfig fields


def make_method(entry: MethodEntry, settings: MethodSettings):
    """``analyse(data, cond) -> dict`` of one method for the engine (``data``: a
    :class:`~simstudy.domain.ReplicateData`)."""
    if entry.kind == "peer":
        return _peer_method(settings)
    spec = method_spec(entry, settings)

    def analyse(data: ReplicateData, cond: dict) -> dict:
        student = build_student(data.dgm, spec, data.student_seed)
        exact = None
        if spec.solver == "exact":
            exact = {"rule": _exact_rule(spec, student, settings), "max_iter": settings.exact_max_iter,
                     "max_refinements": 0}
        fit = fit_student(student, spec, data.x, data.y, seed=data.student_seed, exact=exact,
                          device=settings.exact_device)
        out = evaluate_student(student, data, num_bins=settings.num_bins, mc_draws=settings.mc_draws,
                               nodes={2: settings.eval_nodes})
        out.update(fit_statistics(fit, FIT_STATISTICS))
        return out

    return analyse


def method_spec(entry: MethodEntry, settings: MethodSettings) -> PerturbationMethod:
    """The :class:`~simstudy.domain.PerturbationMethod` of a non-peer ``entry`` under ``settings``."""
    options: dict = {}
    if entry.method == "ps-mh":
        options["equation_options"] = {"steps": settings.ps_mh_steps}
    if entry.method == "ps-exact":
        options["equation_options"] = {"max_proposals": settings.ps_exact_max_proposals}
    if entry.method == "q2":
        options["equation_options"] = {"num_draws": settings.q2_draws}
    return PerturbationMethod.from_name(entry.method, solver="exact" if entry.kind == "exact" else "sgd",
                                        sgd=dict(settings.sgd), **options)


def _exact_rule(spec: PerturbationMethod, student, settings: MethodSettings):
    """The exact solver's quadrature rule over z: None for mle (no latent), the pruned trapezoid
    rule for q <= 2; :class:`Skipped` for q > 2."""
    if spec.equation_class.root_objective == "mle":
        return None
    q = student.perturbation.latent_dim
    if q > 2:
        raise Skipped(f"the exact solver needs latent_dim <= 2 (latent_dim={q})")
    return pruned_trapezoid(settings.exact_nodes if q == 2 else settings.exact_nodes_q1, q)


def _peer_method(settings: MethodSettings):
    """``analyse`` of the engression peer: its class frequencies scored against the truth with their
    multinomial Monte Carlo bias removed (:func:`simstudy.checks.peers.multinomial_kl`)."""
    config = peers.EngressionConfig(**settings.engression)

    def analyse_peer(data: ReplicateData, cond: dict) -> dict:
        model = peers.fit_engression(data.dgm.embedding, data.x, data.y, config=config, seed=data.student_seed)
        freq = peers.engression_marginal(model, data.dgm.embedding, data.prefixes, config=config,
                                         seed=data.student_seed + 1)  # (N, V)
        res = peers.multinomial_kl(data.truth, freq, config.sample_size)
        out = region_metrics(data, res["kl"], metrics.tv_distance(data.truth, res["probs"]), res["mc_se"],
                             settings.num_bins)
        out["mc_bias_kl_oos"] = float(res["bias"][data.distance > 0].mean())
        out["marginal_error"] = 0.0
        return out

    return analyse_peer
