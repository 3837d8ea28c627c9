"""Approximate neighbour search for large feature sets: a FAISS IVF-PQ (or HNSW) candidate index,
built once per feature set and kept beside the store, whose candidates are re-ranked exactly.

The ANN index only proposes candidates: ``rerank`` of them per query are scored again by exact
cosine against the stored features, so every similarity returned is exact and only *which* cells
are found can differ from exhaustive search. How often it differs is measured: the recall@k of the
index (after re-ranking) against exact search on a sample of the indexed cells, left out of their
own answers, is computed when the index is built (and on request) and kept with it.

An index is keyed by a digest of the features it was built from (:func:`features_digest`: the
feature set's key, fingerprint, shape, the per-chunk checksums and the rows indexed) and by its
parameters, and kept as ``<store>.embedcache/probes/ann/<dataset>/<key>-<pool>-<params>-<digest>.faiss``
with a JSON record beside it (written last: no record, no index). A changed or extended feature
set has another digest, so a stale index is never read; building a new one removes the old files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from probes.errors import ProbeError
from probes.search.vectors import l2_normalize

INDEX_KINDS = ("auto", "exact", "ivf", "hnsw")
ANN_KINDS = ("ivf", "hnsw")
AUTO_EXACT_BELOW = 200_000  # `auto`: exact search for fewer cells than this, IVF-PQ from here on
ADD_BLOCK = 65536  # rows normalised and added (or scanned) at a time
RERANK_BLOCK = 64  # queries re-ranked at a time: bounds the (queries, rerank, D) float32 gather
RECALL_SAMPLE = 500  # indexed cells whose exact neighbours are the recall reference
RECALL_K = 20
DEFAULT_NPROBE = 32  # IVF lists visited per query (see benchmarks/neighbors_1m.py)
DEFAULT_EF = 128  # HNSW candidate list size per query
DEFAULT_RERANK = 200  # candidates per query re-ranked exactly
FORMAT = 1


@dataclass(frozen=True)
class AnnParams:
    """How an ANN index is built. IVF-PQ: ``nlist`` inverted lists, ``m`` PQ sub-quantizers of 4-bit codes
    (FAISS fast scan; ``m / 2`` bytes per cell), k-means on ``train`` rows; 0 means chosen from the number of
    cells and the width (:meth:`resolved`). HNSW: graph degree ``hnsw_m``, vectors stored as 8-bit scalars."""

    kind: str = "ivf"
    nlist: int = 0
    m: int = 0
    train: int = 0
    hnsw_m: int = 32
    seed: int = 0

    def resolved(self, n: int, dim: int) -> AnnParams:
        """The parameters with every automatic (0) value filled in for ``n`` cells of width ``dim``."""
        if self.kind not in ANN_KINDS:
            raise ProbeError(f"unknown ANN index '{self.kind}'; use one of: {', '.join(ANN_KINDS)}")
        if n < 2:
            raise ProbeError(f"an ANN index needs at least 2 cells, got {n}")
        if self.kind == "hnsw":
            return AnnParams("hnsw", hnsw_m=self.hnsw_m, train=min(n, self.train or 100_000), seed=self.seed)
        # about sqrt(n) lists (a power of two) of at least 39 training rows each (FAISS's minimum per centroid)
        nlist = self.nlist or max(1, min(2 ** round(math.log2(math.sqrt(n))), 4096, n // 39))
        m = self.m or _divisor_at_most(dim, max(1, dim // 8))
        if m < 1 or dim % m:
            raise ProbeError(f"PQ sub-quantizers m={m} must divide the feature width {dim}")
        train = min(n, self.train or max(64 * nlist, 50_000))
        return AnnParams("ivf", nlist=nlist, m=m, train=train, seed=self.seed)

    def factory(self) -> str:
        """The FAISS index-factory string (L2 over unit vectors ranks like cosine)."""
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}_SQ8"
        return f"IVF{self.nlist},PQ{self.m}x4fs"

    def tag(self) -> str:
        """Short file-name form of the parameters."""
        if self.kind == "hnsw":
            return f"hnsw{self.hnsw_m}-sq8-t{self.train}-s{self.seed}"
        return f"ivf{self.nlist}-pq{self.m}x4fs-t{self.train}-s{self.seed}"


def choose_kind(index: str, n: int | None, exact_below: int = AUTO_EXACT_BELOW) -> str:
    """``exact``, ``ivf`` or ``hnsw`` for the ``index`` asked for; ``auto`` is exact below ``exact_below`` cells
    (``n``; None: not known yet, ``auto`` is returned) and ``ivf`` from there on."""
    name = str(index).strip().lower()
    if name not in INDEX_KINDS:
        raise ProbeError(f"unknown neighbour index '{index}'; use one of: {', '.join(INDEX_KINDS)}")
    if name != "auto" or n is None:
        return name
    return "exact" if n < exact_below else "ivf"


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, cap + 1) if n % d == 0)


def features_digest(feature_set: Any, pool: str, rows: np.ndarray, x: np.ndarray | None = None) -> str:
    """sha256 (16 hex) naming the indexed features: set key, fingerprint, shape, dtype, the rows indexed and
    the per-chunk checksums of ``pool`` and of ok/error (any rewritten chunk changes it). Sets written before
    checksums existed are hashed from their values ``x`` instead."""
    fs = feature_set
    h = hashlib.sha256()
    arr = fs.array(pool)
    head = {
        "dataset": fs.dataset.name,
        "key": fs.key,
        "pool": pool,
        "fingerprint": fs.attrs.get("fingerprint"),
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    if fs.has_checksums:
        h.update(np.ascontiguousarray(fs.group[f"crc_{pool}"][:], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(fs.group["crc_rows"][:], dtype=np.int64).tobytes())
    else:
        if x is None:
            raise ProbeError(f"'{fs.key}' has no chunk checksums: pass its features to digest them")
        for start in range(0, len(x), ADD_BLOCK):
            h.update(np.ascontiguousarray(x[start : start + ADD_BLOCK]).tobytes())
    return h.hexdigest()[:16]


def index_url(feature_set: Any, pool: str, params: AnnParams, digest: str) -> str:
    """Where the ANN index of these features and parameters is kept (its ``.json`` record beside it)."""
    fs = feature_set
    return fs.dataset.store.side_url(
        "probes", "ann", _slug(fs.dataset.name), f"{index_prefix(fs, pool, params)}{digest}.faiss"
    )


def index_prefix(fs: Any, pool: str, params: AnnParams) -> str:
    """File-name start shared by the indexes of one feature set, pooling and parameters (any digest)."""
    return f"{_slug(fs.key)}-{_slug(pool)}-{params.tag()}-"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=]+", "_", str(s)).strip("_") or "_"


def _fs(url: str):
    import fsspec.core

    return fsspec.core.url_to_fs(url)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


@dataclass
class AnnIndex:
    """A FAISS candidate index over ``n`` unit vectors of width ``dim`` and what is known about it."""

    index: Any
    params: AnnParams
    n: int
    dim: int
    digest: str = ""
    build_s: float = 0.0
    recall: list[dict[str, Any]] = field(default_factory=list)  # measured recall@k, one entry per setting
    url: str | None = None  # where it is kept (None: not kept)
    loaded: bool = False  # read from ``url`` rather than built now
    note: str = ""  # why it was rebuilt or not kept

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, x: np.ndarray, params: AnnParams, *, digest: str = "", log: Callable[[str], None] | None = None
    ) -> AnnIndex:
        """Train on a random sample of ``x`` (rows normalised on the fly) and add every row, in blocks."""
        import faiss

        n, dim = x.shape
        p = params.resolved(n, dim)
        t0 = time.perf_counter()
        index = faiss.index_factory(dim, p.factory())
        rng = np.random.default_rng(p.seed)
        sample = np.sort(rng.choice(n, size=min(p.train, n), replace=False))
        if log:
            log(f"training {p.factory()} on {len(sample):,} of {n:,} cells")
        train = _unit(x[sample], first=0)
        if p.kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = p.seed
        index.train(train)
        del train
        for start in range(0, n, ADD_BLOCK):
            if log and start and start % (16 * ADD_BLOCK) == 0:
                log(f"added {start:,} of {n:,} cells")
            index.add(_unit(x[start : start + ADD_BLOCK], first=start))
        return cls(index, p, n, dim, digest=digest, build_s=time.perf_counter() - t0)

    # -- searching -----------------------------------------------------------------------------
    def candidates(self, q: np.ndarray, depth: int, *, nprobe: int | None = None, ef: int | None = None) -> np.ndarray:
        """Positions (len(q), depth) of the approximate nearest rows of unit queries ``q`` (-1: none)."""
        import faiss

        depth = min(int(depth), self.n)
        if self.params.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = max(1, min(int(nprobe or DEFAULT_NPROBE), ivf.nlist))
        else:
            self.index.hnsw.efSearch = max(int(ef or DEFAULT_EF), depth)
        _, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), depth)
        return idx

    def settings(self, nprobe: int | None, ef: int | None, rerank: int) -> dict[str, Any]:
        """The search settings as recorded with a recall measurement."""
        if self.params.kind == "ivf":
            return {"nprobe": int(nprobe or DEFAULT_NPROBE), "rerank": int(rerank)}
        return {"ef": int(ef or DEFAULT_EF), "rerank": int(rerank)}

    def describe(self) -> str:
        """One line: the index, its size and where it came from."""
        p = self.params
        what = p.factory() + (f" ({p.nlist} lists, {p.m} x 4-bit PQ codes)" if p.kind == "ivf" else "")
        if self.loaded:
            src = f"loaded from {self.url}"
        else:
            src = f"built in {self.build_s:.1f} s" + (
                f", kept at {self.url}" if self.url else f", not kept ({self.note or 'no store'})"
            )
        if self.note and (self.loaded or self.url):
            src += f"; {self.note}"
        return f"{what} over {self.n:,} cells, {src}"

    # -- keeping -------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "digest": self.digest,
            "params": asdict(self.params),
            "factory": self.params.factory(),
            "n": self.n,
            "dim": self.dim,
            "build_s": round(self.build_s, 3),
            "recall": self.recall,
        }

    def save(self, url: str, *, replace_prefix: str | None = None) -> None:
        """Write the index (temp file + rename) and then its JSON record; remove older indexes of the same
        feature set (files starting with ``replace_prefix`` and another digest)."""
        import faiss

        fs, path = _fs(url)
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            if _is_local(fs):
                faiss.write_index(self.index, tmp)
            else:
                fs.pipe_file(tmp, faiss.serialize_index(self.index).tobytes())
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
        self.url = url
        self.write_record()
        if replace_prefix:
            for old in fs.glob(f"{parent}/{replace_prefix}*"):
                name = str(old).rsplit("/", 1)[-1]
                if not name.startswith(path.rsplit("/", 1)[-1].rsplit(".", 1)[0]):
                    fs.rm(old)

    def write_record(self) -> None:
        """(Re)write the JSON record beside the kept index (e.g. after a new recall measurement)."""
        if not self.url:
            return
        fs, path = _fs(self.url)
        tmp = f"{path}.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, json.dumps(self.record(), indent=1).encode())
        fs.mv(tmp, path + ".json")

    @classmethod
    def load(cls, url: str, *, digest: str, n: int, dim: int) -> AnnIndex | None:
        """The index kept at ``url`` when its record names ``digest``, ``n`` and ``dim``; None when there is
        none. A record that does not match, or an unreadable index, is an error (the caller rebuilds)."""
        import faiss

        fs, path = _fs(url)
        if not fs.exists(path + ".json") or not fs.exists(path):
            return None
        rec = json.loads(fs.cat_file(path + ".json"))
        if rec.get("format") != FORMAT or rec.get("digest") != digest or rec.get("n") != n or rec.get("dim") != dim:
            raise ProbeError(f"the index record at {url}.json does not match these features")
        if _is_local(fs):
            index = faiss.read_index(path)
        else:
            index = faiss.deserialize_index(np.frombuffer(fs.cat_file(path), dtype=np.uint8))
        if index.ntotal != n or index.d != dim:
            raise ProbeError(f"the index at {url} holds {index.ntotal} x {index.d} vectors, not {n} x {dim}")
        params = AnnParams(**rec["params"])
        return cls(
            index, params, n, dim, digest=digest, build_s=float(rec["build_s"]), recall=list(rec["recall"]),
            url=url, loaded=True,
        )  # fmt: skip


def _unit(block: np.ndarray, first: int) -> np.ndarray:
    """``block`` as unit float32 rows; a NaN/inf row is an error naming its position."""
    u = l2_normalize(block)
    if not np.isfinite(u).all():
        bad = first + int(np.flatnonzero(~np.isfinite(u).all(axis=1))[0])
        raise ProbeError(f"feature row {bad} holds NaN or inf; a neighbour index needs finite features")
    return u


def rerank(
    x: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (cosine, positions) of unit queries ``q`` among candidate rows ``cand`` of ``x``
    (raw features, normalised here as the exact index normalises them). ``cand`` -1 and ``exclude[i]``
    are left out; rows with fewer answers are padded with -1 / NaN."""
    nq, depth = cand.shape
    sims_out = np.full((nq, k), np.nan, dtype=np.float32)
    idx_out = np.full((nq, k), -1, dtype=np.int64)
    for s in range(0, nq, RERANK_BLOCK):
        c = cand[s : s + RERANK_BLOCK]
        valid = c >= 0
        if exclude is not None:
            valid &= c != exclude[s : s + RERANK_BLOCK, None]
        rows = l2_normalize(x[np.where(valid, c, 0).reshape(-1)]).reshape(len(c), depth, -1)
        sims = np.einsum("qd,qrd->qr", q[s : s + RERANK_BLOCK], rows)
        sims = np.where(valid, sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(sims, order, 1)
        ok = np.isfinite(best)
        w = order.shape[1]
        idx_out[s : s + len(c), :w] = np.where(ok, np.take_along_axis(c, order, 1), -1)
        sims_out[s : s + len(c), :w] = np.where(ok, best, np.nan)
    return sims_out, idx_out


def exact_topk(
    x: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive top-``k`` (cosine, positions) of unit queries ``q`` over raw rows ``x``, scanned in blocks
    (rows normalised per block: never a full float32 copy). ``exclude[i]`` is left out of query ``i``."""
    nq = len(q)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.full((nq, 0), -1, dtype=np.int64)
    for start in range(0, len(x), ADD_BLOCK):
        block = l2_normalize(x[start : start + ADD_BLOCK])
        s = q @ block.T
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < len(block))
            s[np.flatnonzero(hit), local[hit]] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (positions; -1 entries ignored)."""
    hits = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth)
    ]
    return float(np.mean(hits)) if hits else float("nan")
