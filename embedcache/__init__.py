"""embedcache: cache frozen foundation-model embeddings of single cells, then study them.

Python API (the CLI ``embedcache`` is a thin skin over these):

* :func:`extract` — images in, a resumable, chunked Zarr feature set out;
* :func:`import_features` — embeddings computed elsewhere, written into a store beside extracted ones;
  :func:`import_features_file` — the same from a ``.npy`` / ``.npz`` file (``embedcache import``);
* :func:`embedcache.demo.demo` — the bundled demo (``embedcache demo``): synthetic cells, extract, probes;
* :func:`open_store` — read a store: datasets, the cell table, features as numpy / dask;
* :func:`verify` — check every written chunk against its checksum, and mark damaged ones for recompute;
* :func:`list_models` / :func:`load_backbone` — the backbone registry; :func:`models` — it as a table, and with
  ``cost=True`` what each backbone costs here (``embedcache models --cost``);
* :func:`check_precision` — each compute dtype against fp32 on real cells, recorded for ``--dtype auto``;
* :func:`export_anndata` — a dataset as an AnnData ``.h5ad`` (obs: cells, obsm: feature sets) for scanpy.

Names load lazily, so reading a store does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "extract": "pipeline",
    "ExtractResult": "pipeline",
    "ExtractionError": "pipeline",
    "import_features": "importing",
    "ImportResult": "importing",
    "import_features_file": "import_files",
    "load_features": "import_files",
    "DemoResult": "demo",
    "resolve_device": "devices",
    "resolve_dtype": "devices",
    "open_store": "store",
    "Store": "store",
    "Dataset": "store",
    "FeatureSet": "store",
    "StoreError": "store",
    "StoreBusyError": "store",
    "FeatureSetConflict": "store",
    "ChunkDamaged": "store",
    "verify": "integrity",
    "VerifyReport": "integrity",
    "open_source": "sources",
    "CellSource": "sources",
    "SourceError": "sources",
    "list_models": "registry",
    "get_spec": "registry",
    "register": "registry",
    "BackboneSpec": "registry",
    "models": "costs",
    "check_precision": "precision",
    "export_anndata": "export",
    "choose_dtype": "precision",
    "load_backbone": "loading",
    "LoadedBackbone": "loading",
    "WeightsUnavailable": "loading",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
