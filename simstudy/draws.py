"""Random draws that honour a generator on another device.

A ``torch.Generator`` lives on one device; torch refuses ``torch.rand(..., device="cuda",
generator=cpu_generator)``. The solvers keep one CPU generator per fit (minibatch order,
latent draws) so that a fit is reproducible on any device: these helpers draw on the
generator's device and move the result to where it is needed.
"""
from __future__ import annotations

import torch


def _device(generator: torch.Generator | None, device) -> torch.device | None:
    return generator.device if generator is not None else device


def randn(shape, *, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``device``."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=_device(generator, device)).to(device)


def rand(shape, *, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
    """Uniform(0, 1) draws of ``shape`` on ``device``."""
    return torch.rand(shape, generator=generator, dtype=dtype, device=_device(generator, device)).to(device)


def multinomial(probs: torch.Tensor, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial`` of the rows of ``probs``, returned on ``probs.device``."""
    where = _device(generator, probs.device)
    return torch.multinomial(probs.to(where), num_samples, generator=generator).to(probs.device)
