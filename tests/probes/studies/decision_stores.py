"""Stores for the decision-study tests (ensemble, calibrate, selective), built from the real features of
the ``chula_features`` fixture (832 bundled Chula cells, tiny random-init ViT) with
:func:`embedcache.import_features`: no second extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import embedcache


def column_split(y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """``"test"`` for a seeded ``test_fraction`` of each class, ``"train"`` for the rest."""
    rng = np.random.default_rng(seed)
    split = np.full(len(y), "train", dtype=object)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        split[idx[: int(round(test_fraction * len(idx)))]] = "test"
    return split.astype(str)


def decision_store(
    path: Path, X: np.ndarray, y: np.ndarray, *, split: np.ndarray | None = None, views: dict[str, slice] | None = None
) -> Path:
    """A store of the cells with labels ``y`` (and a ``split`` column), one imported feature set per
    ``views`` entry (backbone name -> columns of ``X``; default ``{"vit": all}``)."""
    cells = pd.DataFrame({"id": [f"cell{i:04d}" for i in range(len(y))], "label": y})
    if split is not None:
        cells["split"] = split
    for name, cols in (views or {"vit": slice(None)}).items():
        embedcache.import_features(path, np.ascontiguousarray(X[:, cols]), cells, backbone=name, store_dtype="float32")
    return path


def permute_test_labels(y: np.ndarray, split: np.ndarray, seed: int = 1) -> np.ndarray:
    """``y`` with the labels of the test cells shuffled among themselves (training labels unchanged)."""
    out = y.copy()
    test = np.flatnonzero(split == "test")
    out[test] = out[np.random.default_rng(seed).permutation(test)]
    assert (out != y).any()
    return out
