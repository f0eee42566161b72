"""Extending a study with more replicates (DESIGN §7 "Seeds"): replicate ``r`` is keyed by its position, so
its rows do not depend on how many replicates the study has, and a study re-run at a larger count need only
compute the new replicates.

* :func:`smaller_versions`: the store itself holds the study at a smaller count (extended in place);
* :func:`import_other_counts`: a sibling store (same parent folder) holds it at another count; its rows are
  copied into the new store.

Both compare config hashes: ``hash_at(count)`` is the study's hash recomputed at another replicate count, so
design, methods, seed and fingerprint must all agree.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from .errors import StoreDamagedError
from .storage import KEY, MANIFEST, Store, read_manifest, read_rows

__all__ = ["import_other_counts", "smaller_versions"]


def smaller_versions(store: str | os.PathLike, replicates: int, hash_at: Callable[[int], str]) -> tuple[str, ...]:
    """The config hash in ``store`` if it holds this study with fewer replicates (then it is extended)."""
    try:
        old = read_manifest(store)
        count = int(old["replicates"])
    except (ValueError, KeyError, TypeError):
        return ()
    if count < replicates and old.get("config_hash") == hash_at(count):
        return (old["config_hash"],)
    return ()


def import_other_counts(st: Store, replicates: int, hash_at: Callable[[int], str]) -> None:
    """Seed an empty store with the rows of the same study run at another replicate count.

    A sibling directory (same parent as ``st``) qualifies when its stored config hash equals
    ``hash_at(its count)``. Its rows with ``replicate < replicates`` are copied into one chunk
    and the source is recorded in the manifest under ``"imported"``.
    """
    if st.read_only or st.manifest.get("complete") or len(st.rows()):
        return
    imported, seen = [], set()  # seen: keys copied so far (two siblings may overlap: the first wins)
    for other in sorted(st.path.parent.glob(f"*/{MANIFEST}")):
        folder = other.parent
        if folder.resolve() == st.path.resolve():
            continue
        try:
            old = read_manifest(folder)
            count = int(old["replicates"])
        except (ValueError, KeyError, TypeError):
            continue
        if count == replicates or old.get("config_hash") != hash_at(count):
            continue
        try:
            rows = read_rows(folder)
        except StoreDamagedError:  # a damaged sibling is its own business: its rows are not copied
            continue
        rows = rows[rows["replicate"].astype(int) < replicates]
        keys = list(zip(*(rows[k] for k in KEY)))
        rows = rows[[k not in seen for k in keys]]
        seen.update(keys)
        if len(rows):
            st.write_chunk(rows.reset_index(drop=True))
            imported.append({"store": str(folder), "replicates": count, "rows": int(len(rows))})
    if imported:
        st.manifest["imported"] = imported
        st.write_manifest()
