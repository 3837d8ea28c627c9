"""``audit``: rank cells by how likely their label is wrong, split by job.

* :mod:`.folds` — folds and out-of-fold probabilities (:class:`OOF`);
* :mod:`.cache` — the Parquet cache of out-of-fold probabilities (beside the store);
* :mod:`.evidence` — consensus, self-confidence, neighbour disagreement and the score;
* :mod:`.run` — :func:`audit` / :func:`audit_arrays` with :class:`AuditOptions`;
* :mod:`.outputs` — files and the printed summary.

Relabelling (a store mutation) is :func:`probes.labels.relabel`; thread caps are
:func:`probes.threads.limit_threads`.
"""

from __future__ import annotations

from ...labels import relabel
from .cache import KEY_COLUMNS, default_cache, legacy_cache, read_oof_cache, write_oof_cache
from .evidence import EVIDENCE_COLUMNS, SCORE_FORMULA, WEIGHTS, evidence, formula, neighbor_disagreement
from .folds import OOF, SCHEMES, feature_digest, label_digest, make_folds, oof_proba, probe_signature
from .outputs import print_summary, suspect_neighbors, write_outputs
from .run import DEFAULT_PROBES, AuditOptions, AuditResult, audit, audit_arrays

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
    "SCORE_FORMULA",
    "WEIGHTS",
    "evidence",
    "formula",
    "neighbor_disagreement",
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
