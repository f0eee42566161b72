"""Generic Monte Carlo study engine (DESIGN §7).

Study definition (design grid x methods x replicates), reproducible
positional random streams, in-process / loky / dask execution, kill-safe
storage with resume, failure capture, performance measures with Monte Carlo
standard errors (Morris, White and Crowther 2019), convergence rates,
figures and a markdown report. It imports nothing of the perturbation
domain: built-in studies plug the domain into it as any user's study would.

The results table has one row per (condition, replicate, method) and one
column per value a method returns (issue 3 refines DESIGN §7's "one row per
replicate x method x metric" to this wide form; ``summary()`` is long/tidy).

Modules: :mod:`.design` (grids), :mod:`.seeds` (positional streams, thread
pinning), :mod:`.study` (Study, the replicate runner), :mod:`.backends`
(in-process, loky, dask), :mod:`.storage` (kill-safe store, resume, config
hash), :mod:`.performance` (measures with MCSE), :mod:`.rates` (WLS rates),
:mod:`.result` (StudyResult), :mod:`.plots`, :mod:`.loop_plot` and :mod:`.heatmap` (many conditions),
:mod:`.figures`, :mod:`.report`, :mod:`.report_html` (self-contained report.html); run control:
:mod:`.runner` (Study.run's body, ``max_time``), :mod:`.plan` (which pairs a run computes),
:mod:`.precision` (replicate to a target MCSE), :mod:`.shards` (array jobs, merge), :mod:`.artifacts`
(per-replicate files, ``ctx.artifact_dir``).
"""
from .design import conditions_frame, expand_design
from .errors import (Diverged, FitFailure, StoreBusyError, StoreDamagedError, StoreMismatchError, StoreReadOnlyError,
                     TruthError)
from .performance import MEASURES, Measure, UserMeasure, summarise
from .rates import RateResult, fit_rate
from .result import StudyResult
from .seeds import method_rng, replicate_rng, replicate_seed_sequence, torch_seed
from .study import Study

__all__ = [
    "Study", "StudyResult", "RateResult", "FitFailure", "Diverged", "StoreMismatchError", "StoreBusyError", "TruthError",
    "StoreDamagedError", "StoreReadOnlyError",
    "Measure", "MEASURES", "UserMeasure", "summarise", "fit_rate", "expand_design", "conditions_frame", "replicate_rng",
    "replicate_seed_sequence", "method_rng", "torch_seed",
]
