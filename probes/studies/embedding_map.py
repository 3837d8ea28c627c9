"""``embedding_map`` (``probes map``): a 2-D map of a feature set, coloured by label, split, domain, group or
audit suspicion, as one self-contained HTML page (click a point: its image and its nearest cells) and a PNG
for papers.

The layout is openTSNE's FFT-accelerated t-SNE on the first 50 principal components of the L2-normalised
features (cosine geometry, as the kNN probe and the neighbour search use). Chosen over UMAP (umap-learn):
openTSNE needs no JIT compiler (umap-learn pulls numba and compiles on first use, tens of seconds before the
first map), is seeded and deterministic, and its FFT interpolation scales linearly in the cells, so a
100,000-cell map is minutes on two cores (``benchmarks/embedding_map.py`` measures it). Every cell is a
point; only ``thumbnails`` cells (a stratified sample) carry an image and a neighbour list, so the page
stays small at 100,000 cells.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError

__all__ = ["embedding_map", "MapResult", "COLOURS"]

COLOURS = ("label", "split", "domain", "group", "suspicion")  # what the points can be coloured by
PCA_DIMS = 50


@dataclass
class MapResult:
    """The map: one row per cell (``id``, ``x``, ``y``, ``label`` and the other colourings the store has)."""

    points: pd.DataFrame
    params: dict[str, Any]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    build_page: Callable[[], str] | None = field(default=None, repr=False)

    @cached_property
    def page(self) -> str:
        """The self-contained map.html (written under out; the audit's Map tab embeds it), built on first use:
        it reads the thumbnails' images."""
        return self.build_page() if self.build_page is not None else ""


def layout(x: np.ndarray, *, perplexity: float = 30.0, seed: int = 0, threads: int | None = None) -> np.ndarray:
    """``(n, 2)`` t-SNE coordinates of the rows of ``x`` (cosine geometry: L2-normalised, then PCA to 50)."""
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    from probes.search.vectors import l2_normalize

    n = len(x)
    if n < 5:
        raise ProbeError(f"a map needs at least 5 cells, got {n}")
    z = l2_normalize(x)
    dims = min(PCA_DIMS, z.shape[1], n - 1)
    z = PCA(n_components=dims, random_state=seed).fit_transform(z).astype(np.float64)
    perplexity = min(float(perplexity), (n - 1) / 3)  # t-SNE needs 3 x perplexity neighbours
    tsne = TSNE(perplexity=perplexity, n_jobs=threads or os.cpu_count() or 1, random_state=seed, verbose=False)
    return np.asarray(tsne.fit(z), dtype=np.float32)


def _suspicion(suspicion: Any, ids: pd.Series) -> pd.Series | None:
    """Audit scores per cell from an audit's ``suspects.csv`` (a path, its folder, or a frame with id, score)."""
    if suspicion is None:
        return None
    if isinstance(suspicion, (str, os.PathLike)):
        path = Path(suspicion)
        path = path / "suspects.csv" if path.is_dir() else path
        if not path.is_file():
            raise ProbeError(f"no audit table at {path} (give an audit's output folder or its suspects.csv)")
        suspicion = pd.read_csv(path, dtype={"id": str})
    if not {"id", "score"} <= set(suspicion.columns):
        raise ProbeError("the audit table needs columns id and score (an audit's suspects.csv)")
    score = suspicion.drop_duplicates("id").set_index(suspicion["id"].astype(str).drop_duplicates())["score"]
    return ids.astype(str).map(score).astype(float)


def _sample(labels: np.ndarray, m: int, seed: int) -> np.ndarray:
    """``m`` positions (sorted), every label represented in proportion and at least once (so a label with few
    cells is never left without an image), the rest drawn at random."""
    n = len(labels)
    if m >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for lab in np.unique(labels):
        pos = np.flatnonzero(labels == lab)
        picked.append(rng.choice(pos, size=min(len(pos), max(1, m * len(pos) // n)), replace=False))
    chosen = np.concatenate(picked)
    rest = np.setdiff1d(np.arange(n), chosen)
    extra = rng.choice(rest, size=max(0, m - len(chosen)), replace=False)
    return np.sort(np.concatenate([chosen, extra]))


def _neighbours(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine neighbours (FAISS inner product on unit rows) of the rows ``queries``, self excluded."""
    import faiss

    from probes.search.vectors import l2_normalize

    z = l2_normalize(x)
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(z)
    sims, nbrs = index.search(z[queries], min(k + 1, len(z)))
    keep = nbrs != queries[:, None]
    rows = [(n[m][:k], s[m][:k]) for n, s, m in zip(nbrs, sims, keep)]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def embedding_map(
    store: str | os.PathLike | Any,
    model: str,
    *,
    dataset: str | None = None,
    pool: str | None = None,
    suspicion: str | os.PathLike | pd.DataFrame | None = None,
    perplexity: float = 30.0,
    thumbnails: int = 2000,
    k: int = 8,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> MapResult:
    """A 2-D map of ``model``'s features in ``store``: every cell a point, coloured by label and by whatever
    the store has of split / domain / group, and by audit suspicion when ``suspicion`` (an audit's output folder,
    its ``suspects.csv`` or a frame with id and score) is given. ``thumbnails`` cells (stratified by label) carry
    their image and their ``k`` nearest cells in the page. Writes ``map.html``, ``map.png`` and ``map.csv``
    under ``out`` when given."""
    from probes.features.cells import open_cells

    if int(thumbnails) < 0 or int(k) < 1:
        raise ProbeError(f"thumbnails must be >= 0 and k >= 1, got {thumbnails} and {k}")
    cells = open_cells(store, model, dataset=dataset, pool=pool, labelled=False)
    backbone = cells.backbones[0]
    obs = cells.obs.reset_index(drop=True)
    x = np.asarray(cells.features(backbone, np.arange(len(obs))), dtype=np.float32)
    xy = layout(x, perplexity=perplexity, seed=seed)
    points = pd.DataFrame({"id": obs["id"].astype(str), "x": xy[:, 0], "y": xy[:, 1]})
    labels = obs["label"].fillna("(no label)").astype(str) if "label" in obs else pd.Series(["(no label)"] * len(obs))
    points["label"] = labels.to_numpy()
    for col in ("split", "domain", "group"):
        if col in obs.columns:
            values = obs[col].astype("string").fillna("")
            if (values != "").any():  # a column the store has but no cell fills is not a colouring
                points[col] = values.replace("", "(none)").to_numpy(dtype=str)
    scores = _suspicion(suspicion, points["id"])
    if scores is not None:
        points["suspicion"] = scores.to_numpy()
    points["path"] = obs["path"].astype(str).to_numpy() if "path" in obs else ""
    sample = _sample(points["label"].to_numpy(), int(thumbnails), seed) if thumbnails else np.array([], dtype=int)
    nbrs, sims = _neighbours(x, sample, int(k)) if len(sample) else (np.zeros((0, 0), int), np.zeros((0, 0)))
    params = {
        "store": str(getattr(store, "url", store)),
        "dataset": cells.dataset,
        "feature_key": cells.feature_key(backbone),
        "pool": cells.pool_of(backbone),
        "cells": len(points),
        "layout": "openTSNE t-SNE on PCA-50 of unit rows",
        "perplexity": perplexity,
        "seed": seed,
        "thumbnails": len(sample),
        "k": int(k),
    }
    from probes.reporting.map_html import map_html

    res = MapResult(points, params, build_page=lambda: map_html(points, sample, nbrs, sims, params))
    if out is not None:
        from probes.reporting.map_html import map_png
        from probes.reporting.tables import prepare_out, write_files

        res.out = prepare_out(out)
        res.files = write_files(
            res.out,
            tables={"map.csv": points},
            plots={"map.png": lambda p: map_png(points, p, title=f"{cells.dataset} · {params['feature_key']}")},
            documents={"map.json": params},
        )
        (res.out / "map.html").write_text(res.page, encoding="utf-8")
        res.files["map.html"] = res.out / "map.html"
    return res


def describe(res: MapResult) -> str:
    """One line: what was mapped and where it went."""
    where = f" -> {res.files['map.html']}" if "map.html" in res.files else ""
    colours = [c for c in COLOURS if c in res.points.columns]
    return (
        f"map of {res.params['cells']:,} cells ({res.params['feature_key']}), coloured by {', '.join(colours)}{where}"
    )
