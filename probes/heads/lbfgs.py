"""Full-batch L-BFGS for L2-regularised linear classifiers over all K classes at once (torch).

Objective, with ``lam = 1 / (C * n)`` so that ``C`` means what it means in scikit-learn::

    mean_i loss(x_i W + b, y_i) + lam / 2 * ||W||^2        (intercept not penalised)

``loss`` is ``"softmax"`` (multinomial cross-entropy: logistic regression) or
``"squared_hinge"`` (one-vs-rest, summed over classes: what ``LinearSVC`` optimises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("softmax", "squared_hinge")


@dataclass
class LinearFit:
    """Weights ``W`` (d, K) and intercept ``b`` (K,) on the device, plus solver counts."""

    W: torch.Tensor
    b: torch.Tensor
    n_iter: int
    n_evals: int


def targets(codes: torch.Tensor, n_classes: int, loss: str) -> torch.Tensor:
    """What ``loss`` compares scores with: class codes (softmax) or +-1 (n, K) (squared hinge)."""
    if loss == "softmax":
        return codes
    if loss == "squared_hinge":
        return F.one_hot(codes, n_classes).float().mul_(2).sub_(1)
    raise ValueError(f"unknown loss {loss!r}; one of {LOSSES}")


def data_loss(scores: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over rows of the loss of ``scores`` (n, K) against ``target``."""
    if loss == "softmax":
        return F.cross_entropy(scores, target)
    return (1 - target * scores).clamp_min_(0).square().sum(1).mean()


def fit_linear(
    X: torch.Tensor,
    target: torch.Tensor,
    n_classes: int,
    loss: str,
    C: float,
    init: LinearFit | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    history_size: int = 10,
) -> LinearFit:
    """Minimise the objective above with ``torch.optim.LBFGS`` (strong-Wolfe line search).

    Stops after ``max_iter`` iterations, when the largest gradient entry is below ``tol``, or
    when the objective changes by less than ``tol * 1e-2`` between iterations. ``init`` warm-starts.
    """
    n, d = X.shape
    lam = 1.0 / (C * n)
    W = (init.W.clone() if init is not None else torch.zeros(d, n_classes, device=X.device)).requires_grad_()
    b = (init.b.clone() if init is not None else torch.zeros(n_classes, device=X.device)).requires_grad_()
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.5) + 5,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-2,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        obj = data_loss(torch.addmm(b, X, W), target, loss) + 0.5 * lam * W.square().sum()
        obj.backward()
        return obj

    opt.step(closure)
    state = opt.state[W]
    return LinearFit(W.detach(), b.detach(), int(state.get("n_iter", 0)), int(state.get("func_evals", 0)))


@torch.no_grad()
def linear_scores(X: torch.Tensor, fit: LinearFit, chunk: int = 65536) -> torch.Tensor:
    """Decision scores ``X W + b`` (n, K), in row chunks."""
    return torch.cat([torch.addmm(fit.b, X[i : i + chunk], fit.W) for i in range(0, len(X), chunk)])
