"""The store's errors."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store cannot be used as asked (missing, wrong schema, conflicting contents)."""


class StoreBusyError(StoreError):
    """Another process is writing the same feature set."""


class FeatureSetConflict(StoreError):
    """A feature set of that key exists but was made differently."""


class ChunkDamaged(StoreError):
    """A written row-chunk is missing, truncated or altered (its checksum does not match)."""
