"""Stochastic solver: Adam or SGD on a stochastic estimating equation (DESIGN §3).

Fresh latent draws at every step; the latent noise does not shrink with n, so the
step budget scales with n (``passes`` over the data) and the learning rate decays
(Robbins-Monro). Optional early stopping on a held-out in-support split, scored
by the held-out log marginal likelihood (quadrature when the latent allows it,
else a fixed-seed IWAE bound). Non-finite or exploding losses raise
:class:`FitDiverged`, which a study records as a failure.

Early stopping as a protocol (DESIGN §4: compare methods only when each has reached
its own early-stopping point): the budget is a maximum in passes (``passes``), the
validation interval and the patience may be given in passes too
(``eval_every_passes``, ``patience_passes``), and every fit records where it
stopped (``steps``, ``best_step``, ``passes_run``, ``best_pass``), whether early
stopping fired (``stopped_early``) or the budget ran out first (``hit_cap``), and
its validation curve (``FitResult.history``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from .. import quadrature
from ..models import PerturbedLM
from ..validation import check_choice, check_float, check_int, check_positive
from .exact import GroupedData, exact_objective, group_data
from .results import FitDiverged, FitResult

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant", "inverse")


@dataclass
class SGDConfig:
    """Settings of the stochastic solver (all keyword, validated on creation)."""

    optimizer: str = field(default="adam", metadata={"help": "adam or sgd"})
    lr: float = field(default=0.02, metadata={"help": "initial learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to lr * final_lr_fraction), constant, inverse"})
    final_lr_fraction: float = field(default=0.05, metadata={"help": "last learning rate / initial"})
    batch_size: int = field(default=256, metadata={"help": "data per minibatch"})
    passes: float = field(default=50.0, metadata={"help": "passes over the training data: steps = passes * n / batch"})
    steps: int | None = field(default=None, metadata={"help": "a fixed step count (overrides passes)"})
    min_steps: int = field(default=200, metadata={"help": "floor on the step budget"})
    max_steps: int = field(default=20000, metadata={"help": "ceiling on the step budget"})
    validation_fraction: float = field(default=0.1, metadata={"help": "held-out share for early stopping (0: none)"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation scores"})
    patience: int = field(default=10, metadata={"help": "validation scores without improvement before stopping"})
    eval_every_passes: float | None = field(default=None, metadata={
        "help": "passes between validation scores (overrides eval_every)"})
    patience_passes: float | None = field(default=None, metadata={
        "help": "passes without improvement before stopping (overrides patience)"})
    validation_draws: int = field(default=64, metadata={"help": "IWAE draws when quadrature is not available"})
    explode_factor: float = field(default=1e3, metadata={"help": "loss above factor * (|initial| + 1) is divergence"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 penalty on the parameters"})

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS, word="unknown")
        check_choice("schedule", self.schedule, SCHEDULES, word="unknown")
        for name in ("lr", "passes", "explode_factor"):
            check_positive(name, getattr(self, name))
        for name in ("batch_size", "min_steps", "max_steps", "eval_every", "patience", "validation_draws"):
            check_int(name, getattr(self, name), 1)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        for name in ("eval_every_passes", "patience_passes"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        check_float("validation_fraction", self.validation_fraction, low=0.0, high=1.0)
        check_float("final_lr_fraction", self.final_lr_fraction, low=0.0, high=1.0, low_open=True, high_open=False)
        check_positive("weight_decay", self.weight_decay, strict=False)

    def budget(self, n: int) -> int:
        """The number of steps for n training data."""
        if self.steps is not None:
            return int(self.steps)
        steps = math.ceil(self.passes * n / self.batch_size)
        return int(min(max(steps, self.min_steps), self.max_steps))

    def steps_per_pass(self, n: int) -> float:
        """Minibatch steps in one pass over n training data."""
        return n / min(self.batch_size, max(n, 1))

    def evaluation_schedule(self, n: int) -> tuple[int, int]:
        """``(eval_every, patience)`` in steps and evaluations for n training data: the pass-based
        settings (``eval_every_passes``, ``patience_passes``) converted, else the step-based ones."""
        every = self.eval_every
        if self.eval_every_passes is not None:
            every = max(1, round(self.eval_every_passes * self.steps_per_pass(n)))
        patience = self.patience
        if self.patience_passes is not None:
            patience = max(1, math.ceil(self.patience_passes * self.steps_per_pass(n) / every))
        return int(every), int(patience)


def learning_rate(config: SGDConfig, step: int, total: int) -> float:
    """The scheduled learning rate at ``step`` of ``total``."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "inverse":
        return config.lr / (1.0 + 10.0 * step / max(total, 1))
    floor = config.lr * config.final_lr_fraction
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * step / max(total, 1)))


@torch.no_grad()
def held_out_score(model, x: torch.Tensor, y: torch.Tensor, *, num_draws: int = 64, seed: int = 0,
                   grouped: GroupedData | None = None) -> float:
    """Mean held-out log m(y | x): quadrature when possible, else a fixed-seed IWAE bound.

    The quadrature score of a :class:`~simstudy.models.PerturbedLM` is the exact solver's likelihood
    objective (:func:`~simstudy.fit.exact_objective`: blockwise over distinct prefixes, in float64), the
    same value as the mean of ``quadrature_log_lik`` to rounding and many times faster; ``grouped``
    (:func:`~simstudy.fit.exact.group_data` of ``x``, ``y``) saves regrouping a fixed split at every call.
    """
    p = model.perturbation
    if not p.perturb_at_eval or p.latent_dim == 0:
        return float(model.log_lik(x, y, None).mean())
    if p.gaussian_latent and p.latent_dim <= 2:
        rule = quadrature.trapezoid(61 if p.latent_dim == 1 else 25, p.latent_dim)
        if isinstance(model, PerturbedLM):
            return float(exact_objective(model, x, y, objective="likelihood", rule=rule, grouped=grouped))
        return float(model.quadrature_log_lik(x, y, rule).mean())
    gen = torch.Generator(device=x.device).manual_seed(seed)
    latent = model.sample_latent(x, num_draws, gen)
    return float((torch.logsumexp(model.log_lik(x, y, latent), dim=1) - math.log(num_draws)).mean())


def _snapshot(model) -> dict:
    """A copy of what training changes: the trainable state when the model says what it is
    (an LLM wrapper: LoRA and perturbation only), else the whole state dict."""
    if hasattr(model, "trainable_state_dict"):
        return copy.deepcopy(model.trainable_state_dict())
    return copy.deepcopy(model.state_dict())


def _restore(model, state: dict) -> None:
    if hasattr(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(state)
    else:
        model.load_state_dict(state)


def fit_sgd(model, equation, x: torch.Tensor, y: torch.Tensor, *, config: SGDConfig | None = None,
            generator: torch.Generator | None = None, progress=None) -> FitResult:
    """Solve ``equation`` on data (x (n, L), y (n, c)) by stochastic optimisation.

    Parameters
    ----------
    model : PerturbedLM (or any model the equation accepts), modified in place.
    equation : an object with ``loss(model, x, y, generator=, index=)`` (simstudy.equations).
    config : SGDConfig.
    generator : torch.Generator for minibatches and latent draws (seed it for reproducibility).
    progress : optional callable(step, total, loss) for progress reporting.

    Raises
    ------
    FitDiverged when the loss or parameters become non-finite or the loss explodes.
    """
    config = config or SGDConfig()
    generator = generator or torch.Generator().manual_seed(0)
    n = x.shape[0]
    if n < 1:
        raise ValueError(f"n={n} is invalid; allowed: at least one datum")
    order = torch.randperm(n, generator=generator)
    n_val = int(round(config.validation_fraction * n)) if config.validation_fraction > 0 else 0
    n_val = min(n_val, n - 1)
    val_idx, train_idx = order[:n_val], order[n_val:]
    n_train = train_idx.numel()
    x_val, y_val = x[val_idx], y[val_idx]  # (n_val, L), (n_val, c): the held-out split, grouped once
    val_grouped = group_data(x_val, y_val) if n_val else None
    total = config.budget(n_train)
    eval_every, patience = config.evaluation_schedule(n_train)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)

    batch = min(config.batch_size, n_train)
    permutation, cursor = train_idx[torch.randperm(n_train, generator=generator)], 0
    history, stat_sums, ema, initial = [], {}, None, None
    best_score, best_state, best_step, bad_evals, stopped_early = -math.inf, None, 0, 0, False
    started = time.perf_counter()
    step = 0
    for step in range(1, total + 1):
        if cursor + batch > n_train:
            permutation, cursor = train_idx[torch.randperm(n_train, generator=generator)], 0
        idx = permutation[cursor:cursor + batch]
        cursor += batch
        lr = learning_rate(config, step - 1, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        out = equation.loss(model, x[idx], y[idx], generator=generator, index=idx)
        loss = out.loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FitDiverged(f"non-finite loss {value} at step {step} of {total}")
        initial = value if initial is None else initial
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if abs(ema) > config.explode_factor * (abs(initial) + 1.0):
            raise FitDiverged(f"loss exploded to {ema:.3g} at step {step} (initial {initial:.3g})")
        loss.backward()
        grad_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        if not grad_ok:
            raise FitDiverged(f"non-finite gradient at step {step} of {total}")
        optimizer.step()
        for key, val in getattr(out, "stats", {}).items():
            stat_sums[key] = stat_sums.get(key, 0.0) + float(val)
        if progress is not None:
            progress(step, total, ema)
        if step % eval_every == 0 or step == total:
            row = {"step": step, "loss": ema, "lr": lr}
            if n_val:
                score = held_out_score(model, x_val, y_val, num_draws=config.validation_draws, grouped=val_grouped)
                row["validation"] = score
                if not math.isfinite(score):
                    raise FitDiverged(f"non-finite validation score at step {step}")
                if score > best_score:
                    best_score, best_step, bad_evals = score, step, 0
                    best_state = _snapshot(model)
                else:
                    bad_evals += 1
                    if bad_evals >= patience:
                        stopped_early = True
                        history.append(row)
                        break
            history.append(row)
    if not all(torch.isfinite(p).all() for p in params):
        raise FitDiverged("non-finite parameters at the end of the fit")
    if best_state is not None:
        _restore(model, best_state)
    per_pass = config.steps_per_pass(n_train)
    stats = {"steps": step, "budget": total, "n_train": int(n_train), "n_validation": int(n_val),
             "best_step": best_step if n_val else step, "stopped_early": stopped_early,
             "hit_cap": bool(n_val) and not stopped_early, "passes_run": step / per_pass,
             "best_pass": (best_step if n_val else step) / per_pass, "eval_every": eval_every,
             "patience": patience, "seconds": time.perf_counter() - started, "final_loss": ema}
    if n_val:
        stats["validation_log_m"] = best_score
    stats.update({f"eq_{k}": v / step for k, v in stat_sums.items()})
    return FitResult(model=model, solver="sgd", objective=getattr(equation, "name", type(equation).__name__),
                     history=pd.DataFrame(history), stats=stats)


def config_dict(config: SGDConfig) -> dict:
    return asdict(config)
