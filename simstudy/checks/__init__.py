"""Paper checks (DESIGN §6): one registered check per claim; see :mod:`simstudy.checks.base`.

Importing this package registers every check, in the order ``simstudy check all`` runs them.
"""
import importlib

from .base import CHECKS, Check, CheckContext, CheckResult, register, run_check

_MODULES = ("unbiasedness", "calibration", "consistency", "rates", "inference", "efficiency", "overparameterised",
            "extrapolation", "extrapolation_map")
for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["CHECKS", "Check", "CheckContext", "CheckResult", "register", "run_check"]
