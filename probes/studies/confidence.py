"""Selective prediction: how confident each prediction is, and what abstaining on the least confident
cells buys (risk-coverage curve, AURC, excess-AURC, scores at fixed coverages, a threshold for a target
accuracy chosen on validation cells, which classes go to a human).

Pure numpy / pandas; ``conf`` (n,) is any confidence (higher = keep first), ``correct`` (n,) booleans.
Ties in ``conf`` are handled exactly: the curve and AURC take, at every coverage inside a run of equal
confidences, the expected risk over the orders of that run (so no arbitrary order decides); keeping a
fixed fraction of cells (:func:`keep_top`) breaks ties by cell order (stable sort).

Reference: Geifman, Uziel & El-Yaniv, "Bias-reduced uncertainty estimation for deep neural
classifiers" (ICLR 2019): AURC and E-AURC = AURC - AURC of the oracle ranking (every correct cell
first), whose continuous approximation is ``r + (1 - r) ln(1 - r)`` at overall risk ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from probes.metrics import score

CONFIDENCES = ("msp", "margin", "entropy", "agreement")
COVERAGES = (1.0, 0.9, 0.8, 0.67, 0.5)
MIN_AGREEMENT_VOTERS = 3  # the prediction's own head or backbone and at least two others


# -- confidence scores ----------------------------------------------------------------------------
def _proba(proba: np.ndarray) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or not np.isfinite(p).all():
        raise ValueError(f"class probabilities must be a finite (n, K >= 2) array, got shape {p.shape}")
    return p


def msp(proba: np.ndarray) -> np.ndarray:
    """Maximum softmax probability."""
    return _proba(proba).max(axis=1)


def margin(proba: np.ndarray) -> np.ndarray:
    """Largest minus second-largest probability."""
    top2 = np.sort(_proba(proba), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy_confidence(proba: np.ndarray) -> np.ndarray:
    """Minus the Shannon entropy (nats) of the probabilities: higher = more confident."""
    p = _proba(proba)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return -h


def agreement(pred: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """Fraction of all voters (``pred`` and every array of ``others``: other heads or backbones on the
    same cells) that predict what ``pred`` predicts; needs at least :data:`MIN_AGREEMENT_VOTERS` voters."""
    if len(others) + 1 < MIN_AGREEMENT_VOTERS:
        raise ValueError(
            f"agreement needs at least {MIN_AGREEMENT_VOTERS} heads or backbones (this one and "
            f"{MIN_AGREEMENT_VOTERS - 1} others), got {len(others) + 1}"
        )
    pred = np.asarray(pred).astype(str)
    votes = 1 + sum((np.asarray(o).astype(str) == pred).astype(np.int64) for o in others)
    return votes / (len(others) + 1)


def confidence(
    kind: str, proba: np.ndarray, pred: np.ndarray | None = None, others: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """The confidence ``kind`` (:data:`CONFIDENCES`) of each cell."""
    if kind == "msp":
        return msp(proba)
    if kind == "margin":
        return margin(proba)
    if kind == "entropy":
        return entropy_confidence(proba)
    if kind == "agreement":
        return agreement(pred if pred is not None else np.argmax(proba, axis=1), others)
    raise ValueError(f"unknown confidence {kind!r}; one of {', '.join(CONFIDENCES)}")


# -- risk-coverage ---------------------------------------------------------------------------------
def _check(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if conf.ndim != 1 or conf.shape != correct.shape or len(conf) == 0:
        raise ValueError(f"need conf and correct of one equal length n >= 1, got {conf.shape} and {correct.shape}")
    if np.isnan(conf).any():
        raise ValueError("confidence holds NaN")
    return conf, correct


def risks_at_k(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """``r[k-1]`` = the (tie-expected) error rate of the ``k`` most confident cells, ``k = 1..n``."""
    conf, correct = _check(conf, correct)
    order = np.argsort(-conf, kind="stable")
    c, err = conf[order], (~correct[order]).astype(np.float64)
    n = len(c)
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, n])
    gid = np.repeat(np.arange(len(starts)), sizes)
    cum = np.r_[0.0, np.cumsum(err)]
    group_err = cum[starts + sizes] - cum[starts]
    k = np.arange(1, n + 1)
    before = starts[gid]
    return (cum[before] + (k - before) * group_err[gid] / sizes[gid]) / k


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """The curve at every distinct threshold ``t`` (keep cells with ``conf >= t``): ``threshold``,
    ``coverage``, ``risk``, ``n_kept``; from the highest threshold to the lowest (coverage 1)."""
    conf, correct = _check(conf, correct)
    order = np.argsort(-conf, kind="stable")
    c, err = conf[order], ~correct[order]
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last position of each run of equal conf
    k = ends + 1
    return pd.DataFrame({"threshold": c[ends], "coverage": k / len(c), "risk": np.cumsum(err)[ends] / k, "n_kept": k})


def aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of :func:`risks_at_k` over ``k = 1..n``."""
    return float(risks_at_k(conf, correct).mean())


def oracle_aurc(correct: np.ndarray) -> float:
    """AURC of the oracle ranking (every correct cell before every error)."""
    correct = np.asarray(correct, dtype=bool)
    k = np.arange(1, len(correct) + 1)
    return float((np.maximum(0, k - int(correct.sum())) / k).mean())


def e_aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Excess AURC: :func:`aurc` minus :func:`oracle_aurc` (0 = a perfect ranking of errors last)."""
    return aurc(conf, correct) - oracle_aurc(correct)


def oracle_aurc_approx(risk: float) -> float:
    """Geifman et al.'s continuous approximation of the oracle AURC at overall risk ``r``."""
    return float(risk + (1 - risk) * math.log(1 - risk)) if risk < 1 else 1.0


def risk_on_grid(conf: np.ndarray, correct: np.ndarray, grid: Sequence[float] | np.ndarray) -> np.ndarray:
    """The (tie-expected) risk at each coverage of ``grid`` (the ``ceil(c n)`` most confident cells)."""
    r = risks_at_k(conf, correct)
    k = np.clip(np.ceil(np.asarray(grid, dtype=np.float64) * len(r) - 1e-9).astype(np.int64), 1, len(r))
    return r[k - 1]


def keep_top(conf: np.ndarray, coverage: float) -> np.ndarray:
    """Boolean mask of the ``round(coverage * n)`` most confident cells (at least one; ties: cell order)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    conf = np.asarray(conf, dtype=np.float64)
    k = max(1, int(round(coverage * len(conf))))
    mask = np.zeros(len(conf), dtype=bool)
    mask[np.argsort(-conf, kind="stable")[:k]] = True
    return mask


def scores_at_coverages(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    conf: np.ndarray,
    classes: Sequence[str],
    coverages: Sequence[float] = COVERAGES,
) -> pd.DataFrame:
    """Per coverage: the kept cells' accuracy, macro and weighted precision / recall / F1 (over the
    classes present among the kept cells), ``risk`` and ``n_kept``; one row per coverage x metric."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    rows = []
    for cov in coverages:
        kept = keep_top(conf, cov)
        rows += _kept_rows(y_true[kept], y_pred[kept], classes, coverage=float(cov))
    return pd.DataFrame(rows, columns=["coverage", "metric", "value"])


def _kept_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], **key) -> list[dict]:
    present = [c for c in classes if c in set(y_true.tolist())]
    sc = score(y_true, y_pred, present).values if len(y_true) else {}
    rows = [{**key, "metric": m, "value": v} for m, v in sc.items()]
    acc = sc.get("accuracy", float("nan"))
    rows += [{**key, "metric": "risk", "value": 1 - acc}, {**key, "metric": "n_kept", "value": float(len(y_true))}]
    return rows


# -- a threshold for a target accuracy ------------------------------------------------------------
def check_target(target_accuracy: float) -> float:
    """``target_accuracy`` as a float in (0, 1], else ``ValueError``."""
    t = float(target_accuracy)
    if not 0 < t <= 1:
        raise ValueError(f"target accuracy must lie in (0, 1] (e.g. 0.995), got {target_accuracy}")
    return t


def choose_threshold(conf_val: np.ndarray, correct_val: np.ndarray, target_accuracy: float) -> dict[str, float]:
    """The lowest threshold ``t`` whose kept validation cells (``conf >= t``) reach ``target_accuracy``
    (so the largest validation coverage that does): ``threshold``, ``val_coverage``, ``val_accuracy``;
    ``threshold`` is ``inf`` (abstain on every cell) when no threshold reaches it."""
    target = check_target(target_accuracy)
    curve = risk_coverage(conf_val, correct_val)
    ok = curve[(1 - curve["risk"]) >= target - 1e-12]
    if not len(ok):
        return {"threshold": math.inf, "val_coverage": 0.0, "val_accuracy": float("nan")}
    best = ok.iloc[-1]
    return {
        "threshold": float(best["threshold"]),
        "val_coverage": float(best["coverage"]),
        "val_accuracy": float(1 - best["risk"]),
    }


def abstention_by_class(y_true: np.ndarray, kept: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Per true class: ``n`` cells, ``n_abstained`` (sent to a human), ``abstention_rate``."""
    y_true, kept = np.asarray(y_true).astype(str), np.asarray(kept, dtype=bool)
    rows = []
    for c in classes:
        m = y_true == c
        n, a = int(m.sum()), int((m & ~kept).sum())
        rows.append({"class": c, "n": n, "n_abstained": a, "abstention_rate": a / n if n else float("nan")})
    return pd.DataFrame(rows, columns=["class", "n", "n_abstained", "abstention_rate"])
