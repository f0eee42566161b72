"""What every paper check shares (DESIGN §6): DGM settings from ``--set``, formatting, one store layout,
figure saving.

* :func:`dgm_settings` -- the DGM keywords of a check, derived from the registered DGM's
  signature and the reference design, each overridable by ``--set key=value``;
* :func:`comma_list` -- a ``--set`` list (``"1,2,4"``) or a default list;
* :func:`fmt` -- a number for a summary line;
* :func:`study_store` -- where a check keeps a study's rows: ``FOLDER/<name>-<config hash[:12]>``
  (a rerun with the same settings resumes; other settings get their own folder);
* :func:`save_figure` -- the engine's atomic figure writer (a ``matplotlib.figure.Figure``, no pyplot).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from ..dgm import DEFAULT_KIND, DESIGNS, dgm_defaults
from ..engine.plots import save_figure
from .base import CheckContext

__all__ = ["comma_list", "dgm_settings", "fmt", "save_figure", "saved", "study_store"]

#: DGM keywords that no check exposes to ``--set`` (labels and sample sizes are the check's own)
NOT_SETTABLE = ("name", "n", "transformer", "max_enumerate", "num_prefix_samples")


def comma_list(value) -> list:
    """``"a,b,,c"`` -> ``["a", "b", "c"]``; a list is returned without empty strings."""
    return [v for v in (value.split(",") if isinstance(value, str) else value) if v != ""]


def dgm_settings(context: CheckContext, design: str, *, exclude: Iterable[str] = (), kind: str | None = None) -> dict:
    """The DGM keywords of a check: the DGM's constructor defaults, then the reference ``design``'s values,
    then ``--set`` overrides (coerced to the default's type).

    Every keyword of the registered DGM's signature is a parameter except :data:`NOT_SETTABLE` and
    ``exclude``; the returned dict is in signature order.
    """
    if design not in DESIGNS:
        raise ValueError(f"--set design={design!r} is unknown; allowed: {', '.join(DESIGNS)}")
    defaults = dgm_defaults(kind or DEFAULT_KIND)
    base = {**defaults, **{k: v for k, v in DESIGNS[design].items() if k in defaults}}
    skip = set(NOT_SETTABLE) | set(exclude)
    return {key: context.param(key, value) for key, value in base.items() if key not in skip and value is not None}


def fmt(x: float, digits: int = 3, *, fixed: bool = False) -> str:
    """``x`` with ``digits`` significant digits (``fixed``: decimals); ``inf``, ``-inf``, ``nan`` spelled out."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}" if fixed else f"{x:.{digits}g}"


def study_store(folder: Path | str, name: str, study) -> Path:
    """The store of ``study`` under ``folder``: ``folder/<name>-<config hash[:12]>``."""
    return Path(folder) / f"{name}-{study.config_hash[:12]}"


def saved(fig, path: Path | str) -> str:
    """Save ``fig`` atomically at ``path`` (PNG) and return the path as a string (for a check's figure list)."""
    return str(save_figure(fig, Path(path)))
