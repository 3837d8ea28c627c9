"""``svm`` (linear, one-vs-rest, squared hinge + L2) and ``svm-rbf`` (kernel SVC) probes.

``predict_proba`` of both is the softmax of the decision scores: a ranking score that sums to
one, **not** a calibrated probability.
"""

from __future__ import annotations

import numpy as np
import torch

from probes.heads.base import ScoresHead, decision_to_2d, importable, require, standardize, standardize_t
from probes.heads.lbfgs import (
    LinearFit,
    Preconditioner,
    fit_linear,
    linear_scores,
    targets,
    wants_preconditioner,
)


class _StandardisedScores(ScoresHead):
    """Standardise with train statistics; subclasses give ``_scores(Xs) -> (n, K)`` tensors."""

    def _standardise_fit(self, X: np.ndarray, dev: torch.device) -> torch.Tensor:
        Xs, self.mean_, self.scale_ = standardize(torch.from_numpy(X).to(dev))
        return Xs

    def _decision(self, X: np.ndarray) -> torch.Tensor:
        """Decision scores (n, K) of raw rows, one column per class of ``classes_``."""
        Xt = torch.from_numpy(X).to(self.device_)
        return self._scores((Xt - self.mean_) / self.scale_)


def _external_scores(model, Xs: torch.Tensor, on_device: bool) -> torch.Tensor:
    """Decision scores of a scikit-learn (CPU) / cuML (device) model as a (n, K) tensor."""
    data = Xs if on_device else Xs.cpu().numpy()
    d = model.decision_function(data)
    d = d.get() if hasattr(d, "get") else np.asarray(d)  # cupy -> numpy
    return torch.from_numpy(decision_to_2d(d)).to(Xs.device)


class LinearSVMProbe(_StandardisedScores):
    """What ``LinearSVC(C)`` optimises (one-vs-rest squared hinge + L2, C=1 by default), on
    standardised features. ``backend="torch"`` (default): full-batch L-BFGS over all K classes at
    once on the device (eigen-preconditioned unless ``precondition`` is False; ``"auto"``: from 1.5 rows per
    feature on; see :mod:`probes.heads.lbfgs`).

    ``intercept_scaling``: None (default) leaves the intercept unpenalised; a number ``s``
    penalises it exactly as liblinear does (``LinearSVC(intercept_scaling=s)``; its default is 1),
    for results that match ``LinearSVC`` itself. The difference matters when the classes are
    nearly separable (small loss, large intercepts): liblinear's penalty shrinks the intercepts,
    which costs rare classes recall (on the synthetic benchmark, several macro-F1 points).

    ``backend="sklearn"``:
    ``sklearn.svm.LinearSVC``; ``"cuml"``: ``cuml.svm.LinearSVC`` (ImportError naming the ``gpu``
    extra when missing). ``predict_proba`` = softmax of the scores (not calibrated)."""

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 300,
        tol: float = 1e-4,
        backend: str = "torch",
        precondition: bool | str = True,
        intercept_scaling: float | None = None,
        seed: int = 0,
        device: str = "auto",
    ):
        self.C = C
        self.intercept_scaling = intercept_scaling
        self.max_iter = max_iter
        self.tol = tol
        self.backend = backend
        self.precondition = precondition
        self.seed = seed
        self.device = device

    def fit(self, X, y) -> LinearSVMProbe:
        """Standardise, then fit all K one-vs-rest classifiers."""
        X, codes, dev = self._start_fit(X, y)
        if self.backend not in ("torch", "sklearn", "cuml"):
            raise ValueError(f"backend={self.backend!r}; one of ('torch', 'sklearn', 'cuml')")
        if self.backend == "cuml":
            require("cuml.svm", "LinearSVMProbe(backend='cuml')")
        K = len(self.classes_)
        if self.backend == "torch":
            yt = torch.from_numpy(codes).to(dev)
            # transposed (d, n): the layout the solver is fast in
            XT, self.mean_, self.scale_ = standardize_t(torch.from_numpy(X).to(dev))
            n_rows = XT.shape[1]
            precond = (
                Preconditioner.of(XT, seed=self.seed)
                if wants_preconditioner(self.precondition, n_rows, XT.shape[0])
                else None
            )
            self.coef_: LinearFit = fit_linear(
                XT,
                targets(yt, K, "squared_hinge"),
                K,
                "squared_hinge",
                self.C,
                None,
                self.max_iter,
                self.tol,
                precond=precond,
                intercept_scaling=self.intercept_scaling,
            )
            self.n_iter_ = self.coef_.n_iter
            self.converged_ = self.coef_.converged
        elif self.backend == "sklearn":
            from sklearn.svm import LinearSVC

            Xs = self._standardise_fit(X, dev)
            self.model_ = LinearSVC(C=self.C, intercept_scaling=self.intercept_scaling or 1.0, random_state=self.seed)
            self.model_.fit(Xs.cpu().numpy(), codes)
        else:
            from cuml.svm import LinearSVC

            Xs = self._standardise_fit(X, dev)
            self.model_ = LinearSVC(C=self.C, loss="squared_hinge", penalty="l2").fit(Xs, codes)
        return self

    def _scores(self, Xs: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return linear_scores(Xs, self.coef_)
        return _external_scores(self.model_, Xs, self.backend == "cuml")


class RBFSVMProbe(_StandardisedScores):
    """Kernel SVM (RBF) on standardised features: ``sklearn.svm.SVC(kernel="rbf")`` on CPU,
    ``cuml.svm.SVC`` on CUDA (``backend="auto"`` picks cuML when the device is CUDA and cuML
    imports; ``"cuml"`` insists, ImportError naming the ``gpu`` extra). ``predict_proba`` = softmax
    of the one-vs-rest decision scores (not calibrated; no Platt scaling is fitted); ``predict`` is
    their arg-max, i.e. ``SVC(break_ties=True).predict`` (plain ``SVC`` breaks one-vs-one vote
    ties by class order instead: about 1% of cells differ on hard data)."""

    def __init__(
        self, C: float = 1.0, gamma: str | float = "scale", backend: str = "auto", seed: int = 0, device: str = "auto"
    ):
        self.C = C
        self.gamma = gamma
        self.backend = backend
        self.seed = seed
        self.device = device

    def fit(self, X, y) -> RBFSVMProbe:
        """Standardise, then fit the kernel SVM."""
        X, codes, dev = self._start_fit(X, y)
        if self.backend not in ("auto", "sklearn", "cuml"):
            raise ValueError(f"backend={self.backend!r}; one of ('auto', 'sklearn', 'cuml')")
        use_cuml = self.backend == "cuml" or (self.backend == "auto" and dev.type == "cuda" and importable("cuml"))
        Xs = self._standardise_fit(X, dev)
        if use_cuml:
            cuml_svc = require("cuml.svm", "RBFSVMProbe(backend='cuml')").SVC
            self.model_ = cuml_svc(kernel="rbf", C=self.C, gamma=self.gamma, probability=False).fit(Xs, codes)
        else:
            from sklearn.svm import SVC

            self.model_ = SVC(kernel="rbf", C=self.C, gamma=self.gamma, random_state=self.seed)
            self.model_.fit(Xs.cpu().numpy(), codes)
        self.backend_ = "cuml" if use_cuml else "sklearn"
        return self

    def _scores(self, Xs: torch.Tensor) -> torch.Tensor:
        return _external_scores(self.model_, Xs, self.backend_ == "cuml")
