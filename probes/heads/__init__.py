"""Probe heads with scikit-learn's estimator shape (``fit``, ``predict``, ``predict_proba``).

A registry in the manner of timm's: :data:`PROBES` maps each name the CLI accepts to a
constructor (filled by :func:`register_probe` on the head classes), and :func:`make_probe`
builds one with a seed and a device::

    make_probe("logistic", seed=42, device="auto").fit(X, y).predict(X_test)

All heads take float32 features, refuse NaN/inf with a clear error, run on the torch device
(CUDA when present) and fall back to the CPU; cuML / faiss-gpu are used when installed.
"""

from __future__ import annotations

from typing import Any

from probes.heads.base import ProbeBase, ScoresHead, resolve_device
from probes.heads.ensemble import EnsembleProbe  # noqa: E402  parameterised names: ensemble:<head>+<head>+<head>
from probes.heads.knn import KNNProbe  # noqa: E402

# importing the head modules registers them; this order is the order PROBES lists them in
from probes.heads.logistic import LogisticProbe  # noqa: E402, I001
from probes.heads.nets import CosineProbe, MLPProbe  # noqa: E402
from probes.heads.registry import PROBES, register_probe
from probes.heads.svm import LinearSVMProbe, RBFSVMProbe  # noqa: E402


def make_probe(name: str, *, seed: int = 0, device: str = "auto", **params: Any) -> ProbeBase:
    """A fresh, unfitted probe ``name`` (one of :data:`PROBES`, or a parameterised family name such as
    ``ensemble:mlp+logistic+cosine``) with ``seed`` and ``device``."""
    try:
        ctor = PROBES[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r}; choose from {', '.join([*PROBES, *PROBES.patterns()])}") from None
    return ctor(seed=seed, device=device, **params)


__all__ = [
    "PROBES",
    "make_probe",
    "register_probe",
    "resolve_device",
    "ProbeBase",
    "ScoresHead",
    "LogisticProbe",
    "KNNProbe",
    "LinearSVMProbe",
    "RBFSVMProbe",
    "MLPProbe",
    "CosineProbe",
    "EnsembleProbe",
]
