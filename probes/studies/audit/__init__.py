"""``audit``: rank cells by how likely their label is wrong, split by job.

* :mod:`.folds` — folds and out-of-fold probabilities (:class:`OOF`);
* :mod:`.cache` — the Parquet cache of out-of-fold probabilities (beside the store);
* :mod:`.ranking` — calibration, the ensemble, cleanlab's confident learning and the score (:class:`Ranking`);
* :mod:`.evidence` — per-cell evidence (consensus, self-confidence, flags, neighbours) and why each cell is suspected;
* :mod:`.run` — :func:`audit` / :func:`audit_arrays` with :class:`AuditOptions`;
* :mod:`.outputs` — files and the printed summary.

Relabelling (a store mutation) is :func:`probes.studies.relabel.relabel`; thread caps are
:func:`probes.engine.threads.limit_threads`.
"""

from __future__ import annotations

from probes.studies.audit.cache import KEY_COLUMNS, default_cache, legacy_cache, read_oof_cache, write_oof_cache
from probes.studies.audit.evidence import (
    EVIDENCE_COLUMNS,
    as_ranking,
    evidence,
    formula,
    neighbor_disagreement,
    why_columns,
)
from probes.studies.audit.folds import (
    OOF,
    SCHEMES,
    feature_digest,
    label_digest,
    make_folds,
    oof_proba,
    probe_signature,
)
from probes.studies.audit.outputs import print_summary, suspect_neighbors, write_outputs
from probes.studies.audit.ranking import (
    CANDIDATES,
    DEFAULT_RANKING,
    Ranking,
    calibrate_oof,
    confident_learning,
    ensemble_proba,
)
from probes.studies.audit.run import DEFAULT_PROBES, AuditOptions, AuditResult, audit, audit_arrays
from probes.studies.relabel import relabel

__all__ = [
    "AuditOptions",
    "AuditResult",
    "audit",
    "audit_arrays",
    "relabel",
    "DEFAULT_PROBES",
    "KEY_COLUMNS",
    "default_cache",
    "legacy_cache",
    "read_oof_cache",
    "write_oof_cache",
    "EVIDENCE_COLUMNS",
    "as_ranking",
    "evidence",
    "formula",
    "neighbor_disagreement",
    "why_columns",
    "CANDIDATES",
    "DEFAULT_RANKING",
    "Ranking",
    "calibrate_oof",
    "confident_learning",
    "ensemble_proba",
    "OOF",
    "SCHEMES",
    "feature_digest",
    "label_digest",
    "make_folds",
    "oof_proba",
    "probe_signature",
    "print_summary",
    "suspect_neighbors",
    "write_outputs",
]
