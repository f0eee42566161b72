"""Scoring latent proposals in float32 (DESIGN §3: ps-mh and ps-exact score many prior proposals per datum).

Both posterior-sampling equations spend most of their time computing log p(y | x, z) for proposals z that
only decide which draw is kept (an accept/reject test); the gradient pass afterwards is in the model's dtype.
``score_dtype="float32"`` scores the proposals with a float32 copy of the model: about twice as fast on a
CPU for the float64 synthetic students, and the draws then follow the posterior of the float32 likelihood,
whose log differs from the float64 one by about 1e-6 (rounding), far below the Monte Carlo noise of one
draw. :class:`Float32Scorer` makes the copy once per model and refreshes its parameters in place at every
call (a fresh deep copy per step cost about as much as scoring a small minibatch).
"""
from __future__ import annotations

import copy

import torch

__all__ = ["SCORE_DTYPES", "Float32Scorer"]

#: the dtype proposals are scored in: the model's own, or float32 (a copy of the model)
SCORE_DTYPES = ("model", "float32")


class Float32Scorer:
    """A float32 copy of one model at a time, with that model's current parameters and buffers."""

    def __init__(self) -> None:
        self._model = None
        self._copy = None

    def __call__(self, model):
        """The float32 copy of ``model`` (made on first use, or when the model or its device changed)."""
        device = next(model.parameters()).device
        if self._model is not model or next(self._copy.parameters()).device != device:
            self._model, self._copy = model, copy.deepcopy(model).float()
        with torch.no_grad():
            for mine, theirs in zip(self._copy.parameters(), model.parameters()):
                mine.copy_(theirs)
            for mine, theirs in zip(self._copy.buffers(), model.buffers()):
                mine.copy_(theirs)
        return self._copy

    def __deepcopy__(self, memo):  # an equation copied (get_params, clones) starts without a cached copy
        return Float32Scorer()

    def __getstate__(self):  # nor is the copy pickled with an equation
        return {"_model": None, "_copy": None}
