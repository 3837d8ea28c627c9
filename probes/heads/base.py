"""Shared pieces of the probe heads: device choice (:func:`embedcache.backbones.devices.resolve_device`, the
project's one), input checks, label coding, standardisation, the seeded stratified hold-out split,
the estimator base class and :class:`ScoresHead` (``decision_function`` and ``predict_proba`` from
one ``_decision`` method)."""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from embedcache.backbones.devices import (
    cpu_has_native_bf16,  # noqa: F401  the one detector; heads import it from here
    resolve_device,
)

CHUNK = 4096  # rows per query / prediction batch
BF16_MIN_WORK = 1 << 22  # matrix entries (rows x features) from which precision="auto" uses bf16


def require(module: str, what: str) -> ModuleType:
    """Import an optional GPU library or fail with a message naming the ``gpu`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs {module.split('.')[0]!r}, which is not importable here ({e}); "
            "install the GPU extra (pip install 'embedcache[gpu]') on a CUDA machine, "
            "or use the default torch backend"
        ) from e


def importable(module: str) -> bool:
    """True when ``module`` imports (used only to pick a backend under ``backend='auto'``)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken optional install counts as absent
        return False


def check_X(X, n_features: int | None = None) -> np.ndarray:  # noqa: N802  scikit-learn's name
    """Float32, C-contiguous, 2-D and finite; ``n_features`` checks the width at predict time."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_cells, n_features), got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {n_features}")
    if X.shape[0] == 0:
        raise ValueError("X has no rows")
    X = np.ascontiguousarray(X, dtype=np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(
            f"X has {int(bad.sum())} of {len(X)} rows with NaN or inf values "
            f"(first at row {int(np.flatnonzero(bad)[0])}); drop or impute them before probing"
        )
    return X


def encode_labels(y, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes_, codes)``: sorted unique labels and each row's code 0..K-1 (needs K >= 2)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"y must be 1-D with one label per row of X ({n}), got shape {y.shape}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, y has {len(classes)}: {classes.tolist()}")
    return classes, codes.astype(np.int64)


def stratified_holdout(codes: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split ``(fit_idx, val_idx)``: ceil(fraction * n_c) of each class to validation, but
    every class keeps at least one training row (a single-sample class stays in training)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in range(int(codes.max()) + 1):
        idx = rng.permutation(np.flatnonzero(codes == c))
        n_val = min(math.ceil(fraction * len(idx)), len(idx) - 1) if fraction > 0 else 0
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def standardize(Xt: torch.Tensor, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Xs, mean, scale)``: statistics of all of ``Xt``; ``Xs`` holds ``rows`` (all when None),
    in that order, standardised into one fresh tensor. Constant features get scale 1."""
    n = len(Xt)
    Xs = Xt.index_select(0, torch.as_tensor(rows, device=Xt.device)) if rows is not None else Xt.clone()
    if Xt.device.type == "cpu":  # numpy's column reductions are several times faster than torch's
        mean = torch.from_numpy(Xt.numpy().mean(axis=0))
        Xs.sub_(mean)
        if rows is None or (len(rows) == n and len(np.unique(rows)) == n):  # Xs: all rows, centred
            Xc = Xs.numpy()
            var = torch.from_numpy(np.einsum("ij,ij->j", Xc, Xc) / np.float32(n))
        else:
            var = torch.from_numpy(Xt.numpy().var(axis=0))
    else:
        var, mean = torch.var_mean(Xt, dim=0, correction=0)
        Xs.sub_(mean)
    scale = var.sqrt()
    scale = torch.where(scale > 1e-12 * mean.abs().clamp_min(1.0), scale, torch.ones_like(scale))
    return Xs.div_(scale), mean, scale


def standardize_t(Xt: torch.Tensor, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`standardize`, but ``Xs`` comes transposed and contiguous, (d, len(rows)): the
    layout the linear solvers are fast in (:mod:`probes.heads.lbfgs`). One copy of the data."""
    n, d = Xt.shape
    src = Xt if rows is None else Xt.index_select(0, torch.as_tensor(rows, device=Xt.device))
    XT = torch.empty(d, len(src), dtype=Xt.dtype, device=Xt.device)
    XT.copy_(src.T)
    del src
    full = rows is None or (len(rows) == n and len(np.unique(rows)) == n)  # XT holds every row
    if full:
        mean = XT.mean(dim=1)
        XT.sub_(mean[:, None])
        var = torch.linalg.vector_norm(XT, dim=1).square_().div_(n)
    else:
        if Xt.device.type == "cpu":
            mean, var = torch.from_numpy(Xt.numpy().mean(axis=0)), torch.from_numpy(Xt.numpy().var(axis=0))
        else:
            var, mean = torch.var_mean(Xt, dim=0, correction=0)
        XT.sub_(mean[:, None])
    scale = var.sqrt()
    scale = torch.where(scale > 1e-12 * mean.abs().clamp_min(1.0), scale, torch.ones_like(scale))
    return XT.div_(scale[:, None]), mean, scale


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNGs seeded, restoring them afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ProbeBase(ClassifierMixin, BaseEstimator):
    """Estimator shape shared by every head: subclasses set ``classes_``/``n_features_in_`` in
    ``fit`` and implement ``_proba(X) -> (n, K)`` on checked float32 input."""

    def _proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(X, y) first")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, K), columns in the order of ``classes_``."""
        self._check_fitted()
        return self._proba(check_X(X, self.n_features_in_))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row (ties -> the first in ``classes_``)."""
        proba = self.predict_proba(X)  # first: it says so when the probe is not fitted
        return self.classes_[np.argmax(proba, axis=1)]

    def _start_fit(self, X, y) -> tuple[np.ndarray, np.ndarray, torch.device]:
        """Check and code the training data; set ``classes_``, ``n_features_in_``, ``device_``."""
        X = check_X(X)
        self.classes_, codes = encode_labels(y, len(X))
        self.n_features_in_ = X.shape[1]
        self.device_ = resolve_device(self.device)
        return X, codes, self.device_


class ScoresHead(ProbeBase):
    """A head with decision scores: subclasses give ``_decision(X) -> (n, K)`` torch scores on checked
    float32 input; ``decision_function`` returns them and ``predict_proba`` is their row softmax."""

    def _decision(self, X: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decision_function(self, X) -> np.ndarray:
        """Decision scores (logits) (n, K), one column per class of ``classes_``."""
        self._check_fitted()
        return self._decision(check_X(X, self.n_features_in_)).cpu().numpy()

    def _proba(self, X: np.ndarray) -> np.ndarray:
        return softmax_rows(self._decision(X))


def softmax_rows(scores: torch.Tensor) -> np.ndarray:
    """Row softmax of decision scores as float32 numpy."""
    return torch.softmax(scores.float(), dim=1).cpu().numpy()


def decision_to_2d(d: np.ndarray) -> np.ndarray:
    """Binary ``decision_function`` (n,) -> (n, 2) scores ``[0, d]``; (n, K) passes through."""
    d = np.asarray(d, dtype=np.float32)
    return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d
