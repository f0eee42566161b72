"""Fisher information, sandwich covariances and KL constants by quadrature (DESIGN §6.3-§6.5).

The asymptotic theory of the estimating equations of DESIGN §3, for a
well-specified parametric student whose trainable parameters are theta (P of
them) and data (x, y) with x drawn from the support and y ~ m*(. | x):

* an estimating equation is the gradient of a per-datum objective term
  t(theta; x, y) (``likelihood``: log m(y | x), the root of ps-exact, ps-mh, sumo;
  ``brier``: -sum_j [||m_j||^2 - 2 m_j(y_j)], the root of q2; the same terms as
  :func:`simstudy.fit.exact.exact_objective`);
* psi = grad t, A = E[grad psi] (the Hessian of the population objective),
  B = Cov(psi); the root is asymptotically normal with covariance
  Sigma / n, Sigma = A^+ B A^+ (the sandwich);
* the Fisher information is I = E[s s^T], s = grad log m(y | x); for the
  likelihood A = -I and B = I (information equality), so Sigma = I^+;
* KL(m* || m-hat) averaged over the data's prefixes is, to second order,
  (1/2) delta^T I delta, so n E[KL] -> (1/2) tr(I Sigma): r/2 for the likelihood
  equations (r = rank I, the Cramér-Rao limit) and the sandwich constant
  (1/2) tr(I A^+ B A^+) for q2; averaged over other prefixes (OOS) I is
  replaced by that set's information I_oos.

Parameters that leave m unchanged (softmax shifts, the part of G's output that
f's first layer ignores, DESIGN §3) make I singular. Everything is computed on
the identifiable subspace: the span of the eigenvectors of I whose eigenvalues
exceed ``rtol`` times the largest (a stated relative tolerance; the gap to the
first dropped eigenvalue is reported so that the cut can be judged).

Expectations over y are exact: every outcome y in V^c is enumerated for every
prefix, weighted by P(x) m(y | x), and m is computed by quadrature over z.
Derivatives are exact too (``torch.func`` on a flat parameter vector). The flat parameter view,
the identifiable subspace and the sandwich algebra are in :mod:`simstudy.checks.fisher_linalg`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import quadrature
from .fisher_linalg import DEFAULT_RTOL, FlatParameters, Subspace, identifiable_subspace, kl_constant, \
    sandwich_covariance

OBJECTIVES = ("likelihood", "brier")
MAX_ENUMERATED_ROWS = 200_000  # prefixes x V^c outcomes enumerated for population expectations


# ---- objective terms -----------------------------------------------------------------------
def objective_terms(model, x: torch.Tensor, y: torch.Tensor, objective: str, rule: quadrature.Rule) -> torch.Tensor:
    """Per-datum objective terms t(theta; x_i, y_i) ``(B,)`` with autograd (maximised by the root).

    ``likelihood``: log m(y | x) of the whole datum (per-datum latent scope);
    ``brier``: -sum_j [||m_j||^2 - 2 m_j(y_j)], m_j the per-token marginal (DESIGN §2).
    Their weighted mean is :func:`simstudy.fit.exact.exact_objective`.
    """
    if objective == "likelihood":
        return model.quadrature_log_lik(x, y, rule)  # (B,)
    if objective == "brier":
        marg = model.quadrature_token_log_marginals(x, y, rule).exp()  # (B, c, V)
        observed = marg.gather(-1, y[..., None]).squeeze(-1)  # (B, c)
        return -((marg ** 2).sum(-1) - 2 * observed).sum(-1)  # (B,)
    raise ValueError(f"objective={objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")


def solver_rule(model, rule: quadrature.Rule | None = None) -> quadrature.Rule:
    """The quadrature rule used here: ``rule`` or the default rule of the model's latent dimension."""
    p = model.perturbation
    if not (getattr(p, "gaussian_latent", False) and 1 <= p.latent_dim <= 3):
        raise ValueError(f"perturbation={type(p).__name__} (latent_dim={getattr(p, 'latent_dim', None)}) has no "
                         "quadrature rule; allowed: a Gaussian latent of dimension 1 to 3")
    return rule if rule is not None else quadrature.default_rule(p.latent_dim)


def group_data(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (x, y) rows and their frequencies: ``(D, L)``, ``(D, c)``, weights ``(D,)`` summing to 1."""
    rows = torch.cat([x, y], dim=1)
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    L = x.shape[1]
    return unique[:, :L], unique[:, L:], counts.to(torch.float64) / counts.sum()


# ---- derivatives ---------------------------------------------------------------------------------
def term_gradients(model, x, y, objective: str, rule: quadrature.Rule | None = None) -> torch.Tensor:
    """psi_i = grad_theta t(theta; x_i, y_i) for every row: ``(B, P)`` (exact, torch.func.jacrev)."""
    rule = solver_rule(model, rule)
    flat = FlatParameters.of(model)
    fn = lambda theta: flat.call(lambda m, a, b: objective_terms(m, a, b, objective, rule), theta, x, y)  # noqa: E731
    return torch.func.jacrev(fn)(flat.theta()).detach()


def objective_hessian(model, x, y, weights: torch.Tensor, objective: str,
                      rule: quadrature.Rule | None = None) -> torch.Tensor:
    """Hessian of sum_i w_i t(theta; x_i, y_i) in theta: ``(P, P)`` (exact, torch.func.hessian)."""
    rule = solver_rule(model, rule)
    flat = FlatParameters.of(model)
    w = torch.as_tensor(weights, dtype=model.dtype)

    def total(theta):
        return (flat.call(lambda m, a, b: objective_terms(m, a, b, objective, rule), theta, x, y) * w).sum()

    H = torch.func.hessian(total)(flat.theta()).detach()
    return 0.5 * (H + H.T)


def marginal_gradient(model, x0: torch.Tensor, y0: torch.Tensor,
                      rule: quadrature.Rule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token marginals m(y0_k | x0_k) ``(K,)`` and their gradients ``(K, P)``: the
    delta-method ingredients of an identifiable scalar functional (DESIGN §3, §6.4)."""
    rule = solver_rule(model, rule)
    flat = FlatParameters.of(model)
    y0 = torch.as_tensor(y0, dtype=torch.long)

    def fn(theta):
        logm = flat.call(lambda m, a: m.quadrature_token_log_marginals(a, None, rule), theta, x0)  # (K, 1, V)
        return logm[:, 0].gather(-1, y0[:, None]).squeeze(-1).exp()  # (K,)

    theta = flat.theta()
    return fn(theta).detach(), torch.func.jacrev(fn)(theta).detach()


# ---- population expectations by enumeration -----------------------------------------------------
def enumerate_outcomes(prefixes, vocab_size: int, observations: int,
                       prefix_weights=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (x, y) with y in V^c for the given prefixes: x ``(N V^c, L)``, y ``(N V^c, c)``
    and the prefix weight of each row ``(N V^c,)`` (uniform over prefixes by default)."""
    x = torch.as_tensor(np.asarray(prefixes), dtype=torch.long)
    N = x.shape[0]
    outcomes = vocab_size ** observations
    if N * outcomes > MAX_ENUMERATED_ROWS:
        raise ValueError(f"{N} prefixes x {vocab_size}^{observations} outcomes = {N * outcomes} rows is too many; "
                         f"allowed: at most {MAX_ENUMERATED_ROWS} (a smaller vocabulary or fewer observations)")
    ys = torch.tensor(list(itertools.product(range(vocab_size), repeat=observations)), dtype=torch.long)  # (V^c, c)
    w = torch.full((N,), 1.0 / N, dtype=torch.float64) if prefix_weights is None else torch.as_tensor(
        np.asarray(prefix_weights, dtype=np.float64))
    return x.repeat_interleave(outcomes, 0), ys.repeat(N, 1), w.repeat_interleave(outcomes)


@torch.no_grad()
def outcome_probabilities(model, x: torch.Tensor, y: torch.Tensor, rule: quadrature.Rule | None = None) -> torch.Tensor:
    """m(y | x) of whole data under ``model`` by quadrature: ``(B,)``."""
    return model.quadrature_log_lik(x, y, solver_rule(model, rule)).exp()


@dataclass
class PopulationMatrices:
    """I, and A, B of each objective, at one parameter (usually the truth)."""

    information: np.ndarray
    A: dict
    B: dict
    mean_psi: dict  # max |E psi| per objective: ~0 at the truth (unbiasedness of the equation)


def population_matrices(model, prefixes, *, observations: int = 1, objectives=OBJECTIVES,
                        rule: quadrature.Rule | None = None, prefix_weights=None) -> PopulationMatrices:
    """I = E[s s^T] and, per objective, A = Hessian of E[t] and B = Cov(psi), with the data
    distribution P(x) m(y | x) of ``model`` itself (exact enumeration of y in V^c)."""
    rule = solver_rule(model, rule)
    x, y, wx = enumerate_outcomes(prefixes, model.vocab_size, observations, prefix_weights)
    prob = wx * outcome_probabilities(model, x, y, rule)  # (N V^c,) P(x, y)
    A, B, mean_psi = {}, {}, {}
    scores = term_gradients(model, x, y, "likelihood", rule)  # (N V^c, P)
    information = ((scores.T * prob) @ scores).numpy()
    for objective in objectives:
        psi = scores if objective == "likelihood" else term_gradients(model, x, y, objective, rule)
        mean = (psi.T * prob).sum(1)  # (P,)
        centred = psi - mean
        B[objective] = ((centred.T * prob) @ centred).numpy()
        A[objective] = objective_hessian(model, x, y, prob, objective, rule).numpy()
        mean_psi[objective] = float(mean.abs().max())
    return PopulationMatrices(information=information, A=A, B=B, mean_psi=mean_psi)


def empirical_sandwich(model, x: torch.Tensor, y: torch.Tensor, objective: str, rule: quadrature.Rule | None = None,
                       rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Sigma-hat = A-hat^+ B-hat A-hat^+ of the empirical equation at the model's current
    parameters (the fitted root), from the distinct data rows: ``(P, P)``; the root's
    covariance is Sigma-hat / n. Pseudo-inverse of A-hat at relative tolerance ``rtol``."""
    xu, yu, w = group_data(x, y)
    psi = term_gradients(model, xu, yu, objective, rule)  # (D, P)
    mean = (psi.T * w).sum(1)
    centred = psi - mean
    B = ((centred.T * w) @ centred).numpy()
    A = objective_hessian(model, xu, yu, w, objective, rule).numpy()
    return sandwich_covariance(A, B, None, rtol)


# ---- the theory of one design --------------------------------------------------------------------
@dataclass
class AsymptoticTheory:
    """Asymptotic constants of a well-specified student at the truth (DESIGN §6.3-§6.5).

    ``constants[objective][region]`` is the limit of n E[KL(m* || m-hat)] averaged over the
    region's prefixes ("id": the data's prefixes; "oos": out of support);
    ``covariances[objective]`` is Sigma (P x P) on the identifiable subspace.
    ``null_leak_oos`` is max |U0^T I_oos U0| / max |I_oos| over the dropped directions U0:
    ~0 when what the in-support data cannot identify does not move OOS predictions either.
    """

    num_parameters: int
    subspace: Subspace
    constants: dict
    covariances: dict
    information: np.ndarray
    information_oos: np.ndarray | None
    null_leak_oos: float
    mean_psi: dict
    notes: list = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.subspace.rank

    def efficiency_ratio(self, region: str = "id") -> float:
        """n E[KL] of q2 over that of the likelihood equations (>= 1: the likelihood is efficient)."""
        return self.constants["brier"][region] / self.constants["likelihood"][region]

    def functional_variance(self, gradients, objective: str) -> np.ndarray:
        """n Var of the estimates of functionals with gradients ``(K, P)``: g^T Sigma g."""
        G = np.asarray(gradients)
        return np.einsum("kp,pq,kq->k", G, self.covariances[objective], G)

    def statistics(self) -> dict:
        """JSON-ready numbers for a check result."""
        ev = self.subspace.eigenvalues
        return {"num_parameters": self.num_parameters, "rank": self.rank, "rtol": self.subspace.rtol,
                "eigenvalue_gap": self.subspace.gap, "condition_number": self.subspace.condition,
                "eigenvalues": ev.tolist(), "constants": self.constants,
                "efficiency_ratio_id": self.efficiency_ratio("id"), "null_leak_oos": self.null_leak_oos,
                "max_abs_mean_psi_at_truth": self.mean_psi}

    def summary(self) -> str:
        c = self.constants
        lines = [f"Fisher information: rank r = {self.rank} of {self.num_parameters} parameters (relative "
                 f"eigenvalue tolerance {self.subspace.rtol:g}, gap {self.subspace.gap:.3g}, condition "
                 f"{self.subspace.condition:.3g})",
                 f"  n E[KL] limits, ID: likelihood r/2 = {c['likelihood']['id']:.4g}, q2 sandwich "
                 f"{c['brier']['id']:.4g} (ratio {self.efficiency_ratio('id'):.4g})"]
        if "oos" in c["likelihood"]:
            lines.append(f"  OOS: likelihood {c['likelihood']['oos']:.4g}, q2 {c['brier']['oos']:.4g} "
                         f"(null leak {self.null_leak_oos:.2g})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def asymptotic_theory(model, prefixes_id, prefixes_oos=None, *, observations: int = 1,
                      rule: quadrature.Rule | None = None, rtol: float = DEFAULT_RTOL,
                      prefix_weights=None) -> AsymptoticTheory:
    """The constants of DESIGN §6.3 for ``model`` at its current parameters, taken as the truth.

    ``prefixes_id`` are the data's prefixes (uniform unless ``prefix_weights``), ``prefixes_oos``
    an evaluation set (uniform). I, A and B are exact expectations (enumeration of y,
    quadrature over z); the rank of I uses the relative tolerance ``rtol``.
    """
    pm = population_matrices(model, prefixes_id, observations=observations, rule=rule,
                             prefix_weights=prefix_weights)
    sub = identifiable_subspace(pm.information, rtol)
    covariances = {obj: sandwich_covariance(pm.A[obj], pm.B[obj], sub.basis) for obj in OBJECTIVES}
    notes = []
    # the KL metric compares next-token marginals: weigh Sigma by the next-token information
    # of each region (the data's own information when c = 1)
    info_id = pm.information if observations == 1 else population_matrices(
        model, prefixes_id, observations=1, objectives=(), rule=rule, prefix_weights=prefix_weights).information
    if observations != 1:
        notes.append(f"data of c = {observations} observations: Sigma from the whole-datum equations, KL of "
                     "next-token marginals; the likelihood's ID constant is then not r/2")
    constants = {obj: {"id": kl_constant(info_id, covariances[obj])} for obj in OBJECTIVES}
    info_oos, leak = None, float("nan")
    if prefixes_oos is not None and len(prefixes_oos):
        info_oos = population_matrices(model, prefixes_oos, observations=1, objectives=(), rule=rule).information
        for obj in OBJECTIVES:
            constants[obj]["oos"] = kl_constant(info_oos, covariances[obj])
        U0 = sub.null_basis
        leak = float(np.abs(U0.T @ info_oos @ U0).max() / max(np.abs(info_oos).max(), 1e-300)) if U0.size else 0.0
    return AsymptoticTheory(num_parameters=int(pm.information.shape[0]), subspace=sub, constants=constants,
                            covariances=covariances, information=pm.information, information_oos=info_oos,
                            null_leak_oos=leak, mean_psi=pm.mean_psi, notes=notes)
