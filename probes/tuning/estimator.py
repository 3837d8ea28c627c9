"""Fine-tunes with the probes' shape: ``fit(reader, y)``, ``predict(reader)``, ``predict_proba(reader)``.

Methods (the small-patch paper's protocol; every value an option):

* ``lp``: a trained head on pooled features, backbone frozen (Adam, 50 epochs, batch 256);
  the reader holds pooled features (N, D), or tail tokens run through the frozen tail.
* ``ft-last``: the last ``k`` blocks, the final norm and the head trained (Adam, lr 1e-4, weight
  decay 0.01, 50 epochs, batch 256).
* ``lora``: peft LoRA (rank / alpha / dropout) on the attention (qkv and proj) of the last ``k``
  blocks (a CNN's 1x1 convolutions) plus the head; every other weight stays bit-identical (Adam, lr 1e-4,
  weight decay 0.01).

Defaults that learn at any data size and feature scale (``lr=None``, ``standardize=True``):

* pooled heads standardise their input with the training cells' moments (:class:`probes.heads.tokens.Standardize`,
  set once before training), as a linear probe's input should be;
* ``lp`` takes its learning rate and weight decay from a sweep over :data:`LP_SWEEP` on the hold-out (it is
  cheap: a head on pooled vectors; the papers' setting is one of them; chosen by hold-out log-loss) and
  trains for at least :data:`MIN_STEPS` optimizer steps when ``epochs`` is not given (up to
  :data:`MAX_LP_EPOCHS` epochs; ``epochs_`` says how many);
* ``ft-last`` / ``lora`` keep the papers' lr when a run makes at least :data:`MIN_STEPS` optimizer steps (the
  papers' smallest FlagLimit, 256 cells x 20 classes for 50 epochs, makes about that many) and scale it up by
  ``MIN_STEPS / steps`` (at most :data:`MAX_LR_SCALE` x) when the data is smaller, so that a short run goes as far;
* a fit whose best hold-out epoch is the first, or whose hold-out macro-F1 is at chance, warns (the study prints it).

The reader's rows are tail tokens (``kind="tokens"``) or images (``kind="images"``: the frozen prefix
runs each step, :class:`~probes.tuning.nets.FullBackboneModule`). The best epoch (lowest hold-out
log-loss on a stratified ``val_fraction`` of the training cells; its macro-F1 is recorded too) is kept;
``patience`` stops early;
``history_`` holds one dict per epoch; a non-finite loss stops with :class:`TrainingDiverged`
naming the epoch, the best state so far kept.
"""

from __future__ import annotations

import copy
import time
import warnings
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
DEFAULTS = {"lp": (5e-4, 0.0), "ft-last": (1e-4, 0.01), "lora": (1e-4, 0.01)}  # (lr, weight decay): the papers'
# lp's (lr, weight decay) pairs tried on the hold-out (lr=None): the L2 strength matters most at small data, as
# the logistic probe's C does; the papers' setting (5e-4, 0) is the first
LP_SWEEP = ((5e-4, 0.0), (1e-3, 1e-3), (1e-3, 1e-2), (1e-3, 3e-2), (1e-3, 1e-1), (3e-3, 0.0))
DEFAULT_EPOCHS = 50  # the papers' (epochs=None)
MIN_STEPS = 1000  # optimizer steps below which ft-last / lora scale their lr up (lr=None) and lp trains longer
MAX_LP_EPOCHS = 500
MAX_LR_SCALE = 10.0
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
    None: the method's defaults (``lr``: by the data size, see the module); ``standardize``: pooled heads read
    standardised vectors. After ``fit``: ``lr_`` / ``weight_decay_`` (used), ``epochs_`` (the epochs run at most),
    ``lr_sweep_`` (lp: hold-out log-loss per (lr, weight decay)).
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
        epochs: int | None = None,
        batch_size: int = 256,
        lr: float | None = None,
        weight_decay: float | None = None,
        val_fraction: float = 0.1,
        patience: int | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        standardize: bool = True,
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
        self.standardize = standardize
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
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {self.patience}")

    def head_params(self) -> dict[str, Any]:
        """The keywords the head is built with (``head_kwargs`` and ``standardize``; saved with an adapter)."""
        return {**(self.head_kwargs or {}), "standardize": bool(self.standardize)}

    def _build(self, sample: np.ndarray, kind: str, n_classes: int) -> TunedNet:
        """The network for rows shaped like ``sample`` (one row)."""
        bb = self.backbone
        if bb is None:
            if self.method != "lp" or kind != "tokens" or sample.ndim != 2:
                raise ValueError(
                    f"method {self.method!r} on {kind} of shape {sample.shape[1:]} needs a backbone; "
                    "only 'lp' on pooled features (N, D) runs without one"
                )
            head = make_token_head(self.head, sample.shape[1], n_classes, 0, self.pool or "mean", **self.head_params())
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
            **self.head_params(),
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
        self.device_ = resolve_device(self.device)
        first = np.asarray(X.read(np.array([0], dtype=np.int64)))
        self.row_shape_ = tuple(first.shape[1:])
        self.reader_kind_ = kind
        frac = self.val_fraction if n >= MIN_HOLDOUT_CELLS else 0.0
        fit_idx, val_idx = stratified_holdout(codes, frac, self.seed)
        base_lr, wd = self._method_defaults()
        wd = wd if self.weight_decay is None else self.weight_decay
        batches = -(-len(fit_idx) // self.batch_size)
        self.epochs_ = DEFAULT_EPOCHS if self.epochs is None else int(self.epochs)
        if (
            self.method == "lp" and self.epochs is None and batches * self.epochs_ < MIN_STEPS
        ):  # cheap: as long as needed
            self.epochs_ = min(MAX_LP_EPOCHS, -(-MIN_STEPS // batches))
        steps = batches * self.epochs_
        if self.lr is not None:
            candidates = [(float(self.lr), wd)]
        elif self.method == "lp" and len(val_idx) and type(self)._method_defaults is FineTuneProbe._method_defaults:
            candidates = [(lr, wd if self.weight_decay is not None else w) for lr, w in LP_SWEEP]
            candidates = list(dict.fromkeys(candidates))
        elif self.method in ("ft-last", "lora"):
            candidates = [(base_lr * min(MAX_LR_SCALE, max(1.0, MIN_STEPS / max(steps, 1))), wd)]
        else:
            candidates = [(base_lr, wd)]
        runs = [self._train(X, codes, fit_idx, val_idx, first, kind, K, lr, w) for lr, w in candidates]
        best = max(range(len(runs)), key=lambda i: (runs[i]["score"], -i))  # ties: the earlier candidate
        self.lr_sweep_ = {c: -r["score"] for c, r in zip(candidates, runs)} if len(runs) > 1 else None
        chosen = runs[best]
        self.lr_, self.weight_decay_ = candidates[best]
        self.net_, self.history_, self.step_losses_ = chosen["net"], chosen["history"], chosen["steps"]
        self.best_epoch_, self.n_trainable_ = chosen["best_epoch"], chosen["n_trainable"]
        self._warn_if_it_did_not_learn(chosen["f1"], K)
        self.data_digest_ = _data_digest(X, codes, self.classes_)
        return self

    def _train(
        self, X, codes: np.ndarray, fit_idx: np.ndarray, val_idx: np.ndarray, first: np.ndarray, kind: str,
        K: int, lr: float, wd: float,
    ) -> dict[str, Any]:  # fmt: skip
        """One training run at ``lr``: the best hold-out state, its score, the per-epoch history."""
        dev = self.device_
        history: list[dict] = []
        step_losses: list[float] = []
        self.best_epoch_ = None
        with seeded(self.seed, dev):
            net = self._build(first, kind, K).to(dev)
            if self.standardize:
                self._set_head_moments(net, X, fit_idx)
            loss_fn = make_loss(
                self.loss,
                self.classes_,
                codes[fit_idx],
                gamma=self.gamma,
                weights=self.class_weights,
                hierarchy=self.hierarchy,
            ).to(dev)
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
            gen = torch.Generator().manual_seed(self.seed)
            train_read = getattr(X, "read_train", None) or X.read  # augmenting readers augment training reads only
            self.net_ = net
            best_loss, best_f1, best_state, stale = float("inf"), None, None, 0
            for epoch in range(1, self.epochs_ + 1):
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
                    step_losses.append(value)
                    total, seen = total + value * len(rows), seen + len(rows)
                f1, nll = self._holdout(net, X, codes, val_idx) if len(val_idx) else (None, None)
                improved = nll is None or nll < best_loss  # log-loss: far less noisy than F1 on a small hold-out
                if improved:
                    best_loss, best_f1 = (nll, f1) if nll is not None else (best_loss, best_f1)
                    best_state, self.best_epoch_, stale = copy.deepcopy(net.state_dict()), epoch, 0
                else:
                    stale += 1
                history.append(
                    {
                        "epoch": epoch,
                        "train_loss": total / seen,
                        "val_macro_f1": f1,
                        "val_loss": nll,
                        "best": improved,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                if self.patience is not None and stale >= self.patience:
                    break
            assert best_state is not None  # epoch 1 always sets it
            net.load_state_dict(best_state)
        net.eval()
        return {
            "net": net,
            "score": -best_loss,  # higher is better
            "f1": best_f1,
            "history": history,
            "steps": step_losses,
            "best_epoch": self.best_epoch_,
            "n_trainable": int(sum(p.numel() for p in params)),
        }

    @torch.no_grad()
    def _set_head_moments(self, net: TunedNet, X, fit_idx: np.ndarray) -> None:
        """Give a pooled head's :class:`~probes.heads.tokens.Standardize` the moments of the vectors it reads on
        the training cells (the trunk as it starts; float64 sums)."""
        head: Any = net.head  # a pooled head (its own methods are called)
        norm = getattr(head, "standardize", None)
        if norm is None:
            return
        net.eval()
        total = sq = None
        for i in range(0, len(fit_idx), self.batch_size):
            xb = torch.from_numpy(np.asarray(X.read(np.sort(fit_idx[i : i + self.batch_size])))).to(self.device_)
            v = head.pooled(net.features(xb)).double()
            total = v.sum(0) if total is None else total + v.sum(0)
            sq = (v * v).sum(0) if sq is None else sq + (v * v).sum(0)
        assert total is not None and sq is not None
        mean = total / len(fit_idx)
        std = (sq / len(fit_idx) - mean * mean).clamp_min(0).sqrt()
        norm.set_moments(mean.float(), std.float())

    def _warn_if_it_did_not_learn(self, score: float | None, n_classes: int) -> None:
        """Say so when the kept epoch is the first one or the hold-out macro-F1 is at chance."""
        if score is None:
            return
        problems = []
        if self.best_epoch_ == 1 and self.epochs_ > 1:
            problems.append("its best hold-out epoch was the first (it did not improve after one epoch)")
        if score <= 1.0 / n_classes:
            problems.append(f"its hold-out macro-F1 {score:.3f} is at chance (1/{n_classes} classes)")
        if problems:
            warnings.warn(
                f"{self.method} fine-tune (lr {self.lr_:g}, {self.epochs_} epochs): {' and '.join(problems)}; "
                "try more epochs, another --lr, or check the features",
                RuntimeWarning,
                stacklevel=3,
            )

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

    def _holdout(self, net: TunedNet, X, codes: np.ndarray, val_idx: np.ndarray) -> tuple[float, float]:
        """Hold-out macro-F1 and mean negative log-likelihood."""
        logits = self._logits(net, X, val_idx)
        pred = logits.argmax(1).numpy()
        f1 = f1_score(codes[val_idx], pred, average="macro", labels=np.arange(len(self.classes_)), zero_division=0)
        nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(codes[val_idx]).long()).item()
        return float(f1), float(nll)

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
