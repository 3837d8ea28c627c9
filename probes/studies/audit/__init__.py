"""``audit``: rank cells by how likely their label is wrong, split by job.

* :mod:`.folds` — folds and out-of-fold probabilities (:class:`OOF`);
* :mod:`.cache` — the Parquet cache of out-of-fold probabilities (beside the store);
* :mod:`.ranking` — calibration, the ensemble, cleanlab's confident learning and the score (:class:`Ranking`);
* :mod:`.evidence` — per-cell evidence (consensus, self-confidence, flags, neighbours) and why each cell is suspected;
* :mod:`.options` — :class:`AuditOptions`; :mod:`.run` — :func:`audit` / :func:`audit_arrays`;
* :mod:`.outputs` — files and the printed summary.

Relabelling (a store mutation) is :func:`probes.studies.relabel.relabel`; thread caps are
:func:`probes.engine.threads.limit_threads`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KEY_COLUMNS": "probes.studies.audit.cache",
    "default_cache": "probes.studies.audit.cache",
    "legacy_cache": "probes.studies.audit.cache",
    "read_oof_cache": "probes.studies.audit.cache",
    "write_oof_cache": "probes.studies.audit.cache",
    "EVIDENCE_COLUMNS": "probes.studies.audit.cell_evidence",
    "as_ranking": "probes.studies.audit.cell_evidence",
    "evidence": "probes.studies.audit.cell_evidence",
    "formula": "probes.studies.audit.cell_evidence",
    "neighbor_disagreement": "probes.studies.audit.cell_evidence",
    "why_columns": "probes.studies.audit.cell_evidence",
    "OOF": "probes.studies.audit.folds",
    "SCHEMES": "probes.studies.audit.folds",
    "feature_digest": "probes.studies.audit.folds",
    "label_digest": "probes.studies.audit.folds",
    "make_folds": "probes.studies.audit.folds",
    "oof_proba": "probes.studies.audit.folds",
    "probe_signature": "probes.studies.audit.folds",
    "print_summary": "probes.studies.audit.outputs",
    "suspect_neighbors": "probes.studies.audit.outputs",
    "write_outputs": "probes.studies.audit.outputs",
    "CANDIDATES": "probes.studies.audit.ranking",
    "DEFAULT_RANKING": "probes.studies.audit.ranking",
    "Ranking": "probes.studies.audit.ranking",
    "calibrate_oof": "probes.studies.audit.ranking",
    "confident_learning": "probes.studies.audit.ranking",
    "ensemble_proba": "probes.studies.audit.ranking",
    "DEFAULT_PROBES": "probes.studies.audit.options",
    "AuditOptions": "probes.studies.audit.options",
    "AuditResult": "probes.studies.audit.run",
    "audit": "probes.studies.audit.run",
    "audit_arrays": "probes.studies.audit.run",
    "relabel": "probes.studies.relabel",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:  # deferred: the audit's modules import the heads (torch) and cleanlab
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes.studies.audit' has no attribute {name!r}")


__all__ = list(_EXPORTS)
