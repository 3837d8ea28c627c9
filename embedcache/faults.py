"""Named fault points: a test harness can SIGKILL a real process at a chosen step.

Set ``EMBEDCACHE_KILL_AT=<point>`` (or ``<point>#<n>`` for its n-th passage) in a child
process's environment and that process kills itself with SIGKILL when it reaches the point,
exactly as a power cut or an OOM kill would stop it there. Unset, a checkpoint costs one
dictionary look-up. The points are listed in :data:`POINTS` so that tests can walk them all.
"""

from __future__ import annotations

import os
import signal

ENV = "EMBEDCACHE_KILL_AT"

POINTS = (
    # label corrections (embedcache.store.labels.commit)
    "relabel:version-created",
    "relabel:current-written",
    "relabel:history-column",
    "relabel:before-switch",
    "relabel:after-switch",
    # metadata of groups (embedcache.store.store, embedcache.store.dataset)
    "dataset:obs-written",
    "feature-set:arrays-created",
    # chunk writes (embedcache.store.feature_set.FeatureSet.write_chunk)
    "chunk:data-written",
    "chunk:checksums-written",
    "chunk:done",
    # distributed extraction (embedcache.extraction.distributed): the driver after a task's chunk is written and flagged
    "distributed:chunk-finished",
)

_hits: dict[str, int] = {}


def checkpoint(point: str) -> None:
    """Kill this process with SIGKILL if ``EMBEDCACHE_KILL_AT`` names ``point`` (and its count)."""
    target = os.environ.get(ENV)
    if not target:
        return
    name, _, nth = target.partition("#")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
