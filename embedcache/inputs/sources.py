"""Image sources: where cells come from, one row per cell with a stable id.

Three kinds, all giving a :class:`CellSource` whose ``table`` has the columns
``id, path, label, split, domain, group`` (strings, ``""`` where absent) and whose
``load(i)`` returns cell ``i`` as an (H, W, 3) uint8 array:

* an ImageFolder tree (one sub-folder per class; a flat folder is an unlabelled set);
* a CSV or Parquet manifest (``path`` plus ``label`` and optional ``id, split, domain,
  group`` columns; paths absolute or relative to the manifest), local or at an fsspec URL
  (``s3://lab/cells/manifest.parquet``); image paths may be URLs too;
* arrays of images, in memory or in a ``.npz`` file (N, H, W[, C], as MedMNIST ships).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, is_url, read_image, to_rgb_uint8
from embedcache.inputs.urls import carries_secret, refuse_credentials

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
OBS_COLUMNS = ("id", "path", "label", "split", "domain", "group")
OPTIONAL_COLUMNS = ("split", "domain", "group")


class SourceError(ValueError):
    """The input data cannot be used as given (bad manifest, no images, ...)."""


class LabelSpellingWarning(UserWarning):
    """Label spellings that are one number (``1``, ``01``, ``1.0``) are kept as distinct classes."""


@dataclass
class CellSource:
    """Cells to extract: a table of metadata plus a way to load each image."""

    name: str
    kind: str  # "imagefolder" | "manifest" | "arrays"
    origin: str
    table: pd.DataFrame
    images: np.ndarray | None = field(default=None, repr=False)  # for kind == "arrays"
    # ids an earlier version gave the same cells (absolute paths of a manifest without an id column): a store
    # written then still matches this source
    legacy_ids: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    def load(self, i: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
        """Cell ``i`` as (H, W, 3) uint8; raises :class:`ImageDecodeError` (also for a file over
        ``max_pixels`` pixels, checked before decoding; in-memory arrays are already decoded)."""
        if self.images is not None:
            return to_rgb_uint8(np.asarray(self.images[i]))
        return read_image(self.table["path"].iat[i], max_pixels=max_pixels)

    def fingerprint(self, i: int) -> int:
        """A 63-bit fingerprint of cell ``i``'s input as it is now: of a local file its size and modification
        time (one ``stat``, no read: a changed image is caught when its size or mtime changes), of an in-memory
        image its bytes; 0 for URLs (not checked: a HEAD request per cell would cost more than it saves)."""
        if self.images is not None:
            return _fp(np.ascontiguousarray(self.images[i]).tobytes())
        path = self.table["path"].iat[i]
        if is_url(path):
            return 0
        try:
            st = os.stat(path)
        except OSError:
            return -1  # gone: differs from any recorded fingerprint
        return _fp(f"{st.st_size}:{st.st_mtime_ns}".encode())

    def cell_id(self, i: int) -> str:
        """The id of cell ``i``."""
        return str(self.table["id"].iat[i])

    def cell_path(self, i: int) -> str:
        """The image path (or URL) of cell ``i`` ("" for in-memory arrays)."""
        return str(self.table["path"].iat[i])

    def rows(self, start: int, stop: int) -> SourceRows:
        """Cells ``start .. stop - 1`` alone (ids, paths and images; no other metadata), still indexed by
        their row in this source: what one Dask task of a distributed extraction is sent."""
        return SourceRows(
            name=self.name,
            kind=self.kind,
            origin=self.origin,
            table=self.table.iloc[start:stop][["id", "path"]].reset_index(drop=True),
            images=None if self.images is None else self.images[start:stop],
            start=start,
        )

    def digest(self) -> str:
        """Digest of the cell list (ids and image paths), not of the labels.

        Labels are metadata that may be corrected later; the cell list decides
        whether stored features still belong to these cells.
        """
        return cell_list_digest(self.table["id"].tolist(), self.table["path"].tolist())

    def as_stored(self, digest: str) -> CellSource:
        """This source under the ids of the store dataset whose cell-list digest is ``digest``: itself, or, for a
        dataset written under the ids an earlier version gave these cells (:attr:`legacy_ids`), a copy with those
        ids, so that what an extraction reports (skipped cells, errors) names cells as the store does."""
        if self.legacy_ids is None or digest == self.digest():
            return self
        table = self.table.copy()
        table["id"] = self.legacy_ids
        return replace(self, table=table, legacy_ids=None)

    def accepted_digests(self) -> list[str]:
        """:meth:`digest`, then the digest of the same cells under the ids an earlier version gave them."""
        old = [] if self.legacy_ids is None else [cell_list_digest(self.legacy_ids, self.table["path"].tolist())]
        return [self.digest(), *old]


@dataclass
class SourceRows(CellSource):
    """Rows ``start .. start + len(table) - 1`` of a :class:`CellSource` (:meth:`CellSource.rows`), indexed by
    their row numbers in the whole source; only what loading them needs."""

    start: int = 0

    def load(self, i: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
        return super().load(self._local(i), max_pixels)

    def cell_id(self, i: int) -> str:
        return super().cell_id(self._local(i))

    def fingerprint(self, i: int) -> int:
        return super().fingerprint(self._local(i))

    def cell_path(self, i: int) -> str:
        return super().cell_path(self._local(i))

    def _local(self, i: int) -> int:
        j = int(i) - self.start
        if not 0 <= j < len(self.table):
            raise IndexError(f"row {i} is not among rows {self.start}..{self.start + len(self.table) - 1}")
        return j


def _fp(data: bytes) -> int:
    """A positive 63-bit digest of ``data`` (0 and -1 mean unknown and gone)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1 | 1


def cell_list_digest(ids: list[str], paths: list[str]) -> str:
    """The digest a dataset records of its cell list (ids and paths, in order)."""
    h = hashlib.sha256()
    for values in (ids, paths):
        h.update("\x1f".join(values).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def open_source(
    data: str | os.PathLike | np.ndarray,
    *,
    labels: Sequence[Any] | np.ndarray | None = None,
    label_column: str | None = "label",
    name: str | None = None,
) -> CellSource:
    """Open an ImageFolder, a CSV/Parquet manifest, a ``.npz`` file or an image array.

    ``label_column=None`` reads a manifest as unlabelled; ``labels`` gives the labels
    of an in-memory array. Label spellings of one number (``1``, ``01``, ``1.0``) stay distinct
    classes and raise a :class:`LabelSpellingWarning` naming them. An ImageFolder's dangling
    symbolic links are listed as cells (their path is the link), so that extraction fails
    naming them or, with ``on_error="skip"``, records them as skipped.
    """
    source = _open(data, labels=labels, label_column=label_column, name=name)
    for note in label_collisions(source.table["label"]):
        warnings.warn(note, LabelSpellingWarning, stacklevel=2)
    return source


def label_collisions(labels: Iterable[str]) -> list[str]:
    """One note per number spelt several ways among ``labels`` (e.g. ``1``, ``01``, ``1.0``)."""
    by_value: dict[float, set[str]] = {}
    for label in set(labels):
        try:
            value = float(label)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            by_value.setdefault(value, set()).add(label)
    return [
        f"labels {', '.join(repr(v) for v in sorted(spellings))} are one number spelt {len(spellings)} ways; "
        "they are kept as distinct classes (correct the labels if they mean one class)"
        for _, spellings in sorted(by_value.items())
        if len(spellings) > 1
    ]


def _open(
    data: str | os.PathLike | np.ndarray,
    *,
    labels: Sequence[Any] | np.ndarray | None,
    label_column: str | None,
    name: str | None,
) -> CellSource:
    if isinstance(data, np.ndarray):
        return _from_arrays(data, labels, name or "arrays", origin="<memory>")
    if isinstance(data, str) and data.startswith("file://"):
        data = data[len("file://") :]
    if isinstance(data, str) and is_url(data):
        return _open_url(data, label_column=label_column, name=name)
    path = Path(data)
    if not path.exists():
        raise SourceError(f"data not found: {path}")
    if path.is_dir():
        return _from_folder(path, name or path.resolve().name)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        generic = path.stem.lower() in ("manifest", "metadata", "labels", "index", "cells")
        return _from_manifest(path, label_column, name or (path.resolve().parent.name if generic else path.stem))
    if suffix == ".npz":
        return _from_npz(path, name or path.stem)
    raise SourceError(f"cannot tell what {path} is: give a folder of images, a .csv/.parquet manifest or a .npz file")


_SECRET_URL = (
    "the URL carries credentials (user:password@ or a signed query such as X-Amz-Signature); it would be "
    "written into the store and into logs: give plain URLs and the credentials through the environment "
    "(AWS_* variables, ~/.aws, fsspec's configuration)"
)


def _open_url(url: str, *, label_column: str | None, name: str | None) -> CellSource:
    """A manifest or ``.npz`` at an fsspec URL (``s3://lab/cells/manifest.parquet``)."""
    import fsspec

    refuse_credentials(url, "data", SourceError)

    fs, where = fsspec.url_to_fs(url)
    if not fs.exists(where):
        raise SourceError(f"data not found: {url}")
    stem = PurePosixPath(where)
    suffix = stem.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        generic = stem.stem.lower() in ("manifest", "metadata", "labels", "index", "cells")
        return _from_manifest(url, label_column, name or (stem.parent.name if generic else stem.stem))
    if suffix == ".npz":
        return _from_npz(url, name or stem.stem)
    if fs.isdir(where):
        raise SourceError(f"{url} is a folder: on object storage give a .csv/.parquet manifest of its images")
    raise SourceError(f"cannot tell what {url} is: give a .csv/.parquet manifest or a .npz file")


def _table(ids, paths, labels, **optional) -> pd.DataFrame:
    n = len(ids)
    cols = {"id": list(ids), "path": list(paths), "label": list(labels)}
    for c in OPTIONAL_COLUMNS:
        values = optional.get(c)
        cols[c] = list(values) if values is not None else [""] * n
    table = pd.DataFrame(cols, columns=list(OBS_COLUMNS))
    return table.astype(str)


def _from_folder(root: Path, name: str) -> CellSource:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ids, paths, labels = [], [], []
    if subdirs:
        for d in subdirs:
            for f in _image_files(d):
                ids.append(f.relative_to(root).as_posix())
                paths.append(_cell_path(f))
                labels.append(d.name)
    else:
        for f in _image_files(root):
            ids.append(f.name)
            paths.append(_cell_path(f))
            labels.append("")
    if not ids:
        raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return CellSource(name, "imagefolder", str(root), _table(ids, paths, labels))


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (not hidden), with dangling symbolic links among them."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and (p.is_file() or _dangling(p))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _dangling(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _cell_path(f: Path) -> str:
    """The resolved file; for a dangling link the link itself, so that its error names it."""
    return str(f.absolute()) if _dangling(f) else str(f.resolve())


def _read_manifest(path: Path | str) -> pd.DataFrame:
    """A manifest from a local path or an fsspec URL."""
    import fsspec

    with fsspec.open(str(path), "rb") as f:
        if _suffix(path) == ".csv":
            return pd.read_csv(f, dtype=str, keep_default_na=False)
        df = pd.read_parquet(f)
    return df.astype(object).where(df.notna(), "").astype(str)


def _suffix(path: Path | str) -> str:
    return PurePosixPath(str(path)).suffix.lower()


def _from_manifest(path: Path | str, label_column: str | None, name: str) -> CellSource:
    """Cells listed in a manifest at a local ``Path`` or a URL (``str``); relative image paths are
    relative to the manifest's folder, and image paths may be URLs themselves."""
    df = _read_manifest(path)
    df.columns = [str(c).strip() for c in df.columns]
    if "path" not in df.columns:
        raise SourceError(f"{path}: no 'path' column (columns: {', '.join(df.columns)})")
    if label_column is not None and label_column not in df.columns:
        raise SourceError(
            f"{path}: no '{label_column}' column (columns: {', '.join(df.columns)}); "
            "name the label column with --label-column, or use --no-labels for an unlabelled set"
        )
    if len(df) == 0:
        raise SourceError(f"{path}: the manifest has no rows")
    line = lambda i: f"{PurePosixPath(str(path)).name} row {i + 1} (line {i + 2})"  # noqa: E731  header is line 1
    paths = df["path"].str.strip()
    for i in np.flatnonzero(paths.eq("").to_numpy()):
        raise SourceError(f"{line(i)}: empty path")
    if label_column is not None:
        labels = df[label_column].str.strip()
        bad = labels.eq("") | labels.str.lower().isin(["nan", "none", "null", "na"])
        for i in np.flatnonzero(bad.to_numpy()):
            raise SourceError(
                f"{line(i)}: label '{df[label_column].iat[i]}' is missing or malformed (path {paths.iat[i]})"
            )
    else:
        labels = pd.Series([""] * len(df))
    if isinstance(path, Path):
        base = path.resolve().parent
        abs_paths = [p if os.path.isabs(p) or is_url(p) else str(base / p) for p in paths]
    else:  # a URL manifest: relative paths are URLs beside it
        url_base = path.rsplit("/", 1)[0]
        abs_paths = [p if is_url(p) else f"{url_base}/{p.lstrip('/')}" for p in paths]
    for row, p in enumerate(abs_paths):
        if is_url(p) and carries_secret(p):
            raise SourceError(f"{line(row)}: {_SECRET_URL}")
    legacy_ids = None
    if "id" in df.columns:
        ids = df["id"].str.strip()
    elif len(paths) and all(os.path.isabs(p) for p in paths) and _common_folder(paths.tolist()):
        # absolute paths make wide, machine-bound ids: the id is the path below the paths' common folder
        root = _common_folder(paths.tolist())
        ids, legacy_ids = pd.Series([os.path.relpath(p, root) for p in paths]), paths.tolist()
    else:
        ids = paths
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:5]
        raise SourceError(
            f"{path}: cell ids must be unique; '{ids.iat[rows[0]]}' repeats "
            f"(rows {', '.join(str(r + 1) for r in rows)})"
        )
    optional = {c: df[c].str.strip().tolist() for c in OPTIONAL_COLUMNS if c in df.columns}
    return CellSource(name, "manifest", str(path), _table(ids, abs_paths, labels, **optional), legacy_ids=legacy_ids)


def _common_folder(paths: list[str]) -> str | None:
    """The deepest folder holding every path, or None when that is the filesystem root (ids would still be
    machine-bound, and no shorter)."""
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return None if os.path.dirname(root) == root else root


def _from_npz(path: Path | str, name: str) -> CellSource:
    if isinstance(path, str):  # a URL: fetched whole
        import fsspec

        with fsspec.open(path, "rb") as f:
            data: Path | io.BytesIO = io.BytesIO(f.read())
    else:
        data = path
    with np.load(data, allow_pickle=False) as z:
        keys = set(z.files)
        splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
        if splits:  # MedMNIST layout
            images = np.concatenate([z[f"{s}_images"] for s in splits])
            labels = (
                np.concatenate([z[f"{s}_labels"].reshape(len(z[f"{s}_images"]), -1)[:, 0] for s in splits])
                if all(f"{s}_labels" in keys for s in splits)
                else None
            )
            split = [s for s in splits for _ in range(len(z[f"{s}_images"]))]
            ids = [f"{s}/{i:06d}" for s in splits for i in range(len(z[f"{s}_images"]))]
        elif "images" in keys:
            images = z["images"]
            labels = z["labels"].reshape(len(images), -1)[:, 0] if "labels" in keys else None
            split, ids = None, None
        else:
            raise SourceError(f"{path}: expected 'images' or '<split>_images' arrays, found {sorted(keys)}")
    src = _from_arrays(images, labels, name, origin=str(path), ids=ids, split=split)
    return src


def _from_arrays(
    images: np.ndarray,
    labels,
    name: str,
    *,
    origin: str,
    ids: Sequence[str] | None = None,
    split: Sequence[str] | None = None,
) -> CellSource:
    if images.ndim not in (3, 4) or len(images) == 0:
        raise SourceError(f"images must be (N, H, W) or (N, H, W, C) with N > 0, got shape {images.shape}")
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise SourceError(f"{n} images but {len(labels)} labels")
        labels = [str(v) for v in labels.tolist()]
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(n)]
    table = _table(ids, [""] * n, labels if labels is not None else [""] * n, split=split)
    return CellSource(name, "arrays", origin, table, images=images)


__all__ = [
    "CellSource",
    "SourceError",
    "LabelSpellingWarning",
    "open_source",
    "label_collisions",
    "ImageDecodeError",
    "OBS_COLUMNS",
]
