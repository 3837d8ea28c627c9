"""``mlp`` and ``cosine``: small torch heads trained with AdamW on standardised features.

One seed paper ensembles linear, cosine and MLP heads on frozen features; these are the latter two.
Both train for ``epochs`` passes of shuffled mini-batches (seeded), with a cosine learning-rate
decay and label smoothing 0.1, and keep the weights of the epoch with the best macro-F1 on a
stratified ``val_fraction`` hold-out (no hold-out on tiny data: the last epoch is kept).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import f1_score

from probes.heads.base import CHUNK, ScoresHead, seeded, standardize, stratified_holdout


class CosineLinear(nn.Module):
    """Logits ``s * cos(x, w_k)``: rows and class weights L2-normalised, learnable scale ``s``."""

    def __init__(self, d: int, n_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, d) / math.sqrt(d))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class _TorchHead(ScoresHead):
    """Shared mini-batch trainer; subclasses build the network in ``_network(d, K)``."""

    def _network(self, d: int, n_classes: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, X, y) -> _TorchHead:
        """Standardise, train with AdamW, keep the best hold-out epoch, then refit-free predict."""
        X, codes, dev = self._start_fit(X, y)
        K = len(self.classes_)
        fit_idx, val_idx = stratified_holdout(codes, self.val_fraction if len(X) >= 20 else 0.0, self.seed)
        order = np.concatenate([fit_idx, val_idx])
        Xs, self.mean_, self.scale_ = standardize(torch.from_numpy(X).to(dev), order)
        yt = torch.from_numpy(codes[order]).to(dev)
        nf = len(fit_idx)
        with seeded(self.seed, dev):
            net = self._network(X.shape[1], K).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            bs = min(self.batch_size, nf)
            steps_per_epoch = math.ceil(nf / bs)
            total = self.epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            best_f1, best_state = -1.0, None
            self.val_f1_: list[float] = []
            for _ in range(self.epochs):
                net.train()
                perm = torch.randperm(nf, generator=gen).to(dev)
                for i in range(0, nf, bs):
                    idx = perm[i : i + bs]
                    loss = F.cross_entropy(net(Xs[idx]), yt[idx], label_smoothing=0.1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                if len(val_idx):
                    net.eval()
                    with torch.no_grad():
                        pred = self._logits(net, Xs[nf:]).argmax(1).cpu().numpy()
                    f1 = float(f1_score(codes[val_idx], pred, average="macro"))
                    self.val_f1_.append(f1)
                    if f1 > best_f1:
                        best_f1, best_state = f1, copy.deepcopy(net.state_dict())
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        return self

    @staticmethod
    @torch.no_grad()
    def _logits(net: nn.Module, Xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(Xs[i : i + CHUNK]) for i in range(0, len(Xs), CHUNK)])

    def _decision(self, X: np.ndarray) -> torch.Tensor:
        """Logits (n, K)."""
        Xt = (torch.from_numpy(X).to(self.device_) - self.mean_) / self.scale_
        return self._logits(self.net_, Xt)

    def __init__(
        self,
        epochs: int = 30,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str = "auto",
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device


class MLPProbe(_TorchHead):
    """One hidden layer (``hidden`` units, GELU, dropout ``dropout``) on standardised features."""

    def __init__(
        self,
        hidden: int = 512,
        dropout: float = 0.2,
        epochs: int = 30,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str = "auto",
    ):
        super().__init__(epochs, batch_size, lr, weight_decay, val_fraction, seed, device)
        self.hidden = hidden
        self.dropout = dropout

    def _network(self, d: int, n_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(d, self.hidden), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, n_classes)
        )


class CosineProbe(_TorchHead):
    """Cosine classifier: ``s * cos(x, w_k)`` with a learnable scale ``s`` (start 16)."""

    def __init__(
        self,
        scale: float = 16.0,
        epochs: int = 30,
        batch_size: int = 256,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str = "auto",
    ):
        super().__init__(epochs, batch_size, lr, weight_decay, val_fraction, seed, device)
        self.scale = scale

    def _network(self, d: int, n_classes: int) -> nn.Module:
        return CosineLinear(d, n_classes, self.scale)
