"""The Zarr v3 feature cache: one store, many datasets, backbones and perturbations.

* :mod:`.store` — :func:`open_store`, :class:`Store` (datasets, side folder, writer locks);
* :mod:`.dataset` — :class:`Dataset`: the cell table, label corrections, feature sets;
* :mod:`.feature_set` — :class:`FeatureSet`: chunked features and tail tokens, checked on every read;
* :mod:`.labels` — label corrections as transactions; :mod:`.checksums` — CRC-32 of written chunks;
* :mod:`.verify` — check a whole store, repair by recompute; :mod:`.describe` — ``embedcache info``;
  :mod:`.export` — AnnData; :mod:`.locking` — writer locks behind one interface.

Within the package, modules import each other's own modules (never this ``__init__``).
"""

from embedcache.store.dataset import Dataset
from embedcache.store.errors import ChunkDamaged, FeatureSetConflict, StoreBusyError, StoreError
from embedcache.store.feature_set import FeatureSet, TailTokens, tokens_name
from embedcache.store.groups import safe_key
from embedcache.store.store import Store, WriteResult, open_store, side_url

__all__ = [
    "open_store",
    "Store",
    "Dataset",
    "FeatureSet",
    "TailTokens",
    "WriteResult",
    "StoreError",
    "StoreBusyError",
    "FeatureSetConflict",
    "ChunkDamaged",
    "safe_key",
    "side_url",
    "tokens_name",
]
