"""The evaluation set's own error in a paired comparison of two methods (DESIGN §5, §7; issue 14).

The evaluation pairs of a split are the same in every replicate and method, so their sampling error
does not show in the spread over replicates: the replicates' paired t interval is conditional on that
evaluation set. Each method of a stored run keeps its per-pair NLL per token of every split as an
artifact (``DIR/artifacts/condition=C/replicate=R/method=M/nll_<split>.npy``); for two methods,
:func:`evaluation_error` gives per replicate the mean per-pair difference and its standard error over the
evaluation pairs, sd(d_i) / sqrt(n_eval): how far another evaluation set of the same size could move
that replicate's difference. An evaluation set is large enough for a comparison when this error is
small next to the difference (and next to the replicates' MCSE of it).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from ...engine.artifacts import artifact_path
from ...engine.storage import read_manifest
from .analysis import PAIR_NLL_PREFIX

__all__ = ["evaluation_error"]


def evaluation_error(store: str | os.PathLike, *, method: str, reference: str, split: str,
                     condition: int = 0) -> pd.DataFrame:
    """Per replicate where both methods kept their per-pair NLLs of ``split``: ``replicate``, ``pairs``,
    ``difference`` (mean of d_i = nll_i(method) - nll_i(reference), nats per token) and ``se``
    (sd(d_i) / sqrt(pairs)). Replicates computed before per-pair NLLs were kept are left out."""
    manifest = read_manifest(store)
    for name in (method, reference):
        if name not in manifest["methods"]:
            raise ValueError(f"method={name!r} is not a method of the study in {store}; allowed: "
                             f"{', '.join(manifest['methods'])}")
    root = os.path.join(store, "artifacts")
    rows = []
    for r in range(int(manifest["replicates"])):
        files = [artifact_path(root, condition, r, m) / f"{PAIR_NLL_PREFIX}{split}.npy" for m in (method, reference)]
        if not all(f.is_file() for f in files):
            continue
        a, b = (np.load(f) for f in files)
        d = a - b  # (n_eval,)
        rows.append({"replicate": r, "pairs": len(d), "difference": float(d.mean()),
                     "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan})
    return pd.DataFrame(rows, columns=["replicate", "pairs", "difference", "se"])
