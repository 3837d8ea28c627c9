"""embedcache: cache frozen foundation-model embeddings of single cells, then study them.

Python API (the CLI ``embedcache`` is a thin skin over these):

* :func:`extract` — images in, a resumable, chunked Zarr feature set out;
* :func:`import_features` — embeddings computed elsewhere, written into a store beside extracted ones;
  :func:`import_features_file` — the same from a ``.npy`` / ``.npz`` file (``embedcache import``);
* ``embedcache demo`` (:func:`embedcache_cli.demo.demo`) — the bundled real cells through ``efficientnet-lite0``
  and a random-init copy, logistic and kNN probes on both;
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
    "extract": "extraction.runner",
    "ExtractOptions": "extraction.options",
    "ExtractResult": "extraction.plan",
    "ExtractionError": "extraction.plan",
    "import_features": "extraction.importing",
    "ImportResult": "extraction.importing",
    "import_features_file": "extraction.importing",
    "load_features": "extraction.importing",
    "resolve_device": "backbones.devices",
    "resolve_dtype": "backbones.devices",
    "open_store": "store",
    "Store": "store",
    "Dataset": "store",
    "FeatureSet": "store",
    "StoreError": "store",
    "StoreBusyError": "store",
    "FeatureSetConflict": "store",
    "ChunkDamaged": "store",
    "verify": "store.verify",
    "describe": "store.describe",
    "VerifyReport": "store.verify",
    "open_source": "inputs.sources",
    "CellSource": "inputs.sources",
    "SourceError": "inputs.sources",
    "list_models": "backbones.registry",
    "get_spec": "backbones.registry",
    "register": "backbones.registry",
    "BackboneSpec": "backbones.registry",
    "models": "backbones.costs",
    "check_precision": "backbones.precision",
    "export_anndata": "store.export",
    "choose_dtype": "backbones.precision",
    "load_backbone": "backbones.loading",
    "LoadedBackbone": "backbones.loading",
    "WeightsUnavailable": "backbones.loading",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"embedcache.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
