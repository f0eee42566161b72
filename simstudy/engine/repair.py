"""Repair of a damaged store: ``Study.run(..., repair=True)``, ``simstudy run ... --repair`` (DESIGN §7).

Nothing stored is lost and nothing is repaired silently. Without a repair, a damaged file stops every
command with one line naming it (:class:`~.errors.StoreDamagedError`). With one:

* a damaged parquet file (a chunk ``chunks/part-*.parquet`` or the consolidated ``replicates.parquet``:
  truncated, empty or garbled) is moved to ``DIR/damaged/`` (kept for inspection) and the run recomputes
  exactly the rows now missing: rows are keyed by (condition, replicate, method) and every replicate's
  random stream by its position, so the recomputed rows are bitwise the lost ones;
* a damaged (or missing) ``manifest.json`` is moved aside too and rewritten from the study's own
  definition, but only once the stored rows are shown to be this study's: its config hash, if still
  readable in the damaged text, must be the study's; otherwise one replicate of every stored condition is
  recomputed and must equal the stored rows bitwise. If neither holds, nothing is changed and the repair
  is refused with one line.

One line per file moved is printed to stderr (``simstudy: repaired: ...``).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pandas as pd

from .errors import StoreDamagedError, StoreMismatchError, StoreReadOnlyError
from .extension import smaller_versions
from .storage import CHUNKS, DAMAGED, MANIFEST, Store, combine_rows, read_manifest, read_part, stored_files, \
    write_problem
from .tidy import finalise

__all__ = ["repair_store", "move_aside"]

#: statuses whose rows need not recompute identically (wall-clock limits, killed workers)
_UNREPEATABLE = ("timeout", "crashed")


def move_aside(store: Path, file: Path) -> Path:
    """Move ``file`` to ``store/damaged/`` under a name not taken yet (``NAME``, ``NAME.1``, ...); the path."""
    folder = store / DAMAGED
    folder.mkdir(exist_ok=True)
    dest, k = folder / file.name, 1
    while dest.exists():
        dest, k = folder / f"{file.stem}.{k}{file.suffix}", k + 1
    os.replace(file, dest)
    return dest


def repair_store(path: str | os.PathLike, study, *, stream=None) -> list[str]:
    """Repair the store of ``study`` at ``path`` before a run; returns the notes printed (one per file).

    Parameters
    ----------
    path : path
        The store directory (nothing happens if it does not exist or is undamaged).
    study : Study
        The study that is about to run into it (its config hash, design and methods verify the rows).
    stream : file, optional
        Where the notes go (default stderr).

    Raises
    ------
    StoreMismatchError
        The manifest is damaged and the stored rows cannot be shown to be this study's (nothing changed).
    StoreReadOnlyError
        The store is damaged and cannot be written (nothing changed).
    """
    path = Path(path)
    if not path.is_dir():
        return []
    good, damaged = [], []
    for file in stored_files(path):
        try:
            good.append(read_part(file))
        except StoreDamagedError as exc:
            damaged.append((file, exc))
    try:
        old, manifest_bad = read_manifest(path), None
    except StoreDamagedError as exc:
        old, manifest_bad = None, exc
    except ValueError:  # no manifest: a new folder, or rows whose manifest was lost
        if not good and not damaged:
            return []
        old, manifest_bad = None, "missing"
    if old is not None:
        if old.get("config_hash") != study.config_hash and not smaller_versions(path, study.replicates,
                                                                               study._at_count):
            return []  # another study's store: the run refuses it, nothing here is touched
        if not damaged:
            return []
    problem = next((p for d in (path, path / CHUNKS) if d.is_dir() and (p := write_problem(d))), None)
    if problem:
        first = damaged[0][0] if damaged else path / MANIFEST
        raise StoreReadOnlyError(f"store {str(path)!r} is read-only ({problem}): the repair cannot move "
                                 f"{str(first)!r} aside; allowed: a copy you can write to (cp -r DIR NEW, then "
                                 "run into NEW with --repair), or make it writable")
    lock = Store(path, {})
    lock._lock()
    notes = []
    try:
        if manifest_bad is not None:
            how = _verify(path, study, combine_rows(good))
        for file, exc in damaged:
            dest = move_aside(path, file)
            notes.append(f"moved damaged {str(file)!r} ({exc.reason}) to {str(dest)!r}; its rows are recomputed")
        if manifest_bad is not None:
            moved = move_aside(path, path / MANIFEST) if (path / MANIFEST).exists() else None
            manifest = dict(study.manifest(), complete=False)
            lock.manifest = manifest
            lock.write_manifest()
            notes.append(f"rewrote {str(path / MANIFEST)!r} from the study's definition ({how})"
                         + (f"; the damaged one is {str(moved)!r}" if moved else ""))
        elif old.get("complete"):  # rows are missing now: the store is not complete until they are recomputed
            lock.manifest = dict(old, complete=False)
            lock.write_manifest()
    finally:
        lock.close()
    for note in notes:
        print(f"simstudy: repaired: {note}", file=stream or sys.stderr)
    return notes


def _verify(path: Path, study, rows: pd.DataFrame) -> str:
    """How the rows of ``path`` are known to be ``study``'s (for the note), or StoreMismatchError."""
    file = path / MANIFEST
    text = file.read_bytes().decode("utf-8", "replace") if file.is_file() else ""
    found = re.search(r'"config_hash"\s*:\s*"([0-9a-f]{64})"', text)
    if found:
        old = found.group(1)
        count = re.search(r'"replicates"\s*:\s*(\d+)', text)
        if old == study.config_hash or (count and int(count.group(1)) < study.replicates
                                        and study._at_count(int(count.group(1))) == old):
            return "its config hash, still readable, is this study's"
        raise _refuse(file, f"it names another study (config hash {old[:12]} != {study.config_hash[:12]})")
    if not len(rows):
        return "the store holds no rows"
    names = list(study.methods)
    cond, rep = rows["condition"].to_numpy(), rows["replicate"].to_numpy()
    outside = ((cond < 0) | (cond >= len(study.conditions)) | (rep < 0) | (rep >= study.replicates)
               | ~rows["method"].isin(names).to_numpy())
    if outside.any():
        bad = rows[outside].iloc[0]
        raise _refuse(file, f"the stored row (condition {bad['condition']}, replicate {bad['replicate']}, method "
                            f"{bad['method']!r}) is outside this study's design")
    checked = 0
    for c, part in rows.groupby("condition", sort=True):
        usable = part.groupby("replicate", sort=True)["status"].agg(lambda s: not s.isin(_UNREPEATABLE).any())
        if not usable.any():
            continue
        r = int(usable[usable].index[0])
        mine = part[part["replicate"] == r]
        methods = [m for m in names if m in set(mine["method"])]
        fresh = study.run_replicate(int(c), r, methods=methods).reset_index(drop=True)
        stored = finalise(mine, study.conditions, names, study.truths()).table.reset_index(drop=True)
        extra = [col for col in stored.columns if col not in fresh.columns]
        if not set(fresh.columns) <= set(stored.columns) or not stored[list(fresh.columns)].equals(fresh) \
                or stored[extra].notna().any().any():
            raise _refuse(file, f"replicate {r} of condition {int(c)} recomputes differently from its stored rows")
        checked += 1
    if not checked:
        raise _refuse(file, "no stored replicate can be recomputed to check it (all timed out or crashed)")
    return f"one replicate of each of {checked} stored condition(s) recomputed bitwise equal"


def _refuse(file: Path, why: str) -> StoreMismatchError:
    return StoreMismatchError(f"store file {str(file)!r} is damaged and the rows beside it cannot be shown to be "
                              f"this study's: {why}; nothing was changed; allowed: --repair with the study that "
                              "wrote them, or a new directory")

