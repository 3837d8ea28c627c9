"""Evidence and score of the label audit: the calibrated ensemble's confident learning (cleanlab),
model disagreement (consensus), neighbour disagreement, and per cell the reasons it is suspected."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError
from probes.search.index import NeighborIndex
from probes.studies.audit.folds import OOF
from probes.studies.audit.ranking import DEFAULT_RANKING, Ranking, combine, confident_learning, ensemble_proba

EVIDENCE_COLUMNS = [
    "rank",
    "id",
    "path",
    "given_label",
    "proposed_label",
    "proposed_votes",
    "consensus",
    "self_confidence",
    "confident_learning",
    "neighbor_disagreement",
    "score",
    "why",
    "models_disagreeing",
    "neighbors_disagreeing",
]


def neighbor_disagreement(features: Any, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(disagreement (N,), neighbour positions (N, k), similarities (N, k)) over one backbone; features read
    out of core (:class:`probes.features.chunked.ChunkedRows`) are searched chunk by chunk to the exact top-k."""
    from probes.features.chunked import is_chunked
    from probes.search.exact import all_neighbors

    if is_chunked(features):
        sims, idx = all_neighbors(features, k)
    else:
        sims, idx = NeighborIndex(features).all_neighbors(k)
    valid = idx >= 0
    other = (labels[np.where(valid, idx, 0)] != labels[:, None]) & valid
    return other.sum(1) / np.maximum(valid.sum(1), 1), idx, sims


def as_ranking(ranking: Ranking | str | None) -> Ranking:
    """``ranking`` itself, parsed from its name, or :data:`~.ranking.DEFAULT_RANKING` for None."""
    if ranking is None:
        return DEFAULT_RANKING
    if isinstance(ranking, Ranking):
        return ranking
    return Ranking.parse(ranking)


def formula(ranking: Ranking | str | None = None) -> str:
    """The score formula of ``ranking`` (default: the audit's), as text."""
    return as_ranking(ranking).formula()


def evidence(
    oofs: Sequence[OOF],
    labels: np.ndarray,
    classes: Sequence[str],
    disagreement: np.ndarray,
    ranking: Ranking | str | None = None,
) -> pd.DataFrame:
    """Per-cell evidence and score: ``given_label, proposed_label, proposed_votes, consensus,
    self_confidence, confident_learning, neighbor_disagreement, score`` (see :mod:`.ranking`).

    ``self_confidence`` is the (calibrated, when ``ranking.calibrate``) ensemble's probability of the
    given label (cleanlab's self-confidence label quality); ``confident_learning`` whether cleanlab's
    ``find_label_issues`` flags the cell; ``consensus`` the fraction of models predicting another class;
    ``proposed_label`` the class most models predict instead (ties: the higher mean probability).
    The ensemble is in ``df.attrs["ensemble"]``.
    """
    rk = as_ranking(ranking)
    y = pd.Index(list(classes)).get_indexer(labels)
    if (y < 0).any():
        raise ProbeError(f"labels outside the classes: {sorted(set(labels[y < 0]))[:5]}")
    if not oofs:
        raise ProbeError("no models to audit with")
    for o in oofs:
        if list(o.classes) != list(classes):
            raise ProbeError(f"model {o.name} was fit on classes {o.classes}, the audit has {list(classes)}")
    ens = ensemble_proba([o.proba for o in oofs], y, [o.fold for o in oofs], calibrate=rk.calibrate)
    m, n, c = ens.members.shape
    rows = np.arange(n)
    votes = np.zeros((n, c))
    for p in ens.members.argmax(2):
        votes[rows, p] += 1
    pick = votes + 1e-3 * ens.proba  # most votes, then the higher mean probability
    pick[rows, y] = -np.inf
    proposed = pick.argmax(1)
    quality, flagged = confident_learning(ens.proba, y)
    disagreement = np.asarray(disagreement, dtype=np.float64)
    score = combine(quality, flagged, disagreement, ens.consensus, rk, proba=ens.proba, labels=y)
    df = pd.DataFrame(
        {
            "given_label": labels,
            "proposed_label": np.asarray(classes, dtype=object)[proposed],
            "proposed_votes": votes[rows, proposed] / m,
            "consensus": ens.consensus,
            "self_confidence": quality,
            "confident_learning": flagged,
            "neighbor_disagreement": disagreement,
            "score": score,
        }
    )
    df.attrs["ensemble"] = ens
    return df


def _short(name: str) -> str:
    """``timm:test_vit`` -> ``test_vit`` (the part after the last ``:`` or ``/``); the joint member's
    ``timm:test_vit+timm:test_resnet`` -> ``test_vit+test_resnet``."""
    return "+".join(part.replace("/", ":").rsplit(":", 1)[-1] for part in name.split("+"))


def model_groups(oofs: Sequence[OOF]) -> dict[tuple[str, str], list[int]]:
    """The audit's *models*: one per backbone x probe (the joint member is one), each the positions in
    ``oofs`` of its seeds' out-of-fold runs. Every count of models the audit prints is ``len`` of this."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(oofs):
        groups.setdefault((str(o.key.get("backbone", "?")), str(o.key.get("probe", "?"))), []).append(i)
    return groups


def why_columns(
    oofs: Sequence[OOF],
    members: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    neighbors: dict[str, tuple[np.ndarray, np.ndarray]],
    ids: np.ndarray,
    flagged: np.ndarray,
    shown: int = 5,
) -> pd.DataFrame:
    """Why each cell is suspected, as text: ``models_disagreeing`` (each backbone/probe whose top class,
    over its seeds, is not the given label: ``backbone/probe→class p``), ``neighbors_disagreeing`` (per
    backbone: how many of the k nearest cells carry another label, those labels, and up to ``shown`` of
    their ids) and ``why`` (one sentence joining the evidence)."""
    labels = np.asarray(labels, dtype=str)
    classes = list(classes)
    y = pd.Index(classes).get_indexer(labels)
    n = len(labels)
    groups = model_groups(oofs)
    multi_bb = len({b for b, _ in groups}) > 1
    per_model = []
    for (b, p), members_of in groups.items():
        mean = members[members_of].mean(0)
        top = mean.argmax(1)
        tag = f"{_short(b)}/{p}" if multi_bb else p
        per_model.append((tag, top, mean))
    rows = np.arange(n)
    model_txt, why = [], []
    nb_txt: list[list[str]] = [[] for _ in range(n)]
    nb_summary: list[list[tuple[int, int, str]]] = [[] for _ in range(n)]
    for b, (idx, _) in neighbors.items():
        valid = idx >= 0
        nl = labels[np.where(valid, idx, 0)]
        for i in range(n):
            other = valid[i] & (nl[i] != labels[i])
            if not other.any():
                continue
            cnt = Counter(nl[i][other])
            top_lab = ", ".join(f"{lab} {c}" for lab, c in cnt.most_common(3))
            who = ", ".join(str(ids[j]) for j in idx[i][other][:shown])
            prefix = f"{_short(b)}: " if len(neighbors) > 1 else ""
            nb_txt[i].append(f"{prefix}{int(other.sum())}/{int(valid[i].sum())} ({top_lab}): {who}")
            nb_summary[i].append((int(other.sum()), int(valid[i].sum()), cnt.most_common(1)[0][0]))
    n_groups = len(per_model)
    for i in range(n):
        parts = [f"{tag}→{classes[top[i]]} {mean[i, top[i]]:.2f}" for tag, top, mean in per_model if top[i] != y[i]]
        model_txt.append("; ".join(parts))
        reasons = []
        if flagged[i]:
            reasons.append("confident learning flags the label")
        if parts:
            alt = Counter(classes[top[i]] for _, top, _ in per_model if top[i] != y[i]).most_common(1)[0][0]
            reasons.append(f"{len(parts)}/{n_groups} models predict another class (mostly {alt})")
        for n_other, n_valid, lab in nb_summary[i]:
            if 2 * n_other >= n_valid:
                reasons.append(f"{n_other}/{n_valid} neighbours carry another label (mostly {lab})")
                break
        why.append("; ".join(reasons) if reasons else "weak evidence: ranked by label quality alone")
    return pd.DataFrame(
        {"why": why, "models_disagreeing": model_txt, "neighbors_disagreeing": [" | ".join(t) for t in nb_txt]},
        index=rows,
    )
