"""Fit results and the typed failures a study records (DESIGN §3 "Solving the equations")."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from ..engine.errors import Diverged, FitFailure

#: The loss or the parameters became non-finite, or the loss exploded: the engine's typed failure
#: (one class; a study records its status ``"diverged"``).
FitDiverged = Diverged

__all__ = ["FitDiverged", "FitFailure", "FitResult"]


@dataclass
class FitResult:
    """What a solver returns: the fitted model and how it got there.

    ``history`` is a tidy DataFrame (one row per logged step: step, loss,
    validation score, learning rate); ``stats`` holds solver-level numbers
    (steps taken, best step, early stop, gradient norm, equation diagnostics).
    """

    model: torch.nn.Module
    solver: str
    objective: str
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.solver} fit of the {self.objective} equations"]
        lines += [f"  {k}: {v}" for k, v in self.stats.items()]
        return "\n".join(lines)
