"""The data-set audit (duplicates, leaks, outliers) against cleanlab's Datalab, on real cells with planted issues.

Cells: ``--cells`` (20,000) real Chula RBC-12 cells, a stratified (by class) subsample of the 22,106, seed
``--seed``. Split: grouped by smear, about 20% of the cells' smears in ``test`` (whole smears), the rest in
``train``, written as the manifest's ``split`` column. Planted issues, each a new file in the work folder:

* **near-duplicate copies**, ``--dup-rate`` (1%) of the cells, an equal share of each kind: ``jpeg`` (the
  decoded cell re-encoded as JPEG at quality 75, 85 or 90, drawn per copy; the originals are JPEG q95),
  ``flip`` (mirrored left-right, saved as PNG) and ``shift`` (moved 1-2 px along x and/or y, at least one
  of them by the drawn amount, the uncovered edge filled by reflection, PNG);
* **exact copies**, ``--exact-rate`` (0.2%): the decoded pixels re-saved as PNG (other bytes, the same
  pixels: what the pixel digest recorded at extraction is for);
* every copy is of a different original, carries its label, a smear id of its own (it came in by another
  route) and the *other* part of the split than its original (each copy is a train/test leak);
* **outliers**, ``--outlier-rate`` (1%): BCCD platelets and white cells (``bccd_cells``, half each),
  resized to 64x64 and saved as JPEG q95 like the Chula cells, each given a Chula class drawn with the
  classes' frequencies, a random part (80/20) and group ``bccd``.

Everything is extracted once with ``efficientnet-lite0`` (ImageNet weights, "mean" pool) into a store in the
work folder (``--work``); a rerun finds the planted files and the complete store and only audits.

Methods, on the same features (float32, one row per cell):

* **ours**: :func:`probes.studies.audit.data_issues.data_issues` with the pixel digests extraction recorded,
  the labels, the split and the groups, default threshold (cosine 0.97) and k (20);
* **Datalab**: ``cleanlab.Datalab(data={"label": labels}, label_name="label").find_issues(features=X,
  issue_types={"near_duplicate": {}, "outlier": {}})`` with its defaults (cosine kNN graph, k = 10).

Both timed on the same ``--threads`` (BLAS/OpenMP via ``limit_threads``, FAISS's OpenMP set to the same
count); reading the features is not timed for either.

What counts as found:

* **duplicates, ranked** (threshold-free): each method ranks *pairs* of cells. Ours: pixel-digest pairs
  first, then feature pairs (cosine >= threshold) by cosine, then every cell paired with its nearest cell
  outside its duplicate set (``Outliers.neighbors``) by that cosine. Datalab: the edges of its kNN graph
  by distance (its near-duplicate score is a monotone function of the first). With m = planted copies,
  a true positive is a planted (copy, original) pair among the top m distinct pairs; precision at m =
  TP / m = recall at m (one count, reported once as both); recall at m is also given per kind of copy.
* **duplicates, flagged** (each method's own threshold): ours, every pair it reports (``pairs``);
  Datalab, every pair (i, j) with j in ``near_duplicate_sets[i]``. Precision = planted pairs among them /
  pairs flagged; recall = planted pairs flagged / m.
* **leaks** (flagged): a cell is a planted leak when it is a copy or the original of one (each pair lies
  across the split). Ours reports the cells of duplicate sets spanning both parts (``Leaks.cells
  .leak_duplicate``); Datalab has no split check, so its leaks are the cells with a near-duplicate (its
  ``near_duplicate_sets``) in the other part. Precision / recall over cells; ``precision_verified`` also
  counts an unplanted reported cell when one of the method's flagged pairs across the split holding it is
  the same cell (the check below).
* **outliers**: with m = planted outliers, TP = planted outliers among the m cells ranked most outlying
  (ours: ``score``, the kNN distance over its class median; Datalab: lowest ``outlier_score``), and among
  the cells each flags (ours ``flag``; Datalab ``is_outlier_issue``).

Chula itself holds real near-duplicates (one field re-cropped under two smear ids, see the module
docstring of :mod:`probes.studies.audit.data_issues`), which count as false positives above. For every
flagged pair that is not planted, the script checks whether its two images are the same cell (grey-level
mean absolute difference < 3 after the best alignment within 12 px) and reports the precision counting
those as found too (``precision_verified``).

Intervals: 95% Wilson score intervals of each proportion (binomial, the count over its denominator).

    python benchmarks/data_issues.py                 # the reported run: ~10 min extraction once, then the audits
    python benchmarks/data_issues.py --quick         # a smoke test: a few hundred cells, seconds once extracted

Writes ``benchmarks/results/data_issues-cpu.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedcache.backbones.devices import cpu_has_native_bf16, cpu_model  # noqa: E402
from probes.engine.threads import limit_threads  # noqa: E402

SHARED = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "efficientnet-lite0"
POOL = "mean"
NEAR_KINDS = ("jpeg", "flip", "shift")
JPEG_QUALITIES = (75, 85, 90)
SAME_CELL_GREY = 3.0  # mean |grey difference| below which two aligned images are the same cell
SAME_CELL_SHIFT = 12  # pixels searched either way when aligning two images


# -- the planted data set -----------------------------------------------------------------------------
def _decode(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _save(pixels: np.ndarray, path: Path, quality: int | None = None) -> None:
    from PIL import Image

    im = Image.fromarray(pixels)
    if quality is None:
        im.save(path, format="PNG")
    else:
        im.save(path, format="JPEG", quality=quality)


def _shift(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) px, the uncovered edge filled by reflection; same size."""
    p = max(abs(dy), abs(dx))
    padded = np.pad(pixels, ((p, p), (p, p), (0, 0)), mode="reflect")
    h, w = pixels.shape[:2]
    return padded[p - dy : p - dy + h, p - dx : p - dx + w]


def _group_split(groups: np.ndarray, rng: np.random.Generator, test: float = 0.2) -> np.ndarray:
    """Per cell "train" or "test": whole groups in test until they hold >= ``test`` of the cells."""
    names, counts = np.unique(groups, return_counts=True)
    order = rng.permutation(len(names))
    cum = np.cumsum(counts[order])
    n_test = int(np.searchsorted(cum, test * len(groups)) + 1)
    in_test = set(names[order[:n_test]].tolist())
    return np.where(np.isin(groups, list(in_test)), "test", "train")


def plant(work: Path, cells: int, seed: int, dup_rate: float, exact_rate: float, outlier_rate: float) -> pd.DataFrame:
    """Write (or find) the planted files and ``cells.csv`` (the manifest) + ``truth.csv`` in ``work``; returns
    the truth table, one row per manifest row: ``path, label, group, split, kind`` (``original``, ``exact``,
    ``jpeg``, ``flip``, ``shift``, ``outlier``), ``source`` (the copied row, -1), ``detail``."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    truth_csv = work / "truth.csv"
    if truth_csv.exists() and (work / "cells.csv").exists():
        truth = pd.read_csv(truth_csv, dtype={"group": str, "detail": str}, keep_default_na=False)
        if all(Path(p).exists() for p in truth["path"]):
            return truth
    root = SHARED / "chula_rbc12"
    bccd = SHARED / "bccd_cells"
    for need in (root, bccd):
        if not need.is_dir():
            sys.exit(f"real cells not found at {need} (set EMBEDCACHE_SHARED_DATA)")
    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    df = pd.read_csv(root / "manifest.csv", dtype=str)
    if 0 < cells < len(df):
        df, _ = train_test_split(df, train_size=cells, stratify=df["label_name"], random_state=seed)
    df = df.sort_values("path").reset_index(drop=True)
    base = pd.DataFrame(
        {
            "path": [str(root / p) for p in df["path"]],
            "label": df["label_name"].to_numpy(),
            "group": "smear-" + df["smear"].astype(str),
        }
    )
    base["split"] = _group_split(base["group"].to_numpy(), rng)
    base["kind"], base["source"], base["detail"] = "original", -1, ""
    n = len(base)

    n_near, n_exact, n_out = round(dup_rate * n), round(exact_rate * n), round(outlier_rate * n)
    sources = rng.choice(n, size=n_near + n_exact, replace=False)
    kinds = ["exact"] * n_exact + [NEAR_KINDS[i % len(NEAR_KINDS)] for i in range(n_near)]
    rows = []
    for c, (src, kind) in enumerate(zip(sources.tolist(), kinds)):
        pixels = _decode(base.at[src, "path"])
        detail, quality = "", None
        if kind == "exact":
            out = pixels
        elif kind == "jpeg":
            quality = int(rng.choice(JPEG_QUALITIES))
            out, detail = pixels, f"q{quality}"
        elif kind == "flip":
            out, detail = pixels[:, ::-1], "horizontal"
        else:
            amount = int(rng.integers(1, 3))
            axes = [(amount, 0), (0, amount), (amount, amount)][int(rng.integers(3))]
            dy, dx = (a * int(rng.choice([-1, 1])) for a in axes)
            out, detail = _shift(pixels, dy, dx), f"dy={dy} dx={dx}"
        path = files / f"copy{c:05d}-{kind}.{'jpg' if quality else 'png'}"
        _save(np.ascontiguousarray(out), path, quality)
        rows.append(
            {
                "path": str(path),
                "label": base.at[src, "label"],
                "group": f"copy-{c:05d}",
                "split": "test" if base.at[src, "split"] == "train" else "train",
                "kind": kind,
                "source": src,
                "detail": detail,
            }
        )

    foreign = []
    for cls, count in (("Platelets", n_out // 2), ("WBC", n_out - n_out // 2)):
        pool = sorted((bccd / cls).glob("*.jpg"))
        foreign += [(cls, pool[i]) for i in rng.choice(len(pool), size=count, replace=False)]
    freq = base["label"].value_counts(normalize=True)
    for o, (cls, src_path) in enumerate(foreign):
        with Image.open(src_path) as im:
            small = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
        path = files / f"outlier{o:04d}-{cls}.jpg"
        _save(small, path, 95)
        rows.append(
            {
                "path": str(path),
                "label": str(rng.choice(freq.index.to_numpy(), p=freq.to_numpy())),
                "group": "bccd",
                "split": "test" if rng.random() < 0.2 else "train",
                "kind": "outlier",
                "source": -1,
                "detail": f"bccd {cls} {src_path.name}",
            }
        )
    truth = pd.concat([base, pd.DataFrame(rows)], ignore_index=True)
    truth[["path", "label", "group", "split"]].to_csv(work / "cells.csv", index=False)
    truth.to_csv(truth_csv, index=False)
    return truth


def features(work: Path, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, float]:
    """(features (n, d) float32 in the truth's row order, pixel digests, extraction seconds of this call);
    extracts into ``work/cache.zarr`` or reuses it."""
    import embedcache

    t0 = time.perf_counter()
    store = work / "cache.zarr"
    fs = None
    if store.exists():  # a complete store is read as it is (extract would load the model to find it complete)
        with contextlib.suppress(Exception):
            ds = embedcache.open_store(store).dataset()
            fs = ds.find_feature_set(MODEL)
            if len(ds.obs) != len(truth) or not fs.ok().all():
                fs = None
    if fs is None:
        r = embedcache.extract(MODEL, work / "cells.csv", store, progress=False, chunk_size=512)
        ds = embedcache.open_store(store).dataset(r.dataset)
        fs = ds.feature_set(r.key)
    seconds = time.perf_counter() - t0
    if not fs.ok().all():
        sys.exit(f"{int((~fs.ok()).sum())} cells could not be read: remove {work} and rerun")
    order = pd.Series(np.arange(len(ds.obs)), index=ds.obs["path"].astype(str).to_numpy())
    rows = order.loc[truth["path"].to_numpy()].to_numpy()
    return fs.to_numpy(POOL)[rows], fs.pixel_digests()[rows], seconds


# -- scoring ------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of k successes in n trials ([nan, nan] for n = 0)."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion(k: int, n: int) -> dict[str, Any]:
    return {"value": k / n if n else math.nan, "k": int(k), "n": int(n), "ci95": wilson(int(k), int(n))}


def _key(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    return np.minimum(i, j) * (1 << 32) + np.maximum(i, j)


def _unique_ordered(keys: np.ndarray) -> np.ndarray:
    _, first = np.unique(keys, return_index=True)
    return keys[np.sort(first)]


def same_cell(a: np.ndarray, b: np.ndarray, shift: int = SAME_CELL_SHIFT) -> float:
    """Smallest mean |grey difference| of two images over alignments within ``shift`` px (overlap >= half)."""
    ga, gb = a.astype(np.float32).mean(axis=2), b.astype(np.float32).mean(axis=2)
    h, w = ga.shape
    best = math.inf
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            ya, yb = max(0, dy), max(0, -dy)
            xa, xb = max(0, dx), max(0, -dx)
            hh, ww = h - abs(dy), w - abs(dx)
            if hh * ww < h * w // 2:
                continue
            d = float(np.abs(ga[ya : ya + hh, xa : xa + ww] - gb[yb : yb + hh, xb : xb + ww]).mean())
            best = min(best, d)
    return best


class Verifier:
    """Whether a non-planted pair is the same cell (cached over methods)."""

    def __init__(self, paths: np.ndarray):
        self.paths = paths
        self.cache: dict[int, bool] = {}

    def __call__(self, keys: np.ndarray) -> int:
        hits = 0
        for key in keys.tolist():
            if key not in self.cache:
                i, j = divmod(int(key), 1 << 32)
                a, b = _decode(self.paths[i]), _decode(self.paths[j])
                self.cache[key] = a.shape == b.shape and same_cell(a, b) < SAME_CELL_GREY
            hits += self.cache[key]
        return hits


def score_duplicates(ranked: np.ndarray, flagged: np.ndarray, truth: pd.DataFrame, verify: Verifier) -> dict:
    """Figures of one method's duplicate pairs: ``ranked`` (pair keys, best first) and ``flagged`` (pair keys)."""
    copies = truth.index[truth["source"] >= 0].to_numpy()
    planted = _key(copies, truth.loc[copies, "source"].to_numpy())
    kind_of = dict(zip(planted.tolist(), truth.loc[copies, "kind"].tolist()))
    m = len(planted)
    top = _unique_ordered(ranked)[:m]
    hit = np.isin(top, planted)
    tp = int(hit.sum())
    by_kind = {}
    for kind in ("exact", *NEAR_KINDS):
        want = np.array([k for k, v in kind_of.items() if v == kind], dtype=np.int64)
        by_kind[kind] = proportion(int(np.isin(want, top).sum()), len(want))
    flagged = np.unique(flagged)
    f_hit = np.isin(flagged, planted)
    f_tp = int(f_hit.sum())
    natural = verify(flagged[~f_hit])
    flagged_by_kind = {}
    for kind in ("exact", *NEAR_KINDS):
        want = np.array([k for k, v in kind_of.items() if v == kind], dtype=np.int64)
        flagged_by_kind[kind] = proportion(int(np.isin(want, flagged).sum()), len(want))
    return {
        "planted_pairs": m,
        "at_m": {"precision": proportion(tp, m), "recall": proportion(tp, m), "recall_by_kind": by_kind},
        "flagged": {
            "pairs": len(flagged),
            "precision": proportion(f_tp, len(flagged)),
            "recall": proportion(f_tp, m),
            "recall_by_kind": flagged_by_kind,
            "unplanted_same_cell": natural,
            "precision_verified": proportion(f_tp + natural, len(flagged)),
        },
    }


def score_leaks(reported: np.ndarray, flagged: np.ndarray, truth: pd.DataFrame, verify: Verifier) -> dict:
    """Cell-level leak figures: ``reported`` a boolean per cell; ``flagged`` the method's duplicate pair keys
    (an unplanted reported cell counts in ``precision_verified`` when one of its flagged pairs across the split
    is the same cell by :func:`same_cell`)."""
    copies = truth.index[truth["source"] >= 0].to_numpy()
    planted = np.zeros(len(truth), dtype=bool)
    planted[copies] = True
    planted[truth.loc[copies, "source"].to_numpy(np.int64)] = True
    tp = int((reported & planted).sum())
    parts = truth["split"].to_numpy()
    same = np.zeros(len(truth), dtype=bool)
    for key in np.unique(flagged).tolist():
        i, j = divmod(int(key), 1 << 32)
        if parts[i] != parts[j] and not (planted[i] and planted[j]) and verify(np.array([key])):
            same[[i, j]] = True
    extra = int((reported & ~planted & same).sum())
    return {
        "planted_cells": int(planted.sum()),
        "reported_cells": int(reported.sum()),
        "precision": proportion(tp, int(reported.sum())),
        "precision_verified": proportion(tp + extra, int(reported.sum())),
        "recall": proportion(tp, int(planted.sum())),
    }


def score_outliers(order: np.ndarray, flagged: np.ndarray, truth: pd.DataFrame) -> dict:
    """Outlier figures: ``order`` cell positions most outlying first, ``flagged`` boolean per cell."""
    from sklearn.metrics import roc_auc_score

    planted = (truth["kind"] == "outlier").to_numpy()
    m = int(planted.sum())
    tp = int(planted[order[:m]].sum())
    rank_score = np.empty(len(order))
    rank_score[order] = -np.arange(len(order), dtype=np.float64)
    f_tp = int((flagged & planted).sum())
    by_source = {}
    for cls in ("Platelets", "WBC"):
        mine = planted & truth["detail"].str.contains(f" {cls} ").to_numpy()
        by_source[cls] = proportion(int(mine[order[:m]].sum()), int(mine.sum()))
    return {
        "planted": m,
        "at_m": {"precision": proportion(tp, m), "recall": proportion(tp, m), "recall_by_source": by_source},
        "flagged": {
            "cells": int(flagged.sum()),
            "precision": proportion(f_tp, int(flagged.sum())),
            "recall": proportion(f_tp, m),
        },
        "auroc": float(roc_auc_score(planted, rank_score)),
    }


# -- the two methods ------------------------------------------------------------------------------------
def run_ours(X: np.ndarray, hashes: np.ndarray, truth: pd.DataFrame) -> tuple[Any, float]:
    from probes.studies.audit.data_issues import data_issues

    ids = np.array([f"c{i}" for i in range(len(truth))])
    t0 = time.perf_counter()
    res = data_issues(
        X,
        ids,
        labels=truth["label"].to_numpy(),
        parts=truth["split"].to_numpy(),
        groups=truth["group"].to_numpy(),
        hashes=hashes,
    )
    return res, time.perf_counter() - t0


def ours_pairs(res: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ranked pair keys, flagged pair keys) of our result (see the module docstring)."""
    p = res.duplicates.pairs
    pixel = (p["evidence"] == "pixel").to_numpy()
    sim = p["similarity"].fillna(1.0).to_numpy()
    order = np.lexsort((-sim, ~pixel))
    flagged = _key(p["i"].to_numpy(), p["j"].to_numpy())
    nn_i = np.arange(len(res.outliers.neighbors))
    nn_j = res.outliers.neighbors[:, 0]
    nn_s = np.nan_to_num(res.outliers.similarities[:, 0], nan=-np.inf)
    ok = nn_j >= 0
    nearest = np.argsort(-nn_s[ok], kind="stable")
    rest = _key(nn_i[ok][nearest], nn_j[ok][nearest])
    return np.concatenate([flagged[order], rest]), flagged


def run_datalab(X: np.ndarray, labels: np.ndarray) -> tuple[Any, float]:
    from cleanlab import Datalab

    t0 = time.perf_counter()
    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    with contextlib.redirect_stdout(io.StringIO()):
        lab.find_issues(features=X, issue_types={"near_duplicate": {}, "outlier": {}})
    return lab, time.perf_counter() - t0


def datalab_pairs(lab: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ranked pair keys: kNN-graph edges by distance, flagged pair keys: its near-duplicate sets)."""
    graph = lab.get_info("statistics")["weighted_knn_graph"].tocoo()
    order = np.lexsort((graph.col, graph.row, graph.data))
    ranked = _key(graph.row[order], graph.col[order])
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    i = np.concatenate([np.full(len(s), a, dtype=np.int64) for a, s in enumerate(sets)] + [np.zeros(0, np.int64)])
    j = np.concatenate([np.asarray(s, dtype=np.int64) for s in sets] + [np.zeros(0, np.int64)])
    return ranked, _key(i, j)


def datalab_leaks(lab: Any, parts: np.ndarray) -> np.ndarray:
    """Per cell: a near-duplicate of it (Datalab's sets) lies in another part."""
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    return np.array([bool((parts[np.asarray(s, dtype=np.int64)] != parts[a]).any()) for a, s in enumerate(sets)])


# -- report ---------------------------------------------------------------------------------------------
def _fmt(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{p['value']:.3f} [{lo:.2f}, {hi:.2f}]" if p["n"] else "n/a"


def table(doc: dict) -> str:
    """The markdown table of the JSON's figures (ours / Datalab)."""
    methods = [m for m in ("ours", "datalab") if m in doc["methods"]]
    head = "| issue | figure | " + " | ".join(methods) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]

    def row(issue: str, name: str, get) -> None:
        lines.append(f"| {issue} | {name} | " + " | ".join(get(doc["methods"][m]) for m in methods) + " |")

    d, o, lk = "duplicates", "outliers", "leaks"
    row(d, "precision = recall at m (top m pairs)", lambda r: _fmt(r[d]["at_m"]["precision"]))
    for kind in ("exact", *NEAR_KINDS):
        row(d, f"recall at m, {kind} copies", lambda r, k=kind: _fmt(r[d]["at_m"]["recall_by_kind"][k]))
    row(d, "flagged pairs", lambda r: str(r[d]["flagged"]["pairs"]))
    row(d, "precision of flagged pairs", lambda r: _fmt(r[d]["flagged"]["precision"]))
    row(d, "precision, same-cell unplanted pairs counted", lambda r: _fmt(r[d]["flagged"]["precision_verified"]))
    row(d, "recall of flagged pairs", lambda r: _fmt(r[d]["flagged"]["recall"]))
    for kind in ("exact", *NEAR_KINDS):
        row(d, f"recall flagged, {kind} copies", lambda r, k=kind: _fmt(r[d]["flagged"]["recall_by_kind"][k]))
    row(lk, "cells reported", lambda r: str(r[lk]["reported_cells"]))
    row(lk, "precision (cells)", lambda r: _fmt(r[lk]["precision"]))
    row(lk, "precision, same-cell unplanted leaks counted", lambda r: _fmt(r[lk]["precision_verified"]))
    row(lk, "recall (cells)", lambda r: _fmt(r[lk]["recall"]))
    row(o, "precision = recall at m (top m cells)", lambda r: _fmt(r[o]["at_m"]["precision"]))
    for src in ("Platelets", "WBC"):
        row(o, f"recall at m, {src}", lambda r, s=src: _fmt(r[o]["at_m"]["recall_by_source"][s]))
    row(o, "AUROC", lambda r: f"{r[o]['auroc']:.3f}")
    row(o, "flagged cells", lambda r: str(r[o]["flagged"]["cells"]))
    row(o, "precision of flagged", lambda r: _fmt(r[o]["flagged"]["precision"]))
    row(o, "recall of flagged", lambda r: _fmt(r[o]["flagged"]["recall"]))
    row("all", "wall time, s", lambda r: f"{r['seconds']:.2f}")
    return "\n".join(lines)


def goals(doc: dict) -> dict[str, Any]:
    """Ours >= Datalab on recall and precision per issue type (at m and flagged), and faster."""
    if "datalab" not in doc["methods"]:
        return {}
    ours, lab = doc["methods"]["ours"], doc["methods"]["datalab"]
    out: dict[str, Any] = {}
    for issue, figs in (
        ("duplicates", (("at_m", "precision"), ("at_m", "recall"), ("flagged", "precision"), ("flagged", "recall"))),
        ("leaks", ((None, "precision"), (None, "recall"))),
        ("outliers", (("at_m", "precision"), ("at_m", "recall"), ("flagged", "precision"), ("flagged", "recall"))),
    ):
        for where, fig in figs:
            a = ours[issue][where][fig] if where else ours[issue][fig]
            b = lab[issue][where][fig] if where else lab[issue][fig]
            name = f"{issue}:{where + ':' if where else ''}{fig}"
            out[name] = {"ours": a["value"], "datalab": b["value"], "met": bool(a["value"] >= b["value"] - 1e-12)}
    out["faster"] = {"ours_s": ours["seconds"], "datalab_s": lab["seconds"], "met": ours["seconds"] < lab["seconds"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=None, help="Chula cells (20,000; quick 400)")
    ap.add_argument("--dup-rate", type=float, default=0.01, help="near-duplicate copies, share of --cells")
    ap.add_argument("--exact-rate", type=float, default=0.002, help="pixel-identical copies, share of --cells")
    ap.add_argument("--outlier-rate", type=float, default=0.01, help="foreign cells, share of --cells")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS/OpenMP/FAISS threads, both")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-work/data_issues"))
    ap.add_argument("--no-datalab", action="store_true", help="ours only")
    ap.add_argument("--quick", action="store_true", help="smoke test: 400 cells, 3%% copies and outliers, 1%% exact")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/data_issues-cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.cells = args.cells or 400
        args.dup_rate, args.exact_rate, args.outlier_rate = 0.03, 0.01, 0.03
    args.cells = args.cells or 20_000
    out = args.out or RESULTS / ("data_issues-cpu-quick.json" if args.quick else "data_issues-cpu.json")
    work = args.work / f"n{args.cells}-seed{args.seed}-d{args.dup_rate:g}-e{args.exact_rate:g}-o{args.outlier_rate:g}"
    work.mkdir(parents=True, exist_ok=True)

    import faiss

    cpu, bf16 = cpu_model(), cpu_has_native_bf16()
    load_start = os.getloadavg()
    print(f"CPU: {cpu} ({os.cpu_count()} cores, {args.threads} threads each method, native bf16: {bf16})")
    t0 = time.perf_counter()
    truth = plant(work, args.cells, args.seed, args.dup_rate, args.exact_rate, args.outlier_rate)
    counts = truth["kind"].value_counts().to_dict()
    print(f"work folder {work}: {len(truth)} cells, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    X, hashes, extract_s = features(work, truth)
    print(f"features {X.shape} from {MODEL} ({POOL} pool); plant + extract {time.perf_counter() - t0:.0f} s")
    exact = truth.index[truth["kind"] == "exact"].to_numpy()
    same_digest = int((hashes[exact] == hashes[truth.loc[exact, "source"].to_numpy(np.int64)]).sum())

    try:
        import cleanlab

        have_cleanlab = not args.no_datalab
    except ImportError:
        have_cleanlab = False
    labels = truth["label"].to_numpy()
    parts = truth["split"].to_numpy()
    verify = Verifier(truth["path"].to_numpy())
    methods: dict[str, dict] = {}
    faiss_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(args.threads)
    try:
        with limit_threads(args.threads):
            res, ours_s = run_ours(X, hashes, truth)
            lab, lab_s = run_datalab(X, labels) if have_cleanlab else (None, math.nan)
    finally:
        faiss.omp_set_num_threads(faiss_before)
    ranked, flagged = ours_pairs(res)
    methods["ours"] = {
        "seconds": ours_s,
        "duplicates": score_duplicates(ranked, flagged, truth, verify),
        "leaks": score_leaks(res.leaks.cells["leak_duplicate"].to_numpy(bool), flagged, truth, verify),
        "outliers": score_outliers(
            res.outliers.ranking().index.to_numpy(), res.outliers.cells["flag"].to_numpy(bool), truth
        ),
    }
    if lab is not None:
        ranked, flagged = datalab_pairs(lab)
        out_issues = lab.get_issues("outlier")
        methods["datalab"] = {
            "seconds": lab_s,
            "duplicates": score_duplicates(ranked, flagged, truth, verify),
            "leaks": score_leaks(datalab_leaks(lab, parts), flagged, truth, verify),
            "outliers": score_outliers(
                np.argsort(out_issues["outlier_score"].to_numpy(), kind="stable"),
                out_issues["is_outlier_issue"].to_numpy(bool),
                truth,
            ),
        }
    doc = {
        "benchmark": "data_issues",
        "cpu": cpu,
        "cpu_native_bf16": bf16,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "quick": args.quick,
        "cells": args.cells,
        "total_cells": len(truth),
        "planted": {k: int(v) for k, v in counts.items() if k != "original"},
        "exact_copies_with_equal_digest": same_digest,
        "model": MODEL,
        "pool": POOL,
        "feature_dim": int(X.shape[1]),
        "seed": args.seed,
        "jpeg_qualities": list(JPEG_QUALITIES),
        "work": str(work),
        "extract_seconds_this_run": extract_s,
        "intervals": "95% Wilson score intervals (binomial: the count over its denominator)",
        "same_cell_check": f"mean |grey difference| < {SAME_CELL_GREY} at the best alignment within "
        f"{SAME_CELL_SHIFT} px",
        "cleanlab": cleanlab.__version__ if have_cleanlab else None,
        "datalab_call": 'Datalab(data={"label": labels}, label_name="label").find_issues(features=X, '
        'issue_types={"near_duplicate": {}, "outlier": {}})',
        "methods": methods,
    }
    if "datalab" in methods:
        doc["speed_ratio_datalab_over_ours"] = lab_s / ours_s
    doc["goals"] = goals(doc)
    doc["table"] = table(doc)
    print(doc["table"])
    if "datalab" in methods:
        print(f"ours {ours_s:.2f} s, Datalab {lab_s:.2f} s: ours {lab_s / ours_s:.1f}x faster")
        missed = [k for k, v in doc["goals"].items() if not v["met"]]
        print("goals met: all" if not missed else f"goals missed: {', '.join(missed)}")
    print(f"load average at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
