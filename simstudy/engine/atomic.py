"""Atomic file writes, the one way every engine file is written (DESIGN §7: safe against a kill).

Each helper fills a temporary file beside the target (``.tmp-NAME-PID-XXXX`` in the same folder, so the
move never crosses a file system) and moves it into place with :func:`os.replace`: a kill or an error at any
moment leaves the old file or the new one, never a torn one, and no temporary behind after an error.
Tables, the manifest, ``summary.csv``, ``report.md`` and every figure (:func:`simstudy.engine.plots.save_figure`)
go through :func:`atomic_write`.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_write_parquet", "frame_digest",
           "write_problem", "DIGEST_KEY"]

DIGEST_KEY = b"simstudy.sha256"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """The one atomic write: ``write(tmp)`` fills a temporary file beside ``path``, then :func:`os.replace`
    moves it into place. On any failure the temporary is removed and ``path`` keeps its old content, so a
    kill or an error mid-write never leaves a torn file (tables, manifest, report and figures alike)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was written there
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + os.replace)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + os.replace)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def frame_digest(frame: pd.DataFrame) -> str:
    """SHA-256 (hex) of a frame's column names and values, as stored in each parquet file's metadata."""
    h = hashlib.sha256(json.dumps([str(c) for c in frame.columns]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def atomic_write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``frame`` to ``path`` as parquet atomically, damage-evident: a CRC per page and the
    :func:`frame_digest` of the rows in the file's metadata (key :data:`DIGEST_KEY`), so that changed bytes
    are found when the file is read (:func:`simstudy.engine.storage.read_part`), never read as other values
    (page CRCs alone miss changes to the footer, e.g. a column name or a row count)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[DIGEST_KEY] = frame_digest(table.to_pandas()).encode()  # of the frame as it will be read back
    table = table.replace_schema_metadata(meta)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def write_problem(path: str | os.PathLike) -> str | None:
    """None when a file can be created in the folder ``path``; else why not (``"PermissionError: ..."``).

    The probe creates and removes an empty temporary file, so it answers for the user actually running
    (``os.access`` is no guide for root or on a read-only mount).
    """
    probe = Path(path) / f".tmp-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        os.unlink(probe)
    except OSError:  # pragma: no cover - created but not removable: the folder is writable all the same
        pass
    return None
