"""Array jobs: shard stores and their merge (DESIGN §7; SimDesign's ``runArraySimulation``, benchopt's submitit).

``Study.run(shard="i/N", store=DIR_i)`` (``simstudy run STUDY --shard i/N --out DIR_i``) computes only the
shard's share of the (condition, replicate) pairs (:class:`~.plan.Shard`) into its own store; the manifest
records the shard. Each shard is an ordinary store: it resumes, takes ``max_time``, is repaired alike.
:func:`merge_stores` combines shard stores into one store holding the rows of all of them. Since every
replicate is keyed by its position, the merged table is bitwise the table of one run of the study.

A merge refuses (one line, nothing written): a folder that is not a store, stores of different studies
(config hashes differ: design, methods, replicates, seed or code), and a row (condition, replicate, method)
held by two stores (a shard given twice, or shards of different ``N``). Shards still running are not merged:
their lock is taken. The merged store is complete when the shards cover every pair; otherwise it is a store
of the study like an interrupted one, and running the study into it computes the missing rows.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .artifacts import ARTIFACTS
from .errors import StoreMismatchError
from .plan import Shard, planned_rows
from .storage import KEY, MANIFEST, Store, read_manifest
from .tidy import finalise

__all__ = ["check_store_shard", "merge_stores"]


def check_store_shard(store: str | os.PathLike, shard: Shard | None) -> dict | None:
    """The manifest stored in ``store`` (None if there is none), after checking it holds the same shard.

    Raises
    ------
    StoreMismatchError
        One line: the store holds another shard of the study, a whole study where a shard is asked for, or
        the reverse.
    """
    try:
        old = read_manifest(store)
    except ValueError:  # no manifest (a new folder), or damaged: the store's own checks say so
        return None
    held = old.get("shard")
    if held is not None and str(held) != str(shard):
        raise StoreMismatchError(f"store {str(store)!r} holds shard {held} of a study; allowed: the same shard "
                                 f"(--shard {held}), a directory of its own for each shard, then simstudy merge")
    if held is None and shard is not None and (Path(store) / MANIFEST).is_file():
        raise StoreMismatchError(f"store {str(store)!r} holds a whole study; allowed: a directory of its own for "
                                 f"shard {shard} (e.g. {str(Path(store) / f'shard-{shard.index}')!r})")
    return old


def _key_text(row) -> str:
    return f"(condition {int(row['condition'])}, replicate {int(row['replicate'])}, method {row['method']!r})"


def merge_stores(stores: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Combine the rows (and artifacts) of shard stores of one study into the new store ``out``.

    Parameters
    ----------
    stores : sequence of path
        Store directories written by runs of the same study (usually its shards ``1/N .. N/N``).
    out : path
        A new (or empty) directory for the merged store.

    Returns
    -------
    dict
        ``rows`` (merged), ``expected`` (rows of the whole study), ``complete``, ``stores`` (per input: path,
        shard, rows).

    Raises
    ------
    ValueError, StoreMismatchError, StoreDamagedError, StoreBusyError
        One line each; nothing is written.
    """
    paths = [Path(s) for s in stores]
    out = Path(out)
    if not paths:
        raise ValueError("stores=[] is invalid; allowed: one or more store directories")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise ValueError(f"store {str(p)!r} is given twice; allowed: each store once")
        seen[p.resolve()] = p
    if out.resolve() in seen:
        raise ValueError(f"out={str(out)!r} is one of the stores merged; allowed: a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out={str(out)!r} exists and is not empty; allowed: a new or empty directory")
    manifests = [read_manifest(p) for p in paths]
    first = manifests[0]
    for p, m in zip(paths[1:], manifests[1:]):
        if m.get("config_hash") != first.get("config_hash"):
            raise StoreMismatchError(f"stores {str(paths[0])!r} and {str(p)!r} hold different studies (config hash "
                                     f"{str(first.get('config_hash'))[:12]} != {str(m.get('config_hash'))[:12]}); "
                                     "allowed: stores of one study (its shards)")
    for p, m in zip(paths, manifests):
        if m.get("replicates_per_condition") is not None:
            raise ValueError(f"store {str(p)!r} holds a precision-target run (replicates per condition); allowed: "
                             "shard stores (simstudy run STUDY --shard i/N)")
    frames, inputs = [], []
    for p, m in zip(paths, manifests):
        with Store(p, m) as st:  # the lock: a shard still running is not merged half-way
            rows = st.rows()
        rows = rows.assign(_store=len(frames))
        frames.append(rows)
        inputs.append({"store": str(p), "shard": m.get("shard"), "rows": int(len(rows))})
    rows = pd.concat(frames, ignore_index=True, sort=False)
    dup = rows.duplicated(subset=KEY, keep=False)
    if dup.any():
        both = rows[dup].sort_values(KEY, kind="mergesort")
        a, b = both.iloc[0], both.iloc[1]
        raise StoreMismatchError(f"row {_key_text(a)} is in both {str(paths[int(a['_store'])])!r} and "
                                 f"{str(paths[int(b['_store'])])!r}; allowed: stores of disjoint shards (each "
                                 "shard i/N once, one N)")
    rows = rows.drop(columns="_store")
    manifest = {k: v for k, v in first.items() if k not in ("shard", "complete", "imported", "extended_from")}
    manifest["merged_from"] = inputs
    fin = finalise(rows, manifest["conditions"], list(manifest["methods"]),
                   manifest.get("truths") or [{}] * len(manifest["conditions"]))
    expected = planned_rows(manifest)
    with Store(out, manifest) as st:
        if len(fin.table) == expected:
            st.consolidate(fin.raw)
        else:
            st.write_chunk(fin.raw)
        for p in paths:  # artifacts: keyed like the rows, so disjoint too
            if (p / ARTIFACTS).is_dir():
                shutil.copytree(p / ARTIFACTS, out / ARTIFACTS, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(".tmp-*"))
    return {"rows": int(len(fin.table)), "expected": int(expected), "complete": len(fin.table) == expected,
            "stores": inputs}
