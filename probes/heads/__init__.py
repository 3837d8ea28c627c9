"""Probe heads with scikit-learn's estimator shape (``fit``, ``predict``, ``predict_proba``).

A registry in the manner of timm's: :data:`PROBES` maps each name the CLI accepts to a
constructor, and :func:`make_probe` builds one with a seed and a device::

    make_probe("logistic", seed=42, device="auto").fit(X, y).predict(X_test)

All heads take float32 features, refuse NaN/inf with a clear error, run on the torch device
(CUDA when present) and fall back to the CPU; cuML / faiss-gpu are used when installed.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from .base import ProbeBase, resolve_device
from .knn import KNNProbe
from .logistic import LogisticProbe
from .nets import CosineProbe, MLPProbe
from .svm import LinearSVMProbe, RBFSVMProbe

PROBES: dict[str, Callable[..., ProbeBase]] = {
    "logistic": LogisticProbe,
    "knn": KNNProbe,  # k = 20, similarity-weighted, T = 0.07
    "knn1": partial(KNNProbe, k=1),
    "svm": LinearSVMProbe,
    "svm-rbf": RBFSVMProbe,
    "mlp": MLPProbe,
    "cosine": CosineProbe,
}


def make_probe(name: str, *, seed: int = 0, device: str = "auto", **params: Any) -> ProbeBase:
    """A fresh, unfitted probe ``name`` (one of :data:`PROBES`) with ``seed`` and ``device``."""
    try:
        ctor = PROBES[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}") from None
    return ctor(seed=seed, device=device, **params)


__all__ = [
    "PROBES", "make_probe", "resolve_device", "ProbeBase", "LogisticProbe", "KNNProbe", "LinearSVMProbe",
    "RBFSVMProbe", "MLPProbe", "CosineProbe",
]
