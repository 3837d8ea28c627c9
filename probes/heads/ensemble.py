"""Head-diverse ensembles as an estimator: several probe heads on one set of features, combined by a
rule of :mod:`probes.heads.ensemble_rules` (the paper's ``override``, ``majority``, ``mean``).

:class:`EnsembleProbe` is registered as the parameterised probe names ``ensemble:<head>+<head>+<head>``
(override, primary = the first head, pairs chosen on a hold-out of the training cells),
``ensemble-vote:...`` (majority) and ``ensemble-mean:...`` (probability averaging), so
``probes scale/eval --probes ensemble:mlp+logistic+cosine`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from probes.heads.base import ProbeBase, check_X, encode_labels, stratified_holdout
from probes.heads.ensemble_rules import MIN_OVERRIDE_HEADS, RULES, auto_pairs, combine, parse_pairs
from probes.heads.registry import PROBES, make_probe


# -- the estimator ------------------------------------------------------------------------------
def _parse_members(arg: str, rule: str) -> dict[str, Any]:
    heads = [h.strip() for h in arg.split("+") if h.strip()]
    if len(heads) != len(set(heads)):
        raise ValueError(f"ensemble members repeat a head: {arg!r}")
    unknown = [h for h in heads if not PROBES.is_plain(h)]
    if unknown:
        raise ValueError(
            f"unknown ensemble member(s) {', '.join(unknown)}; members are plain probes: {', '.join(PROBES)}"
        )
    need = MIN_OVERRIDE_HEADS if rule == "override" else 2
    if len(heads) < need:
        raise ValueError(f"an ensemble ({rule}) needs at least {need} heads joined by '+', got {arg!r}")
    return {"heads": tuple(heads), "rule": rule}


def parse_override(arg: str) -> dict[str, Any]:
    """``ensemble:<heads>``: the override rule, primary = the first head."""
    return _parse_members(arg, "override")


def parse_vote(arg: str) -> dict[str, Any]:
    """``ensemble-vote:<heads>``: majority vote."""
    return _parse_members(arg, "majority")


def parse_mean(arg: str) -> dict[str, Any]:
    """``ensemble-mean:<heads>``: probability averaging."""
    return _parse_members(arg, "mean")


class EnsembleProbe(ProbeBase):
    """Heads fitted on the same cells, combined by ``rule`` (:data:`RULES`, see :func:`combine`).

    ``heads``: probe names (:data:`probes.heads.PROBES`); ``primary``: the primary head (default the
    first). ``pairs`` (override): ``"A:B,C:D"``, a list of pairs, or ``"auto"``: the ``n_pairs``
    pairs the primary head confuses most on a stratified ``val_fraction`` hold-out of the training
    cells (heads fitted on the rest), after which every head is refitted on all training cells.
    ``pairs_`` holds the pairs used and ``pair_counts_`` their hold-out confusions (auto).
    """

    NAME_PATTERN = "<head>+<head>+..."

    def __init__(
        self,
        heads: Sequence[str] = ("mlp", "logistic", "cosine"),
        rule: str = "override",
        primary: str | None = None,
        pairs: str | Sequence[Sequence[str]] = "auto",
        n_pairs: int = 4,
        val_fraction: float = 0.2,
        seed: int = 0,
        device: str = "auto",
    ):
        self.heads = heads
        self.rule = rule
        self.primary = primary
        self.pairs = pairs
        self.n_pairs = n_pairs
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device

    def _members(self) -> list[Any]:
        out = []
        for name in self.heads:
            est = make_probe(name, seed=self.seed, device=self.device)
            if not callable(getattr(est, "predict_proba", None)):
                raise ValueError(f"ensemble member {name!r} gives no class probabilities (no predict_proba)")
            out.append(est)
        return out

    def _check_params(self) -> int:
        heads = list(self.heads)
        if self.rule not in RULES:
            raise ValueError(f"unknown ensemble rule {self.rule!r}; one of {', '.join(RULES)}")
        need = MIN_OVERRIDE_HEADS if self.rule == "override" else 2
        if len(heads) < need or len(set(heads)) != len(heads):
            raise ValueError(f"an ensemble ({self.rule}) needs at least {need} distinct heads, got {heads}")
        primary = heads[0] if self.primary is None else self.primary
        if primary not in heads:
            raise ValueError(f"primary head {primary!r} is not one of the heads {heads}")
        return heads.index(primary)

    def fit(self, X, y) -> EnsembleProbe:
        """Fit every head (for ``pairs="auto"``: first on the fit part to choose the pairs, then on all)."""
        self.primary_index_ = self._check_params()
        X = check_X(X)
        self.classes_, codes = encode_labels(y, len(X))
        self.n_features_in_ = X.shape[1]
        y = np.asarray(y).ravel()
        self.pair_counts_: dict[str, int] = {}
        if self.rule != "override":
            self.pairs_: list[tuple[str, str]] = []
        elif not (isinstance(self.pairs, str) and self.pairs.strip().lower() == "auto"):
            self.pairs_ = parse_pairs(self.pairs, self.classes_.astype(str))
        else:
            fit_idx, val_idx = stratified_holdout(codes, self.val_fraction if len(X) >= 20 else 0.0, self.seed)
            self.pairs_ = []
            if len(val_idx):
                head = self._members()[self.primary_index_]
                head.fit(X[fit_idx], y[fit_idx])
                ranked = auto_pairs(
                    y[val_idx].astype(str), np.asarray(head.predict(X[val_idx])).astype(str), self.n_pairs
                )
                self.pairs_ = [p for p, _ in ranked]
                self.pair_counts_ = {f"{a}:{b}": c for (a, b), c in ranked}
        self.members_ = [est.fit(X, y) for est in self._members()]
        return self

    def _member_probas(self, X: np.ndarray) -> list[np.ndarray]:
        out = []
        for est in self.members_:
            order = {c: i for i, c in enumerate(np.asarray(est.classes_).astype(str))}
            cols = [order[c] for c in self.classes_.astype(str)]
            out.append(np.asarray(est.predict_proba(X))[:, cols])
        return out

    def _combined(self, X) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        X = check_X(X, self.n_features_in_)
        return combine(
            self.rule, self._member_probas(X), self.classes_.astype(str), primary=self.primary_index_, pairs=self.pairs_
        )

    def _proba(self, X: np.ndarray) -> np.ndarray:
        return self._combined(X)[1].astype(np.float32)

    def predict(self, X) -> np.ndarray:
        """The rule's labels (override / majority ties follow the rule, not the argmax of the probabilities)."""
        labels = self._combined(X)[0]
        position = {c: i for i, c in enumerate(self.classes_.astype(str).tolist())}
        return self.classes_[np.array([position[v] for v in labels.tolist()], dtype=np.int64)]
