"""Export a dataset of a store for single-cell tools: an AnnData ``.h5ad`` (scanpy, anndata).

``obs`` is the cell table with the current labels (corrections applied) and each feature set's
``ok`` flag; ``obsm`` holds one (N, D) float32 matrix per feature set and pooling, named from its
key (``timm-test_vit@random/224-bicubic/clean`` + ``cls`` -> ``timm-test_vit_random_224-bicubic_clean_cls``);
``uns["embedcache"]`` maps each of those names to its key, pooling and provenance summary.
Rows not ok (unreadable images, NaN/inf) are NaN in ``obsm``. Needs the ``anndata`` package.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.store.errors import StoreError
from embedcache.store.store import open_store, refuse_inside_store

__all__ = ["export_anndata", "obsm_name"]


def obsm_name(key: str, pool: str) -> str:
    """The ``obsm`` name of a feature set's pooling: letters, digits, ``.``, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", f"{key}/{pool}").strip("_")


def export_anndata(
    store: str | os.PathLike,
    anndata: str | os.PathLike,
    *,
    dataset: str | None = None,
    model: str | Sequence[str] | None = None,
) -> Path:
    """Write ``dataset`` of ``store`` as the AnnData file ``anndata`` (``.h5ad``); returns its path.

    ``model``: backbone names or feature keys (a comma list), as ``probes --model`` takes them
    (default: every complete feature set, perturbed ones included)."""
    try:
        import anndata as ad
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("export to AnnData needs the anndata package: pip install anndata") from e
    import pandas as pd

    refuse_inside_store(anndata, "the AnnData file")
    ds = open_store(store).dataset(dataset)
    if model is None:
        sets = [ds.feature_set(k) for k in ds.feature_keys()]
    else:
        names = [m.strip() for m in (model.split(",") if isinstance(model, str) else model) if m.strip()]
        sets = [ds.find_feature_set(m) for m in names]
    obs = ds.obs.copy()
    obs.index = pd.Index(obs["id"].astype(str).to_numpy(), name="cell")
    obsm: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    for fs in sets:
        pools = [p for p in fs.pools if fs.is_complete([p])]
        if not pools:
            raise StoreError(f"'{fs.key}' has no complete pooling to export; finish it with the same extract command")
        ok = fs.ok()
        obs[obsm_name(fs.key, "ok")] = ok
        for p in pools:
            x = fs.to_numpy(p)
            x[~ok] = np.nan
            name = obsm_name(fs.key, p)
            obsm[name] = x
            prov = fs.attrs.get("provenance", {})
            summary[name] = {
                "key": fs.key,
                "pool": p,
                "backbone": (prov.get("backbone") or {}).get("name"),
                "weights": json.dumps(prov.get("weights", {}), default=str),
                "preprocessing": json.dumps(prov.get("preprocessing", {}), default=str),
                "perturbation": json.dumps(prov.get("perturbation"), default=str),
                "created": str(prov.get("created") or prov.get("time") or ""),
            }
    if not obsm:
        raise StoreError(f"dataset '{ds.name}' has no feature sets to export")
    for col in obs.columns:
        if obs[col].dtype == object:
            obs[col] = obs[col].astype(str)
    adata = ad.AnnData(obs=obs, obsm=obsm)
    adata.uns["embedcache"] = {"store": str(store), "dataset": ds.name, "feature_sets": summary}
    path = Path(anndata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # a killed export leaves the previous file intact
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
