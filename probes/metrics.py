"""Scores of one fit: accuracy, balanced accuracy, macro/weighted P/R/F1, per-class F1, confusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def score(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> Scores:
    """All metrics over ``classes`` (the classes of the split; each has test cells).

    Macro averages weigh every class of the split equally; a class never predicted scores
    precision 0 (no warning). Predictions outside ``classes`` count as errors.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(y_true, dtype=str)
    y_pred = np.asarray(y_pred, dtype=str)
    labels = [str(c) for c in classes]
    values = {"accuracy": float(accuracy_score(y_true, y_pred))}
    # balanced accuracy = macro recall over the true classes (sklearn's definition)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # y_pred may hold labels absent from y_true
        values["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        values.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    _, _, f_each, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return Scores(values, dict(zip(labels, map(float, f_each))), labels, cm)
