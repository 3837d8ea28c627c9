"""``logistic``: multinomial L2 logistic regression on standardised features, with a small
regularisation sweep on a seeded, stratified validation split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score

from probes.heads.base import (
    BF16_MIN_WORK,
    ScoresHead,
    cpu_has_native_bf16,
    encode_labels,
    importable,
    require,
    resolve_device,
    stratified_holdout,
)
from probes.heads.blocks import RowBlocks, column_moments, read_rows, row_blocks, standardized_t
from probes.heads.lbfgs import (
    Curvature,
    LinearFit,
    Preconditioner,
    fit_linear,
    linear_scores,
    linear_scores_t,
    sample_columns,
    targets,
    wants_preconditioner,
)

BACKENDS = ("auto", "torch", "cuml")
PRECISIONS = ("auto", "float32", "bfloat16")
SELECTS = ("macro_f1", "log_loss")  # what the C sweep picks by
PRECOND_ROWS = 8192  # rows the preconditioner's covariance is estimated on (Preconditioner.of's default)


class LogisticProbe(ScoresHead):
    """Softmax regression, full-batch L-BFGS in torch (float32, on the device).

    ``Cs`` (sklearn's inverse L2 strength; 1.0 is sklearn's default) are tried from strongest to
    weakest on a stratified ``val_fraction`` hold-out, each fit warm-started from the previous;
    the sweep stops early once ``patience`` consecutive values score below the best so far (None:
    try them all). The sweep's fits and the refit share one set of preconditioned coordinates and
    carry L-BFGS curvature pairs from fit to fit (later fits need a fraction of the iterations).
    The best validation score wins (ties -> stronger regularisation) and is refitted on all
    rows, warm-started from its hold-out solution: ``select="macro_f1"`` (the default: what a study
    reports) or ``"log_loss"`` (the hold-out's mean negative log-likelihood, negated: a proper scoring
    rule, for uses that rank by the probabilities themselves, such as the label audit). When the
    hold-out has fewer than 2 rows (tiny data) the sweep is skipped and ``C=1`` (or the middle of
    ``Cs``) is used. ``C_`` is the choice, ``val_f1_`` the sweep's scores (macro-F1, or minus the log-loss).

    ``precondition`` (torch backend): L-BFGS on eigen-preconditioned coordinates (see
    :mod:`probes.heads.lbfgs`); same objective and minimiser, fewer iterations; costs one
    ``d x d`` eigen-decomposition per fit. ``"auto"``: only from 1.5 rows per feature
    on (:func:`probes.heads.lbfgs.wants_preconditioner`): faster on small data, but without it the fits on real
    features can stall in float32 before meeting the stopping rule (the demo's 665-cell sweep did), so the
    default stays True.

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
        precondition: bool | str = True,
        precision: str = "auto",
        patience: int | None = 2,
        select: str = "macro_f1",
        seed: int = 0,
        device: str = "auto",
    ):
        self.Cs = Cs
        self.select = select
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

    def _fit_cuml(self, XT, codes, K, C, init, precond=None, XT_low=None, path=None):
        from cuml.linear_model import LogisticRegression

        if codes is None:  # standardised blocks carrying their codes (StandardizedBlocks)
            XT, codes = XT.to_tensors()
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
        """Standardise, sweep ``Cs`` on the hold-out, refit the chosen ``C`` on all rows.

        ``X`` may be rows read from the store block by block, never all at once
        (:class:`probes.features.chunked.ChunkedRows`; torch backend only): each objective evaluation is then a
        pass over the blocks. Rows in memory and rows out of core go through the same blocks, sums and
        order (:mod:`probes.heads.blocks`), so the coefficients are the same bit for bit."""
        from probes.features.chunked import is_chunked

        streamed = is_chunked(X)
        if streamed:
            self.classes_, codes = encode_labels(y, len(X))
            self.n_features_in_ = X.width
            dev = self.device_ = resolve_device(self.device)
        else:
            X, codes, dev = self._start_fit(X, y)
        solve = self._solver(dev)
        torch_fit = solve == self._fit_torch
        if streamed and not torch_fit:
            raise ValueError(
                "the out-of-core logistic fit streams row blocks through the torch solver; use backend='torch'"
            )
        if self.select not in SELECTS:
            raise ValueError(f"select={self.select!r}; one of {SELECTS}")
        K = len(self.classes_)
        Cs = sorted(float(c) for c in self.Cs)
        sweep = len(Cs) > 1
        if sweep:
            fit_idx, val_idx = stratified_holdout(codes, self.val_fraction, self.seed)
        else:  # one C: no hold-out, rows stay in their order
            fit_idx, val_idx = np.arange(len(codes)), np.arange(0)
        self.mean_, self.scale_ = column_moments(X, dev)
        # blocks of the fit rows, then of the hold-out rows: the sweep runs on the first, the refit on all
        width = X.shape[1]
        fit_parts = row_blocks(fit_idx, width)
        parts, n_fit = fit_parts + row_blocks(val_idx, width), len(fit_parts)
        rows = RowBlocks(X, codes, parts, self.mean_, self.scale_, dev, X.cache_bytes if streamed else None)
        fitting, val, every = rows.view(range(n_fit)), rows.view(range(n_fit, len(parts))), rows.view(range(len(parts)))
        pc = None
        if torch_fit and wants_preconditioner(self.precondition, len(codes), X.shape[1]):
            # the covariance of all rows (a seeded sample of them beyond PRECOND_ROWS), in one block
            order = np.concatenate([fit_idx, val_idx])
            cols = sample_columns(len(order), PRECOND_ROWS, self.seed)
            XT_s = standardized_t(
                read_rows(X, order if cols is None else order[cols.numpy()]), self.mean_, self.scale_, dev
            )
            pc = Preconditioner.from_gram((XT_s @ XT_s.T).div_(XT_s.shape[1]))
            del XT_s
        bf16 = torch_fit and self._use_bf16(X.shape[1] * len(X), dev)
        self.precision_ = "bfloat16" if bf16 else "float32"
        self.val_f1_: dict[float, float] = {}
        chosen, start, best, worse = (1.0 if 1.0 in Cs else Cs[len(Cs) // 2]), None, -1.0, 0
        # along the sweep and into the refit: one set of preconditioned coordinates (built for the
        # strongest C) and the L-BFGS curvature pairs carried from fit to fit
        path = (Curvature(), 1.0 / (Cs[0] * len(fit_idx))) if sweep and pc is not None else None
        if len(val_idx) >= 2 and sweep:
            fit = None
            for C in Cs:  # strongest first; each warm-starts the next
                fit = solve(fitting, None, K, C, fit, pc, fitting.lowered() if bf16 else None, path)
                f1 = self._hold_out_score(fit, val, codes[val_idx])
                self.val_f1_[C] = float(f1)
                if f1 > best:
                    chosen, start, best, worse = C, fit, f1, 0
                else:
                    worse += 1
                    if self.patience is not None and worse >= self.patience:
                        break
        self.C_ = chosen
        self.coef_ = solve(every, None, K, chosen, start, pc, every.lowered() if bf16 else None, path)
        rows.release()
        self.n_iter_ = self.coef_.n_iter
        self.converged_ = self.coef_.converged
        return self

    def _hold_out_score(self, fit: LinearFit, val, truth: np.ndarray) -> float:
        """The sweep's score of ``fit`` on the hold-out blocks ``val`` (higher is better; see ``select``)."""
        scores = torch.cat([linear_scores_t(XT_i, fit) for XT_i, _ in val.blocks()])
        if self.select == "log_loss":
            nll = torch.nn.functional.cross_entropy(scores, torch.from_numpy(truth).to(scores.device))
            return -float(nll)
        return float(f1_score(truth, scores.argmax(1).cpu().numpy(), average="macro"))

    def _decision(self, X: np.ndarray) -> torch.Tensor:
        """Logits (n, K) of the standardised rows."""
        Xt = torch.from_numpy(X).to(self.device_)
        return linear_scores((Xt - self.mean_) / self.scale_, self.coef_)
