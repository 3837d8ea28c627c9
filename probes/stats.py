"""Uncertainty over test cells: bootstrap intervals of one probe's scores and paired tests between probes.

Mean ± std over seeds says how much a score moves when the training split or the head's seed changes;
it says nothing about the finite set of test cells the score was measured on. This module answers
that second question.

Method
------
* **Stratified bootstrap over test cells.** One resample draws, for every true class ``c``, ``n_c``
  of that class's test cells with replacement (``n_c`` = its count in the test set), so every
  resample keeps the class counts of the test set. ``stratified=False`` resamples all ``n`` cells
  at once instead (class counts then vary, as in :func:`scipy.stats.bootstrap`).
* **Vectorised over resamples.** A resample only changes counts, so it is summarised by its
  confusion matrix: the drawn cells' codes ``true * K + pred`` are counted with one
  :func:`numpy.bincount` per class over all resamples of a chunk (flat index ``b * K + pred``).
  Macro-F1, accuracy and weighted F1 then come from the ``(B, K, K)`` confusion tensor in a few
  array operations. Resamples are processed in chunks of about 2**22 drawn cells (tens of MB).
* **Scores exactly as scikit-learn's.** Per class F1 = ``2 tp / (n_true + n_pred)``, 0 when a class
  is neither true nor predicted (``zero_division=0``). With ``labels`` given the macro average runs
  over exactly those classes (a class absent from a resample, or from the whole test set, scores
  F1 0 and counts), as ``f1_score(labels=labels, average="macro", zero_division=0)``; with
  ``labels=None`` it runs over the classes present in that sample's ``y_true`` or ``y_pred``, as
  scikit-learn's default. Weighted F1 weighs by true support; accuracy is the confusion's trace / n.
* **Percentile intervals.** The ``level`` interval is the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the resampled scores; the
  estimate is the score on all test cells (not the bootstrap mean). No BCa correction.
* **Paired comparisons.** Two (or more) prediction vectors on the same test cells are scored on the
  *same* resampled cells (indices drawn once, applied to every vector), so the interval of the
  macro-F1 difference ``B - A`` accounts for the correlation between probes. Its two-sided p-value
  is ``min(1, 2 * min(1 + #{d <= 0}, 1 + #{d >= 0}) / (R + 1))`` over the ``R`` resampled
  differences ``d`` (the +1 correction keeps it above 0).
* **McNemar's test** on accuracy uses the discordant cells: ``b`` (A right, B wrong) and ``c``
  (A wrong, B right). When ``b + c < 25`` it is the exact two-sided binomial test
  ``min(1, 2 * P(X <= min(b, c)))``, ``X ~ Binomial(b + c, 1/2)``; otherwise the chi-square test with
  continuity correction ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom. ``b + c = 0`` gives 1.
* **Holm's step-down correction** of a family of p-values: the i-th smallest (1-based) is multiplied
  by ``m - i + 1``, made monotone by a running maximum and clipped at 1.

Results depend only on the data, the seed and the number of resamples: the same seed gives the same
resamples in :func:`bootstrap_ci`, :func:`paired_comparison` and :func:`compare_all`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _scipy_stats

from probes.errors import ProbeError

if TYPE_CHECKING:
    import pandas as pd

METRIC_NAMES = ("macro_f1", "accuracy", "weighted_f1")
COMPARE_COLUMNS = [
    *("a", "b", "macro_f1_a", "macro_f1_b", "diff", "diff_low", "diff_high", "p_bootstrap", "p_bootstrap_holm"),
    *("accuracy_a", "accuracy_b", "mcnemar_b", "mcnemar_c", "p_mcnemar", "p_mcnemar_holm"),
]
_CHUNK_CELLS = 2**22  # drawn cells (and confusion entries) per chunk of resamples: ~16-32 MB per array
_EXACT_MCNEMAR_BELOW = 25  # b + c below this: exact binomial test


@dataclass(frozen=True)
class Interval:
    """A score on all test cells and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float


# -- integer-code layer -------------------------------------------------------------------------------
def confusion(y_true_codes: ArrayLike, y_pred_codes: ArrayLike, n_classes: int) -> np.ndarray:
    """The ``(K, K)`` int64 confusion matrix of codes in ``[0, K)``: ``[i, j]`` counts true ``i`` predicted ``j``."""
    true, (pred,) = _check_codes(y_true_codes, [y_pred_codes], n_classes)
    k = n_classes
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def metrics_from_confusion(
    conf: ArrayLike, *, present_only: bool = False, scored: int | None = None
) -> dict[str, np.ndarray]:
    """Macro-F1, accuracy and weighted F1 of confusion matrices ``(..., K, K)``, each of shape ``(...)``.

    Equal to scikit-learn's ``f1_score(labels=range(K), average=..., zero_division=0)`` and
    ``accuracy_score`` on the cells the matrix counts. ``present_only=True`` averages macro-F1 over
    the classes that are true or predicted at least once (scikit-learn's ``labels=None``).
    ``scored``: macro-F1 averages over the first ``scored`` classes only (the others are predictions
    outside the test set's classes, errors that score no F1 of their own, as :func:`probes.metrics.score`).
    """
    c = np.asarray(conf)
    if c.ndim < 2 or c.shape[-1] != c.shape[-2] or c.shape[-1] == 0:
        raise ProbeError(f"a confusion matrix must have shape (..., K, K) with K >= 1, got {c.shape}")
    c = c.astype(np.float64, copy=False)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    n_true = c.sum(axis=-1)
    n_pred = c.sum(axis=-2)
    n = n_true.sum(axis=-1)
    denom = n_true + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    if scored is not None:
        f1 = f1[..., :scored]
    if present_only:
        present = (denom[..., : f1.shape[-1]] > 0).sum(axis=-1)
        macro = np.divide(f1.sum(axis=-1), present, out=np.zeros_like(n), where=present > 0)
    else:
        macro = f1.mean(axis=-1)
    return {
        "macro_f1": macro,
        "accuracy": np.divide(tp.sum(axis=-1), n, out=np.zeros_like(n), where=n > 0),
        "weighted_f1": np.divide((f1 * n_true[..., : f1.shape[-1]]).sum(axis=-1), n, out=np.zeros_like(n), where=n > 0),
    }


def bootstrap_indices(
    y_true_codes: ArrayLike, n_classes: int, *, n_resamples: int = 2000, seed: int = 0, stratified: bool = True
) -> np.ndarray:
    """The ``(B, n)`` cell indices of the resamples that :func:`bootstrap_confusions` counts (same seed path).

    Row ``b`` lists the cells of resample ``b``, class by class when stratified. Meant for checks with
    small ``B``: ``y_true[idx[b]]``, ``y_pred[idx[b]]`` are the resampled arrays.
    """
    true, _ = _check_codes(y_true_codes, [], n_classes)
    out = np.empty((n_resamples, true.size), dtype=np.int64)
    for rows, group_draws in _draw_chunks(true, n_classes, n_resamples, seed, stratified):
        start = 0
        for cells, idx in group_draws:
            out[rows, start : start + cells.size] = cells[idx]
            start += cells.size
    return out


def bootstrap_confusions(
    y_true_codes: ArrayLike,
    y_pred_codes: ArrayLike,
    n_classes: int,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    stratified: bool = True,
) -> np.ndarray:
    """Confusion matrices of ``n_resamples`` bootstrap resamples of the test cells.

    ``y_pred_codes`` of shape ``(n,)`` gives ``(B, K, K)``; several prediction vectors ``(P, n)`` give
    ``(P, B, K, K)``, all counted on the same resampled cells. The full tensor is returned
    (``P * B * K * K * 8`` bytes); :func:`bootstrap_ci` and the paired tests reduce chunk by chunk.
    """
    preds = np.asarray(y_pred_codes)
    several = preds.ndim == 2
    true, pred_list = _check_codes(y_true_codes, list(preds) if several else [preds], n_classes)
    out = np.empty((len(pred_list), n_resamples, n_classes, n_classes), dtype=np.int64)
    for rows, confs in _confusion_chunks(true, pred_list, n_classes, n_resamples, seed, stratified):
        for p, conf in enumerate(confs):
            out[p, rows] = conf
    return out if several else out[0]


# -- labels layer ----------------------------------------------------------------------------------------
def bootstrap_ci(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = True,
) -> dict[str, Interval]:
    """Bootstrap percentile intervals over test cells for ``metrics`` (``macro_f1``, ``accuracy``, ``weighted_f1``).

    ``labels``: the classes macro-F1 averages over (e.g. the training classes; every value of
    ``y_true`` and ``y_pred`` must be one); ``None``: the classes present, as scikit-learn's default.
    Resamples are stratified by true class unless ``stratified=False``. Use ``n_resamples >= 1000``.
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ProbeError(f"unknown metrics {unknown}; choose from {list(METRIC_NAMES)}")
    _check_resampling(n_resamples, level)
    k, true, (pred,), present_only = _encode(y_true, {"y_pred": y_pred}, labels)
    point = metrics_from_confusion(_full_confusion(true, pred, k), present_only=present_only)
    resampled = _resampled_metrics(true, [pred], k, n_resamples, seed, stratified, present_only)[0]
    out = {}
    for name in metrics:
        low, high = _percentile_interval(resampled[name], level)
        out[name] = Interval(float(point[name]), low, high)
    return out


def paired_comparison(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = True,
) -> dict[str, float | int]:
    """Compare two prediction vectors on the same test cells: paired bootstrap of macro-F1 and McNemar.

    Keys: ``macro_f1_a``, ``macro_f1_b``, ``diff`` (B - A), ``diff_low``, ``diff_high`` (percentile
    interval of the paired resampled differences), ``p_bootstrap`` (two-sided, see the module
    docstring), ``accuracy_a``, ``accuracy_b``, ``mcnemar_b`` (cells A right, B wrong),
    ``mcnemar_c`` (A wrong, B right), ``p_mcnemar`` (exact binomial if b + c < 25, else chi-square
    with continuity correction). ``labels`` as in :func:`bootstrap_ci`.
    """
    _check_resampling(n_resamples, level)
    k, true, preds, present_only = _encode(y_true, {"pred_a": pred_a, "pred_b": pred_b}, labels)
    return _compare_pairs(true, preds, k, n_resamples, seed, level, stratified, present_only)[(0, 1)]


def compare_all(
    y_true: ArrayLike,
    predictions: Mapping[str, ArrayLike],
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = True,
) -> pd.DataFrame:
    """:func:`paired_comparison` of every two named prediction vectors, with Holm-corrected p-values.

    One row per pair ``(a, b)`` in the mapping's order (``diff`` is b - a), columns ``a``, ``b``, the
    keys of :func:`paired_comparison`, and ``p_bootstrap_holm``, ``p_mcnemar_holm`` (Holm over the
    pairs of this call). All vectors share the same resampled cells; a pair's row equals
    :func:`paired_comparison` with the same seed.
    """
    import pandas as pd

    names = list(predictions)
    if len(names) < 2:
        raise ProbeError(f"compare_all needs at least two prediction vectors, got {len(names)}")
    _check_resampling(n_resamples, level)
    k, true, preds, present_only = _encode(y_true, {str(n): predictions[n] for n in names}, labels)
    rows = _compare_pairs(true, preds, k, n_resamples, seed, level, stratified, present_only)
    table = pd.DataFrame([{"a": names[i], "b": names[j], **row} for (i, j), row in rows.items()])
    table["p_bootstrap_holm"] = holm(table["p_bootstrap"].to_numpy())
    table["p_mcnemar_holm"] = holm(table["p_mcnemar"].to_numpy())
    return table[COMPARE_COLUMNS]


@dataclass
class GroupBootstrap:
    """Scores of several prediction vectors on the same test cells, resampled together.

    ``intervals[name][metric]``: the score and its percentile interval; ``replicates[name][metric]``:
    the ``(B,)`` resampled scores (resample ``r`` is the same cells for every name, so differences and
    means over names are paired); ``comparisons``: :func:`compare_all`'s table (None with one vector).
    """

    intervals: dict[str, dict[str, Interval]]
    replicates: dict[str, dict[str, np.ndarray]]
    comparisons: pd.DataFrame | None


def bootstrap_group(
    y_true: ArrayLike,
    predictions: Mapping[str, ArrayLike],
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = True,
    others: str = "error",
) -> GroupBootstrap:
    """:func:`bootstrap_ci` of every named vector and :func:`compare_all` of every two, from one set of resamples.

    What a study needs per test set: each vector's cells are counted once (the cost of one
    :func:`bootstrap_ci` per vector), and the pairs reuse those resampled scores. ``others="wrong"``
    (with ``labels``): a prediction outside ``labels`` is an error that scores no F1 of its own, as
    :func:`probes.metrics.score` counts a prediction of a class the test set lacks; ``"error"`` refuses it.
    """
    import pandas as pd

    names = list(predictions)
    if not names:
        raise ProbeError("bootstrap_group needs at least one prediction vector")
    if others not in ("error", "wrong"):
        raise ProbeError(f"others must be 'error' or 'wrong', got {others!r}")
    _check_resampling(n_resamples, level)
    scored = None
    if others == "wrong" and labels is not None:
        classes = [str(c) for c in labels]
        seen = np.unique(np.concatenate([np.asarray(predictions[n]).astype(str) for n in names]))
        extra = sorted(set(seen.tolist()) - set(classes))
        labels, scored = classes + extra, len(classes)
    k, true, preds, present_only = _encode(y_true, {str(n): predictions[n] for n in names}, labels)
    points = [
        metrics_from_confusion(_full_confusion(true, p, k), present_only=present_only, scored=scored) for p in preds
    ]
    resampled = _resampled_metrics(true, preds, k, n_resamples, seed, stratified, present_only, scored)
    intervals = {
        name: {m: Interval(float(point[m]), *_percentile_interval(values[m], level)) for m in METRIC_NAMES}
        for name, point, values in zip(names, points, resampled)
    }
    comparisons = None
    if len(names) > 1:
        rows = _pair_rows(true, preds, points, resampled, level)
        comparisons = pd.DataFrame([{"a": names[i], "b": names[j], **row} for (i, j), row in rows.items()])
        comparisons["p_bootstrap_holm"] = holm(comparisons["p_bootstrap"].to_numpy())
        comparisons["p_mcnemar_holm"] = holm(comparisons["p_mcnemar"].to_numpy())
        comparisons = comparisons[COMPARE_COLUMNS]
    return GroupBootstrap(intervals, dict(zip(names, resampled)), comparisons)


def interval_of_mean(replicates: Sequence[np.ndarray], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of several scores, each resampled independently (``(B,)`` each).

    The mean over seeds of a study: resample ``r`` of the mean is the mean of every seed's resample
    ``r`` (their test cells are resampled independently, so this is a draw of the mean's bootstrap)."""
    if not replicates:
        raise ProbeError("interval_of_mean needs at least one set of replicates")
    sizes = {np.asarray(r).shape for r in replicates}
    if len(sizes) != 1:
        raise ProbeError(f"replicates must share one shape (B,), got {sorted(sizes)}")
    return _percentile_interval(np.mean(np.stack(replicates), axis=0), level)


def bootstrap_kept(
    y_true: ArrayLike,
    kept: ArrayLike,
    correct: ArrayLike,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = True,
) -> dict[str, Interval]:
    """Intervals over test cells of what a confidence threshold keeps: ``coverage`` (share kept) and
    ``accuracy`` (share right among the kept), resampled as :func:`bootstrap_ci` (stratified by true class).

    Only the counts of (kept, right) per class matter, so each resample is one multinomial draw of
    those four counts per class (the exact distribution of resampling the cells): cheap at any size.
    A resample that keeps no cell has no accuracy and is left out of its interval.
    """
    _check_resampling(n_resamples, level)
    y = np.asarray(y_true)
    k_, c_ = np.asarray(kept, dtype=bool), np.asarray(correct, dtype=bool)
    if y.ndim != 1 or y.size == 0 or k_.shape != y.shape or c_.shape != y.shape:
        raise ProbeError(
            f"y_true, kept and correct must be 1-D of one non-zero length, got {y.shape}, {k_.shape}, {c_.shape}"
        )
    rng = np.random.default_rng(seed)
    category = k_.astype(np.int64) * 2 + c_.astype(np.int64)  # 0: dropped wrong .. 3: kept right
    groups = [category[y == v] for v in np.unique(y)] if stratified else [category]
    counts = np.zeros((n_resamples, 4), dtype=np.int64)
    for g in groups:
        counts += rng.multinomial(g.size, np.bincount(g, minlength=4) / g.size, size=n_resamples)
    n_kept = counts[:, 2] + counts[:, 3]
    coverage = n_kept / y.size
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = counts[:, 3] / n_kept
    out = {"coverage": Interval(float(k_.mean()), *_percentile_interval(coverage, level))}
    finite = accuracy[np.isfinite(accuracy)]
    point = float(c_[k_].mean()) if k_.any() else float("nan")
    bounds = _percentile_interval(finite, level) if finite.size else (float("nan"), float("nan"))
    out["accuracy"] = Interval(point, *bounds)
    return out


def mcnemar(b: int, c: int) -> float:
    """McNemar's two-sided p-value from the discordant counts: exact binomial if ``b + c < 25``, else chi-square.

    The chi-square statistic carries the continuity correction ``(|b - c| - 1)^2 / (b + c)``.
    """
    if b < 0 or c < 0:
        raise ProbeError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    if n < _EXACT_MCNEMAR_BELOW:
        return float(min(1.0, 2.0 * _scipy_stats.binom.cdf(min(b, c), n, 0.5)))
    statistic = (abs(b - c) - 1) ** 2 / n
    return float(_scipy_stats.chi2.sf(statistic, df=1))


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order (monotone in the p-values, at most 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ProbeError(f"holm takes a 1-D list of p-values, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ProbeError("p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


# -- internals --------------------------------------------------------------------------------------------
def _check_resampling(n_resamples: int, level: float) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ProbeError(f"n_resamples must be a positive integer, got {n_resamples}")
    if not 0 < level < 1:
        raise ProbeError(f"level must lie strictly between 0 and 1, got {level}")


def _encode(
    y_true: ArrayLike, preds: Mapping[str, ArrayLike], labels: Sequence[Any] | np.ndarray | None
) -> tuple[int, np.ndarray, list[np.ndarray], bool]:
    """Integer codes of ``y_true`` and each prediction vector over ``labels``: ``(K, true, preds, present_only)``."""
    arrays = {"y_true": np.asarray(y_true), **{name: np.asarray(p) for name, p in preds.items()}}
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ProbeError(f"{name} must be 1-D, got shape {a.shape}")
    n = arrays["y_true"].size
    if n == 0:
        raise ProbeError("no test cells: y_true is empty")
    for name, a in arrays.items():
        if a.size != n:
            raise ProbeError(f"y_true has {n} values but {name} has {a.size}")
    classes = None if labels is None else np.asarray(list(labels))
    textual = any(a.dtype.kind not in "biuf" for a in [*arrays.values(), *([] if classes is None else [classes])])
    if textual:  # compare labels as text, as probes.metrics.score does
        arrays = {name: a.astype(str) for name, a in arrays.items()}
        classes = None if classes is None else classes.astype(str)
    if classes is None:
        classes = np.unique(np.concatenate(list(arrays.values())))
    elif classes.size == 0:
        raise ProbeError("labels is empty")
    elif np.unique(classes).size != classes.size:
        raise ProbeError("labels has duplicates")
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    codes = []
    for name, a in arrays.items():
        pos = np.minimum(np.searchsorted(ordered, a), ordered.size - 1)
        missing = ordered[pos] != a
        if missing.any():
            absent = np.unique(a[missing]).tolist()
            shown = ", ".join(map(repr, absent[:10])) + (" ..." if len(absent) > 10 else "")
            raise ProbeError(f"labels lack {len(absent)} class(es) that occur in {name}: {shown}")
        codes.append(order[pos].astype(np.int64))
    return classes.size, codes[0], codes[1:], labels is None


def _check_codes(
    y_true_codes: ArrayLike, y_pred_codes: Sequence[ArrayLike], n_classes: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    if int(n_classes) != n_classes or n_classes < 1:
        raise ProbeError(f"n_classes must be a positive integer, got {n_classes}")
    arrays = [np.asarray(y_true_codes), *(np.asarray(p) for p in y_pred_codes)]
    n = arrays[0].size
    if n == 0:
        raise ProbeError("no test cells: y_true_codes is empty")
    for i, a in enumerate(arrays):
        what = "y_true_codes" if i == 0 else "y_pred_codes"
        if a.ndim != 1 or a.size != n:
            raise ProbeError(f"{what} must be 1-D of the length of y_true_codes ({n}), got shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise ProbeError(f"{what} must hold integer codes, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= n_classes:
            raise ProbeError(f"{what} must lie in [0, {n_classes}), got [{a.min()}, {a.max()}]")
    codes = [a.astype(np.int64) for a in arrays]
    return codes[0], codes[1:]


def _full_confusion(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def _groups(true: np.ndarray, k: int, stratified: bool) -> list[tuple[int, np.ndarray]]:
    """``(row, cells)`` of each resampling group: each true class (``row`` = class) or all cells (``row`` = -1)."""
    if not stratified:
        return [(-1, np.arange(true.size))]
    order = np.argsort(true, kind="stable")
    bounds = np.searchsorted(true[order], np.arange(k + 1))
    return [(c, order[bounds[c] : bounds[c + 1]]) for c in range(k) if bounds[c + 1] > bounds[c]]


def _draw_chunks(
    true: np.ndarray, k: int, n_resamples: int, seed: int, stratified: bool
) -> Iterator[tuple[slice, list[tuple[np.ndarray, np.ndarray]]]]:
    """For each chunk of resamples: its rows and, per group, ``(cells, idx)`` with ``idx`` ``(b, n_group)``.

    ``cells[idx[r]]`` are the cells resample ``r`` of the chunk draws from the group. The chunk size
    depends on ``n`` and ``K`` only, so the seed path is the same whatever is counted.
    """
    rng = np.random.default_rng(seed)
    groups = _groups(true, k, stratified)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(true.size, k * k)))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        draws = [(cells, rng.integers(0, cells.size, size=(b, cells.size), dtype=np.int32)) for _, cells in groups]
        yield slice(start, start + b), draws


def _confusion_chunks(
    true: np.ndarray, preds: list[np.ndarray], k: int, n_resamples: int, seed: int, stratified: bool
) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Per chunk of resamples: its rows and one ``(b, K, K)`` confusion tensor per prediction vector."""
    # within a class only the prediction varies: count keys r * K + pred; over all cells, r * K^2 + true * K + pred
    groups = _groups(true, k, stratified)
    keys = [
        [(p[cells] if row >= 0 else true[cells] * k + p[cells]).astype(np.int32) for p in preds]
        for row, cells in groups
    ]
    for rows, draws in _draw_chunks(true, k, n_resamples, seed, stratified):
        b = rows.stop - rows.start
        confs = [np.zeros((b, k * k), dtype=np.int64) for _ in preds]  # classes without test cells stay 0
        for (row, _), group_keys, (_, idx) in zip(groups, keys, draws):
            width = k if row >= 0 else k * k
            columns = slice(row * k, (row + 1) * k) if row >= 0 else slice(0, k * k)
            offsets = (np.arange(b, dtype=np.int32) * width)[:, None]
            for conf, key in zip(confs, group_keys):
                drawn = key[idx]
                drawn += offsets
                conf[:, columns] = np.bincount(drawn.ravel(), minlength=b * width).reshape(b, width)
        yield rows, [conf.reshape(b, k, k) for conf in confs]


def _resampled_metrics(
    true: np.ndarray,
    preds: list[np.ndarray],
    k: int,
    n_resamples: int,
    seed: int,
    stratified: bool,
    present_only: bool,
    scored: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Each metric over the resamples, ``(B,)`` per prediction vector, never holding all confusions at once."""
    out = [{name: np.empty(n_resamples) for name in METRIC_NAMES} for _ in preds]
    for rows, confs in _confusion_chunks(true, preds, k, n_resamples, seed, stratified):
        for values, conf in zip(out, confs):
            for name, v in metrics_from_confusion(conf, present_only=present_only, scored=scored).items():
                values[name][rows] = v
    return out


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _compare_pairs(
    true: np.ndarray,
    preds: list[np.ndarray],
    k: int,
    n_resamples: int,
    seed: int,
    level: float,
    stratified: bool,
    present_only: bool,
) -> dict[tuple[int, int], dict[str, float | int]]:
    """The comparison of every two prediction vectors ``(i, j)``, ``i < j``, on shared resamples."""
    points = [metrics_from_confusion(_full_confusion(true, p, k), present_only=present_only) for p in preds]
    resampled = _resampled_metrics(true, preds, k, n_resamples, seed, stratified, present_only)
    return _pair_rows(true, preds, points, resampled, level)


def _pair_rows(
    true: np.ndarray,
    preds: list[np.ndarray],
    points: list[dict[str, np.ndarray]],
    resampled: list[dict[str, np.ndarray]],
    level: float,
) -> dict[tuple[int, int], dict[str, float | int]]:
    """Paired bootstrap and McNemar rows of every two vectors from their point scores and shared resamples."""
    correct = [p == true for p in preds]
    out: dict[tuple[int, int], dict[str, float | int]] = {}
    for i, j in combinations(range(len(preds)), 2):
        d = resampled[j]["macro_f1"] - resampled[i]["macro_f1"]
        n_resamples = d.size
        low, high = _percentile_interval(d, level)
        below, above = int(np.count_nonzero(d <= 0)), int(np.count_nonzero(d >= 0))
        b = int(np.count_nonzero(correct[i] & ~correct[j]))
        c = int(np.count_nonzero(~correct[i] & correct[j]))
        out[(i, j)] = {
            "macro_f1_a": float(points[i]["macro_f1"]),
            "macro_f1_b": float(points[j]["macro_f1"]),
            "diff": float(points[j]["macro_f1"] - points[i]["macro_f1"]),
            "diff_low": low,
            "diff_high": high,
            "p_bootstrap": min(1.0, 2 * (1 + min(below, above)) / (n_resamples + 1)),
            "accuracy_a": float(points[i]["accuracy"]),
            "accuracy_b": float(points[j]["accuracy"]),
            "mcnemar_b": b,
            "mcnemar_c": c,
            "p_mcnemar": mcnemar(b, c),
        }
    return out
