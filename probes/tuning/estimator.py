"""Fine-tunes with the probes' shape: ``fit(reader, y)``, ``predict(reader)``, ``predict_proba(reader)``.

Methods (the small-patch paper's protocol; every value an option):

* ``lp``: a trained head on pooled features, backbone frozen (Adam, lr 5e-4, 50 epochs, batch 256);
  the reader holds pooled features (N, D), or tail tokens run through the frozen tail.
* ``ft-last``: the last ``k`` blocks, the final norm and the head trained (Adam, lr 1e-4, weight
  decay 0.01, 50 epochs, batch 256).
* ``lora``: peft LoRA (rank / alpha / dropout) on the attention (qkv and proj) of the last ``k``
  blocks plus the head; every other weight stays bit-identical (Adam, lr 1e-4, weight decay 0.01).

The reader's rows are tail tokens (``kind="tokens"``) or images (``kind="images"``: the frozen prefix
runs each step, :class:`~probes.tuning.nets.FullBackboneModule`). The best epoch (hold-out
macro-F1 on a stratified ``val_fraction`` of the training cells) is kept; ``patience`` stops early;
``history_`` holds one dict per epoch; a non-finite loss stops with :class:`TrainingDiverged`
naming the epoch, the best state so far kept.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score

from embedcache.backbones.adapters import inject_lora
from probes.heads.base import encode_labels, resolve_device, seeded, stratified_holdout
from probes.heads.tokens import make_token_head
from probes.tuning.losses import make_loss
from probes.tuning.nets import FullBackboneModule, TunedNet, tail_of
from probes.tuning.readers import check_reader, reader_kind

METHODS = ("lp", "ft-last", "lora")
DEFAULTS = {"lp": (5e-4, 0.0), "ft-last": (1e-4, 0.01), "lora": (1e-4, 0.01)}  # (lr, weight decay)
MIN_HOLDOUT_CELLS = 20  # fewer training cells: no hold-out, the last epoch is kept


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN / inf; ``epoch`` (1-based) says when. The best state so far is kept."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


class FineTuneProbe(ClassifierMixin, BaseEstimator):
    """One fine-tune of ``backbone`` (a ``LoadedBackbone``; None only for ``lp`` on pooled features).

    ``k``: tail blocks (stages for ResNets); ``head``: a :data:`probes.heads.tokens.TOKEN_HEADS` name with
    ``head_kwargs``; ``pool``: the pooled vector pooled heads see (``cls`` / ``mean`` / ``head``; default
    the backbone's default pool); ``loss``: a :data:`probes.tuning.losses.LOSSES` name (``gamma``,
    ``class_weights``, ``hierarchy`` as in :func:`probes.tuning.losses.make_loss`); ``lr`` / ``weight_decay``
    None: the method's defaults.
    """

    def __init__(
        self,
        backbone=None,
        method: str = "ft-last",
        k: int = 1,
        head: str = "linear",
        head_kwargs: dict | None = None,
        pool: str | None = None,
        loss: str = "ce",
        gamma: float | None = None,
        class_weights: Any = None,
        hierarchy: Any = None,
        epochs: int = 50,
        batch_size: int = 256,
        lr: float | None = None,
        weight_decay: float | None = None,
        val_fraction: float = 0.1,
        patience: int | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        seed: int = 0,
        device: str = "auto",
    ):
        self.backbone = backbone
        self.method = method
        self.k = k
        self.head = head
        self.head_kwargs = head_kwargs
        self.pool = pool
        self.loss = loss
        self.gamma = gamma
        self.class_weights = class_weights
        self.hierarchy = hierarchy
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.patience = patience
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.seed = seed
        self.device = device

    _methods: tuple[str, ...] = METHODS  # a subclass with its own networks (scratch-vit) names its own

    def _method_defaults(self) -> tuple[float, float]:
        """``(lr, weight decay)`` of the method when not given."""
        return DEFAULTS[self.method]

    # -----------------------------------------------------------------------------------------
    # Building
    # -----------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        if self.method not in self._methods:
            raise ValueError(f"unknown fine-tune method {self.method!r}; choose from {', '.join(self._methods)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {self.patience}")

    def _build(self, sample: np.ndarray, kind: str, n_classes: int) -> TunedNet:
        """The network for rows shaped like ``sample`` (one row)."""
        bb = self.backbone
        if bb is None:
            if self.method != "lp" or kind != "tokens" or sample.ndim != 2:
                raise ValueError(
                    f"method {self.method!r} on {kind} of shape {sample.shape[1:]} needs a backbone; "
                    "only 'lp' on pooled features (N, D) runs without one"
                )
            head = make_token_head(
                self.head, sample.shape[1], n_classes, 0, self.pool or "mean", **(self.head_kwargs or {})
            )
            if head.input != "pooled":
                raise ValueError(f"head {self.head!r} reads tokens; pooled features (N, D) need 'linear' or 'mlp'")
            return TunedNet(None, head, "mean", frozen_trunk=True)
        if kind == "tokens" and sample.ndim == 2:
            raise ValueError(
                "the reader holds pooled features (N, D): use method 'lp' without a backbone, "
                "or pass tail tokens (extract --tail-blocks K)"
            )
        from embedcache.backbones.tail import TailModule

        pool = self.pool or bb.spec.default_pool[0]
        trunk = FullBackboneModule(bb, self.k, pool) if kind == "images" else TailModule(bb, self.k, pool, copy=True)
        tail = tail_of(trunk)
        tail.eval()  # the shape probe must not touch BatchNorm statistics
        if kind == "tokens":
            shape = tuple(sample.shape[1:])
            with torch.no_grad():
                probe = torch.zeros((1, *shape), dtype=torch.float32)
                try:
                    feats = tail.forward_features(probe)
                except Exception as e:
                    raise ValueError(
                        f"tokens of shape {shape} do not fit the last {tail.k} blocks of {bb.spec.name}: {e}"
                    ) from e
        else:
            with torch.no_grad():
                feats = trunk.forward_features(torch.from_numpy(sample.astype(np.float32)))
        dim = int(feats.shape[1] if feats.ndim == 4 else feats.shape[-1])
        npt = 0 if feats.ndim == 4 else tail.num_prefix_tokens
        head_pool = pool if pool in ("cls", "mean") else None
        head = make_token_head(
            self.head,
            dim,
            n_classes,
            npt,
            head_pool if self.head in ("linear", "mlp") else None,
            **(self.head_kwargs or {}),
        )
        if self.method == "lp":
            tail.requires_grad_(False)
        elif self.method == "ft-last":
            tail.requires_grad_(True)
        else:
            inject_lora(tail, self.lora_rank, self.lora_alpha, self.lora_dropout)
        return TunedNet(trunk, head, pool, frozen_trunk=self.method == "lp")

    # -----------------------------------------------------------------------------------------
    # Fitting
    # -----------------------------------------------------------------------------------------

    def fit(self, X, y) -> FineTuneProbe:
        """Train on reader ``X`` with labels ``y``; see the module docstring."""
        self._check_params()
        n = check_reader(X)
        kind = reader_kind(X)
        self.classes_, codes = encode_labels(y, n)
        K = len(self.classes_)
        dev = self.device_ = resolve_device(self.device)
        first = np.asarray(X.read(np.array([0], dtype=np.int64)))
        self.row_shape_ = tuple(first.shape[1:])
        self.reader_kind_ = kind
        frac = self.val_fraction if n >= MIN_HOLDOUT_CELLS else 0.0
        fit_idx, val_idx = stratified_holdout(codes, frac, self.seed)
        lr, wd = self._method_defaults()
        lr = lr if self.lr is None else self.lr
        wd = wd if self.weight_decay is None else self.weight_decay
        self.history_: list[dict] = []
        self.step_losses_: list[float] = []
        self.best_epoch_ = None
        with seeded(self.seed, dev):
            net = self._build(first, kind, K).to(dev)
            loss_fn = make_loss(
                self.loss,
                self.classes_,
                codes[fit_idx],
                gamma=self.gamma,
                weights=self.class_weights,
                hierarchy=self.hierarchy,
            ).to(dev)
            params = [p for p in net.parameters() if p.requires_grad]
            self.n_trainable_ = int(sum(p.numel() for p in params))
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
            gen = torch.Generator().manual_seed(self.seed)
            train_read = getattr(X, "read_train", None) or X.read  # augmenting readers augment training reads only
            self.net_ = net
            best_f1, best_state, stale = -1.0, None, 0
            for epoch in range(1, self.epochs + 1):
                t0 = time.perf_counter()
                net.train()
                perm = fit_idx[torch.randperm(len(fit_idx), generator=gen).numpy()]
                total, seen = 0.0, 0
                for i in range(0, len(perm), self.batch_size):
                    rows = np.sort(perm[i : i + self.batch_size])
                    xb = torch.from_numpy(np.asarray(train_read(rows))).to(dev)
                    yb = torch.from_numpy(codes[rows]).to(dev)
                    loss = loss_fn(net(xb), yb)
                    if not torch.isfinite(loss):
                        self._diverged(net, best_state, epoch, float(loss.item()))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    value = float(loss.item())
                    self.step_losses_.append(value)
                    total, seen = total + value * len(rows), seen + len(rows)
                f1 = self._holdout_f1(net, X, codes, val_idx) if len(val_idx) else None
                improved = f1 is None or f1 > best_f1
                if improved:
                    best_f1 = f1 if f1 is not None else best_f1
                    best_state, self.best_epoch_, stale = copy.deepcopy(net.state_dict()), epoch, 0
                else:
                    stale += 1
                self.history_.append(
                    {
                        "epoch": epoch,
                        "train_loss": total / seen,
                        "val_macro_f1": f1,
                        "best": improved,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                if self.patience is not None and stale >= self.patience:
                    break
            assert best_state is not None  # epoch 1 always sets it
            net.load_state_dict(best_state)
        net.eval()
        self.data_digest_ = _data_digest(X, codes, self.classes_)
        return self

    def _diverged(self, net: TunedNet, best_state: dict | None, epoch: int, value: float) -> None:
        if best_state is not None:
            assert best_state is not None  # epoch 1 always sets it
            net.load_state_dict(best_state)
        net.eval()
        kept = (
            f"kept the best state (epoch {self.best_epoch_})"
            if best_state is not None
            else "no epoch finished, so the probe holds no trained state"
        )
        if best_state is None:
            del self.net_
        raise TrainingDiverged(
            f"{self.method} training loss became {value} at epoch {epoch}; {kept}. "
            "Lower lr, check the tokens for NaN/inf, or use another loss.",
            epoch,
        )

    def _holdout_f1(self, net: TunedNet, X, codes: np.ndarray, val_idx: np.ndarray) -> float:
        pred = self._logits(net, X, val_idx).argmax(1).numpy()
        return float(
            f1_score(codes[val_idx], pred, average="macro", labels=np.arange(len(self.classes_)), zero_division=0)
        )

    @torch.no_grad()
    def _logits(self, net: TunedNet, X, rows: np.ndarray) -> torch.Tensor:
        net.eval()
        out = []
        for i in range(0, len(rows), self.batch_size):
            xb = torch.from_numpy(np.asarray(X.read(rows[i : i + self.batch_size]))).to(self.device_)
            out.append(net(xb).float().cpu())
        return torch.cat(out)

    # -----------------------------------------------------------------------------------------
    # Predicting
    # -----------------------------------------------------------------------------------------

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, K), columns in the order of ``classes_``."""
        if not hasattr(self, "net_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(reader, y) first")
        n = check_reader(X)
        if reader_kind(X) != self.reader_kind_:
            raise ValueError(f"fitted on {self.reader_kind_}, asked to predict on {reader_kind(X)}")
        shape = tuple(np.asarray(X.read(np.array([0], dtype=np.int64))).shape[1:])
        if shape != self.row_shape_:
            raise ValueError(f"rows of shape {shape}; the fine-tune was fitted on rows of shape {self.row_shape_}")
        return torch.softmax(self._logits(self.net_, X, np.arange(n, dtype=np.int64)), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    # -----------------------------------------------------------------------------------------
    # Adapters
    # -----------------------------------------------------------------------------------------

    def save_adapter(self, directory) -> None:
        """Write the trained tail / LoRA adapters and head (safetensors) with provenance JSON to ``directory``."""
        from probes.tuning.adapter import save_adapter

        save_adapter(self, directory)


def _data_digest(X, codes: np.ndarray, classes: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256(str(getattr(X, "digest", None)).encode() + b"|" + str(len(X)).encode() + b"|")
    h.update(np.ascontiguousarray(codes).tobytes())
    h.update("|".join(map(str, classes)).encode())
    return h.hexdigest()


__all__ = ["DEFAULTS", "METHODS", "FineTuneProbe", "TrainingDiverged"]
