"""The one writer of study files: tables as CSV or Parquet, documents as JSON, plots as PNG.

A study hands :func:`write_files` what it made, keyed by file name; the suffix picks the
format (``.csv``, ``.parquet``, ``.json``, anything else: a plot drawn by the callable given).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from probes.errors import ProbeError

_CREATED: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("created_out", default=None)


@contextlib.contextmanager
def no_empty_outputs_on_failure() -> Iterator[None]:
    """A study that fails inside leaves no empty output folder behind: folders :func:`prepare_out`
    created inside are removed when the block raises and they are still empty (never a folder that
    existed before, nor one holding files)."""
    created: list[Path] = []
    token = _CREATED.set(created)
    try:
        yield
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty folder goes
        raise
    finally:
        _CREATED.reset(token)


def prepare_out(out: str | os.PathLike) -> Path:
    """Create the output folder now (before any fit), or say why it cannot be (never inside a store)."""
    from embedcache.store.errors import StoreError
    from embedcache.store.store import refuse_inside_store

    path = Path(out)
    try:
        refuse_inside_store(path, "the output folder")
    except StoreError as e:
        raise ProbeError(str(e)) from None
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProbeError(f"cannot create the output folder {path}: {e}") from e
    created = _CREATED.get()
    if created is not None and not existed:
        created.append(path)
    return path


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """One table as CSV or Parquet (by the suffix), without the index."""
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"a table is written as .csv or .parquet, not {path.name}")
    return path


def write_json(doc: Any, path: Path) -> Path:
    """A JSON document (values JSON cannot hold are written as text)."""
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return path


def study_document(
    kind: str, name: str, params: Mapping[str, Any], notes: Sequence[str], files: Sequence[str], **extra: Any
) -> dict[str, Any]:
    """The ``study.json`` of a study: what ran, with which parameters, what it noted and wrote."""
    return {
        "kind": kind,
        "name": name,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "params": dict(params),
        "notes": list(notes),
        **extra,
        "files": sorted(files),
    }


def write_files(
    out: str | os.PathLike,
    *,
    tables: Mapping[str, pd.DataFrame] | None = None,
    plots: Mapping[str, Callable[[Path], Any]] | None = None,
    documents: Mapping[str, Any | Callable[[list[str]], Any]] | None = None,
) -> dict[str, Path]:
    """Write every table, plot and JSON document under ``out``; returns ``{file name: path}``.

    A document may be a callable taking the names of every file written (e.g. to list them in
    ``study.json``); documents are written last.
    """
    folder = prepare_out(out)
    files: dict[str, Path] = {}
    for name, frame in (tables or {}).items():
        files[name] = write_table(frame, folder / name)
    for name, draw in (plots or {}).items():
        draw(folder / name)
        files[name] = folder / name
    docs = documents or {}
    names = sorted([*files, *docs])
    for name, doc in docs.items():
        files[name] = write_json(doc(names) if callable(doc) else doc, folder / name)
    return files
