"""``knn`` / ``knn1``: cosine k-nearest-neighbour vote, as in DINO's kNN evaluation.

Rows are L2-normalised; neighbours are maximum inner product (FAISS ``IndexFlatIP``, or matmul +
top-k in torch); neighbour j of a query votes ``exp(sim_j / T)`` for its class (1 when
``weighted=False``); ``predict_proba`` is the normalised class scores.

On CPUs with native bfloat16 dot products (``avx512_bf16`` / ``amx_bf16``: recent Xeon and EPYC)
the default search is a **bf16 candidate search with an exact re-rank**: the similarity matrix
is computed in bfloat16 (about 4x the float32 matmul speed there), the best ``max(2k, k + 32)``
candidates of each query are re-scored exactly in float32, and the best ``k`` of those are the
neighbours, with exact float32 similarities. A query whose k-th neighbour is not clear of the
last candidate by twice the largest bf16 error seen on its candidates is searched again
exactly in float32 (``exact_fallbacks_`` counts them). The result equals exact search unless
bf16 errs on some row by more than twice the worst error seen among that query's candidates.
``precision="float32"`` searches exactly everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from embedcache.backbones.devices import resolve_device
from probes.features.chunked import is_chunked
from probes.heads.base import BF16_MIN_WORK, CHUNK, ProbeBase, cpu_has_native_bf16, encode_labels, importable
from probes.search.exact import exact_search
from probes.search.vectors import RESCORE_EXTRA, flat_vectors, l2_normalize, pair_dots, rescored_topk

BACKENDS = ("auto", "faiss", "torch")
PRECISIONS = ("auto", "float32", "bfloat16")
SCORE_BUDGET = 1 << 27  # similarity entries per query batch (bf16: 256 MiB)


def _exact_dots_torch(q: torch.Tensor, train: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """``q_i . train[cand[i, j]]`` (b, m) in float32 (gathers the candidate rows)."""
    return torch.bmm(train[cand], q[:, :, None])[..., 0]


def _exact_dots_faiss(q: torch.Tensor, train: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """The same with faiss's fused per-pair products (:func:`probes.search.vectors.pair_dots`; CPU)."""
    return torch.from_numpy(pair_dots(q.numpy(), train.numpy(), cand.numpy()))


def n_candidates(k: int, n_train: int) -> int:
    """Candidates re-ranked exactly after a bf16 search: ``max(2k, k + 32)``, at most ``n_train``."""
    return min(n_train, max(2 * k, k + 32))


def normalized_centred_bf16(
    raw: torch.Tensor, inv_norms: torch.Tensor, mu: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """``raw / |raw| - mu`` (rows) rounded to bfloat16, in row chunks (no float32 copy of the matrix)."""
    out = torch.empty(raw.shape, dtype=torch.bfloat16, device=raw.device)
    for i in range(0, len(raw), chunk):
        out[i : i + chunk] = raw[i : i + chunk] * inv_norms[i : i + chunk, None] - mu
    return out


def vote(sims: torch.Tensor, labels: torch.Tensor, n_classes: int, temperature: float, weighted: bool) -> torch.Tensor:
    """Class probabilities (q, K) from neighbour similarities and labels (q, k), sorted or not."""
    if weighted:  # exp(s / T), shifted by the row maximum so small T cannot overflow
        w = torch.exp((sims - sims.max(dim=1, keepdim=True).values) / temperature)
    else:
        w = torch.ones_like(sims)
    scores = torch.zeros(len(sims), n_classes, dtype=w.dtype, device=w.device)
    scores.scatter_add_(1, labels, w)
    return scores / scores.sum(dim=1, keepdim=True)


class KNNProbe(ProbeBase):
    """Similarity-weighted cosine kNN (``k=20``, ``temperature=0.07``; ``k=1`` for ``knn1``).

    ``backend``: ``"faiss"`` (``IndexFlatIP``, exact float32; faiss-gpu when the device is CUDA and
    ``faiss.get_num_gpus() > 0``), ``"torch"`` (chunked matmul + top-k on the torch device: the
    GPU path where faiss-gpu is absent), ``"auto"``: on CUDA faiss-gpu when present, else torch;
    on the CPU torch with the bf16 search when the CPU has native bf16 (see the module), else faiss.
    ``precision`` (torch backend): ``"float32"`` exact; ``"bfloat16"`` bf16 candidates re-ranked
    exactly; ``"auto"`` bfloat16 on a CPU with native bf16 when the training matrix has at least
    2^22 entries (e.g. 4,096 x 1,024; smaller searches gain nothing), float32 elsewhere.
    Queries go at most ``batch_size`` at a time (fewer when the training set is large, to keep the
    similarity block near 2^27 entries). ``k`` is capped at the number of training rows.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        weighted: bool = True,
        backend: str = "auto",
        precision: str = "auto",
        batch_size: int = CHUNK,
        seed: int = 0,
        device: str = "auto",
    ):
        self.k = k
        self.temperature = temperature
        self.weighted = weighted
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def fit(self, X, y) -> KNNProbe:
        """Keep the rows (referenced, not copied, when already float32 and C-contiguous, as
        scikit-learn's brute-force neighbours do: do not modify them in place afterwards), their
        inverse norms and class codes; the index is built at the first query."""
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0 (got k={self.k}, T={self.temperature})")
        X, codes, dev = self._start_fit(X, y)
        self._n_train, self._n_features = X.shape
        self.backend_, self.precision_ = self._pick_backend(dev)
        self.train_ = X
        norms = torch.linalg.vector_norm(torch.from_numpy(X), dim=1)
        self.inv_norms_ = 1.0 / norms.clamp_min_(1e-12)  # rows scaled by these are unit (zero rows stay 0)
        self.labels_ = torch.from_numpy(codes).to(dev)
        self.k_ = min(int(self.k), len(X))
        self._index = None
        return self

    def _pick_backend(self, dev: torch.device) -> tuple[str, str]:
        """``(backend, precision)`` actually used."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; one of {PRECISIONS}")
        if self.backend == "faiss" and self.precision == "bfloat16":
            raise ValueError("precision='bfloat16' needs backend='torch' (faiss searches in float32)")
        big = self._n_train * self._n_features >= BF16_MIN_WORK  # below that, bf16 saves nothing
        bf16 = self.precision == "bfloat16" or (
            self.precision == "auto" and dev.type == "cpu" and big and cpu_has_native_bf16()
        )
        if self.backend == "faiss":
            return "faiss", "float32"
        if self.backend == "torch":
            return "torch", "bfloat16" if bf16 else "float32"
        if dev.type == "cuda":
            import faiss

            gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
            return ("faiss", "float32") if gpu and not bf16 else ("torch", "bfloat16" if bf16 else "float32")
        return ("torch", "bfloat16") if bf16 else ("faiss", "float32")

    def _searcher(self):
        """A callable ``(Q (q, d) normalised, scores) -> (sims, idx)`` torch tensors on the device,
        best first; ``scores`` is a reusable (>= q, n_train) buffer for the similarity block
        (torch backends; see :meth:`_search_batches`), None for faiss."""
        if self._index is None:
            dev = self.device_
            if self.backend_ == "faiss":
                import faiss

                index = faiss.IndexFlatIP(self._n_features)
                if dev.type == "cuda" and faiss.get_num_gpus() > 0:
                    self._gpu_res = faiss.StandardGpuResources()
                    index = faiss.index_cpu_to_gpu(self._gpu_res, dev.index or 0, index)
                index.add(l2_normalize(self.train_))
                # on the CPU the candidates are re-scored pair by pair: the same neighbours, order and
                # similarities as the out-of-core search in blocks (probes.search.vectors.rescored_topk)
                base = flat_vectors(index) if dev.type == "cpu" else None
                m = min(self.k_ + RESCORE_EXTRA, self._n_train) if base is not None else self.k_

                def search(Q: np.ndarray, scores: Any = None) -> Any:
                    D, idx = index.search(Q, m)
                    if base is not None:
                        D, idx = rescored_topk(Q, base, idx, self.k_)
                    return torch.from_numpy(D).to(dev), torch.from_numpy(idx).to(dev)

            elif self.precision_ == "float32":
                train = torch.from_numpy(l2_normalize(self.train_)).to(dev)

                def search(Q: np.ndarray, scores: Any = None) -> Any:
                    q = torch.from_numpy(Q).to(dev)
                    return torch.mm(q, train.T, out=scores[: len(q)]).topk(self.k_, dim=1)

            else:  # bf16 candidates, exact float32 re-rank, exact search where that could differ
                raw = torch.from_numpy(self.train_).to(dev)  # unnormalised: no normalised copy is kept
                inv = self.inv_norms_.to(dev)
                mu = (inv @ raw) / len(raw)  # the mean of the normalised rows
                # centred: q . (x - mu) ranks the rows of one query as q . x does, and its smaller
                # values keep more of their precision in the bf16 output of the matmul
                train_bf16 = normalized_centred_bf16(raw, inv, mu)
                m = n_candidates(self.k_, len(raw))
                rerank = _exact_dots_faiss if dev.type == "cpu" and importable("faiss") else _exact_dots_torch
                self.exact_fallbacks_ = 0

                def search(Q: np.ndarray, scores: Any = None) -> Any:
                    q = torch.from_numpy(Q).to(dev)
                    block = torch.mm(q.bfloat16(), train_bf16.T, out=scores[: len(q)])
                    approx, cand = block.topk(m, dim=1, sorted=False)  # (b, m)
                    exact = rerank(q, raw, cand) * inv[cand]  # float32 q . x / |x| of the candidates
                    sims, pos = exact.topk(self.k_, dim=1)
                    idx = cand.gather(1, pos)
                    if m < len(raw):
                        # a row outside the candidates scored at most the lowest candidate in bf16;
                        # it could still beat the k-th neighbour if bf16 errs by more than that gap.
                        # Bound the error by twice the largest one seen on this query's candidates.
                        approx = approx.float()
                        qmu = q @ mu
                        err = (approx - (exact - qmu[:, None])).abs().amax(dim=1)
                        unsure = approx.amin(dim=1) + 2 * err + 1e-6 >= sims[:, -1] - qmu
                        if unsure.any():
                            rows = unsure.nonzero()[:, 0]
                            s_ex, i_ex = ((q[rows] @ raw.T) * inv).topk(self.k_, dim=1)
                            sims[rows], idx[rows] = s_ex, i_ex
                            self.exact_fallbacks_ += len(rows)
                    return sims, idx

            self._index = search
        return self._index

    def _search_batches(self, Q: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(sims, idx)`` for each batch of queries: at most ``batch_size`` queries, fewer when
        the training set is large (the similarity block stays near 2^27 entries). The torch
        searches write every batch's block into one buffer allocated once per call (a fresh
        block per batch costs page faults that were ~20% of a 10,000-query search here)."""
        search = self._searcher()
        n = len(self.train_)
        step = max(1, min(int(self.batch_size), SCORE_BUDGET // max(1, n), len(Q)))
        scores = None
        if self.backend_ == "torch":
            dtype = torch.bfloat16 if self.precision_ == "bfloat16" else torch.float32
            scores = torch.empty(step, n, dtype=dtype, device=self.device_)
        for i in range(0, len(Q), step):
            yield search(Q[i : i + step], scores)

    def kneighbors(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and training-row indices of the ``k`` nearest rows, best first."""
        from probes.heads.base import check_X

        self._check_fitted()
        Q = l2_normalize(check_X(X, self.n_features_in_))
        out = list(self._search_batches(Q))
        return (torch.cat([s for s, _ in out]).cpu().numpy(), torch.cat([i for _, i in out]).cpu().numpy())

    @torch.no_grad()
    def _proba(self, X: np.ndarray) -> np.ndarray:
        Q, K = l2_normalize(X), len(self.classes_)
        parts = []
        for sims, idx in self._search_batches(Q):
            parts.append(vote(sims, self.labels_[idx], K, self.temperature, self.weighted).cpu())
        return torch.cat(parts).numpy()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_index", None)
        state.pop("_gpu_res", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = None


class ChunkedKNNProbe(KNNProbe):
    """:class:`probes.heads.knn.KNNProbe` whose training rows stay in the store (a :class:`ChunkedRows`):
    each query batch is answered by :func:`exact_search` (exact float32 FAISS per block, merged); the
    vote and the probabilities are the in-memory probe's. In-memory training rows fit the in-memory
    way. ``backend`` / ``precision`` must be ``auto``, ``faiss`` / ``float32`` on chunked rows."""

    def fit(self, X, y) -> ChunkedKNNProbe:
        """Keep the row reader and class codes; nothing is read until the first query."""
        if not is_chunked(X):
            super().fit(X, y)
            return self
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0 (got k={self.k}, T={self.temperature})")
        if self.backend not in ("auto", "faiss") or self.precision not in ("auto", "float32"):
            raise ValueError(
                f"the out-of-core kNN search is exact float32 FAISS; backend={self.backend!r}, "
                f"precision={self.precision!r} cannot run on rows read from the store"
            )
        self.classes_, codes = encode_labels(y, len(X))
        self.n_features_in_ = X.width
        self.device_ = resolve_device(self.device)
        self._n_train, self._n_features = X.shape
        self.backend_, self.precision_ = "faiss-chunked", "float32"
        self.train_ = X
        self.labels_ = torch.from_numpy(codes).to(self.device_)
        self.k_ = min(int(self.k), len(X))
        self._index = None
        return self

    def _search_batches(self, Q: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not is_chunked(self.train_):
            yield from super()._search_batches(Q)
            return
        sims, idx = exact_search(Q, self.train_, self.k_, normalized=True)  # every query in one pass over the rows
        yield torch.from_numpy(sims).to(self.device_), torch.from_numpy(idx).to(self.device_)
