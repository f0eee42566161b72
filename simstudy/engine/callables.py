"""Resolve ``"package.module:function"`` import paths (study files, figure hooks).

A study file is code: resolving a path imports its module (running the module's top level) and the study
later calls the function, as a Python script would. The import path is the interpreter's own; the
command line never adds the current directory to it (``simstudy.cli``), so a module of your own must be
installed or its folder named in ``PYTHONPATH``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .design import RESERVED_COLUMNS

__all__ = ["normalise_methods", "resolve_callable"]


def resolve_callable(path: str, where: str = "function") -> Callable:
    """Import the callable named by ``"package.module:attr[.attr]"``.

    Parameters
    ----------
    path : str
        Module path, a colon, and the attribute path inside the module.
    where : str
        Name of the setting, for the error message.

    Raises
    ------
    ValueError
        One line naming ``where``, the value and what is allowed.
    """
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"{where}={path!r} is invalid; allowed: an import path 'package.module:function'")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{where}={path!r} is invalid: module {module_name!r} cannot be imported ({exc}); "
                         "allowed: an importable 'package.module:function' (install it, or put its folder on "
                         "PYTHONPATH: the current directory is not searched)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}={path!r} is invalid: {module_name!r} has no attribute {attr!r}; "
                             "allowed: an existing 'package.module:function'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}={path!r} is invalid: {attr!r} is not callable; allowed: a function")
    return obj


def normalise_methods(analyse: Any) -> dict[str, Callable]:
    """``Study(analyse=)``: a dict name -> function, a list of named functions or one function, validated."""
    if callable(analyse) and not isinstance(analyse, Mapping):
        analyse = [analyse]
    if isinstance(analyse, Mapping):
        methods = dict(analyse)
    elif isinstance(analyse, Sequence) and not isinstance(analyse, (str, bytes)):
        methods = {}
        for fn in analyse:
            name = getattr(fn, "__name__", None)
            if not callable(fn) or not name or name == "<lambda>":
                raise ValueError(f"analyse item {fn!r} is invalid; allowed: a named function, or pass a dict "
                                 "name -> function")
            if name in methods:
                raise ValueError(f"analyse has two methods named {name!r}; allowed: distinct names (use a dict)")
            methods[name] = fn
    else:
        raise ValueError(f"analyse={analyse!r} is invalid; allowed: a dict name -> function(data, cond), "
                         "a list of functions or one function")
    if not methods:
        raise ValueError("analyse={} is invalid; allowed: at least one method")
    for name, fn in methods.items():
        if not isinstance(name, str) or not name or name in RESERVED_COLUMNS:
            raise ValueError(f"method name {name!r} is invalid; allowed: a non-empty string")
        if not callable(fn):
            raise ValueError(f"analyse[{name!r}]={fn!r} is invalid; allowed: a callable (data, cond) -> dict")
    return methods
