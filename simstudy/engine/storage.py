"""Kill-safe storage of study results and resume (DESIGN §7).

Layout of a store directory::

    DIR/manifest.json          study description and config hash (written atomically)
    DIR/chunks/part-*.parquet  rows written as replicates finish (each file atomic)
    DIR/replicates.parquet     consolidated table (factors, truths as columns), written when the study completes
    DIR/.lock                  advisory lock (flock) held by the running process
    DIR/damaged/               damaged files moved aside by ``--repair`` (:mod:`.repair`), kept

Every file is written to a temporary name in the same directory and moved
into place with :func:`os.replace` (:mod:`.atomic`), so a ``kill -9`` at any
moment leaves either the old or the new file, never a torn one. Rows still
in memory when the process dies are simply recomputed on resume: every
replicate is keyed by its position (DESIGN §7), so the recomputed rows are
bitwise the ones that were lost. A row is identified by (condition,
replicate, method); resume skips the keys already stored, and reading
deduplicates on that key (a kill between writing ``replicates.parquet`` and
deleting the chunks leaves both).

Damage (a truncated, empty or garbled file; parquet pages carry a CRC) is
found when the file is read and raised as one line naming the file
(:class:`~.errors.StoreDamagedError`); nothing is changed until a repair is
asked for. A folder the user cannot write to opens read-only: a finished
study is read from it, nothing is written (the lock is shared).
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

from .atomic import (DIGEST_KEY, atomic_write_bytes, atomic_write_parquet, atomic_write_text, frame_digest,
                     write_problem)
from .design_columns import with_design
from .errors import StoreBusyError, StoreDamagedError, StoreMismatchError, StoreReadOnlyError

__all__ = ["Store", "config_hash", "callable_fingerprint", "read_manifest", "read_rows", "read_part", "stored_files",
           "write_problem", "atomic_write_text", "atomic_write_bytes", "atomic_write_parquet", "MANIFEST", "TABLE",
           "KEY", "DAMAGED"]

MANIFEST = "manifest.json"
TABLE = "replicates.parquet"
CHUNKS = "chunks"
PRECISION = "precision.csv"  # a run to a precision target: replicates used and MCSE reached (see .precision)
DAMAGED = "damaged"  # damaged files moved aside by a repair, kept for inspection (see .repair)
KEY = ["condition", "replicate", "method"]
ROW_COLUMNS = (*KEY, "status", "message")
MANIFEST_KEYS = ("conditions", "methods", "replicates")


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


def _reason(exc: BaseException, file: Path | None = None) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    if file is not None:  # pyarrow repeats the path, which the message names already
        text = text.replace(f"Could not open Parquet input source '{file}': ", "").replace(str(file), "the file")
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def damaged_error(file: Path, why: str) -> StoreDamagedError:
    """The one-line error for a damaged store file (DESIGN §7: nothing is changed; ``--repair`` recomputes)."""
    where = f"{str(file.parent.parent if file.parent.name == CHUNKS else file.parent)}/{DAMAGED}/"
    if file.name == MANIFEST:
        todo = (f"the rows stored beside it are intact; allowed: run the study again with --repair (Python: "
                f"Study.run(..., repair=True)): it is moved to {where!r} and rewritten from the study's definition "
                "once the stored rows are checked to be that study's")
    else:
        todo = (f"allowed: run the study again with --repair (Python: Study.run(..., repair=True)): it is moved "
                f"to {where!r} and exactly its rows are recomputed")
    return StoreDamagedError(f"store file {str(file)!r} is damaged ({why}); {todo}", file=file, reason=why)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read ``DIR/manifest.json``.

    Raises
    ------
    ValueError
        One line, if there is no manifest.
    StoreDamagedError
        One line naming the file, if it is not the JSON object a run writes.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ValueError(f"store {str(path)!r} is invalid; allowed: a directory written by a simstudy run "
                         f"(it has no {MANIFEST})")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except PermissionError as exc:
        raise ValueError(f"store file {str(file)!r} cannot be read ({_reason(exc)}); allowed: a readable "
                         "store") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise damaged_error(file, "empty file" if file.stat().st_size == 0 else _reason(exc)) from None
    missing = ([k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(MANIFEST_KEYS))
    if missing:
        raise damaged_error(file, f"not a study manifest: no {', '.join(missing)}")
    return manifest


def read_part(file: Path) -> pd.DataFrame:
    """One stored parquet file (a chunk or the consolidated table), its page CRCs and row digest verified.

    Raises
    ------
    StoreDamagedError
        One line naming the file: truncated, empty, garbled, or not rows of a study.
    """
    try:
        if file.stat().st_size == 0:
            raise damaged_error(file, "empty file (0 bytes)")
        import pyarrow.parquet as pq

        table = pq.read_table(file, page_checksum_verification=True)
        frame = table.to_pandas()
        want = (table.schema.metadata or {}).get(DIGEST_KEY)  # absent in files written before it was added
        if want is not None and frame_digest(frame).encode() != want:
            raise damaged_error(file, "its rows do not match the checksum stored in it")
    except StoreDamagedError:
        raise
    except PermissionError as exc:
        raise ValueError(f"store file {str(file)!r} cannot be read ({_reason(exc)}); allowed: a readable "
                         "store") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad bytes; each is damage
        raise damaged_error(file, _reason(exc, file)) from None
    missing = [c for c in ROW_COLUMNS if c not in frame.columns]
    if missing or not all(pd.api.types.is_integer_dtype(frame[c]) for c in ("condition", "replicate")):
        raise damaged_error(file, f"not a study's rows: columns {list(frame.columns)[:8]}")
    return frame


def stored_files(path: str | os.PathLike) -> list[Path]:
    """The parquet files holding a store's rows: the consolidated table first, then the chunks."""
    path = Path(path)
    files = [path / TABLE] if (path / TABLE).is_file() else []
    return files + (sorted((path / CHUNKS).glob("part-*.parquet")) if (path / CHUNKS).is_dir() else [])


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({"condition": pd.Series(dtype="int64"), "replicate": pd.Series(dtype="int64"),
                         "method": pd.Series(dtype="str"), "status": pd.Series(dtype="str"),
                         "message": pd.Series(dtype="str")})


def combine_rows(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Stored frames -> one frame, one row per key (the first wins)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_rows()
    rows = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    return rows.drop_duplicates(subset=KEY, keep="first", ignore_index=True)


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """All stored rows (consolidated table and chunks), one per key.

    Returns
    -------
    DataFrame
        Raw stored rows (no condition columns, unsorted); empty if none.

    Raises
    ------
    StoreDamagedError
        A stored file is damaged (see :func:`read_part`); nothing is changed.
    """
    return combine_rows([read_part(file) for file in stored_files(path)])


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
    StoreDamagedError
        The manifest is damaged (a stored parquet file: when rows are read).
    """

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any], *, extends: Iterable[str] = ()):
        self.path = Path(path)
        self.manifest = dict(manifest)
        self.extends = frozenset(extends)
        self._lock_fh = None
        self._seq = 0
        self.read_only = False

    # -- lifecycle -------------------------------------------------------------------------------------
    def open(self) -> "Store":
        """Create or check the directory, take the lock, write the manifest.

        A folder the user cannot write to is opened read-only (:attr:`read_only`): nothing is written, the
        lock is shared (and skipped if ``.lock`` cannot be opened), and only a finished study can be read
        from it (:meth:`require_writable`).
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"store={str(self.path)!r} is invalid; allowed: a directory path")
        if self.path.is_dir():
            self.read_only = any(write_problem(d) for d in (self.path, self.path / CHUNKS) if d.is_dir())
        if self.read_only:
            return self._open_read_only()
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
                    raise self._mismatch(old)
                else:
                    self.manifest["complete"] = bool(old.get("complete", False))
            elif any(self.path.glob("chunks/part-*.parquet")) or (self.path / TABLE).exists():
                raise StoreMismatchError(f"store {str(self.path)!r} holds rows but no {MANIFEST}; allowed: run "
                                         "again with --repair (Python: repair=True) to rewrite it once the rows "
                                         "are checked to be this study's, a new directory, or delete it first")
            else:
                self.manifest["complete"] = False
                self.write_manifest()
            for tmp in list(self.path.glob(".tmp-*")) + list((self.path / CHUNKS).glob(".tmp-*")):
                tmp.unlink(missing_ok=True)  # torn temporaries of a killed run
        except BaseException:
            self.close()
            raise
        return self

    def _mismatch(self, old: Mapping) -> StoreMismatchError:
        return StoreMismatchError(
            f"store {str(self.path)!r} holds a different study (config hash "
            f"{str(old.get('config_hash'))[:12]} != {self.manifest['config_hash'][:12]}); "
            "allowed: the same study's directory, a new directory, or delete it first")

    def _open_read_only(self) -> "Store":
        self._lock(shared=True)
        try:
            if not (self.path / MANIFEST).is_file():
                raise StoreReadOnlyError(f"store {str(self.path)!r} is read-only and holds no study; allowed: a "
                                         "folder you can write to")
            old = read_manifest(self.path)
            if old.get("config_hash") in self.extends:
                raise StoreReadOnlyError(f"store {str(self.path)!r} is read-only and holds this study with "
                                         f"{old.get('replicates')} replicates; allowed: a copy you can write to "
                                         "(cp -r DIR NEW, then run into NEW), or make it writable")
            if old.get("config_hash") != self.manifest["config_hash"]:
                raise self._mismatch(old)
            self.manifest["complete"] = bool(old.get("complete", False))
        except BaseException:
            self.close()
            raise
        return self

    def require_writable(self, missing: int) -> None:
        """Raise :class:`StoreReadOnlyError` (one line) if ``missing`` replicates are to be computed into a
        read-only store: checked before anything runs, so nothing computed is lost."""
        if self.read_only and missing:
            raise StoreReadOnlyError(
                f"store {str(self.path)!r} is read-only and {missing} replicate(s) of the study are not stored "
                "yet; allowed: a copy you can write to (cp -r DIR NEW, then run into NEW), or make it writable")

    def _lock(self, *, shared: bool = False) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locking
            return
        try:  # a reader needs no write access: open an existing lock file read-only
            fh = open(self.path / ".lock", "r" if shared else "a+")
        except OSError:
            if shared:  # no lock file, or not readable: nobody can be writing a read-only store through it
                return
            raise
        try:
            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=1, default=repr))

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
        is removed, and reading deduplicates on the row key. A read-only store
        is left as it is (its rows are read from the chunks).
        """
        if self.read_only:
            return
        atomic_write_parquet(with_design(frame, self.manifest["conditions"], self.manifest.get("truths")),
                             self.path / TABLE)  # factors and truths as columns (.design_columns)
        self.manifest["complete"] = True
        self.write_manifest()
        for file in (self.path / CHUNKS).glob("part-*.parquet"):
            file.unlink(missing_ok=True)
