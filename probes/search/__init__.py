"""Nearest-neighbour search over cached features: exact (FAISS, in memory or out of core) or approximate.

* :mod:`.index` — :class:`~.index.NeighborIndex`; :mod:`.exact` — block-wise exact search; :mod:`.ann` —
  IVF-PQ / HNSW candidates re-ranked exactly; :mod:`.options` — how a look-up searches; :mod:`.vectors` —
  row-wise helpers.
"""
