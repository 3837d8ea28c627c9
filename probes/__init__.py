"""probes: fast linear / kNN / SVM probes and studies on an embedcache feature store.

The Python API has the CLI's names (the ``probes`` CLI is a thin skin over these):

* :func:`scale` — macro-F1 against cells per class (``probes scale``);
* :func:`evaluate` — one fit on the full training split (``probes eval``);
* :func:`robustness` — clean-trained probes on perturbed test cells (``probes robustness``);
* :func:`audit` — rank cells by how likely their label is wrong (``probes audit``);
* :func:`neighbors` — exact cosine nearest cells of stored cells or new images (``probes neighbors``);
* :func:`relabel` — apply reviewed label corrections, history kept (``probes relabel``);
* :func:`make_probe` / :data:`PROBES` — the heads, scikit-learn shaped (imported lazily: torch).

The functions are bound here after their submodules are imported, so ``probes.audit`` is the
function even though ``probes/audit.py`` shares its name (the modules stay in ``sys.modules``:
``from probes.audit import write_outputs`` works).
"""

from __future__ import annotations

import importlib
from typing import Any

from .audit import AuditResult, audit, audit_arrays, relabel
from .data import ProbeError
from .neighbors import NeighborIndex, neighbors
from .robustness import robustness
from .study import evaluate, scale

_LAZY = {"make_probe": "probes.heads", "PROBES": "probes.heads"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


__all__ = ["scale", "evaluate", "robustness", "audit", "audit_arrays", "AuditResult", "neighbors",
           "NeighborIndex", "relabel", "ProbeError", "make_probe", "PROBES"]
