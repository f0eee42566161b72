"""Convergence rates: weighted least squares of log metric on log x (DESIGN §6.3, §7).

For each group (method and the design factors other than ``x``) and each
level of ``x`` (usually the sample size n), the replicate-level mean of the
metric ``mbar_x`` and its Monte Carlo SE ``s_x = sd / sqrt(R_x)`` are formed.
Then ``log mbar_x = a + b log x`` is fitted by weighted least squares
(statsmodels) with weights ``1 / Var(log mbar_x) = (mbar_x / s_x)^2`` (delta
method). The slope ``b`` comes with a ``level`` interval and is compared with
the theoretical slope; the constant ``C_x = x^(-s) mbar_x`` (``s`` the
theoretical slope when given, else the fitted one) is reported per x with
MCSE ``x^(-s) s_x`` and compared with the theoretical constant. For
``KL ~ C / n`` (slope -1) this is ``C_n = n E[KL]``, which DESIGN §6.3
expects to tend to r/2 for the likelihood equations.

``scale="fixed"`` (default) treats the MCSE-based weights as known
variances (normal-theory interval, with a chi-square lack-of-fit p-value
that flags curvature, e.g. pre-asymptotic small n); ``scale="estimated"``
rescales by the residual variance (t interval on k-2 degrees of freedom).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["RateResult", "fit_rate"]


@dataclass
class RateResult:
    """Result of :func:`fit_rate` / :meth:`StudyResult.rate`.

    Attributes
    ----------
    fits : DataFrame
        One row per group: ``by`` columns, ``k`` (levels of x), ``slope``,
        ``slope_se``, ``slope_low``, ``slope_high``, ``theory_slope``,
        ``slope_ok`` (theory slope inside the interval), ``intercept``,
        ``constant`` (exp(intercept), the fitted ``metric = constant *
        x^slope``), ``lack_of_fit_p``, and with a theoretical slope the
        constant fitted with the slope fixed (``theory_fit_constant`` and its
        interval ``theory_fit_constant_low/high``).
    points : DataFrame
        One row per group and x: ``mean``, ``mcse``, ``n_used`` (replicates), ``fitted``
        (the level entered the slope fit: positive finite mean and MCSE),
        ``constant`` = x^(-s) mean, ``constant_mcse``, ``theory_constant``,
        ``constant_z`` = (constant - theory_constant) / constant_mcse and
        ``constant_ok`` (|z| below the ``level`` normal quantile).
    """

    metric: str
    x: str
    by: list
    level: float
    scale: str
    theory_slope: float | None
    theory_constant: float | None
    fits: pd.DataFrame
    points: pd.DataFrame
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """A readable table of the fits (one line per group), in words.

        Each line reads ``slope -0.61 [-0.90, -0.30]; theory -1 outside the 95% interval``: the fitted
        slope of log mean on log x with its interval, and whether the theoretical slope lies in it. The
        lack-of-fit test (does a straight line fit the levels?) needs three or more levels of x; with two
        it has no degrees of freedom and the line says "not testable with 2 levels".
        """
        pct = f"{self.level * 100:g}%"
        lines = [f"Rate of {self.metric} in {self.x}: WLS of log mean on log {self.x} "
                 f"({pct} intervals, scale={self.scale})"]
        if self.theory_slope is not None:
            lines[0] += f"; theory slope {self.theory_slope:g}"
        if self.theory_constant is not None:
            lines[0] += f", theory constant {self.theory_constant:g}"
        for _, row in self.fits.iterrows():
            label = ", ".join(f"{b}={row[b]}" for b in self.by) or "all"
            k = int(row["k"])
            if not np.isfinite(row["slope"]):
                lines.append(f"  {label}: no fit ({k} usable level(s) of {self.x}; a fit needs 2, each with a "
                             "positive mean and an MCSE)")
                continue
            text = f"  {label}: slope {row['slope']:.3g} [{row['slope_low']:.3g}, {row['slope_high']:.3g}]"
            if self.theory_slope is not None:
                text += (f"; theory {self.theory_slope:g} " + ("inside" if row["slope_ok"] else "outside")
                         + f" the {pct} interval")
            text += f"; constant {row['constant']:.4g}; "
            if np.isfinite(row["lack_of_fit_p"]):
                text += f"lack-of-fit p={row['lack_of_fit_p']:.3g} ({k} levels; small p: not a straight line)"
            else:
                text += f"lack-of-fit: not testable with {k} levels"
            lines.append(text)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def fit_rate(frame: pd.DataFrame, value: str, x: str, by: Sequence[str] = (), *, theory_slope: float | None = None,
             theory_constant: float | None = None, level: float = 0.95, scale: str = "fixed",
             metric: str | None = None) -> RateResult:
    """Fit ``log mean(value) = a + b log x`` per group by WLS.

    Parameters
    ----------
    frame : DataFrame
        One row per replicate with columns ``value``, ``x`` and ``by``.
    value : str
        Column of the per-replicate metric (must have positive means).
    x : str
        Column of the rate variable (positive).
    by : sequence of str
        Grouping columns; one fit per group.
    theory_slope, theory_constant : float, optional
        Theoretical slope b and constant C in ``metric ~ C x^b``.
    level : float
        Interval level, in (0, 1).
    scale : {"fixed", "estimated"}
        Known weights (default) or residual-variance rescaling.
    metric : str, optional
        Name shown in summaries (default ``value``).

    Returns
    -------
    RateResult
    """
    import statsmodels.api as sm

    if not (0 < level < 1):
        raise ValueError(f"level={level!r} is invalid; allowed: a number in (0, 1)")
    if scale not in ("fixed", "estimated"):
        raise ValueError(f"scale={scale!r} is invalid; allowed: 'fixed' or 'estimated'")
    for name, v in (("theory_slope", theory_slope), ("theory_constant", theory_constant)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"{name}={v!r} is invalid; allowed: a finite number or None")
    if theory_constant is not None and theory_constant <= 0:
        raise ValueError(f"theory_constant={theory_constant!r} is invalid; allowed: a positive number")
    by = list(by)
    data = frame[by + [x, value]].dropna(subset=[value])
    if not len(data):
        raise ValueError(f"metric={value!r} has no finished values; allowed: a column with values")
    xs = pd.to_numeric(data[x], errors="coerce")
    if xs.isna().any() or (xs <= 0).any():
        raise ValueError(f"x={x!r} is invalid; allowed: a column of positive numbers")
    zq = stats.norm.ppf(0.5 + level / 2)
    fits, points, notes = [], [], []
    groups = data.groupby(by, sort=False, dropna=False) if by else [((), data)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        labels = dict(zip(by, key))
        agg = g.groupby(x, sort=True)[value].agg(["mean", "std", "count"]).reset_index()
        agg["mcse"] = agg["std"] / np.sqrt(agg["count"])
        xv = agg[x].to_numpy(np.float64)
        mv = agg["mean"].to_numpy(np.float64)
        sv = agg["mcse"].to_numpy(np.float64)
        usable = (mv > 0) & np.isfinite(mv) & (sv > 0) & np.isfinite(sv)
        if not usable.all():
            notes.append(f"{labels or 'all'}: dropped x={list(xv[~usable])} (mean <= 0, non-finite or no MCSE)")
        xv_u, mv_u, sv_u = xv[usable], mv[usable], sv[usable]
        k = int(usable.sum())
        row = {**labels, "k": k, "slope": np.nan, "slope_se": np.nan, "slope_low": np.nan, "slope_high": np.nan,
               "theory_slope": theory_slope if theory_slope is not None else np.nan, "slope_ok": np.nan,
               "intercept": np.nan, "constant": np.nan, "lack_of_fit_p": np.nan}
        if k >= 2 and len(np.unique(xv_u)) >= 2:
            ly, lx = np.log(mv_u), np.log(xv_u)
            w = (mv_u / sv_u) ** 2
            X = sm.add_constant(lx)
            if scale == "fixed":
                res = sm.WLS(ly, X, weights=w).fit(cov_type="fixed scale")
                ci = res.conf_int(alpha=1 - level)
            else:
                res = sm.WLS(ly, X, weights=w).fit()
                ci = res.conf_int(alpha=1 - level) if k > 2 else np.full((2, 2), np.nan)
            rss = float(np.sum(w * res.resid**2))
            row.update(slope=float(res.params[1]), slope_se=float(res.bse[1]) if k > 2 or scale == "fixed"
                       else np.nan, slope_low=float(ci[1][0]), slope_high=float(ci[1][1]),
                       intercept=float(res.params[0]), constant=float(np.exp(res.params[0])),
                       lack_of_fit_p=float(stats.chi2.sf(rss, k - 2)) if k > 2 else np.nan)
            if theory_slope is not None:
                row["slope_ok"] = bool(row["slope_low"] <= theory_slope <= row["slope_high"])
                # constant with the slope fixed at theory: weighted mean of log m - s0 log x
                a = ly - theory_slope * lx
                a_hat = float(np.sum(w * a) / np.sum(w))
                a_se = float(1 / math.sqrt(np.sum(w)))
                if scale == "estimated" and k > 1:
                    a_se *= math.sqrt(float(np.sum(w * (a - a_hat) ** 2)) / (k - 1))
                row.update(theory_fit_constant=math.exp(a_hat), theory_fit_constant_low=math.exp(a_hat - zq * a_se),
                           theory_fit_constant_high=math.exp(a_hat + zq * a_se))
        else:
            notes.append(f"{labels or 'all'}: fewer than 2 usable levels of {x}; no fit")
        fits.append(row)
        s = theory_slope if theory_slope is not None else row["slope"]
        for xi, mi, si, ni, ui in zip(xv, mv, sv, agg["count"].to_numpy(), usable):
            fac = xi ** (-s) if np.isfinite(s) else np.nan
            c, cse = mi * fac, si * fac
            p = {**labels, x: xi, "mean": mi, "mcse": si, "n_used": int(ni), "fitted": bool(ui),
                 "constant": c, "constant_mcse": cse,
                 "theory_constant": theory_constant if theory_constant is not None else np.nan}
            if theory_constant is not None and cse > 0:
                p["constant_z"] = (c - theory_constant) / cse
                p["constant_ok"] = bool(abs(p["constant_z"]) <= zq)
            points.append(p)
    return RateResult(metric=metric or value, x=x, by=by, level=level, scale=scale, theory_slope=theory_slope,
                      theory_constant=theory_constant, fits=pd.DataFrame(fits), points=pd.DataFrame(points),
                      notes=notes)
