"""q2: the gradient of an unbiased estimate of the Brier score of m (DESIGN §3).

The Brier score of the marginal at the observation y is
BS(m, y) = ||m||^2 - 2 m_y + 1 with m = E_z p(. | x, z). Both terms are
expectations over the latent, ||m||^2 = E_{z, z'} <p(z), p(z')> over independent
z, z', so with K >= 2 prior draws the U-statistic over ordered pairs i != j

    mean_{i != j} <p(z_i), p(z_j)> - 2 mean_i p_y(z_i)
    = (||sum_i p_i||^2 - sum_i ||p_i||^2) / (K (K - 1)) - 2 mean_i p_y(z_i)

is unbiased for BS - 1, with no loop over pairs. The Brier score is strictly
proper, so the equation is Fisher consistent (DESIGN §3).

Latent scope (DESIGN §2):

* ``scope="token"``: sum over positions j of the Brier score of the per-token
  marginal m(. | x, y_<j); one forward pass per draw serves every position;
* ``scope="datum"``: the joint Brier score of m(y_1..y_c | x) over V^c, for
  conditionally iid continuations: <p(z), p(z')> over V^c is the product over
  the c positions of the per-position inner products, so the U-statistic needs
  the (K, K) Gram matrix of each datum (still no Python loop).

With c = 1 the two coincide.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_int
from .base import Equation, gather_observed, prior_draws, quadrature_log_probs


@dataclass
class Q2(Equation):
    """q2 (DESIGN §3): minimising the loss minimises the unbiased Brier estimate.

    ``out.loss`` is the (weighted) mean over data of the Brier estimate minus 1,
    so the gradient of the loss is minus the mean estimating function g.

    Parameters
    ----------
    num_draws : int >= 2
        K, prior draws per datum (the U-statistic uses all K (K - 1) ordered pairs).
    scope : {"datum", "token"}
        "datum" needs iid continuations when c > 1.
    """

    name = "q2"
    audit_expectation = "unbiased"
    root_objective = "brier"
    llm_scope = "token"
    label_pattern = r"q2-K(\d+)"
    label_option = "num_draws"
    estimand = "minus the mean Brier score of m(. | x) at y (up to the constant 1)"

    num_draws: int = 2
    scope: str = "datum"

    def validate(self):
        check_int("num_draws", self.num_draws, 2)
        super().validate()

    def _joint(self, model, y) -> bool:
        if self.scope == "token" or y.shape[1] == 1:
            return False
        if getattr(model, "continuation", "iid") != "iid":
            raise ValueError(f"scope={self.scope!r} for q2 with c={y.shape[1]} needs continuation='iid' "
                             f"(the joint Brier score over V^c); allowed with autoregressive continuations: token")
        return True

    def per_datum_loss(self, model, x, y, *, weights, generator, index):
        K = self.num_draws
        joint = self._joint(model, y)
        z = prior_draws(model, x, K, generator)  # (B, K, q)
        logp = model.log_probs(x, y, z)  # (B, K, c, V)
        p = logp.exp()  # (B, K, c, V)
        log_py = gather_observed(logp, y)  # (B, K, c)
        if not joint:
            S = p.sum(1)  # (B, c, V)
            norm2 = ((S * S).sum(-1) - (p * p).sum(-1).sum(1)) / (K * (K - 1))  # (B, c)
            brier = norm2 - 2 * log_py.exp().mean(1)  # (B, c)
            return brier.sum(-1), {"draws": float(x.shape[0] * K), "K": float(K)}
        gram = torch.einsum("bicv,bjcv->bcij", p, p).prod(1)  # (B, K, K): prod_j <p_j(z_i), p_j(z_l)>
        offdiag = gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(-1)  # (B,)
        brier = offdiag / (K * (K - 1)) - 2 * log_py.sum(-1).exp().mean(1)  # (B,)
        return brier, {"draws": float(x.shape[0] * K), "K": float(K)}

    def objective_terms(self, model, x, y, rule):
        """Minus the Brier score of m (minus 1) per datum, by quadrature with autograd."""
        joint = self._joint(model, y)
        logp, log_w = quadrature_log_probs(model, x, y, rule)  # (B, M, c, V), (M,)
        w = log_w.exp()  # (M,)
        probs = logp.exp()  # (B, M, c, V)
        ll = gather_observed(logp, y)  # (B, M, c)
        if not joint:
            m = torch.einsum("m,bmcv->bcv", w, probs)  # (B, c, V)
            m_y = torch.einsum("m,bmc->bc", w, ll.exp())  # (B, c)
            return -((m * m).sum(-1) - 2 * m_y).sum(-1)
        gram = torch.einsum("bicv,bjcv->bcij", probs, probs).prod(1)  # (B, M, M)
        norm2 = torch.einsum("i,bij,j->b", w, gram, w)  # (B,)
        m_y = torch.einsum("m,bm->b", w, ll.sum(-1).exp())  # (B,)
        return -(norm2 - 2 * m_y)
