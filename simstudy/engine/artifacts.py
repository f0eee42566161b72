"""Per-replicate artifacts: files a method writes (a fitted model, a plot) kept beside the store (DESIGN §7).

A method whose signature has a ``ctx`` parameter is passed a :class:`ReplicateContext`: its position
(``condition``, ``replicate``, ``method``) and ``ctx.artifact_dir``, a folder of its own to write into::

    def fit(data, cond, ctx):
        model = ...
        (ctx.artifact_dir / "model.json").write_text(model.to_json())
        return {"estimate": model.coef}

Layout, keyed by (condition, replicate, method) like the rows::

    DIR/artifacts/condition=C/replicate=R/method=NAME/   (NAME percent-encoded where it is not a plain name)

The folder is created on first use of ``ctx.artifact_dir`` under a temporary name and moved into place when
the method returns (also when it fails: what it wrote may explain the failure; not after a timeout, when it
may still be writing), so a folder in place is whole. A replicate killed before its row was stored is
recomputed on resume and its folder replaced; temporaries of a killed run are removed when the store is next
opened. Only a run with a store has artifacts: without one, ``ctx.artifact_dir`` raises (the row records it).
``simstudy merge`` copies the shards' artifacts with their rows (:mod:`.shards`); :func:`artifact_table`
lists them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import pandas as pd

__all__ = ["ARTIFACTS", "ReplicateContext", "artifact_path", "artifact_table", "remove_temporaries"]

#: Folder of a store holding the artifacts.
ARTIFACTS = "artifacts"
_TMP = ".tmp-"


def _component(method: str) -> str:
    text = quote(method, safe="")
    return "%2E" + text[1:] if text.startswith(".") else text


def artifact_path(root: str | os.PathLike, condition: int, replicate: int, method: str) -> Path:
    """The folder of the artifacts of (condition, replicate, method) under ``root`` (a store's ``artifacts/``)."""
    return Path(root) / f"condition={int(condition)}" / f"replicate={int(replicate)}" / f"method={_component(method)}"


@dataclass
class ReplicateContext:
    """What a method with a ``ctx`` parameter is given: its position and a folder for its files."""

    condition: int  # position of the condition in the design
    replicate: int  # position of the replicate within the condition
    method: str  # the method's name
    root: str | None = None  # the store's artifacts folder; None: a run without a store
    _tmp: Path | None = field(default=None, repr=False)

    @property
    def artifact_dir(self) -> Path:
        """This (condition, replicate, method)'s folder (created on first use; moved into place afterwards)."""
        if self.root is None:
            raise RuntimeError("ctx.artifact_dir needs a store; allowed: Study.run(store=DIR) (simstudy run always "
                               "has one)")
        if self._tmp is None:
            final = artifact_path(self.root, self.condition, self.replicate, self.method)
            final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{final.name}-", dir=final.parent))
        return self._tmp

    def publish(self) -> None:
        """Move the folder written by the method into place, replacing one a killed run left unstored."""
        if self._tmp is None:
            return
        final = artifact_path(self.root, self.condition, self.replicate, self.method)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self._tmp, final)
        self._tmp = None


def remove_temporaries(root: str | os.PathLike) -> None:
    """Remove the temporary folders of methods a killed run left behind (the store is locked: none is in use)."""
    for tmp in Path(root).glob(f"condition=*/replicate=*/{_TMP}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def artifact_table(store: str | os.PathLike) -> pd.DataFrame:
    """The artifacts kept in a store: one row per (condition, replicate, method) folder.

    Returns
    -------
    DataFrame
        Columns ``condition``, ``replicate``, ``method``, ``path`` (the folder), ``files`` (files in it),
        sorted by condition and replicate.
    """
    rows = []
    for folder in Path(store, ARTIFACTS).glob("condition=*/replicate=*/method=*"):
        try:
            c = int(folder.parent.parent.name.partition("=")[2])
            r = int(folder.parent.name.partition("=")[2])
        except ValueError:
            continue
        rows.append({"condition": c, "replicate": r, "method": unquote(folder.name.partition("=")[2]),
                     "path": str(folder), "files": sum(1 for p in folder.rglob("*") if p.is_file())})
    frame = pd.DataFrame(rows, columns=["condition", "replicate", "method", "path", "files"]).astype(
        {"condition": "int64", "replicate": "int64", "files": "int64"})
    return frame.sort_values(["condition", "replicate", "method"], kind="mergesort").reset_index(drop=True)
