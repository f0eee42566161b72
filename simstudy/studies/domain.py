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

    [dgm]                     # the DGM's keywords, or design = "<reference design>" + overrides
    kind = "perturbed-next-token"   # optional: a registered DGM class (simstudy list: DGMs)
    design = "five-token"
    seed = 3
    fresh_teacher = false     # true: a new teacher per replicate (seed drawn from the replicate's stream)

    [defaults]                # optional: PerturbationMethod fields shared by every method
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

import itertools
import re
from dataclasses import fields
from pathlib import Path

import pandas as pd

from .. import dgm as dgms
from ..domain import PerturbationMethod, cached_dgm, make_analyse, make_generate
from ..fit import SGDConfig
from ..engine import Study
from ..equations import EQUATIONS, label_forms
from . import spec

METHOD_KEYS = {f.name for f in fields(PerturbationMethod)} - {"name"}
EVALUATION_KEYS = {"bins", "mc_draws", "headline"}
HEADLINE = ["kl_id", "kl_oos", "tv_id", "tv_oos", "scale_ratio"]
QUICK_STUDY = Path(__file__).with_name("quick.toml")
#: Metrics a replicate of this kind returns (DESIGN §5; simstudy.domain.evaluation), for checking headline and rates.
METRICS = {"kl_id", "kl_oos", "tv_id", "tv_oos", "mc_se_kl_id", "mc_se_kl_oos", "marginal_error", "truth_shift_id",
           "truth_shift_oos", "teacher_seed", "cov_error", "cov_spectrum_error", "scale_ratio", "n_parameters",
           "fit_steps", "fit_evaluations", "fit_grad_norm", "fit_quadrature_error"}
SGD_KEYS = [f.name for f in fields(SGDConfig)]


def is_metric(name: str) -> bool:
    """Whether a replicate of the perturbation kind returns the metric ``name``."""
    return name in METRICS or re.fullmatch(r"(kl_oos|distance)_bin[1-9][0-9]*", name) is not None


def _check_sgd(table, where: str) -> None:
    if "sgd" not in table:
        return
    if not isinstance(table["sgd"], dict):
        raise spec.SpecError(f"{where}.sgd={table['sgd']!r} has the wrong type; allowed: a table of SGDConfig "
                             f"fields ({', '.join(SGD_KEYS)})")
    for key in table["sgd"]:
        if key not in SGD_KEYS:
            raise spec.SpecError(f"{where}.sgd.{key} is an unknown key; allowed: the SGDConfig fields "
                                 f"{', '.join(SGD_KEYS)}")


def _method(name: str, table: dict, defaults: dict) -> PerturbationMethod:
    spec.check_keys(table, METHOD_KEYS, f"methods.{name}")
    _check_sgd(table, f"methods.{name}")
    options = {**defaults, **table}
    for key in ("sgd", "equation_options", "perturbation_options"):
        if key in defaults and key in table:
            options[key] = {**defaults[key], **table[key]}
    try:
        if "equation" in table and name not in PerturbationMethod.baselines:
            return PerturbationMethod(name=name, **options)
        if not PerturbationMethod.is_known(name):
            raise spec.SpecError(f"methods.{name} is unknown; allowed: {', '.join(PerturbationMethod.known_names())}, "
                                 f"a short label ({label_forms()}), or any label with "
                                 "equation = '...'")
        return PerturbationMethod.from_name(name, **options)
    except spec.SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise spec.SpecError(f"methods.{name}: {str(exc).splitlines()[0]}") from None


def _dgm_table(t: dict) -> tuple[dict, bool, set]:
    """The ``[dgm]`` table: (options for :func:`simstudy.domain.cached_dgm`, fresh_teacher, the DGM's keywords)."""
    if not isinstance(t.get("dgm", {}), dict):
        raise spec.SpecError(f"dgm={t['dgm']!r} has the wrong type; allowed: a table [dgm] of DGM keywords "
                             "(see simstudy list: DGMs)")
    dgm_t = dict(t.get("dgm", {}))
    kind = spec.get_value(dgm_t, "kind", str, "dgm", default=dgms.DEFAULT_KIND)
    if kind not in dgms.DGMS:
        raise spec.SpecError(f"dgm.kind={kind!r} is unknown; allowed: {', '.join(dgms.DGMS)}")
    keys = set(dgms.dgm_defaults(kind))
    spec.check_keys(dgm_t, keys | {"kind", "design", "fresh_teacher"}, "dgm")
    fresh = spec.get_value(dgm_t, "fresh_teacher", bool, "dgm", default=False)
    dgm_t.pop("fresh_teacher", None)
    if "design" in dgm_t and dgm_t["design"] not in dgms.DESIGNS:
        raise spec.SpecError(f"dgm.design={dgm_t['design']!r} is unknown; allowed: {', '.join(dgms.DESIGNS)}")
    return dgm_t, fresh, keys


def _build(sf: spec.StudyFile) -> Study:
    t = sf.tables
    if sf.design is None:
        raise spec.SpecError("design is missing; allowed: a [design] table with n = [...] (and DGM factors)")
    dgm_t, fresh, dgm_keys = _dgm_table(t)
    conditions = sf.design if isinstance(sf.design, list) else None
    factors = set(sf.design) if isinstance(sf.design, dict) else {k for c in conditions for k in c}
    if "n" not in factors:
        raise spec.SpecError("design.n is missing; allowed: n = [sample sizes] (integers >= 1)")
    spec.check_keys({k: None for k in factors}, dgm_keys | {"n", "design"}, "design")
    _check_conditions(sf.design, dgm_t)
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise spec.SpecError("methods is missing; allowed: one table [methods.NAME] per method "
                             f"(NAME one of {', '.join(PerturbationMethod.known_names())})")
    defaults = t.get("defaults", {})
    spec.check_keys(defaults, METHOD_KEYS, "defaults")
    _check_sgd(defaults, "defaults")
    evaluation = t.get("evaluation", {})
    spec.check_keys(evaluation, EVALUATION_KEYS, "evaluation")
    bins = spec.get_value(evaluation, "bins", int, "evaluation", default=4, check=lambda v: v >= 1,
                          allowed="an integer >= 1")
    mc_draws = spec.get_value(evaluation, "mc_draws", int, "evaluation", default=4096, check=lambda v: v >= 2,
                              allowed="an integer >= 2")
    headline = spec.get_value(evaluation, "headline", list, "evaluation", default=HEADLINE,
                              check=lambda v: all(isinstance(m, str) for m in v), allowed="a list of metric names")
    for m in headline:
        if not is_metric(m) or (m.startswith(("kl_oos_bin", "distance_bin")) and int(m.rsplit("bin", 1)[1]) > bins):
            raise spec.SpecError(f"evaluation.headline entry {m!r} is not a metric of the study; allowed: "
                                 f"{', '.join(sorted(METRICS))}, kl_oos_bin1..{bins}, distance_bin1..{bins}")
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


def _check_conditions(design, dgm_t: dict) -> None:
    """Validate every condition before anything runs: each ``n`` an integer >= 1, and each distinct DGM of the
    design built once (through the per-process cache, so an in-process run reuses it) by its own validators."""
    if isinstance(design, list):
        conds = [(f"conditions[{i}]", c) for i, c in enumerate(design)]
        for where, c in conds:
            if "n" not in c:
                raise spec.SpecError(f"{where}.n is missing; allowed: n = a sample size (an integer >= 1)")
            _check_n(c["n"], f"{where}.n")
    else:
        for lv in design["n"] if isinstance(design["n"], list) else [design["n"]]:
            _check_n(lv, "design.n")
        others = {k: (v if isinstance(v, list) else [v]) for k, v in design.items() if k != "n"}
        conds = [("design", dict(zip(others, combo))) for combo in itertools.product(*others.values())]
    seen = set()
    for where, c in conds:
        options = {**dgm_t, **{k: v for k, v in c.items() if k != "n"}}
        key = repr(sorted(options.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            cached_dgm(options)
        except (TypeError, ValueError) as exc:
            levels = ", ".join(f"{k}={v!r}" for k, v in c.items() if k != "n")
            loc = f"{where} ({levels})" if levels else "dgm"
            raise spec.SpecError(f"{loc}: {str(exc).splitlines()[0]}") from None


def _check_n(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise spec.SpecError(f"{where}={value!r} is invalid; allowed: a sample size, an integer >= 1")


def extrapolation_figure(result, outdir) -> list[tuple[str, Path]]:
    """Figure hook: OOS KL by distance to the support per method (MCSE bars), pooled over n."""
    from ..engine.plots import extrapolation_plot, save_figure

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
                    save_figure(fig, Path(outdir) / name)))
    return out


def _list_dgms() -> dict[str, str]:
    out = {kind: f"{cls.__name__} (DESIGN §4); keywords: " + ", ".join(sorted(dgms.dgm_defaults(kind)))
           for kind, cls in dgms.DGMS.items()}
    for name, d in dgms.DESIGNS.items():
        out[f"  design={name}"] = ", ".join(f"{k}={v}" for k, v in d.items())
    return out


def _list_methods() -> dict[str, str]:
    out = {name: f"baseline: equation {b['equation']}, perturbation {b['perturbation']}"
           for name, b in PerturbationMethod.baselines.items()}
    out.update({name: "learned linear perturbation fitted by this equation" for name in EQUATIONS
                if name not in PerturbationMethod.baselines})
    return out


def _list_equations() -> dict[str, str]:
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in EQUATIONS.items()}


spec.register_kind("perturbation", _build, tables=("dgm", "methods", "defaults", "evaluation"), metrics=is_metric,
                   description="fits of the perturbation domain: DGM, estimating equations, baselines (DESIGN §3-5)")
spec.register_study("quick", QUICK_STUDY, description="default study: an 11-token perturbed DGM, five methods by sgd, n = 500, 4000",
                    out="results/quick")
spec.register_listing("DGMs", _list_dgms)
spec.register_listing("methods", _list_methods)
spec.register_listing("equations", _list_equations)


spec.DEFAULT_STUDY = "quick"
