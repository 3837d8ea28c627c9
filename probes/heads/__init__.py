"""Probe heads with scikit-learn's estimator shape (``fit``, ``predict``, ``predict_proba``).

:data:`PROBES` (:mod:`.registry`) maps each name ``--probes`` accepts to its class, the fine-tunes
included, and :func:`make_probe` builds one with a seed and a device::

    make_probe("logistic", seed=42, device="auto").fit(X, y).predict(X_test)

All heads take float32 features, refuse NaN/inf with a clear error, run on the torch device
(CUDA when present) and fall back to the CPU; cuML / faiss-gpu are used when installed. The head
classes load lazily (they import torch): ``from probes.heads import LogisticProbe`` imports its module.
"""

from __future__ import annotations

import importlib
from typing import Any

from probes.heads.registry import PROBES, make_probe, register_probe

_CLASSES = {
    "ProbeBase": "base",
    "ScoresHead": "base",
    "resolve_device": "base",
    "LogisticProbe": "logistic",
    "KNNProbe": "knn",
    "ChunkedKNNProbe": "knn",
    "LinearSVMProbe": "svm",
    "RBFSVMProbe": "svm",
    "MLPProbe": "nets",
    "CosineProbe": "nets",
    "EnsembleProbe": "ensemble",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:  # deferred: the head modules import torch
        return getattr(importlib.import_module(f"probes.heads.{_CLASSES[name]}"), name)
    raise AttributeError(f"module 'probes.heads' has no attribute {name!r}")


__all__ = ["PROBES", "make_probe", "register_probe", *_CLASSES]
