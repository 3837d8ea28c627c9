"""Evidence and score of the label audit: consensus, self-confidence, neighbour disagreement."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ...data import ProbeError
from ...neighbors import NeighborIndex
from .folds import OOF

# consensus : (1 - self-confidence) : neighbour disagreement = 1 : 4 : 1 (normalised to sum 1).
# Chosen on a development sample of Chula cells disjoint from the benchmark's evaluation cells
# (benchmarks/label_noise.py --part dev): self-confidence carries most of the ranking;
# consensus sharpens the top (precision), neighbours add a feature-space view (AUROC).
WEIGHTS = {"consensus": 1 / 6, "confidence": 4 / 6, "neighbors": 1 / 6}
SCORE_FORMULA = (
    "score = {consensus} × consensus + {confidence} × (1 − self_confidence) + {neighbors} × neighbor_disagreement"
)
EVIDENCE_COLUMNS = [
    "rank",
    "id",
    "path",
    "given_label",
    "proposed_label",
    "proposed_votes",
    "consensus",
    "self_confidence",
    "neighbor_disagreement",
    "score",
]


def neighbor_disagreement(
    features: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(disagreement (N,), neighbour positions (N, k), similarities (N, k)) over one backbone."""
    sims, idx = NeighborIndex(features).all_neighbors(k)
    valid = idx >= 0
    other = (labels[np.where(valid, idx, 0)] != labels[:, None]) & valid
    return other.sum(1) / np.maximum(valid.sum(1), 1), idx, sims


def evidence(
    oofs: Sequence[OOF],
    labels: np.ndarray,
    classes: Sequence[str],
    disagreement: np.ndarray,
    weights: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Per-cell evidence and score (the columns of :data:`EVIDENCE_COLUMNS` but id, path, rank)."""
    w = normalise_weights(weights)
    y = pd.Index(list(classes)).get_indexer(labels)
    if (y < 0).any():
        raise ProbeError(f"labels outside the classes: {sorted(set(labels[y < 0]))[:5]}")
    if not oofs:
        raise ProbeError("no models to audit with")
    for o in oofs:
        if list(o.classes) != list(classes):
            raise ProbeError(f"model {o.name} was fit on classes {o.classes}, the audit has {list(classes)}")
    P = np.stack([o.proba for o in oofs])  # (M, N, C)
    m, n, c = P.shape
    pred = P.argmax(2)
    rows = np.arange(n)
    consensus = (pred != y[None]).mean(0)
    self_conf = P[:, rows, y].mean(0)
    votes = np.zeros((n, c))
    for p in pred:
        votes[rows, p] += 1
    pick = votes + 1e-3 * P.mean(0)  # most votes, then the higher mean probability
    pick[rows, y] = -np.inf
    proposed = pick.argmax(1)
    score = w["consensus"] * consensus + w["confidence"] * (1 - self_conf) + w["neighbors"] * disagreement
    score = np.clip(score, 0.0, 1.0)  # in [0, 1] already, but for the last bit of float rounding
    return pd.DataFrame(
        {
            "given_label": labels,
            "proposed_label": np.asarray(classes, dtype=object)[proposed],
            "proposed_votes": votes[rows, proposed] / m,
            "consensus": consensus,
            "self_confidence": self_conf,
            "neighbor_disagreement": disagreement,
            "score": score,
        }
    )


def normalise_weights(weights: dict[str, float] | None) -> dict[str, float]:
    w = dict(WEIGHTS if weights is None else weights)
    if set(w) != set(WEIGHTS) or min(w.values()) < 0 or sum(w.values()) <= 0:
        raise ProbeError(f"weights need the keys {', '.join(WEIGHTS)} with non-negative values, got {weights}")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def formula(weights: dict[str, float] | None = None) -> str:
    """The score formula with its weights, as text."""
    return SCORE_FORMULA.format(**{k: f"{v:.3g}" for k, v in normalise_weights(weights).items()})
