"""Kill-safe storage of study results and resume (DESIGN §7).

Layout of a store directory::

    DIR/manifest.json          study description and config hash (written atomically)
    DIR/chunks/part-*.parquet  rows written as replicates finish (each file atomic)
    DIR/replicates.parquet     consolidated table, written when the study completes
    DIR/.lock                  advisory lock (flock) held by the running process

Every file is written to a temporary name in the same directory and moved
into place with :func:`os.replace`, so a ``kill -9`` at any moment leaves
either the old or the new file, never a torn one. Rows still in memory when
the process dies are simply recomputed on resume: every replicate is keyed by
its position (DESIGN §7), so the recomputed rows are bitwise the ones that
were lost. A row is identified by (condition, replicate, method); resume
skips the keys already stored, and reading deduplicates on that key (a kill
between writing ``replicates.parquet`` and deleting the chunks leaves both).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import StoreBusyError, StoreMismatchError

__all__ = ["Store", "config_hash", "callable_fingerprint", "read_manifest", "read_rows", "atomic_write_text", "atomic_write_bytes",
           "atomic_write_parquet", "MANIFEST", "TABLE", "KEY"]

MANIFEST = "manifest.json"
TABLE = "replicates.parquet"
CHUNKS = "chunks"
KEY = ["condition", "replicate", "method"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)


def callable_fingerprint(obj: Any) -> str:
    """A process-independent text describing a callable, for the config hash.

    Functions contribute their source code (or ``module:qualname`` when the
    source is unavailable), ``functools.partial`` objects their function and
    arguments, other callables their class source and ``repr`` (when it holds
    no memory address). Changing a method's code therefore changes the hash
    and a stale store is refused instead of silently mixed.
    """
    if obj is None:
        return "None"
    if isinstance(obj, functools.partial):
        return "partial(" + callable_fingerprint(obj.func) + "|" + _canonical(
            [repr(a) for a in obj.args]) + "|" + _canonical({k: repr(v) for k, v in obj.keywords.items()}) + ")"
    target = obj if (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)) else type(obj)
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        text = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"
    if target is not obj:
        r = repr(obj)
        if " at 0x" not in r:
            text += "|" + r
    return text


def config_hash(*, conditions: list[dict], methods: Iterable[str], replicates: int, seed: int,
                fingerprint: str) -> str:
    """SHA-256 (hex) of the study definition that determines its rows.

    Parameters
    ----------
    conditions : list of dict
        The expanded design.
    methods : iterable of str
        Method names, in order.
    replicates : int
        Replicates per condition.
    seed : int
        Root seed.
    fingerprint : str
        User-supplied fingerprint, or one derived from the source of the
        ``generate``, ``analyse`` and ``truth`` callables.
    """
    payload = _canonical({"conditions": conditions, "methods": list(methods), "replicates": int(replicates),
                          "seed": int(seed), "fingerprint": fingerprint})
    return hashlib.sha256(payload.encode()).hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def atomic_write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``frame`` to ``path`` as parquet atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read ``DIR/manifest.json``; ValueError with one line if absent or unreadable."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ValueError(f"store {str(path)!r} is invalid; allowed: a directory written by a simstudy run "
                         f"(it has no {MANIFEST})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"store {str(path)!r} is invalid: {MANIFEST} cannot be read ({exc})") from None


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """All stored rows (consolidated table and chunks), one per key.

    Returns
    -------
    DataFrame
        Raw stored rows (no condition columns, unsorted); empty if none.
    """
    path = Path(path)
    frames = []
    table = path / TABLE
    if table.is_file():
        frames.append(pd.read_parquet(table))
    chunk_dir = path / CHUNKS
    if chunk_dir.is_dir():
        for file in sorted(chunk_dir.glob("part-*.parquet")):
            frames.append(pd.read_parquet(file))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"condition": pd.Series(dtype="int64"), "replicate": pd.Series(dtype="int64"),
                             "method": pd.Series(dtype="str"), "status": pd.Series(dtype="str"),
                             "message": pd.Series(dtype="str")})
    rows = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    return rows.drop_duplicates(subset=KEY, keep="first", ignore_index=True)


class Store:
    """A study's store directory, opened for writing.

    Parameters
    ----------
    path : str or path-like
        Directory (created if missing).
    manifest : dict
        The study's manifest; must hold ``config_hash``.
    extends : iterable of str
        Config hashes of studies this one extends (the same study with fewer
        replicates): a directory holding one of them is taken over, its rows
        kept and its manifest replaced.

    Raises
    ------
    StoreMismatchError
        The directory holds a study with a different config hash.
    StoreBusyError
        Another live process holds the directory's lock.
    """

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any], *, extends: Iterable[str] = ()):
        self.path = Path(path)
        self.manifest = dict(manifest)
        self.extends = frozenset(extends)
        self._lock_fh = None
        self._seq = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def open(self) -> "Store":
        """Create or check the directory, take the lock, write the manifest."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"store={str(self.path)!r} is invalid; allowed: a directory path")
        (self.path / CHUNKS).mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            file = self.path / MANIFEST
            if file.is_file():
                old = read_manifest(self.path)
                if old.get("config_hash") in self.extends:  # the same study, now with more replicates
                    self.manifest["extended_from"] = int(old["replicates"])
                    self.manifest["complete"] = False
                    self.write_manifest()
                elif old.get("config_hash") != self.manifest["config_hash"]:
                    raise StoreMismatchError(
                        f"store {str(self.path)!r} holds a different study (config hash "
                        f"{str(old.get('config_hash'))[:12]} != {self.manifest['config_hash'][:12]}); "
                        "allowed: the same study's directory, a new directory, or delete it first")
                else:
                    self.manifest["complete"] = bool(old.get("complete", False))
            elif any(self.path.glob("chunks/part-*.parquet")) or (self.path / TABLE).exists():
                raise StoreMismatchError(f"store {str(self.path)!r} holds rows but no {MANIFEST}; "
                                         "allowed: a new directory, or delete it first")
            else:
                self.manifest["complete"] = False
                self.write_manifest()
            for tmp in list(self.path.glob(".tmp-*")) + list((self.path / CHUNKS).glob(".tmp-*")):
                tmp.unlink(missing_ok=True)  # torn temporaries of a killed run
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locking
            return
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StoreBusyError(f"store {str(self.path)!r} is in use by another running study; "
                                 "allowed: a directory no other run is writing") from None
        self._lock_fh = fh

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "Store":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- contents --------------------------------------------------------------------------------------
    def write_manifest(self) -> None:
        """Write the manifest atomically."""
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=1,
                                                           default=repr))

    def rows(self) -> pd.DataFrame:
        """Rows stored so far (see :func:`read_rows`)."""
        return read_rows(self.path)

    def write_chunk(self, frame: pd.DataFrame) -> Path | None:
        """Store finished rows as one new parquet chunk (atomic)."""
        if frame is None or not len(frame):
            return None
        self._seq += 1
        file = self.path / CHUNKS / f"part-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_parquet(frame, file)
        return file

    def consolidate(self, frame: pd.DataFrame) -> None:
        """Write ``replicates.parquet`` holding every row, then drop the chunks.

        Order matters for kill safety: the table is in place before any chunk
        is removed, and reading deduplicates on the row key.
        """
        atomic_write_parquet(frame, self.path / TABLE)
        self.manifest["complete"] = True
        self.write_manifest()
        for file in (self.path / CHUNKS).glob("part-*.parquet"):
            file.unlink(missing_ok=True)
