"""Calibration of class probabilities: ECE (equal-width and equal-mass bins), MCE, Brier, NLL, the
reliability table, and temperature scaling fitted on validation cells.

Every function is pure numpy on ``proba`` (n, K), rows summing to one, and ``y`` (n,) integer codes
of the true class (column indices of ``proba``). The confidence of a cell is its largest probability,
correct when that column is ``y`` (ties -> the first column, as ``argmax``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

BINNINGS = ("width", "mass")
N_BINS = 15  # Guo et al. 2017
EPS = 1e-12  # probabilities are clipped here before a log
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def _check(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y)
    if proba.ndim != 2 or y.ndim != 1 or len(proba) != len(y) or len(y) == 0:
        raise ValueError(f"need proba (n, K) and y (n,) with n >= 1, got {proba.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= proba.shape[1]:
        raise ValueError("y must hold integer class codes 0..K-1 (column indices of proba)")
    if not np.isfinite(proba).all():
        raise ValueError("proba holds NaN or inf")
    return proba, y.astype(np.int64)


def confidence_correct(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max probability, argmax == y)`` of every cell."""
    proba, y = _check(proba, y)
    return proba.max(axis=1), proba.argmax(axis=1) == y


def bin_ids(conf: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> np.ndarray:
    """The bin of each confidence. ``width``: bins ``(m-1)/M < c <= m/M`` (c = 0 in the first);
    ``mass``: the cells sorted by confidence (stable) cut into ``n_bins`` runs of equal size
    (``np.array_split`` sizes; fewer bins when there are fewer cells)."""
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; one of {', '.join(BINNINGS)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf = np.asarray(conf, dtype=np.float64)
    if binning == "width":
        return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ids = np.empty(len(conf), dtype=np.int64)
    for b, run in enumerate(np.array_split(np.argsort(conf, kind="stable"), min(n_bins, len(conf)))):
        ids[run] = b
    return ids


def reliability(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> pd.DataFrame:
    """One row per non-empty bin: ``bin``, ``lo`` / ``hi`` (the bin's range: fixed for ``width``, the
    smallest and largest confidence in it for ``mass``), ``n``, mean ``confidence``, ``accuracy``, ``gap``."""
    conf, correct = confidence_correct(proba, y)
    ids = bin_ids(conf, n_bins, binning)
    rows = []
    for b in np.unique(ids):
        m = ids == b
        lo, hi = (b / n_bins, (b + 1) / n_bins) if binning == "width" else (conf[m].min(), conf[m].max())
        c, a = float(conf[m].mean()), float(correct[m].mean())
        rows.append(
            dict(bin=int(b), lo=float(lo), hi=float(hi), n=int(m.sum()), confidence=c, accuracy=a, gap=abs(a - c))
        )
    return pd.DataFrame(rows, columns=["bin", "lo", "hi", "n", "confidence", "accuracy", "gap"])


def ece(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> float:
    """Expected calibration error: ``sum_m |B_m| / n * |accuracy(B_m) - confidence(B_m)|``."""
    t = reliability(proba, y, n_bins, binning)
    return float((t["n"] * t["gap"]).sum() / t["n"].sum())


def mce(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS, binning: str = "width") -> float:
    """Maximum calibration error: the largest ``|accuracy - confidence|`` over non-empty bins."""
    return float(reliability(proba, y, n_bins, binning)["gap"].max())


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over cells of ``sum_k (p_k - [k == y])^2`` (0 best, 2 worst)."""
    proba, y = _check(proba, y)
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Negative log-likelihood: mean of ``-log p_y`` (probabilities clipped at :data:`EPS`)."""
    proba, y = _check(proba, y)
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], EPS, None)).mean())


def calibration_metrics(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> dict[str, float]:
    """``ece_width``, ``ece_mass``, ``mce_width``, ``mce_mass``, ``brier``, ``nll`` of one set of cells."""
    out = {}
    for b in BINNINGS:
        out[f"ece_{b}"] = ece(proba, y, n_bins, b)
        out[f"mce_{b}"] = mce(proba, y, n_bins, b)
    out["brier"] = brier(proba, y)
    out["nll"] = nll(proba, y)
    return out


# -- temperature scaling --------------------------------------------------------------------------
def scale_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the probabilities at temperature ``T`` (T > 1 softens, T < 1 sharpens);
    the argmax, hence every label, is unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray, bounds: Sequence[float] = LOG_T_BOUNDS) -> float:
    """The scalar ``T`` minimising the NLL of ``scale_temperature(proba, T)`` on these (validation) cells:
    bounded scalar minimisation (scipy) over ``log T`` in ``bounds`` (default T in [0.01, 100])."""
    from scipy.optimize import minimize_scalar

    proba, y = _check(proba, y)
    logp = np.log(np.clip(proba, EPS, None))

    def loss(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())

    res = minimize_scalar(loss, bounds=tuple(bounds), method="bounded", options={"xatol": 1e-5})
    if not res.success:
        raise RuntimeError(f"temperature scaling did not converge: {res.message}")
    return float(math.exp(res.x))
