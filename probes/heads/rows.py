"""Which head fits rows read out of core (:class:`probes.features.chunked.ChunkedRows`).

``knn`` / ``knn1`` search them exactly block by block (:class:`probes.heads.knn.ChunkedKNNProbe`),
``logistic`` / ``linear`` stream them through their full-batch L-BFGS on the same fixed blocks of rows as
in memory (bit-for-bit equal coefficients); other heads refuse them with a clear error.
"""

from __future__ import annotations

from typing import Any

from probes.errors import ProbeError
from probes.features.chunked import is_chunked
from probes.features.policy import OUT_OF_CORE_PROBES, current_policy, gib
from probes.heads.knn import ChunkedKNNProbe, KNNProbe
from probes.heads.logistic import LogisticProbe


def for_rows(est: Any, name: str, x_train: Any) -> Any:
    """The estimator that fits ``x_train``: ``est`` itself on in-memory rows or when it streams
    (logistic), the chunked kNN for kNN; other heads on :class:`ChunkedRows` raise a :class:`ProbeError`."""
    if not is_chunked(x_train):
        return est
    if isinstance(est, ChunkedKNNProbe) or isinstance(est, LogisticProbe):
        return est
    if type(est) is KNNProbe:
        return ChunkedKNNProbe(**est.get_params())
    raise ProbeError(
        f"probe '{name}' has no out-of-core path, and its {len(x_train)} x {x_train.width} training features "
        f"({gib(x_train.nbytes)}) are above the memory budget ({gib(current_policy().budget)}); "
        f"raise --max-memory or use {', '.join(OUT_OF_CORE_PROBES)}"
    )
