"""The ``generic`` study kind: a study whose generate, methods and truth are Python callables named by
import path (DESIGN §7), and the built-in generic demo. Registered by :mod:`simstudy.studies.spec`."""
from __future__ import annotations

from ..engine import Study
from ..engine.design import RESERVED_COLUMNS
from .tables import SpecError, StudyFile, get_callable

__all__ = ["DEMO_TOML", "build_generic"]


def build_generic(sf: StudyFile) -> Study:
    """Builder of ``kind = "generic"``: callables by import path (see the module docstring)."""
    t = sf.tables
    if sf.design is None:
        raise SpecError("design is missing; allowed: a [design] table or [[conditions]] tables")
    if "generate" not in t:
        raise SpecError("generate is missing; allowed: a table [generate] with function = 'package.module:function'")
    if not isinstance(t["generate"], dict):
        raise SpecError(f"generate={t['generate']!r} has the wrong type; allowed: a table [generate] with "
                        "function = 'package.module:function'")
    generate = get_callable(t["generate"], "generate")
    truth = None
    if "truth" in t:
        if not isinstance(t["truth"], dict):
            raise SpecError("truth has the wrong type; allowed: a table [truth] with function = '...'")
        truth = get_callable(t["truth"], "truth", n_positional=1)
    methods_t = t.get("methods")
    if not isinstance(methods_t, dict) or not methods_t:
        raise SpecError("methods is missing; allowed: one table [methods.NAME] per method with function = '...'")
    methods = {}
    for name, mt in methods_t.items():
        if name in RESERVED_COLUMNS:
            raise SpecError(f"methods.{name} is a reserved name; allowed: a method name other than "
                            f"{', '.join(RESERVED_COLUMNS)}")
        if not isinstance(mt, dict):
            raise SpecError(f"methods.{name} has the wrong type; allowed: a table with function = '...'")
        methods[name] = get_callable(mt, f"methods.{name}")
    return Study(design=sf.design, generate=generate, analyse=methods, truth=truth, replicates=sf.replicates,
                 seed=sf.seed, name=sf.name, fingerprint=sf.fingerprint, options=sf.options())


#: The built-in generic demo (``simstudy run demo``): mean, median and trimmed mean of a symmetric location.
DEMO_TOML = """\
[study]
kind = "generic"
name = "demo"
description = \"\"\"Generic demo (the default until the domain's quick study is registered): the centre of a \
symmetric distribution estimated by the mean (t interval), the median (order-statistic interval) and the 20% \
trimmed mean (Tukey-McLaughlin interval), for normal and t3 data. Expect relative efficiency of the median near \
0.7 (2/pi asymptotically) for normal data and above 1 for t3, MSE falling like 1/n.\"\"\"
replicates = 300
seed = 1

[design]
n = [10, 40, 160]
dist = ["normal", "t3"]

[generate]
function = "simstudy.studies.examples:location_data"

[truth]
function = "simstudy.studies.examples:location_truth"

[methods.mean_t]
function = "simstudy.studies.examples:mean_t"

[methods.median]
function = "simstudy.studies.examples:median_ci"

[methods.trimmed]
function = "simstudy.studies.examples:trimmed_mean"
params = { proportion = 0.2 }

[summary]
reference = "mean_t"

[[rates]]
metric = "mse:estimate"
x = "n"
theory_slope = -1.0
"""
