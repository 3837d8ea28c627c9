"""Label audit: out-of-fold consensus, self-confidence and neighbour disagreement per cell.

For every backbone x probe x seed (a *model*), each cell gets class probabilities from a probe
(:func:`probes.heads.make_probe`) trained on folds that exclude it: ``StratifiedGroupKFold``
on the ``group`` column when it has values (no group on both sides of a fold), else
``StratifiedKFold``; the folds are reshuffled per seed. Per cell, over the ``M`` models and the
``B`` backbones:

* ``consensus``  = fraction of the M models whose top class is not the given label;
* ``proposed_label`` = the label the most models predict instead (ties: higher mean
  probability); ``proposed_votes`` = the fraction of models predicting it;
* ``self_confidence`` = mean over the M models of the predicted probability of the given label;
* ``neighbor_disagreement`` = fraction of the cell's ``k`` nearest neighbours (exact cosine,
  the cell itself excluded, among the audited cells) that carry another label, averaged over
  the backbones (per backbone in the columns ``neighbor_disagreement:<backbone>``).

Suspicion score, in [0, 1] (higher = more likely mislabelled)::

    score = w_c * consensus + w_s * (1 - self_confidence) + w_n * neighbor_disagreement

with the weights :data:`WEIGHTS`: ``w_c = 1/6, w_s = 4/6, w_n = 1/6`` (``weights=`` overrides
them; they are normalised to sum 1). Each piece is in [0, 1], so the score is too.

Out-of-fold probabilities are cached in a Parquet file, one row per model x cell, keyed by
backbone, feature key, a digest of the feature matrix, pool, probe and its parameters, seed,
folds, fold scheme and ``label_digest`` (the cell ids, labels and groups), so a later audit
reuses every model whose inputs did not change. For a store the file lives in the store
(``<store>/.probes/audit-oof-<dataset>.parquet``) unless ``cache=`` names another one.
Audits read the *current* labels (``obs.label``, after :func:`relabel`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from .data import ProbeError, open_cells, parse_names
from .neighbors import NeighborIndex
from .sampling import parse_seeds, sort_labels

# consensus : (1 - self-confidence) : neighbour disagreement = 1 : 4 : 1 (normalised to sum 1).
# Chosen on a development sample of Chula cells disjoint from the benchmark's evaluation cells
# (benchmarks/label_noise.py --part dev): self-confidence carries most of the ranking;
# consensus sharpens the top (precision), neighbours add a feature-space view (AUROC).
WEIGHTS = {"consensus": 1 / 6, "confidence": 4 / 6, "neighbors": 1 / 6}
SCORE_FORMULA = (
    "score = {consensus} × consensus + {confidence} × (1 − self_confidence) + {neighbors} × neighbor_disagreement"
)
KEY_COLUMNS = ["backbone", "feature_key", "feature_digest", "pool", "probe", "probe_impl", "seed", "folds", "scheme",
               "label_digest"]
EVIDENCE_COLUMNS = [
    "rank", "id", "path", "given_label", "proposed_label", "proposed_votes", "consensus", "self_confidence",
    "neighbor_disagreement", "score",
]
DEFAULT_PROBES = "logistic,knn,mlp"
SCHEMES = ("auto", "group", "stratified")
CACHE_DIR = ".probes"  # inside a store: files of the probes package, never Zarr data


# -- folds and out-of-fold predictions ------------------------------------------------------------
def label_digest(ids: Sequence[str], labels: Sequence[str], groups: Sequence[str] | None = None) -> str:
    """sha256 (16 hex) of the cell ids, labels and groups, in order: what the folds and fits depend on."""
    h = hashlib.sha256()
    for col in (ids, labels, groups if groups is not None else []):
        h.update("\x1f".join(map(str, col)).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def feature_digest(x: np.ndarray) -> str:
    """sha256 (16 hex) of a feature matrix as float32 (shape included)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    h = hashlib.sha256(repr(x.shape).encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()[:16]


def _has_groups(groups: Sequence[str] | None) -> bool:
    if groups is None:
        return False
    g = pd.Series(np.asarray(groups, dtype=object)).fillna("").astype(str).str.strip()
    return bool((g != "").any())


def make_folds(labels: Sequence[str], groups: Sequence[str] | None, n_folds: int, seed: int,
               scheme: str = "auto") -> tuple[np.ndarray, str]:
    """Fold number (0..n_folds-1) of every cell and the scheme used (``group`` or ``stratified``).

    ``scheme="auto"``: ``group`` when ``groups`` has any value, else ``stratified``. Under
    ``group`` no group is split across folds (cells with an empty group are each their own
    group); fewer groups than folds is an error, never a silent switch to ``stratified``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if scheme not in SCHEMES:
        raise ProbeError(f"unknown fold scheme '{scheme}'; use one of {', '.join(SCHEMES)}")
    y = np.asarray(labels, dtype=str)
    if n_folds < 2:
        raise ProbeError(f"--folds must be at least 2, got {n_folds}")
    if len(y) < n_folds:
        raise ProbeError(f"{len(y)} cells are too few for {n_folds} folds")
    if scheme == "auto":
        scheme = "group" if _has_groups(groups) else "stratified"
    fold = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits"
        if scheme == "group":
            if not _has_groups(groups):
                raise ProbeError("fold scheme 'group' needs a group column with values (the store's obs.group is empty)")
            g = pd.Series(np.asarray(groups, dtype=object)).fillna("").astype(str).str.strip().to_numpy(dtype=object)
            empty = g == ""
            g[empty] = [f"\x00cell{i}" for i in np.flatnonzero(empty)]
            n_groups = len(pd.unique(g))
            if n_groups < n_folds:
                raise ProbeError(
                    f"only {n_groups} groups for {n_folds} group-aware folds; use --folds {max(n_groups, 2)} "
                    "or --split stratified (cells of one group then land in different folds)"
                )
            splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y, g)
        else:
            splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y)
        for f, (_, test) in enumerate(splits):
            fold[test] = f
    if (fold < 0).any():  # pragma: no cover - sklearn's splitters partition the cells
        raise ProbeError("internal error: some cells got no fold")
    return fold, scheme


def probe_signature(name: str, make_probe: Callable[..., Any]) -> str:
    """What identifies probe ``name``'s fits in the cache: its class and parameters (seed and
    device left out), so changing a head's defaults invalidates the cached predictions."""
    est = make_probe(name, seed=0, device="cpu")
    params = {k: v for k, v in est.get_params(deep=False).items() if k not in ("seed", "device", "random_state")} \
        if hasattr(est, "get_params") else {}
    text = f"{type(est).__module__}.{type(est).__qualname__}:{sorted((k, repr(v)) for k, v in params.items())}"
    return f"{type(est).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def oof_proba(
    x: np.ndarray, labels: np.ndarray, fold: np.ndarray, classes: Sequence[str], make: Callable[[], Any]
) -> np.ndarray:
    """(N, C) out-of-fold probabilities: fold ``f`` is predicted by a probe fit on every other fold.

    A class absent from a fold's training cells gets probability 0 for that fold's cells.
    """
    idx = {c: i for i, c in enumerate(classes)}
    proba = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
    for f in np.unique(fold):
        test, train = fold == f, fold != f
        est = make()
        est.fit(x[train], labels[train])
        cols = [idx[str(c)] for c in est.classes_]
        if hasattr(est, "predict_proba"):
            p = np.asarray(est.predict_proba(x[test]), dtype=np.float32)
        else:  # a probe without probabilities votes with its prediction
            pred = np.asarray(est.predict(x[test])).astype(str)
            p = (pred[:, None] == np.asarray(est.classes_, dtype=str)[None]).astype(np.float32)
        block = np.zeros((int(test.sum()), len(classes)), dtype=np.float32)
        block[:, cols] = p
        proba[test] = block
    if not np.isfinite(proba).all():
        raise ProbeError("the probe returned NaN or inf probabilities")
    return proba


@dataclass
class OOF:
    """Out-of-fold probabilities of one model (backbone x probe x seed) for every cell."""

    key: dict[str, Any]  # the KEY_COLUMNS values
    classes: list[str]
    proba: np.ndarray  # (N, C) float32, columns in the order of ``classes``
    fold: np.ndarray  # (N,) the fold that predicted each cell

    @property
    def name(self) -> str:
        return f"{self.key['backbone']}|{self.key['probe']}|{self.key['seed']}"


def _fs(path: str | os.PathLike):
    import fsspec.core

    return fsspec.core.url_to_fs(str(path))


def read_oof_cache(path: str | os.PathLike | None, ids: Sequence[str]) -> dict[tuple, OOF]:
    """Every model in the cache file whose cells are exactly ``ids`` (in order), by key tuple."""
    if path is None:
        return {}
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    if not fs.isfile(p):
        return {}
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise ProbeError(f"the out-of-fold cache {path} cannot be read ({e}); delete it or pass another --cache") from e
    if not set(KEY_COLUMNS) <= set(table.column_names):
        return {}  # written by an older version: recomputed and replaced
    keys = table.select(KEY_COLUMNS).to_pandas()
    out: dict[tuple, OOF] = {}
    ids = np.asarray(ids, dtype=str)
    for key, rows in keys.groupby(KEY_COLUMNS, sort=False).indices.items():
        if len(rows) != len(ids):
            continue
        sub = table.take(rows)
        if not np.array_equal(sub.column("id").to_numpy(zero_copy_only=False).astype(str), ids):
            continue
        classes = json.loads(sub.column("classes")[0].as_py())
        proba = sub.column("proba").combine_chunks().flatten().to_numpy().reshape(len(rows), len(classes))
        k = {c: (v.item() if hasattr(v, "item") else v) for c, v in zip(KEY_COLUMNS, key)}
        out[tuple(k[c] for c in KEY_COLUMNS)] = OOF(k, classes, proba.astype(np.float32),
                                                   sub.column("fold").to_numpy())
    return out


def write_oof_cache(path: str | os.PathLike, oofs: Sequence[OOF], ids: Sequence[str]) -> str:
    """Write ``oofs`` into the cache file (local path or fsspec URL), keeping every other model.

    Earlier rows of the same model (same key but for ``label_digest``: e.g. before a relabel)
    are replaced. Local files are replaced atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    model_cols = [c for c in KEY_COLUMNS if c != "label_digest"]
    new = {tuple(str(o.key[c]) for c in model_cols) for o in oofs}
    parts = []
    if fs.isfile(p):
        try:
            with fs.open(p, "rb") as f:
                old = pq.read_table(f)
        except Exception:  # an unreadable cache is rebuilt (read_oof_cache already said so)
            old = None
        if old is not None and set(KEY_COLUMNS) <= set(old.column_names):
            mk = old.select(model_cols).to_pandas().astype(str)
            stale = np.array([tuple(r) in new for r in mk.itertuples(index=False)], dtype=bool)
            if (~stale).any():
                parts.append(old.filter(pa.array(~stale)))
    ids = np.asarray(ids, dtype=str)
    for o in oofs:
        n, c = o.proba.shape
        cols = {k: pa.array([o.key[k]] * n) for k in KEY_COLUMNS}
        cols["seed"] = pa.array([int(o.key["seed"])] * n, pa.int64())
        cols["folds"] = pa.array([int(o.key["folds"])] * n, pa.int64())
        cols.update(
            id=pa.array(ids), fold=pa.array(o.fold.astype(np.int64)), classes=pa.array([json.dumps(o.classes)] * n),
            proba=pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)),
                                           pa.array(o.proba.astype(np.float32).ravel())),
        )
        parts.append(pa.table(cols))
    schema = parts[-1].schema
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in parts])
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    else:
        with fs.open(p, "wb") as f:
            pq.write_table(table, f)
    return str(path)


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Cap BLAS/OpenMP threads (threadpoolctl) and torch's intra-op threads; ``None``: no change."""
    if not threads:
        yield
        return
    import scipy.linalg  # noqa: F401  load scipy's own BLAS now, so that the limit reaches it
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(int(threads)):
            if torch is not None:
                torch.set_num_threads(int(threads))
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


# -- evidence and score ---------------------------------------------------------------------------
def neighbor_disagreement(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(disagreement (N,), neighbour positions (N, k), similarities (N, k)) over one backbone."""
    sims, idx = NeighborIndex(features).all_neighbors(k)
    valid = idx >= 0
    other = (labels[np.where(valid, idx, 0)] != labels[:, None]) & valid
    return other.sum(1) / np.maximum(valid.sum(1), 1), idx, sims


def evidence(
    oofs: Sequence[OOF], labels: np.ndarray, classes: Sequence[str], disagreement: np.ndarray,
    weights: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Per-cell evidence and score (the columns of :data:`EVIDENCE_COLUMNS` but id, path, rank)."""
    w = _weights(weights)
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
    return pd.DataFrame({
        "given_label": labels, "proposed_label": np.asarray(classes, dtype=object)[proposed],
        "proposed_votes": votes[rows, proposed] / m, "consensus": consensus, "self_confidence": self_conf,
        "neighbor_disagreement": disagreement, "score": score,
    })


def _weights(weights: dict[str, float] | None) -> dict[str, float]:
    w = dict(WEIGHTS if weights is None else weights)
    if set(w) != set(WEIGHTS) or min(w.values()) < 0 or sum(w.values()) <= 0:
        raise ProbeError(f"weights need the keys {', '.join(WEIGHTS)} with non-negative values, got {weights}")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def formula(weights: dict[str, float] | None = None) -> str:
    """The score formula with its weights, as text."""
    return SCORE_FORMULA.format(**{k: f"{v:.3g}" for k, v in _weights(weights).items()})


# -- the audit ------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """What an audit found.

    ``table``: every cell ranked by score (rank 1 = most suspicious); its index is the cell's
    position in ``obs`` (the audited order, which the ``neighbors`` positions index).
    """

    table: pd.DataFrame
    oofs: list[OOF]
    classes: list[str]
    params: dict[str, Any]
    neighbors: dict[str, tuple[np.ndarray, np.ndarray]]  # backbone -> (positions (N, k), sims (N, k))
    obs: pd.DataFrame  # the audited cells (id, path, label, group ...) in feature order
    reused: int = 0  # models read from the cache
    computed: int = 0  # models fitted now
    fits: int = 0  # probe fits made now (computed x folds)
    out: Path | None = None
    files: dict[str, Any] = field(default_factory=dict)

    def suspects(self, top: int = 50) -> pd.DataFrame:
        """The ``top`` most suspicious cells."""
        return self.table.head(top)

    def proba(self) -> np.ndarray:
        """(M, N, C) out-of-fold probabilities of every model, cells in ``obs`` order."""
        return np.stack([o.proba for o in self.oofs])


def audit_arrays(
    features: dict[str, np.ndarray],
    labels: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    feature_keys: dict[str, str] | None = None,
    pool: str = "cls",
    probes: str | Sequence[str] = DEFAULT_PROBES,
    folds: int = 5,
    seeds: int | str | Sequence[int] = 3,
    split: str = "auto",
    k: int = 10,
    weights: dict[str, float] | None = None,
    cache: str | os.PathLike | None = None,
    cache_lock: Callable[[], Any] | None = None,
    device: str = "auto",
    make_probe: Callable[..., Any] | None = None,
    threads: int | None = None,
    quiet: bool = True,
) -> AuditResult:
    """The audit on in-memory features: ``features`` maps a backbone name to an (N, D) array.

    ``cache``: a Parquet file (path or fsspec URL) of out-of-fold probabilities read first and
    updated after (None: no cache); ``cache_lock()`` (a context manager) is held while it is
    written. ``split``: fold scheme, ``auto`` (group-aware when
    ``groups`` has values), ``group`` or ``stratified``. ``make_probe(name, seed=, device=)``
    replaces :func:`probes.heads.make_probe` (custom heads, tests). ``threads`` caps
    BLAS/OpenMP (and torch) threads during the fits.
    """
    from .heads import PROBES
    from .heads import make_probe as heads_make_probe
    from .report import progress

    labels = np.asarray(labels, dtype=object).astype(str)
    n = len(labels)
    ids = np.asarray(ids if ids is not None else np.arange(n), dtype=object).astype(str)
    if len(ids) != n or (groups is not None and len(groups) != n) or (paths is not None and len(paths) != n):
        raise ProbeError(f"ids, groups and paths need one entry per label ({n})")
    if len(pd.unique(ids)) != n:
        raise ProbeError("cell ids must be unique")
    obs = pd.DataFrame({"id": ids, "path": list(paths) if paths is not None else [""] * n, "label": labels,
                        "group": list(groups) if groups is not None else [""] * n})
    if not features:
        raise ProbeError("no features to audit: name at least one backbone")
    for name, x in features.items():
        if np.ndim(x) != 2 or len(x) != n:
            raise ProbeError(f"features of '{name}' have shape {np.shape(x)}; need ({n}, D), one row per label")
    classes = sort_labels(labels)
    if len(classes) < 2:
        raise ProbeError(f"an audit needs at least two classes; the cells carry only {classes}")
    probe_list = parse_names(probes)
    if not probe_list:
        raise ProbeError("no probes given: e.g. --probes logistic,knn,mlp")
    if make_probe is None:
        unknown = [p for p in probe_list if p not in PROBES]
        if unknown:
            raise ProbeError(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(PROBES)}")
        make_probe = heads_make_probe
    seed_list = parse_seeds(seeds)
    if int(k) < 1:
        raise ProbeError(f"k must be at least 1, got {k}")
    w = _weights(weights)
    digest = label_digest(ids, labels, groups)
    f_digest = {b: feature_digest(x) for b, x in features.items()}
    impl = {p: probe_signature(p, make_probe) for p in probe_list}
    cached = read_oof_cache(cache, ids)
    fold_cache: dict[int, tuple[np.ndarray, str]] = {}
    oofs: list[OOF] = []
    reused = computed = fits = 0
    keys = feature_keys or {}
    todo = [(b, p, s) for b in features for p in probe_list for s in seed_list]
    with progress(len(todo), quiet) as advance, limit_threads(threads):
        for b, p, s in todo:
            if s not in fold_cache:
                fold_cache[s] = make_folds(labels, groups, folds, s, split)
            fold, scheme = fold_cache[s]
            key = dict(backbone=b, feature_key=keys.get(b, b), feature_digest=f_digest[b], pool=pool, probe=p,
                       probe_impl=impl[p], seed=int(s), folds=int(folds), scheme=scheme, label_digest=digest)
            hit = cached.get(tuple(key[c] for c in KEY_COLUMNS))
            if hit is not None and hit.classes == classes and np.array_equal(hit.fold, fold):
                oofs.append(hit)
                reused += 1
                continue
            advance(f"{b} · {p} · seed {s}")
            x = np.asarray(features[b], dtype=np.float32)
            try:
                proba = oof_proba(x, labels, fold, classes, lambda: make_probe(p, seed=int(s), device=device))
            except ProbeError:
                raise
            except Exception as e:
                raise ProbeError(f"probe '{p}' on {b}, seed {s} failed: {type(e).__name__}: {e}") from e
            oofs.append(OOF(key, classes, proba, fold))
            computed += 1
            fits += len(np.unique(fold))
    nbrs, dis = {}, {}
    for b, x in features.items():
        d, idx, sims = neighbor_disagreement(x, labels, k)
        nbrs[b] = (idx, sims)
        dis[b] = d
    ev = evidence(oofs, labels, classes, np.mean(list(dis.values()), axis=0), w)
    if len(dis) > 1:
        for b, d in dis.items():
            ev[f"neighbor_disagreement:{b}"] = d
    ev.insert(0, "path", obs["path"].to_numpy())
    ev.insert(0, "id", ids)
    order = np.lexsort((np.arange(n), -ev["score"].to_numpy()))  # stable: ties keep cell order
    table = ev.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, n + 1))
    table.index = order  # position of each row's cell in the audited order
    params = dict(backbones=list(features), feature_keys={b: keys.get(b, b) for b in features}, pool=pool,
                  probes=probe_list, probe_impl=impl, seeds=seed_list, folds=int(folds),
                  scheme=fold_cache[seed_list[0]][1], k=int(k), weights=w, label_digest=digest, n_cells=n,
                  n_classes=len(classes), n_models=len(oofs), formula=formula(w), cache=str(cache) if cache else None)
    res = AuditResult(table, oofs, classes, params, nbrs, obs, reused, computed, fits)
    if cache is not None and computed:
        res.files["oof"] = _write_cache(cache, oofs, ids, cache_lock)
    return res


def _write_cache(cache: str | os.PathLike, oofs: Sequence[OOF], ids: Sequence[str],
                 lock: Callable[[], Any] | None = None) -> str:
    """Write the cache, holding ``lock()`` when given (retried while another audit writes)."""
    from embedcache.store import StoreBusyError

    try:
        if lock is None:
            return write_oof_cache(cache, oofs, ids)
        for attempt in range(120):
            try:
                with lock():
                    return write_oof_cache(cache, oofs, ids)
            except StoreBusyError:
                if attempt == 119:
                    raise
                time.sleep(0.5)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(f"cannot write the out-of-fold cache {cache}: {e}; pass --cache FILE elsewhere") from e
    raise AssertionError("unreachable")  # pragma: no cover


def _check_writable(cache: str) -> None:
    """Fail early, with what to do, when the out-of-fold cache cannot be written."""
    fs, p = _fs(cache)
    parent = p.rsplit("/", 1)[0] if "/" in p else "."
    try:
        fs.makedirs(parent, exist_ok=True)
    except Exception as e:
        raise ProbeError(f"cannot write the out-of-fold cache {cache} ({e}); pass --cache FILE elsewhere or --no-cache") from e
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem) and not os.access(parent, os.W_OK):
        raise ProbeError(f"cannot write the out-of-fold cache {cache} (folder not writable); "
                         "pass --cache FILE elsewhere or --no-cache")


def default_cache(store_url: str, dataset: str) -> str:
    """Where a store's audits keep out-of-fold probabilities: ``<store>/.probes/audit-oof-<dataset>.parquet``."""
    return f"{str(store_url).rstrip('/')}/{CACHE_DIR}/audit-oof-{dataset}.parquet"


def audit(
    store: Any,
    model: str | Sequence[str],
    *,
    probes: str | Sequence[str] = DEFAULT_PROBES,
    folds: int = 5,
    seeds: int | str | Sequence[int] = 3,
    split: str = "auto",
    k: int = 10,
    dataset: str | None = None,
    pool: str = "cls",
    out: str | os.PathLike | None = None,
    cache: str | os.PathLike | bool | None = None,
    top: int = 50,
    weights: dict[str, float] | None = None,
    device: str = "auto",
    threads: int | None = None,
    make_probe: Callable[..., Any] | None = None,
    html: bool = True,
    quiet: bool = False,
) -> AuditResult:
    """Audit the current labels of a store's cells with one or more backbones' features.

    ``model``: backbone names (or feature keys), a comma list or a list; the cells audited are
    those readable for every backbone and labelled. Writes to ``out`` (default
    ``audit-<models>-<date>``): ``suspects.csv`` (every cell, ranked, with its evidence),
    ``corrections-template.csv`` (the ``top`` suspects with their proposed labels, to review
    and pass to :func:`relabel`), ``suspects.png`` (contact sheet: the top suspects beside their
    nearest neighbours in the first backbone), ``report.html`` (self-contained) and
    ``audit.json`` (parameters). Out-of-fold probabilities are cached in the store
    (:func:`default_cache`) or in ``cache`` (a file path or URL); ``cache=False`` turns the
    cache off.
    """
    import embedcache

    cells = open_cells(store, model, dataset=dataset, pool=pool)
    lock = None
    if cache is None or cache is True:
        cache_path: str | None = default_cache(cells.store_url, cells.dataset)
        st = embedcache.open_store(cells.store_url)
        lock = lambda: st.lock(f"audit-oof-{cells.dataset}")  # noqa: E731
    elif cache is False:
        cache_path = None
    else:
        cache_path = str(cache)
    if cache_path is not None:
        _check_writable(cache_path)  # before any fit, not after
    pos = np.arange(len(cells.obs))
    feats = {b: cells.features(b, pos) for b in cells.backbones}
    out = Path(out) if out is not None else Path(_default_name(cells.backbones))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProbeError(f"cannot create the output folder {out}: {e}") from e
    res = audit_arrays(
        feats, cells.labels, ids=cells.obs["id"].to_numpy(), groups=cells.obs["group"].to_numpy(),
        paths=cells.obs["path"].to_numpy(), feature_keys={b: cells.feature_key(b) for b in cells.backbones},
        pool=pool, probes=probes, folds=folds, seeds=seeds, split=split, k=k, weights=weights, cache=cache_path,
        cache_lock=lock, device=device, make_probe=make_probe, threads=threads, quiet=quiet,
    )
    res.params.update(store=str(cells.store_url), dataset=cells.dataset, excluded=cells.exclusion_lines())
    res.out = out
    res.files.update(write_outputs(res, top=top, html=html))
    if not quiet:
        _print_summary(res, top=min(top, 15))
    return res


def write_outputs(res: AuditResult, *, top: int = 50, html: bool = True) -> dict[str, Path]:
    """``suspects.csv``, ``corrections-template.csv``, ``suspects.png``, ``audit.json`` and
    ``report.html`` under ``res.out``."""
    from .contact import suspect_sheet

    out = Path(res.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"suspects.csv": out / "suspects.csv", "corrections": out / "corrections-template.csv",
             "suspects.png": out / "suspects.png", "audit.json": out / "audit.json"}
    res.table.to_csv(files["suspects.csv"], index=False)
    sus = res.suspects(top)
    pd.DataFrame({"id": sus["id"], "new_label": sus["proposed_label"],
                  "note": [f"audit rank {r}, score {s:.3f}, was {g}"
                           for r, s, g in zip(sus["rank"], sus["score"], sus["given_label"])]}
                 ).to_csv(files["corrections"], index=False)
    nb = suspect_neighbors(res, top)
    b0 = res.params["backbones"][0]
    suspect_sheet(sus.head(min(top, 24)), nb, files["suspects.png"],
                  title=f"top suspects (red) and their nearest neighbours in {b0} (orange: another label)")
    files["audit.json"].write_text(json.dumps({**res.params, "reused_models": res.reused,
                                               "computed_models": res.computed, "fits": res.fits}, indent=1, default=str))
    if html:
        from .html_report import audit_html

        files["report.html"] = audit_html(res, out / "report.html", top=top, neighbours=nb)
    return files


def suspect_neighbors(res: AuditResult, top: int, backbone: str | None = None) -> pd.DataFrame:
    """Neighbour rows (``query, rank, id, label, similarity, path``) of the ``top`` suspects."""
    b = backbone or res.params["backbones"][0]
    idx, sims = res.neighbors[b]
    rows = []
    ids, labels, paths = (res.obs[c].to_numpy() for c in ("id", "label", "path"))
    for pos in res.table.index[:top]:
        for r, (j, s) in enumerate(zip(idx[pos], sims[pos])):
            if j >= 0:
                rows.append((ids[pos], r + 1, ids[j], labels[j], float(s), paths[j]))
    return pd.DataFrame(rows, columns=["query", "rank", "id", "label", "similarity", "path"])


def relabel(store: Any, corrections: str | os.PathLike | pd.DataFrame, *, dataset: str | None = None,
            source: str | None = None, allow_new_labels: bool = False) -> int:
    """Apply reviewed corrections (CSV or table with ``id, new_label[, note]``) to the store's labels.

    History is kept and the original labels never change
    (:meth:`embedcache.store.Dataset.apply_corrections`); every later study and audit reads the
    new labels. A label no cell carries yet (a typo, usually) is refused unless
    ``allow_new_labels``; an id listed twice is refused. Returns how many labels changed.
    """
    import embedcache
    from embedcache.store import Store

    if not isinstance(corrections, pd.DataFrame):
        path = Path(corrections)
        if not path.is_file():
            raise ProbeError(f"corrections file not found: {corrections}")
        source = source or str(corrections)
        try:
            corrections = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ProbeError(f"cannot read corrections {corrections}: {e}") from e
    missing = [c for c in ("id", "new_label") if c not in corrections.columns]
    if missing:
        raise ProbeError(f"corrections need the columns id and new_label (missing: {', '.join(missing)}; "
                         f"has: {', '.join(map(str, corrections.columns))})")
    corr = corrections.astype(str)
    corr = corr.assign(id=corr["id"].str.strip(), new_label=corr["new_label"].str.strip())
    dup = corr["id"][corr["id"].duplicated()].unique()
    if len(dup):
        raise ProbeError(f"{len(dup)} id(s) appear more than once in the corrections: {', '.join(dup[:5])}")
    try:
        st = store if isinstance(store, Store) and store.mode != "r" else embedcache.open_store(
            store.url if isinstance(store, Store) else store, "r")
        ds = st.dataset(dataset)
        if not allow_new_labels:
            obs = ds.obs
            known = set(obs["label"]) | set(obs["label_original"])
            new = sorted(set(corr["new_label"]) - known - {""})
            if new:
                raise ProbeError(
                    f"new label(s) no cell carries: {', '.join(new[:5])} (known: {', '.join(sort_labels(known - {''}))}); "
                    "fix the typo, or pass --allow-new-labels to introduce a class"
                )
        return ds.apply_corrections(corr, source=source)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(str(e)) from e


def _default_name(backbones: Sequence[str]) -> str:
    slug = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", b).strip("-") for b in backbones)
    return f"audit-{slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _print_summary(res: AuditResult, top: int = 15) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    p = res.params
    t = Table(title=f"label audit: {p['n_cells']} cells, {p['n_models']} models "
                    f"({res.reused} reused, {res.computed} fitted), {p['scheme']} {p['folds']}-fold")
    for col in ("rank", "id", "given", "proposed", "votes", "consensus", "self-conf", "nbr disagr.", "score"):
        t.add_column(col)
    for r in res.table.head(top).itertuples(index=False):
        t.add_row(str(r.rank), str(r.id), str(r.given_label), str(r.proposed_label), f"{r.proposed_votes:.2f}",
                  f"{r.consensus:.2f}", f"{r.self_confidence:.2f}", f"{r.neighbor_disagreement:.2f}", f"{r.score:.3f}")
    console.print(t)
    console.print(p["formula"])
    for line in p.get("excluded", []):
        console.print(line)
    if p.get("cache"):
        console.print(f"out-of-fold cache: {p['cache']}")
    for name, path in res.files.items():
        if name != "oof":
            console.print(f"{name}: {path}")
