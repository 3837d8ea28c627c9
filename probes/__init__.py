"""probes: fast linear / kNN / SVM probes and studies on an embedcache feature store.

The Python API has the CLI's names (the ``probes`` CLI is a thin skin over these):

* :func:`scale` — macro-F1 against cells per class (``probes scale``);
* :func:`evaluate` — one fit on the full training split (``probes eval``);
* :func:`robustness` — clean-trained probes on perturbed test cells (``probes robustness``);
* :func:`ensemble` — per-class F1 of every head and the head-diverse ensembles (``probes ensemble``);
* :func:`calibrate` — ECE / MCE / Brier / NLL before and after temperature scaling (``probes calibrate``);
* :func:`selective` — risk-coverage, AURC, a threshold for a target accuracy (``probes selective``);
* :func:`audit` — rank cells by how likely their label is wrong (``probes audit``);
* :func:`neighbors` — exact cosine nearest cells of stored cells or new images (``probes neighbors``);
* :func:`embedding_map` — a 2-D map of a feature set, coloured by label / split / domain / suspicion (``probes map``);
* :func:`relabel` — apply reviewed label corrections, history kept (``probes relabel``);
* :func:`make_probe` / :data:`PROBES` — the heads, scikit-learn shaped (imported lazily: torch).

Layout: :mod:`probes.heads` (the estimators), :mod:`probes.studies` (one module per study, each
filling :mod:`probes.engine.skeleton`), :mod:`probes.reporting` (files, plots, console, HTML, contact
sheets); beside them the shared inputs: :mod:`probes.features.cells` (cells), :mod:`probes.sampling`
(splits), :mod:`probes.domains`, :mod:`probes.metrics`, :mod:`probes.search.index` (the index),
:mod:`probes.studies.relabel` (relabel). No function here shares its name with a module of this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ProbeError": "probes.errors",
    "NeighborIndex": "probes.search.index",
    "AuditResult": "probes.studies.audit",
    "audit": "probes.studies.audit",
    "audit_arrays": "probes.studies.audit",
    "calibrate": "probes.studies.calibrate",
    "ensemble": "probes.studies.ensemble",
    "evaluate": "probes.studies.evaluate",
    "finetune": "probes.studies.finetune",
    "neighbors": "probes.studies.neighbors",
    "embedding_map": "probes.studies.embedding_map",
    "relabel": "probes.studies.relabel",
    "robustness": "probes.studies.robustness",
    "scale": "probes.studies.scale",
    "selective": "probes.studies.selective",
    "make_probe": "probes.heads.registry",
    "PROBES": "probes.heads.registry",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:  # deferred: a command that fits nothing never imports the heads (torch)
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


__all__ = list(_EXPORTS)
