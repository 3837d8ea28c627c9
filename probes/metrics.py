"""Scores of one fit: accuracy, balanced accuracy, macro/weighted P/R/F1, per-class F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
)
CLASS_METRIC = "class_f1"
MAIN_METRIC = "macro_f1"


@dataclass
class Scores:
    """The scores of one fit; ``confusion[i, j]`` counts cells of ``classes[i]`` predicted ``classes[j]``."""

    values: dict[str, float]
    class_f1: dict[str, float]
    classes: list[str]
    confusion: np.ndarray


def score(
    y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray, classes: Sequence[str] | np.ndarray
) -> Scores:
    """All metrics over ``classes`` (the classes of the split; each has test cells).

    Macro averages weigh every class of the split equally; a class never predicted scores
    precision 0 (no warning). Predictions outside ``classes`` count as errors. Balanced accuracy
    is scikit-learn's: the mean recall over the classes present in ``y_true``. Every value equals
    scikit-learn's (``accuracy_score``, ``balanced_accuracy_score``,
    ``precision_recall_fscore_support(labels=classes, zero_division=0)``, ``confusion_matrix``),
    computed from one confusion matrix of integer codes (a study scores hundreds of fits).
    """
    truth = np.asarray(y_true, dtype=str)
    pred = np.asarray(y_pred, dtype=str)
    labels = [str(c) for c in classes]
    k = len(labels)
    seen, codes = np.unique(np.concatenate([truth, pred]), return_inverse=True)
    known = set(labels)
    extra = [v for v in seen.tolist() if v not in known]  # labels outside the split's classes
    position = {c: i for i, c in enumerate(labels + extra)}
    codes = np.array([position[v] for v in seen.tolist()], dtype=np.int64)[codes]
    n, m = len(truth), len(position)
    full = np.bincount(codes[:n] * m + codes[n:], minlength=m * m).reshape(m, m)
    tp = np.diag(full).astype(np.float64)
    support = full.sum(axis=1).astype(np.float64)  # true cells per label
    present = support > 0
    values = {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(np.mean(tp[present] / support[present])) if present.any() else 0.0,
    }
    tp, true_k, pred_k = tp[:k], support[:k], full[:, :k].sum(axis=0).astype(np.float64)
    precision = np.divide(tp, pred_k, out=np.zeros(k), where=pred_k > 0)
    recall = np.divide(tp, true_k, out=np.zeros(k), where=true_k > 0)
    f1 = np.divide(2 * tp, pred_k + true_k, out=np.zeros(k), where=(pred_k + true_k) > 0)
    weights = true_k / true_k.sum() if true_k.sum() > 0 else np.zeros(k)
    for name, v in (("precision", precision), ("recall", recall), ("f1", f1)):
        values[f"macro_{name}"] = float(v.mean()) if k else 0.0
        values[f"weighted_{name}"] = float(v @ weights)
    return Scores(values, dict(zip(labels, map(float, f1))), labels, full[:k, :k])


def confusion_table(
    y_true: Sequence[str] | np.ndarray,
    y_pred: Sequence[str] | np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
) -> tuple[list[str], np.ndarray]:
    """Counts of true ``rows[i]`` predicted ``columns[j]``, as ``(columns, (len(rows), len(columns)) int64)``.

    ``columns`` may hold classes with no true cell (an out-of-domain test set lacking some training classes):
    every cell of a listed row is counted, so each row sums to that class's cells. A predicted label outside
    ``columns`` gets a column of its own (appended, sorted), never dropped; a true label outside ``rows`` is
    not counted."""
    truth, pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    cols = [str(c) for c in columns]
    cols += sorted(set(pred.tolist()) - set(cols))
    r_pos = {str(c): i for i, c in enumerate(rows)}
    c_pos = {c: j for j, c in enumerate(cols)}
    out = np.zeros((len(r_pos), len(cols)), dtype=np.int64)
    for t, p in zip(truth.tolist(), pred.tolist()):
        i = r_pos.get(t)
        if i is not None:
            out[i, c_pos[p]] += 1
    return cols, out
