"""Training losses of the fine-tunes: cross-entropy, focal, class-weighted, hierarchical focal with penalties.

Every loss maps ``(logits (B, K), codes (B,) int64)`` to the batch mean. The hierarchical focal loss
with critical penalties (the bone-marrow paper's) is, for a cell ``i`` of true class ``y`` with
softmax probabilities ``p_i``::

    q_ic   = 1 - s                      if c == y
           = s / (|lin(y)| - 1)         if c != y and c is in y's lineage lin(y)
           = 0                          otherwise           (a class alone in its lineage: q = one-hot)
    loss_i = sum_c w_y * q_ic * (1 - p_ic)^gamma * (-log p_ic)  +  lambda * sum_c P[y, c] * p_ic

with ``s`` the smoothing, ``w`` optional class weights (1 by default), ``P[t, c]`` the declared penalty
weight of calling a ``t`` cell ``c`` (0 for pairs not declared) and ``lambda`` the ``penalty_scale``. With
``s = 0``, no penalties and ``gamma = 0`` it is cross-entropy. The hierarchy file is YAML::

    lineages: {myeloid: [BLA, PMY, MY], erythroid: [EBO, PEB]}
    penalties:
      - {true: BLA, pred: NGS, weight: 5}
    smoothing: 0.1
    gamma: 2
    penalty_scale: 1.0        # optional, default 1

A malformed file, an unknown key or an unknown class raises :class:`HierarchyError` naming the line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "focal", "weighted-ce", "weighted-focal", "hierarchical-focal")


class HierarchyError(ValueError):
    """A hierarchy / penalty file that cannot be used; the message names the file and line."""


def class_weights(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (K * n_c)`` from training codes (a class with no cells: an error)."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class codes {np.flatnonzero(counts == 0).tolist()} have no training cells")
    return torch.tensor(counts.sum() / (n_classes * counts), dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``-w_y (1 - p_y)^gamma log p_y``; ``gamma = 0`` is (weighted-sum / n) cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()).clamp_min(0.0) ** gamma) * logp
    if weight is not None:
        loss = loss * weight.to(loss.device)[y]
    return loss.mean()


class CrossEntropy(nn.Module):
    """Cross-entropy, optionally class-weighted (mean over cells of ``w_y * ce``) and label-smoothed."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.label_smoothing)
        if self.weight is not None:
            ce = ce * self.weight[y]
        return ce.mean()


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a module."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = cast("torch.Tensor | None", self.weight)  # a registered buffer (or None)
        return focal_loss(logits, y, self.gamma, weight)


class HierarchicalFocalLoss(nn.Module):
    """The module docstring's loss from a target matrix ``Q`` (K, K; row t = q for true class t) and ``P``."""

    def __init__(
        self,
        targets: torch.Tensor,
        penalties: torch.Tensor,
        gamma: float = 2.0,
        penalty_scale: float = 1.0,
        weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.float32))
        self.register_buffer("penalties", torch.as_tensor(penalties, dtype=torch.float32))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.gamma = float(gamma)
        self.penalty_scale = float(penalty_scale)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        p = logp.exp()
        focal = -(self.targets[y] * (1.0 - p).clamp_min(0.0) ** self.gamma * logp).sum(dim=1)
        if self.weight is not None:
            focal = focal * self.weight[y]
        penalty = (self.penalties[y] * p).sum(dim=1)
        return (focal + self.penalty_scale * penalty).mean()


# ---------------------------------------------------------------------------------------------
# The hierarchy file
# ---------------------------------------------------------------------------------------------


@dataclass
class Hierarchy:
    """A parsed hierarchy file; ``*_lines`` keep 1-based line numbers for later class checks."""

    source: str
    lineages: dict[str, list[str]] = field(default_factory=dict)
    class_lines: dict[str, int] = field(default_factory=dict)
    penalties: list[tuple[str, str, float, int, int]] = field(default_factory=list)  # true, pred, w, lines
    smoothing: float = 0.0
    gamma: float = 2.0
    penalty_scale: float = 1.0

    def matrices(self, classes: Sequence | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, P)`` over ``classes`` (their order); every class the file names must be one of them."""
        names = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(names)}
        for cls, line in self.class_lines.items():
            if cls not in index:
                raise HierarchyError(
                    f"{self.source}, line {line}: unknown class {cls!r}; the classes are {', '.join(names)}"
                )
        for t, p, _, lt, lp in self.penalties:
            for cls, line in ((t, lt), (p, lp)):
                if cls not in index:
                    raise HierarchyError(
                        f"{self.source}, line {line}: unknown class {cls!r} in a penalty; "
                        f"the classes are {', '.join(names)}"
                    )
        k = len(names)
        Q = torch.eye(k)
        for members in self.lineages.values():
            idx = [index[m] for m in members]
            if len(idx) < 2 or self.smoothing == 0:
                continue
            for row in idx:
                Q[row, idx] = self.smoothing / (len(idx) - 1)
                Q[row, row] = 1.0 - self.smoothing
        P = torch.zeros(k, k)
        for t, p, w, _, _ in self.penalties:
            P[index[t], index[p]] = w
        return Q, P


def _line(node) -> int:
    return node.start_mark.line + 1


def _scalar(node, source: str, what: str) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise HierarchyError(f"{source}, line {_line(node)}: {what} must be a single value")
    return str(node.value)


def _number(node, source: str, what: str, lo: float, hi: float | None = None) -> float:
    text = _scalar(node, source, what)
    try:
        v = float(text)
    except ValueError:
        raise HierarchyError(f"{source}, line {_line(node)}: {what} must be a number, got {text!r}") from None
    if not np.isfinite(v) or v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" + (f" and < {hi}" if hi is not None else "")
        raise HierarchyError(f"{source}, line {_line(node)}: {what} must be {rng}, got {v}")
    return v


def parse_hierarchy(text: str, source: str = "<hierarchy>") -> Hierarchy:
    """Parse hierarchy YAML text (see the module docstring); errors name ``source`` and the line."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise HierarchyError(f"{source}{at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise HierarchyError(
            f"{source}, line {1 if root is None else _line(root)}: expected a mapping with keys "
            "lineages, penalties, smoothing, gamma (penalty_scale optional)"
        )
    h = Hierarchy(source)
    seen: set[str] = set()
    for knode, vnode in root.value:
        key = _scalar(knode, source, "a top-level key")
        if key in seen:
            raise HierarchyError(f"{source}, line {_line(knode)}: {key!r} is given twice")
        seen.add(key)
        if key == "lineages":
            _parse_lineages(vnode, h)
        elif key == "penalties":
            _parse_penalties(vnode, h)
        elif key == "smoothing":
            h.smoothing = _number(vnode, source, "smoothing", 0.0, 1.0)
        elif key == "gamma":
            h.gamma = _number(vnode, source, "gamma", 0.0)
        elif key == "penalty_scale":
            h.penalty_scale = _number(vnode, source, "penalty_scale", 0.0)
        else:
            raise HierarchyError(
                f"{source}, line {_line(knode)}: unknown key {key!r}; "
                "use lineages, penalties, smoothing, gamma, penalty_scale"
            )
    return h


def _parse_lineages(node, h: Hierarchy) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise HierarchyError(f"{h.source}, line {_line(node)}: lineages must map a lineage name to a list of classes")
    for knode, vnode in node.value:
        name = _scalar(knode, h.source, "a lineage name")
        if name in h.lineages:
            raise HierarchyError(f"{h.source}, line {_line(knode)}: lineage {name!r} is given twice")
        if not isinstance(vnode, yaml.SequenceNode):
            raise HierarchyError(f"{h.source}, line {_line(vnode)}: lineage {name!r} must be a list of classes")
        members = []
        for item in vnode.value:
            cls = _scalar(item, h.source, f"a class of lineage {name!r}")
            if cls in h.class_lines:
                raise HierarchyError(
                    f"{h.source}, line {_line(item)}: class {cls!r} is already in a lineage "
                    f"(line {h.class_lines[cls]}); a class belongs to one lineage"
                )
            h.class_lines[cls] = _line(item)
            members.append(cls)
        h.lineages[name] = members


def _parse_penalties(node, h: Hierarchy) -> None:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise HierarchyError(
            f"{h.source}, line {_line(node)}: penalties must be a list of {{true: CLASS, pred: CLASS, weight: NUMBER}}"
        )
    for item in node.value:
        if not isinstance(item, yaml.MappingNode):
            raise HierarchyError(
                f"{h.source}, line {_line(item)}: a penalty must be {{true: CLASS, pred: CLASS, weight: NUMBER}}"
            )
        fields = {}
        for knode, vnode in item.value:
            key = _scalar(knode, h.source, "a penalty key")
            if key not in ("true", "pred", "weight"):
                raise HierarchyError(
                    f"{h.source}, line {_line(knode)}: unknown penalty key {key!r}; use true, pred, weight"
                )
            fields[key] = vnode
        missing = [k for k in ("true", "pred", "weight") if k not in fields]
        if missing:
            raise HierarchyError(f"{h.source}, line {_line(item)}: penalty lacks {', '.join(missing)}")
        t = _scalar(fields["true"], h.source, "penalty 'true'")
        p = _scalar(fields["pred"], h.source, "penalty 'pred'")
        if t == p:
            raise HierarchyError(f"{h.source}, line {_line(item)}: a penalty needs two different classes, got {t!r}")
        w = _number(fields["weight"], h.source, "penalty weight", 0.0)
        earlier = next((pen for pen in h.penalties if pen[0] == t and pen[1] == p), None)
        if earlier is not None:
            raise HierarchyError(
                f"{h.source}, line {_line(item)}: the penalty {t!r} -> {p!r} is declared twice (first on line "
                f"{earlier[3]}); one weight per pair"
            )
        h.penalties.append((t, p, w, _line(fields["true"]), _line(fields["pred"])))


def load_hierarchy(path: str | os.PathLike) -> Hierarchy:
    """Read and parse a hierarchy YAML file."""
    path = Path(path)
    if not path.is_file():
        raise HierarchyError(f"hierarchy file not found: {str(path)!r}")
    return parse_hierarchy(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def make_loss(
    name: str,
    classes: Sequence | np.ndarray,
    codes: np.ndarray | None = None,
    *,
    gamma: float | None = None,
    weights: Sequence[float] | None = None,
    hierarchy: str | os.PathLike | Hierarchy | None = None,
) -> nn.Module:
    """A loss module over ``classes`` (codes 0..K-1 in that order).

    ``weighted-*``: ``weights`` (one per class) or inverse frequencies of the training ``codes``;
    ``focal``: ``gamma`` (default 2); ``hierarchical-focal``: ``hierarchy`` (path or :class:`Hierarchy`),
    whose ``gamma`` a given ``gamma`` overrides; class weights apply to it when ``weights`` is given.
    """
    k = len(classes)
    w = None
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.shape != (k,) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"class weights need {k} finite non-negative values, got shape {tuple(w.shape)}")
    if name in ("ce", "focal") and w is not None:
        raise ValueError(f"loss {name!r} takes no class weights; use 'weighted-{name}'")
    if name.startswith("weighted-") and w is None:
        if codes is None:
            raise ValueError(f"loss {name!r} needs weights or the training codes")
        w = class_weights(codes, k)
    if name != "hierarchical-focal" and hierarchy is not None:
        raise ValueError(f"a hierarchy file applies to 'hierarchical-focal' only, not {name!r}")
    if name in ("ce", "weighted-ce"):
        return CrossEntropy(w)
    if name in ("focal", "weighted-focal"):
        return FocalLoss(2.0 if gamma is None else gamma, w)
    if name == "hierarchical-focal":
        if hierarchy is None:
            raise ValueError("loss 'hierarchical-focal' needs a hierarchy file (lineages, penalties)")
        h = hierarchy if isinstance(hierarchy, Hierarchy) else load_hierarchy(hierarchy)
        Q, P = h.matrices(classes)
        return HierarchicalFocalLoss(Q, P, h.gamma if gamma is None else gamma, h.penalty_scale, w)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


__all__ = [
    "LOSSES",
    "CrossEntropy",
    "FocalLoss",
    "HierarchicalFocalLoss",
    "Hierarchy",
    "HierarchyError",
    "class_weights",
    "focal_loss",
    "load_hierarchy",
    "make_loss",
    "parse_hierarchy",
]
