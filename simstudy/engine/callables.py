"""Resolve ``"package.module:function"`` import paths (study files, figure hooks)."""
from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["resolve_callable"]


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
                         "allowed: an importable 'package.module:function'") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}={path!r} is invalid: {module_name!r} has no attribute {attr!r}; "
                             "allowed: an existing 'package.module:function'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}={path!r} is invalid: {attr!r} is not callable; allowed: a function")
    return obj
