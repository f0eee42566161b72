"""Evaluate a fitted student against the truth: the one evaluation of the domain (DESIGN §5).

For every prefix of the DGM (in and out of the training support) the fitted marginal
m-hat(. | x) is computed by quadrature when the latent allows it (Gaussian, q <= 3),
else by Monte Carlo, whose plug-in KL is bias-corrected and carries its standard
error (:func:`simstudy.metrics.mc_marginal_kl`). The replicate's metrics are:

* ``kl_id``, ``kl_oos``, ``tv_id``, ``tv_oos``: prefix averages in and out of support
  (absent for an empty region), with ``mc_se_kl_id`` / ``mc_se_kl_oos`` (0 under quadrature);
* ``kl_oos_bin<k>`` and ``distance_bin<k>``: the extrapolation curve, OOS KL in ``num_bins``
  equal bins of distance to the support;
* ``marginal_error``: the quadrature error of the fitted marginal (doubling the nodes);
* ``truth_shift_id`` / ``truth_shift_oos`` (how far the latent moves the truth from the
  deterministic teacher) and ``teacher_seed``;
* the perturbation recovery of :func:`simstudy.metrics.perturbation_recovery` for a learned
  linear perturbation (its finite entries: ``cov_error``, ``cov_spectrum_error``, ``scale_ratio``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from .. import metrics
from .data import ReplicateData

__all__ = ["evaluate_student", "fit_statistics", "fitted_marginal", "region_metrics"]


def fitted_marginal(student, prefixes: np.ndarray, *, mc_draws: int = 4096, nodes: Mapping[int, int] | None = None,
                    mc_seed: int = 0):
    """m-hat(. | x) on ``prefixes`` ``(N, L)``: a :class:`~simstudy.models.Marginal` with ``probs (N, V)``.

    ``nodes`` maps a latent dimension q to the trapezoid nodes per dimension (default: the
    rule of :func:`simstudy.quadrature.default_rule`); ``mc_draws`` and ``mc_seed`` set the
    Monte Carlo marginal where quadrature does not apply.
    """
    x = torch.as_tensor(np.asarray(prefixes), dtype=torch.long, device=student.embedding.device)
    q = getattr(student.perturbation, "latent_dim", None)
    with torch.no_grad():
        return student.marginal(x, method="auto", num_nodes=(nodes or {}).get(q), num_draws=mc_draws,
                                generator=torch.Generator().manual_seed(int(mc_seed)))


def region_metrics(data: ReplicateData, kl: np.ndarray, tv: np.ndarray, mc_se: np.ndarray, num_bins: int) -> dict:
    """Prefix averages in and out of support, their Monte Carlo SE, and OOS KL by distance bin.

    ``kl``, ``tv``, ``mc_se`` are ``(N,)`` over ``data.prefixes``.
    """
    inside = data.distance == 0
    out: dict[str, float] = {}
    for tag, mask in (("id", inside), ("oos", ~inside)):
        if not mask.any():  # an empty region has no value (the summary counts it as missing), never inf
            continue
        out[f"kl_{tag}"] = float(kl[mask].mean())
        out[f"tv_{tag}"] = float(tv[mask].mean())
        out[f"mc_se_kl_{tag}"] = float(np.sqrt((mc_se[mask] ** 2).sum()) / mask.sum())
    oos = pd.DataFrame({"distance": data.distance[~inside], "kl": kl[~inside]})
    if len(oos):
        edges = np.linspace(0.0, float(oos["distance"].max()), num_bins + 1)
        curve = metrics.extrapolation_curve(oos, bins=edges)
        for k, row in enumerate(curve.itertuples(index=False)):
            out[f"kl_oos_bin{k + 1}"] = float(row.kl)
            out[f"distance_bin{k + 1}"] = float(row.distance)
    out.update(data.truth_shift)
    out["teacher_seed"] = float(data.teacher_seed)
    return out


def evaluate_student(student, data: ReplicateData, *, num_bins: int = 4, mc_draws: int = 4096,
                     nodes: Mapping[int, int] | None = None, recovery: bool = True) -> dict:
    """The replicate's metrics of a fitted ``student`` (module docstring), a flat dict of floats.

    The Monte Carlo marginal (where quadrature does not apply) is seeded by the replicate's
    student seed, so every method of a replicate is judged on the same footing.
    """
    fitted = fitted_marginal(student, data.prefixes, mc_draws=mc_draws, nodes=nodes, mc_seed=data.student_seed)
    tv = metrics.tv_distance(data.truth, fitted.probs)
    if fitted.method.startswith("monte carlo"):
        res = metrics.mc_marginal_kl(data.truth, fitted.probs, fitted.error)
        kl, se, marginal_error = res["kl"], res["mc_se"], 0.0
    else:
        kl, se, marginal_error = metrics.kl_divergence(data.truth, fitted.probs), np.zeros(len(data.prefixes)), \
            fitted.max_error
    out = region_metrics(data, kl, tv, se, num_bins)
    out["marginal_error"] = float(marginal_error)
    if recovery and hasattr(student.perturbation, "A"):  # defined for learned linear perturbations only
        rec = metrics.perturbation_recovery(student, data.dgm.teacher)
        out.update({k: v for k, v in rec.items() if math.isfinite(v)})  # a NaN would mark the row failed
    return out


def fit_statistics(fit, keys) -> dict:
    """``fit_<key>`` floats of the solver's statistics that are present (DESIGN §3: report the solve)."""
    return {f"fit_{k}": float(fit.stats[k]) for k in keys if k in fit.stats}
