"""``embedcache import`` from Python: read a features file (``.npy`` / ``.npz``), then :func:`import_features`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.extraction.importing import ImportResult, import_features

__all__ = ["load_features", "import_features_file"]


def load_features(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """``.npy`` -> one (N, D) array (memory-mapped); ``.npz`` -> ``{pool: (N, D)}``, one array per pool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    raise ValueError(f"{path.name}: features must be a .npy (N, D) array or a .npz with one (N, D) array per pool")


def import_features_file(
    out: str | os.PathLike,
    features: str | os.PathLike,
    cells: str | os.PathLike | Any | None = None,
    *,
    backbone: str,
    labels: Sequence[Any] | np.ndarray | None = None,
    dataset: str | None = None,
    store_dtype: str = "float16",
    chunk_size: int = 1024,
) -> ImportResult:
    """:func:`import_features` of the arrays in the file ``features`` (see :func:`load_features`);
    the file's absolute path is kept in the provenance."""
    feats = load_features(features)
    return import_features(
        out,
        feats,
        cells,
        backbone=backbone,
        labels=labels,
        dataset=dataset,
        store_dtype=store_dtype,
        chunk_size=chunk_size,
        source=str(Path(features).resolve()),
    )
