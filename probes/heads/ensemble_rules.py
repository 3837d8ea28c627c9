"""The ensemble rules on the members' predictions, torch-free (the estimator is
:class:`probes.heads.ensemble.EnsembleProbe`; the ``ensemble`` study combines heads it fitted once).

The seed paper's rule (``override``): one head is primary; only where its prediction falls in one of
a few confusion pairs (unordered: a primary ``A`` may become ``B`` and ``B`` may become ``A``) is it
replaced by the pair's other class, and only when every other head (the paper: the two other head
families) predicts that class. For comparison, ``majority`` (most votes; ties -> the tied class with
the larger mean probability) and ``mean`` (argmax of the averaged probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULES = ("override", "majority", "mean")
MIN_OVERRIDE_HEADS = 3  # the primary and the two heads that must agree


# -- pairs --------------------------------------------------------------------------------------
def parse_pairs(spec: str | Sequence[Sequence[str]], classes: Sequence[str] | np.ndarray) -> list[tuple[str, str]]:
    """``"A:B,C:D"`` (or ``[("A", "B"), ...]``) -> unordered pairs as sorted tuples, each class one of
    ``classes``; a class unknown, a pair of one class twice, or no pair at all is a ``ValueError``."""
    known = [str(c) for c in classes]
    items = [p for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    out: list[tuple[str, str]] = []
    for item in items:
        parts = [s.strip() for s in item.split(":")] if isinstance(item, str) else [str(s).strip() for s in item]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"bad confusion pair {item!r}: write CLASS:CLASS, pairs comma separated (A:B,C:D)")
        unknown = [c for c in parts if c not in known]
        if unknown:
            raise ValueError(
                f"confusion pair {item!r} names unknown class(es) {', '.join(map(repr, unknown))}; "
                f"the classes are {', '.join(known)}"
            )
        if parts[0] == parts[1]:
            raise ValueError(f"confusion pair {item!r} names one class twice")
        pair = (min(parts), max(parts))
        if pair not in out:
            out.append(pair)
    if not out:
        raise ValueError("no confusion pair given: write CLASS:CLASS,CLASS:CLASS or 'auto'")
    return out


def auto_pairs(
    y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray, n_pairs: int
) -> list[tuple[tuple[str, str], int]]:
    """The ``n_pairs`` unordered class pairs most confused (``A`` called ``B`` plus ``B`` called ``A``)
    in ``y_pred`` against ``y_true`` (validation cells, never test), with their counts; pairs never
    confused are left out. Ties: the pair first in sorted order."""
    counts: dict[tuple[str, str], int] = {}
    for t, p in zip(np.asarray(y_true, dtype=str).tolist(), np.asarray(y_pred, dtype=str).tolist()):
        if t != p:
            key = (min(t, p), max(t, p))
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[: max(int(n_pairs), 0)]


# -- rules --------------------------------------------------------------------------------------
def override(primary: np.ndarray, others: Sequence[np.ndarray], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """The paper's rule on predicted labels: where ``primary`` predicts a class of a pair and every
    array of ``others`` predicts that pair's other class, take it; elsewhere keep ``primary``."""
    if len(others) < MIN_OVERRIDE_HEADS - 1:
        raise ValueError(
            f"the override rule needs the primary head and at least {MIN_OVERRIDE_HEADS - 1} other "
            f"heads that agree; got {len(others)} other head(s)"
        )
    primary = np.asarray(primary).astype(str)
    others = [np.asarray(o).astype(str) for o in others]
    alt = others[0]
    agree = np.all([o == alt for o in others[1:]], axis=0) if len(others) > 1 else np.ones(len(alt), bool)
    inside = np.zeros(len(primary), dtype=bool)
    for a, b in pairs:
        inside |= ((primary == a) & (alt == b)) | ((primary == b) & (alt == a))
    out = primary.copy()
    take = inside & agree
    out[take] = alt[take]
    return out


def combine(
    rule: str,
    probas: Sequence[np.ndarray],
    classes: Sequence[str] | np.ndarray,
    *,
    primary: int = 0,
    pairs: Sequence[tuple[str, str]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probabilities)`` of ``rule`` over the members' ``probas`` (each (n, K), columns in
    the order of ``classes``); ``primary`` indexes the primary member (override).

    Probabilities: ``mean``: the average; ``majority``: vote shares; ``override``: the primary's,
    except on replaced cells, where they are the mean of the agreeing heads' (whose argmax is the
    new label)."""
    if rule not in RULES:
        raise ValueError(f"unknown ensemble rule {rule!r}; one of {', '.join(RULES)}")
    names = np.asarray(classes).astype(str)
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (m, n, K)
    m, n, k = stack.shape
    if k != len(names):
        raise ValueError(f"probabilities have {k} columns for {len(names)} classes")
    mean = stack.mean(axis=0)
    if rule == "mean":
        return names[mean.argmax(axis=1)], mean
    votes = stack.argmax(axis=2)  # (m, n)
    if rule == "majority":
        counts = np.zeros((n, k))
        np.add.at(counts, (np.repeat(np.arange(n), m), votes.T.ravel()), 1.0)
        tied = counts == counts.max(axis=1, keepdims=True)
        pick = np.where(tied, mean, -np.inf).argmax(axis=1)
        return names[pick], counts / m
    if m < MIN_OVERRIDE_HEADS:
        raise ValueError(
            f"the override rule needs at least {MIN_OVERRIDE_HEADS} heads (the primary and two that "
            f"must agree), got {m}"
        )
    if not 0 <= primary < m:
        raise ValueError(f"primary index {primary} outside the {m} members")
    labels = [names[v] for v in votes]
    rest = [i for i in range(m) if i != primary]
    out = override(labels[primary], [labels[i] for i in rest], pairs)
    proba = stack[primary].copy()
    changed = out != labels[primary]
    proba[changed] = stack[rest][:, changed].mean(axis=0)
    return out, proba
