"""``scratch-vit``: the small-patch paper's task-specific ViT, trained from scratch on the cells.

40 x 40 input, 8 x 8 patches (25 tokens + a class token), width 160, 6 blocks, 4 heads, MLP 640,
dropout 0.2: 1.89 M parameters with 20 classes (timm ``VisionTransformer``). It reads images at the
working size (:class:`probes.tuning.augment.CellImages`), with the same training loop, hold-out
epoch choice, early stopping, losses and augmentations as the fine-tunes.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from torch import nn

from probes.tuning.estimator import FineTuneProbe
from probes.tuning.nets import TunedNet

SCRATCH_VIT = {
    "img_size": 40,
    "patch_size": 8,
    "embed_dim": 160,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "drop_rate": 0.2,
}
SCRATCH_DEFAULTS = (1e-3, 0.05)  # AdamW-style lr and weight decay for training from scratch


def scratch_vit(n_classes: int, img_size: int = 40, **overrides) -> nn.Module:
    """The paper's small ViT (timm ``VisionTransformer``) for ``n_classes`` at ``img_size`` px."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = {**SCRATCH_VIT, "img_size": int(img_size), **overrides}
    if cfg["img_size"] % cfg["patch_size"]:
        raise ValueError(
            f"scratch-vit input {cfg['img_size']} px is not a multiple of its {cfg['patch_size']} px patches"
        )
    return VisionTransformer(num_classes=int(n_classes), **cfg)


class ScratchViTProbe(FineTuneProbe):
    """The small ViT trained from scratch on images (N, 3, S, S) from an image reader.

    Same parameters as :class:`FineTuneProbe` (``backbone``, ``k``, LoRA and pooled options are unused;
    ``head`` must be ``linear``: the network's own class-token head).
    """

    _methods = ("scratch-vit",)

    def __init__(self, *args, method: str = "scratch-vit", **params):
        super().__init__(*args, **{**params, "method": method})

    __init__.__signature__ = inspect.signature(FineTuneProbe.__init__).replace(  # type: ignore[attr-defined]
        parameters=[  # sklearn's get_params
            p.replace(default="scratch-vit") if p.name == "method" else p
            for p in inspect.signature(FineTuneProbe.__init__).parameters.values()
        ]
    )

    def _method_defaults(self) -> tuple[float, float]:
        return SCRATCH_DEFAULTS

    def _build(self, sample: np.ndarray, kind: str, n_classes: int) -> TunedNet:
        if kind != "images" or sample.ndim != 4 or sample.shape[1] != 3 or sample.shape[2] != sample.shape[3]:
            raise ValueError(
                f"scratch-vit trains on square images (N, 3, S, S), got {kind} of shape {sample.shape[1:]}"
            )
        if self.head != "linear":
            raise ValueError(f"scratch-vit has its own class-token linear head; head {self.head!r} does not apply")
        net = scratch_vit(n_classes, img_size=int(sample.shape[2]))
        head: Any = net  # nn.Module types its attributes as tensors or modules
        head.input = "pooled"  # what TunedNet asks a head
        return TunedNet(None, head, "cls", frozen_trunk=False)


__all__ = ["SCRATCH_VIT", "ScratchViTProbe", "scratch_vit"]
