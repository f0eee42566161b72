"""Study kind ``perturbation``: the perturbation domain as a study file (DESIGN §7).

Registers with the generic engine's study-file machinery (simstudy.studies.spec):

* the kind ``perturbation`` with its tables ``[dgm]``, ``[methods.NAME]``,
  ``[defaults]`` and ``[evaluation]``;
* the built-in study ``quick`` (``simstudy run`` without argument);
* listings for ``simstudy list``: DGMs and reference designs, methods, equations.

A study file of this kind::

    [study]
    kind = "perturbation"
    replicates = 4
    seed = 1

    [design]                  # n is required; other factors override [dgm] keys
    n = [500, 2000]
    sigma = [0.6]

    [dgm]                     # PerturbedNextToken keywords, or design = "<reference design>" + overrides
    design = "five-token"
    seed = 3
    fresh_teacher = false     # true: a new teacher per replicate (seed drawn from the replicate's stream)

    [defaults]                # optional: MethodSpec fields shared by every method
    sgd = { passes = 30 }

    [methods.mle]             # a baseline (mle, gaussian, neftune, discrete) or an equation name
    [methods.q2]
    equation_options = { num_draws = 8 }
    [methods.ps-root]         # any label, with equation = ... and solver = "exact" or "sgd"
    equation = "ps-exact"
    solver = "exact"

    [evaluation]              # optional
    bins = 4                  # distance bins of the extrapolation curve
    mc_draws = 4096           # Monte Carlo draws for marginals without quadrature
    headline = ["kl_id", "kl_oos"]   # metrics printed by `simstudy run` and plotted (all are in summary.csv)
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pandas as pd

from ..dgm import PerturbedNextToken
from ..dgm.designs import DESIGNS
from ..engine import Study
from ..equations import EQUATIONS
from . import spec
from .perturbation import BASELINES, MethodSpec, make_analyse, make_generate

DGM_KEYS = set(inspect.signature(PerturbedNextToken.__init__).parameters) - {"self"}
METHOD_KEYS = {f.name for f in fields(MethodSpec)} - {"name"}
EVALUATION_KEYS = {"bins", "mc_draws", "headline"}
HEADLINE = ["kl_id", "kl_oos", "tv_id", "tv_oos", "scale_ratio"]
QUICK_STUDY = Path(__file__).with_name("quick.toml")


def _method(name: str, table: dict, defaults: dict) -> MethodSpec:
    spec.check_keys(table, METHOD_KEYS, f"methods.{name}")
    options = {**defaults, **table}
    for key in ("sgd", "equation_options", "perturbation_options"):
        if key in defaults and key in table:
            options[key] = {**defaults[key], **table[key]}
    try:
        if "equation" in table and name not in BASELINES:
            return MethodSpec(name=name, **options)
        label = name if (name in BASELINES or name in EQUATIONS) else None
        if label is None:
            known = sorted(set(BASELINES) | set(EQUATIONS))
            raise spec.SpecError(f"methods.{name} is unknown; allowed: {', '.join(known)}, "
                                 "or any label with equation = '...'")
        return MethodSpec.from_name(name, **options)
    except spec.SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"methods.{name}: {str(exc).splitlines()[0]}") from None


def _build(sf: spec.StudyFile) -> Study:
    t = sf.tables
    if sf.design is None:
        raise spec.SpecError("design is missing; allowed: a [design] table with n = [...] (and DGM factors)")
    dgm_t = dict(t.get("dgm", {}))
    if not isinstance(t.get("dgm", {}), dict):
        raise spec.SpecError("dgm has the wrong type; allowed: a table [dgm]")
    spec.check_keys(dgm_t, DGM_KEYS | {"design", "fresh_teacher"}, "dgm")
    fresh = spec.get_value(dgm_t, "fresh_teacher", bool, "dgm", default=False)
    dgm_t.pop("fresh_teacher", None)
    if "design" in dgm_t and dgm_t["design"] not in DESIGNS:
        raise spec.SpecError(f"dgm.design={dgm_t['design']!r} is unknown; allowed: {', '.join(DESIGNS)}")
    conditions = sf.design if isinstance(sf.design, list) else None
    factors = set(sf.design) if isinstance(sf.design, dict) else {k for c in conditions for k in c}
    if "n" not in factors:
        raise spec.SpecError("design.n is missing; allowed: n = [sample sizes] (integers >= 1)")
    spec.check_keys({k: None for k in factors}, DGM_KEYS | {"n"}, "design")
    try:  # validate the DGM now (one line), not inside a replicate
        probe = dict(dgm_t)
        first = conditions[0] if conditions else {k: (v[0] if isinstance(v, list) else v) for k, v in sf.design.items()}
        probe.update({k: v for k, v in first.items() if k != "n"})
        if int(first["n"]) < 1:
            raise ValueError(f"n={first['n']} is invalid; allowed: an integer >= 1")
        design = probe.pop("design", None)
        PerturbedNextToken.reference(design, **probe) if design else PerturbedNextToken(**probe)
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"dgm: {str(exc).splitlines()[0]}") from None
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise spec.SpecError("methods is missing; allowed: one table [methods.NAME] per method "
                             f"(NAME one of {', '.join(sorted(set(BASELINES) | set(EQUATIONS)))})")
    defaults = t.get("defaults", {})
    spec.check_keys(defaults, METHOD_KEYS, "defaults")
    evaluation = t.get("evaluation", {})
    spec.check_keys(evaluation, EVALUATION_KEYS, "evaluation")
    bins = spec.get_value(evaluation, "bins", int, "evaluation", default=4, check=lambda v: v >= 1,
                          allowed="an integer >= 1")
    mc_draws = spec.get_value(evaluation, "mc_draws", int, "evaluation", default=4096, check=lambda v: v >= 2,
                              allowed="an integer >= 2")
    headline = spec.get_value(evaluation, "headline", list, "evaluation", default=HEADLINE,
                              check=lambda v: all(isinstance(m, str) for m in v), allowed="a list of metric names")
    analyse = {}
    for name, table in methods_t.items():
        if not isinstance(table, dict):
            raise spec.SpecError(f"methods.{name} has the wrong type; allowed: a table [methods.{name}]")
        analyse[name] = make_analyse(_method(name, table, defaults), num_bins=bins, mc_draws=mc_draws)
    options = sf.options()
    options["figures"] = list(options.get("figures", [])) + ["simstudy.studies.domain:extrapolation_figure"]
    options["headline"] = headline
    fingerprint = sf.fingerprint or repr(sorted({**{"dgm": dgm_t, "fresh": fresh, "defaults": defaults,
                                                   "evaluation": evaluation}, "methods": methods_t}.items()))
    return Study(design=sf.design, generate=make_generate(dgm_t, fresh_teacher=fresh), analyse=analyse,
                 replicates=sf.replicates, seed=sf.seed, name=sf.name, fingerprint=fingerprint, options=options)


def extrapolation_figure(result, outdir) -> list[tuple[str, Path]]:
    """Figure hook: OOS KL by distance to the support per method (MCSE bars), pooled over n."""
    from ..engine.plots import _save, extrapolation_plot

    table = result.table
    bins = sorted(int(c[len("kl_oos_bin"):]) for c in table.columns if c.startswith("kl_oos_bin"))
    if not bins:
        return []
    ok = table[table["status"] == "ok"] if "status" in table else table
    rows = []
    for b in bins:
        part = ok[["method", f"kl_oos_bin{b}", f"distance_bin{b}"] + (["n"] if "n" in ok else [])]
        rows.append(part.rename(columns={f"kl_oos_bin{b}": "kl_oos", f"distance_bin{b}": "distance"}))
    frame = pd.concat(rows, ignore_index=True)
    frame["distance"] = frame["distance"].round(3)
    out = []
    for n in sorted(frame["n"].unique()) if "n" in frame else [None]:
        part = frame if n is None else frame[frame["n"] == n]
        fig = extrapolation_plot(part, "kl_oos", xlabel="distance to the training support (s units)",
                                 title=f"Extrapolation curve{'' if n is None else f', n = {n}'} (bars: +-1.96 MCSE)")
        name = "extrapolation.png" if n is None else f"extrapolation_n{n}.png"
        out.append((f"Extrapolation curve{'' if n is None else f' (n = {n})'}",
                    _save(fig, Path(outdir) / name)))
    return out


def _list_dgms() -> dict[str, str]:
    out = {"perturbed-next-token": "PerturbedNextToken (DESIGN §4); keywords: " + ", ".join(sorted(DGM_KEYS))}
    for name, d in DESIGNS.items():
        out[f"  design={name}"] = ", ".join(f"{k}={v}" for k, v in d.items())
    return out


def _list_methods() -> dict[str, str]:
    out = {name: f"baseline: equation {b['equation']}, perturbation {b['perturbation']}"
           for name, b in BASELINES.items()}
    out.update({name: "learned linear perturbation fitted by this equation" for name in EQUATIONS
                if name not in BASELINES})
    return out


def _list_equations() -> dict[str, str]:
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in EQUATIONS.items()}


spec.register_kind("perturbation", _build, tables=("dgm", "methods", "defaults", "evaluation"),
                   description="fits of the perturbation domain: DGM, estimating equations, baselines (DESIGN §3-5)")
spec.register_study("quick", QUICK_STUDY, description="default study: an 11-token perturbed DGM, five methods by sgd, n = 500, 4000",
                    out="results/quick")
spec.register_listing("DGMs", _list_dgms)
spec.register_listing("methods", _list_methods)
spec.register_listing("equations", _list_equations)


def _list_checks() -> dict[str, str]:
    import importlib

    checks = importlib.import_module("simstudy.checks").CHECKS
    return {name: check.claim for name, check in checks.items()}


spec.register_listing("paper checks (simstudy check NAME)", _list_checks)
spec.DEFAULT_STUDY = "quick"
