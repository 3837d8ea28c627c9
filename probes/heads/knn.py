"""``knn`` / ``knn1``: cosine k-nearest-neighbour vote, as in DINO's kNN evaluation.

Rows are L2-normalised; neighbours are exact maximum inner product (FAISS ``IndexFlatIP``, or
matmul + top-k in torch); neighbour j of a query votes ``exp(sim_j / T)`` for its class
(1 when ``weighted=False``); ``predict_proba`` is the normalised class scores.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CHUNK, ProbeBase

BACKENDS = ("auto", "faiss", "torch")


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (all-zero rows stay zero), float32."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


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

    ``backend``: ``"faiss"`` (``IndexFlatIP``; faiss-gpu when the device is CUDA and
    ``faiss.get_num_gpus() > 0``), ``"torch"`` (chunked matmul + top-k on the torch device: the
    GPU path where faiss-gpu is absent), ``"auto"`` = faiss, except torch on CUDA without faiss-gpu.
    Queries go ``batch_size`` at a time. ``k`` is capped at the number of training rows.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        weighted: bool = True,
        backend: str = "auto",
        batch_size: int = CHUNK,
        seed: int = 0,
        device: str = "auto",
    ):
        self.k = k
        self.temperature = temperature
        self.weighted = weighted
        self.backend = backend
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def fit(self, X, y) -> "KNNProbe":
        """Store the L2-normalised rows and their class codes (and build the index)."""
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0 (got k={self.k}, T={self.temperature})")
        X, codes, dev = self._start_fit(X, y)
        self.backend_ = self._pick_backend(dev)
        self.train_ = l2_normalize(X)
        self.labels_ = torch.from_numpy(codes).to(dev)
        self.k_ = min(int(self.k), len(X))
        self._index = None
        return self

    def _pick_backend(self, dev: torch.device) -> str:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; one of {BACKENDS}")
        if self.backend != "auto":
            return self.backend
        if dev.type == "cuda":
            import faiss

            return "faiss" if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else "torch"
        return "faiss"

    def _searcher(self):
        """A callable ``Q (q, d) normalised -> (sims, idx)`` torch tensors on the device."""
        if self._index is None:
            dev = self.device_
            if self.backend_ == "faiss":
                import faiss

                index = faiss.IndexFlatIP(self.train_.shape[1])
                if dev.type == "cuda" and faiss.get_num_gpus() > 0:
                    self._gpu_res = faiss.StandardGpuResources()
                    index = faiss.index_cpu_to_gpu(self._gpu_res, dev.index or 0, index)
                index.add(self.train_)

                def search(Q: np.ndarray):
                    D, I = index.search(Q, self.k_)
                    return torch.from_numpy(D).to(dev), torch.from_numpy(I).to(dev)

            else:
                train = torch.from_numpy(self.train_).to(dev)

                def search(Q: np.ndarray):
                    return (torch.from_numpy(Q).to(dev) @ train.T).topk(self.k_, dim=1)

            self._index = search
        return self._index

    def kneighbors(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and training-row indices of the ``k`` nearest rows, best first."""
        from .base import check_X

        self._check_fitted()
        Q = l2_normalize(check_X(X, self.n_features_in_))
        out = [self._searcher()(Q[i : i + self.batch_size]) for i in range(0, len(Q), self.batch_size)]
        return (torch.cat([s for s, _ in out]).cpu().numpy(), torch.cat([i for _, i in out]).cpu().numpy())

    @torch.no_grad()
    def _proba(self, X: np.ndarray) -> np.ndarray:
        Q, search, K = l2_normalize(X), self._searcher(), len(self.classes_)
        parts = []
        for i in range(0, len(Q), self.batch_size):
            sims, idx = search(Q[i : i + self.batch_size])
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
