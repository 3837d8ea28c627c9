"""``logistic``: multinomial L2 logistic regression on standardised features, with a small
regularisation sweep on a seeded, stratified validation split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import f1_score

from .base import (
    BF16_MIN_WORK,
    ScoresHead,
    cpu_has_native_bf16,
    encode_labels,
    importable,
    require,
    standardize_t,
    stratified_holdout,
)
from .lbfgs import (
    Curvature,
    LinearFit,
    Preconditioner,
    fit_linear,
    linear_scores,
    linear_scores_t,
    sample_columns,
    targets,
)
from .registry import register_probe

if TYPE_CHECKING:
    from ..outofcore import ChunkedRows

BACKENDS = ("auto", "torch", "cuml")
PRECISIONS = ("auto", "float32", "bfloat16")
PRECOND_ROWS = 8192  # rows the preconditioner's covariance is estimated on (Preconditioner.of's default)


@register_probe("linear")  # the papers' "linear head": the same softmax-linear model on the features
@register_probe("logistic")
class LogisticProbe(ScoresHead):
    """Softmax regression, full-batch L-BFGS in torch (float32, on the device).

    ``Cs`` (sklearn's inverse L2 strength; 1.0 is sklearn's default) are tried from strongest to
    weakest on a stratified ``val_fraction`` hold-out, each fit warm-started from the previous;
    the sweep stops early once ``patience`` consecutive values score below the best so far (None:
    try them all). The sweep's fits and the refit share one set of preconditioned coordinates and
    carry L-BFGS curvature pairs from fit to fit (later fits need a fraction of the iterations).
    The best validation macro-F1 wins (ties -> stronger regularisation) and is refitted on all
    rows, warm-started from its hold-out solution. When the hold-out has fewer than 2 rows (tiny
    data) the sweep is skipped and ``C=1`` (or the middle of ``Cs``) is used. ``C_`` is the choice,
    ``val_f1_`` the sweep's scores.

    ``precondition`` (torch backend): L-BFGS on eigen-preconditioned coordinates (see
    :mod:`probes.heads.lbfgs`); same objective and minimiser, fewer iterations; costs one
    ``d x d`` eigen-decomposition per fit.

    ``precision`` (torch backend): ``"float32"``; ``"bfloat16"``: each fit first runs on a bfloat16
    copy of the features (matmuls ~4x cheaper where bf16 is native) down to the stopping rule,
    then goes on in float32 until the float32 gradient meets it too (the same stopping rule and
    objective as float32; the iterates take another path); ``"auto"``: bfloat16 on a CPU with
    native bf16 (``avx512_bf16`` / ``amx_bf16``) when the features have at least 2^22 entries,
    else float32.

    ``backend``: ``"torch"``; ``"cuml"`` (``cuml.linear_model.LogisticRegression`` for each fit,
    ImportError naming the ``gpu`` extra when missing); ``"auto"`` = cuML when the device is CUDA
    and cuML imports, else torch.
    """

    def __init__(
        self,
        Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
        val_fraction: float = 0.1,
        max_iter: int = 300,
        tol: float = 1e-4,
        backend: str = "auto",
        precondition: bool = True,
        precision: str = "auto",
        patience: int | None = 2,
        seed: int = 0,
        device: str = "auto",
    ):
        self.Cs = Cs
        self.precision = precision
        self.patience = patience
        self.val_fraction = val_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.backend = backend
        self.precondition = precondition
        self.seed = seed
        self.device = device

    def _solver(self, dev: torch.device):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; one of {BACKENDS}")
        use_cuml = self.backend == "cuml" or (self.backend == "auto" and dev.type == "cuda" and importable("cuml"))
        if not use_cuml:
            return self._fit_torch
        require("cuml.linear_model", "LogisticProbe(backend='cuml')")
        return self._fit_cuml

    def _fit_torch(self, XT, codes, K, C, init, precond=None, XT_low=None, path=None):
        curvature, precond_lam = path if path is not None else (None, None)
        return fit_linear(
            XT,
            None if codes is None else targets(codes, K, "softmax"),  # None: column blocks carry their codes
            K,
            "softmax",
            C,
            init,
            self.max_iter,
            self.tol,
            precond=precond,
            XT_low=XT_low,
            low_tol=self.tol,
            curvature=curvature,
            precond_lam=precond_lam,
        )

    def _use_bf16(self, numel: int, device: torch.device) -> bool:
        """Start the fits on bfloat16 features? (see ``precision``)"""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; one of {PRECISIONS}")
        return self.precision == "bfloat16" or (
            self.precision == "auto" and device.type == "cpu" and numel >= BF16_MIN_WORK and cpu_has_native_bf16()
        )

    def _low_precision(self, XT: torch.Tensor) -> torch.Tensor | None:
        """The bfloat16 copy of ``XT`` the fits start on, or None (see ``precision``)."""
        return XT.bfloat16() if self._use_bf16(XT.numel(), XT.device) else None

    def _fit_cuml(self, XT, codes, K, C, init, precond=None, XT_low=None, path=None):
        from cuml.linear_model import LogisticRegression

        X = XT.T.contiguous()
        clf = LogisticRegression(C=C, max_iter=max(self.max_iter, 1000), tol=self.tol, output_type="numpy")
        clf.fit(X, codes)
        coef = np.asarray(clf.coef_, dtype=np.float32).reshape(-1, X.shape[1])
        icpt = np.asarray(clf.intercept_, dtype=np.float32).reshape(-1)
        if coef.shape[0] == 1:  # binary: sigmoid(w x + b) == softmax([0, w x + b])
            coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, icpt].astype(np.float32)
        W = torch.as_tensor(coef.T.copy(), device=X.device)
        return LinearFit(W, torch.as_tensor(icpt, device=X.device), int(np.max(clf.n_iter_)), -1)

    def fit(self, X, y) -> LogisticProbe:
        """Standardise, sweep ``Cs`` on the hold-out, refit the chosen ``C`` on all rows. ``X`` may be
        rows read from the store in blocks (:class:`probes.outofcore.ChunkedRows`): see :meth:`_fit_streamed`."""
        from ..outofcore import is_chunked

        if is_chunked(X):
            return self._fit_streamed(X, y)
        X, codes, dev = self._start_fit(X, y)
        solve = self._solver(dev)
        K = len(self.classes_)
        Cs = sorted(float(c) for c in self.Cs)
        sweep = len(Cs) > 1
        if sweep:
            fit_idx, val_idx = stratified_holdout(codes, self.val_fraction, self.seed)
        else:  # one C: no hold-out, rows stay in their order
            fit_idx, val_idx = np.arange(len(codes)), np.arange(0)
        order = np.concatenate([fit_idx, val_idx])
        # transposed (d, n): the layout the solvers are fast in
        XT, self.mean_, self.scale_ = standardize_t(torch.from_numpy(X).to(dev), order if sweep else None)
        yt = torch.from_numpy(codes[order]).to(dev)
        nf = len(fit_idx)
        torch_fit = solve == self._fit_torch
        pc = Preconditioner.of(XT, PRECOND_ROWS, self.seed) if self.precondition and torch_fit else None
        XT_low = self._low_precision(XT) if torch_fit else None
        self.precision_ = "float32" if XT_low is None else "bfloat16"
        self.val_f1_: dict[float, float] = {}
        chosen, start, best, worse = (1.0 if 1.0 in Cs else Cs[len(Cs) // 2]), None, -1.0, 0
        # along the sweep and into the refit: one set of preconditioned coordinates (built for the
        # strongest C) and the L-BFGS curvature pairs carried from fit to fit
        path = (Curvature(), 1.0 / (Cs[0] * nf)) if sweep and pc is not None else None
        if len(val_idx) >= 2 and sweep:
            fit = None
            low_fit = None if XT_low is None else XT_low[:, :nf]
            for C in Cs:  # strongest first; each warm-starts the next
                fit = solve(XT[:, :nf], yt[:nf], K, C, fit, pc, low_fit, path)
                pred = linear_scores_t(XT[:, nf:], fit).argmax(1).cpu().numpy()
                f1 = f1_score(codes[val_idx], pred, average="macro")
                self.val_f1_[C] = float(f1)
                if f1 > best:
                    chosen, start, best, worse = C, fit, f1, 0
                else:
                    worse += 1
                    if self.patience is not None and worse >= self.patience:
                        break
        self.C_ = chosen
        self.coef_ = solve(XT, yt, K, chosen, start, pc, XT_low, path)
        self.n_iter_ = self.coef_.n_iter
        self.converged_ = self.coef_.converged
        return self

    def _fit_streamed(self, X: ChunkedRows, y) -> LogisticProbe:
        """The fit of :meth:`fit` on rows read block by block, never all at once: the same hold-out,
        standardisation (column moments in two passes), preconditioner (the covariance of the same
        sampled rows, summed over blocks), C sweep and refit; each objective evaluation is a pass over
        the blocks (:func:`probes.heads.lbfgs.fit_linear` on :class:`probes.outofcore.StandardizedBlocks`).
        Coefficients equal the in-memory fit's to float32 round-off. Torch backend only."""
        from embedcache.devices import resolve_device

        from ..outofcore import StandardizedBlocks, stream_moments

        self.classes_, codes = encode_labels(y, len(X))
        self.n_features_in_ = X.width
        dev = self.device_ = resolve_device(self.device)
        if self._solver(dev) != self._fit_torch:
            raise ValueError(
                "the out-of-core logistic fit streams row blocks through the torch solver; use backend='torch'"
            )
        K = len(self.classes_)
        Cs = sorted(float(c) for c in self.Cs)
        sweep = len(Cs) > 1
        if sweep:
            fit_idx, val_idx = stratified_holdout(codes, self.val_fraction, self.seed)
        else:
            fit_idx, val_idx = np.arange(len(codes)), np.arange(0)
        order = np.concatenate([fit_idx, val_idx])
        mean, var = stream_moments(X)
        self.mean_ = torch.from_numpy(mean).to(dev)
        scale = torch.from_numpy(var).sqrt().to(dev)
        self.scale_ = torch.where(scale > 1e-12 * self.mean_.abs().clamp_min(1.0), scale, torch.ones_like(scale))
        every = StandardizedBlocks(X, codes, self.mean_, self.scale_, dev)
        fitting = StandardizedBlocks(X.take(fit_idx), codes[fit_idx], self.mean_, self.scale_, dev)
        pc = None
        if self.precondition:  # the in-memory fit's sample of columns (of XT in hold-out order)
            cols = sample_columns(len(order), PRECOND_ROWS, self.seed)
            pick = order if cols is None else order[cols.numpy()]
            sample = StandardizedBlocks(X.take(pick), codes[pick], self.mean_, self.scale_, dev, keep=False)
            gram = torch.zeros(X.width, X.width, device=dev)
            for XT_i, _ in sample.blocks():
                gram.addmm_(XT_i, XT_i.T)
            pc = Preconditioner.from_gram(gram.div_(sample.shape[1]))
        bf16 = self._use_bf16(X.width * len(X), dev)
        self.precision_ = "bfloat16" if bf16 else "float32"
        self.val_f1_ = {}
        chosen, start, best, worse = (1.0 if 1.0 in Cs else Cs[len(Cs) // 2]), None, -1.0, 0
        path = (Curvature(), 1.0 / (Cs[0] * len(fit_idx))) if sweep and pc is not None else None
        if len(val_idx) >= 2 and sweep:
            fit = None
            val = X.take(val_idx)
            for C in Cs:
                fit = self._fit_torch(fitting, None, K, C, fit, pc, fitting.lowered() if bf16 else None, path)
                pred = np.empty(len(val_idx), dtype=np.int64)
                for pos, x in val.blocks():
                    xt = (torch.from_numpy(x).to(dev) - self.mean_) / self.scale_
                    pred[pos] = linear_scores(xt, fit).argmax(1).cpu().numpy()
                f1 = f1_score(codes[val_idx], pred, average="macro")
                self.val_f1_[C] = float(f1)
                if f1 > best:
                    chosen, start, best, worse = C, fit, f1, 0
                else:
                    worse += 1
                    if self.patience is not None and worse >= self.patience:
                        break
        fitting.release()  # the refit keeps blocks of all rows instead
        self.C_ = chosen
        self.coef_ = self._fit_torch(every, None, K, chosen, start, pc, every.lowered() if bf16 else None, path)
        self.n_iter_ = self.coef_.n_iter
        self.converged_ = self.coef_.converged
        return self

    def _decision(self, X: np.ndarray) -> torch.Tensor:
        """Logits (n, K) of the standardised rows."""
        Xt = torch.from_numpy(X).to(self.device_)
        return linear_scores((Xt - self.mean_) / self.scale_, self.coef_)
