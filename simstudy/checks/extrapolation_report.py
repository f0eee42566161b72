"""The extrapolation check's result from its tidy table, from a run or from stored runs (DESIGN §6.7).

:func:`report` computes the paired comparisons (every method against each mle fit, the
ps methods against the fixed perturbations), the decision on the primary pair
(:mod:`.extrapolation_claim`), the findings, the extrapolation curves, the gain by
distance, the per-method summary, and the figures. :func:`report_from_stores` does the
same from the rows of one or more study stores of the check (read with
:meth:`simstudy.engine.StudyResult.load`), for runs still going, stopped, or run in parts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine import StudyResult
from .base import CheckResult
from .common import fmt
from .extrapolation_claim import CLAIM, NAME, REFERENCE_DESIGNS, decide, decision_rule
from .extrapolation_figures import figures
from .extrapolation_methods import DEFAULT_PRIMARY, METHODS, PREREGISTERED_PRIMARY
from .extrapolation_statistics import bin_gains, capped_fits, curves, findings, paired_differences, per_method

__all__ = ["FIXED_BASELINES", "REFERENCES", "report", "report_from_stores", "stored_rows"]

#: The fixed perturbations every ps method is also paired against (labels of METHODS).
FIXED_BASELINES = ("gaussian (sgd)", "neftune (sgd)", "discrete (sgd)")
#: The reference fits every method is paired against, when present.
REFERENCES = ("mle (sgd)", "mle (empirical root)")


def report(table: pd.DataFrame, *, primary: tuple[str, str], margin_fraction: float, folder: Path,
           designs: list[str], settings: dict, notes: list[str], min_pairs: int = 20) -> CheckResult:
    """Statistics, decision, tables and figures of the check from its tidy table (``design``,
    ``replicate``, ``method``, ``status``, ``message`` and the metric columns); the rule decides only with
    at least ``min_pairs`` pairs."""
    table = table.copy()
    labels = list(dict.fromkeys(table["method"]))
    references = [r for r in REFERENCES if r in labels]
    pairs = [(m, r) for r in references for m in labels if m != r]
    ps_labels = [m for m in labels if m.startswith("ps-")]
    pairs += [(p, b) for p in ps_labels for b in FIXED_BASELINES if b in labels]
    found = findings(paired_differences(table, metric="kl_oos", pairs=pairs),
                     paired_differences(table, metric="kl_id", pairs=pairs), margin_fraction=margin_fraction)
    curve = curves(table)
    gain_pairs = list(dict.fromkeys([primary] + [(m, "mle (sgd)") for m in ps_labels
                                                 if "(sgd)" in m and "mle (sgd)" in labels]))
    gains = pd.concat([bin_gains(table, p) for p in gain_pairs], ignore_index=True) if gain_pairs else pd.DataFrame()
    failures = table[table["status"] != "ok"][["design", "replicate", "method", "status", "message"]]

    statistics: dict = {}
    for r in found.itertuples(index=False):
        statistics[f"{r.design} | {r.method} - {r.reference}"] = {
            "pairs": r.pairs, "oos_method": r.oos_method, "oos_reference": r.oos_reference,
            "oos_difference": r.oos_difference, "oos_mcse": r.oos_mcse, "oos_ci": [r.oos_ci_low, r.oos_ci_high],
            "oos_verdict": r.oos_verdict, "id_method": r.id_method, "id_reference": r.id_reference,
            "id_difference": r.id_difference, "id_mcse": r.id_mcse, "id_ci": [r.id_ci_low, r.id_ci_high],
            "id_margin": r.id_margin, "id_within_margin": bool(r.id_within_margin)}
    summary_table = per_method(table)
    statistics["per_method"] = summary_table.to_dict(orient="records")
    statistics["failures"] = {str(k): int(v) for k, v in failures.groupby("method").size().items()}
    statistics["notes"] = notes
    decision, head = decide(found, primary, min_pairs=min_pairs)
    capped = capped_fits(table)
    statistics["fits_at_budget_cap"] = capped
    if capped:  # a fit that ran out of budget before early stopping fired has not reached its own stopping point
        head += "; fits that hit the pass budget before early stopping: " + ", ".join(
            f"{m} {k}" for m, k in capped.items())
    # the primary method against the other reference too: a pass against one mle fit says little
    # if the other mle fit is as good out of support
    for r in found[(found["design"] == "identified") & (found["method"] == primary[0])
                   & (found["reference"] != primary[1]) & found["reference"].isin(references)].itertuples(index=False):
        head += (f"; against {r.reference}: {_f(r.oos_difference)} [{_f(r.oos_ci_low)}, {_f(r.oos_ci_high)}] "
                 f"(R={int(r.pairs)}, {r.oos_verdict})")
    statistics["findings"] = _finding_lines(found, primary, references)
    rule = decision_rule(primary, margin_fraction, min_pairs=min_pairs,
                         preregistered=tuple(METHODS[k].label for k in PREREGISTERED_PRIMARY))
    return CheckResult(name=NAME, claim=CLAIM, decision_rule=rule,
                       decision=decision, statistics=statistics,
                       summary=head + ("; " + "; ".join(notes) if notes else ""),
                       tables={"replicates": table, "paired": found, "curves": curve, "gain_by_distance": gains,
                               "per_method": summary_table, "failures": failures},
                       figures=figures(folder, found, curve, gains, designs, references), settings=settings)


def _finding_lines(found: pd.DataFrame, primary: tuple[str, str], references: list[str]) -> list[str]:
    """One line per comparison against a reference, except the decided one (the primary pair in the
    identified design, stated first in the summary)."""
    lines = []
    for r in found.itertuples(index=False):
        if ((r.design, r.method, r.reference) != ("identified", *primary)) and r.reference in references:
            relation = {"beats": "beats", "worse": "is worse than"}.get(r.oos_verdict, f"{r.oos_verdict} against")
            lines.append(f"{r.design}: {r.method} {relation} {r.reference} out of support: OOS KL difference "
                         f"{_f(r.oos_difference)} [{_f(r.oos_ci_low)}, {_f(r.oos_ci_high)}], R={int(r.pairs)}")
    return lines


def _f(x: float) -> str:
    return fmt(x, 3, fixed=True)


def stored_rows(store: Path) -> tuple[pd.DataFrame, StudyResult]:
    """The rows finished so far in a store of this check, with its ``design`` and ``n`` columns, in
    (condition, replicate, method name) order, and the loaded :class:`~simstudy.engine.StudyResult`."""
    result = StudyResult.load(store)
    rows = result.table.sort_values(["condition", "replicate", "method"], kind="mergesort")
    return rows.reset_index(drop=True), result


def report_from_stores(stores: list, *, out: str | Path, primary: tuple[str, str] | None = None,
                       margin_fraction: float = 0.10, notes: list[str] | None = None,
                       command: str | None = None, min_pairs: int = 20) -> CheckResult:
    """The check's result from the rows of one or more stores of this check (runs still going,
    stopped, or run with different ``--set`` choices), saved as ``OUT/extrapolation.json``.

    ``stores``: paths, or ``(path, [method labels])`` to take only those methods from a store
    (a peer run that also fitted ``mle (sgd)`` on the same data, say). A (design, replicate,
    method) row found in two stores is an error. The primary pair is the check's default
    (``ps-mh (sgd)`` against ``mle (sgd)``) unless given. ``settings``
    records each store, its manifest and the settings of the run that wrote it
    (``OUT_OF_RUN/extrapolation.json``, when it finished), and ``command`` when given.
    """
    frames, recorded, seconds = [], [], []
    for item in stores:
        path, keep = (item, None) if isinstance(item, (str, Path)) else (item[0], list(item[1]))
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise ValueError(f"store={str(path)!r} is invalid; allowed: a store folder of this check "
                             "(OUT/extrapolation/store-*, holding manifest.json)")
        rows, stored = stored_rows(path)
        timings = stored.timings
        if keep is not None:
            unknown = sorted(set(keep) - set(rows["method"]))
            if unknown:
                raise ValueError(f"methods {unknown} are not in store {str(path)!r}; allowed: "
                                 f"{', '.join(sorted(set(rows['method'])))}")
            rows = rows[rows["method"].isin(keep)]
            timings = timings[timings["method"].isin(keep)]
        frames.append(rows.assign(study=path.name))
        seconds.append(timings["seconds"].to_numpy(dtype=float))
        run_json = path.parent.parent / f"{NAME}.json"
        run_settings = json.loads(run_json.read_text()).get("settings") if run_json.exists() else None
        manifest = stored.manifest
        recorded.append({"store": str(path), "methods_taken": keep or manifest["methods"],
                         "rows": int(len(rows)), "replicates": manifest["replicates"],
                         "conditions": manifest["conditions"], "seed": manifest["seed"],
                         "run_settings": run_settings})
    table = pd.concat(frames, ignore_index=True, sort=False)
    dup = table.duplicated(["design", "replicate", "method"], keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        raise ValueError(f"{first['method']} replicate {first['replicate']} of {first['design']} is in more than "
                         "one store; allowed: each (design, replicate, method) once (take methods per store)")
    primary = primary or (METHODS[DEFAULT_PRIMARY[0]].label, METHODS[DEFAULT_PRIMARY[1]].label)
    designs = [d for d in REFERENCE_DESIGNS if d in set(table["design"])]
    out = Path(out)
    (out / NAME).mkdir(parents=True, exist_ok=True)
    result = report(table, primary=primary, margin_fraction=margin_fraction, folder=out / NAME, designs=designs,
                    settings={**({"command": command} if command else {}), "stores": recorded,
                              "margin_fraction": margin_fraction, "primary": list(primary),
                              "min_pairs": min_pairs},
                    notes=list(notes or []), min_pairs=min_pairs)
    result.scale = "full (combined stores)"
    result.replicate_seconds = float(np.nansum(np.concatenate(seconds)))
    result.save(out)
    return result
