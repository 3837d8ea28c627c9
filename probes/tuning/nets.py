"""The networks a fine-tune trains: trunk (tail on tokens, or frozen prefix + tail on images) + head, LoRA.

``TailModule`` (:mod:`embedcache.backbones.tail`) runs the last ``k`` blocks on cached tokens;
:class:`FullBackboneModule` runs the same tail after the frozen prefix on images, each step, so a
fine-tune from images trains exactly the parameters a fine-tune from cached tokens trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from embedcache.backbones.tail import TailModule, tail_tokens


class FullBackboneModule(nn.Module):
    """Frozen prefix (blocks ``0..L-k-1``, run in eval without grads) + a trainable copy of the tail.

    Only the tail is a registered submodule: ``parameters()`` / ``state_dict()`` are the tail's, the same
    names as a ``TailModule``'s. ``k = L`` leaves only the patch embedding frozen (``--blocks all``).
    The prefix runs on the device of the backbone's model (``.to()`` moves only the tail): move
    ``bb.model`` to the GPU too for speed; tokens travel to the tail's device.
    """

    def __init__(self, bb, k: int, pool: str | None = None):
        super().__init__()
        self.tail = TailModule(bb, k, pool=pool, copy=True)
        object.__setattr__(self, "_prefix", bb)  # not registered: frozen, never trained nor saved
        self.k = self.tail.k

    @property
    def num_prefix_tokens(self) -> int:
        return self.tail.num_prefix_tokens

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail.forward_features(self.tail_input(images))

    def pooled(self, feats: torch.Tensor, pools: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tail.pooled(feats, pools)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.tail_input(images))

    def tail_input(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's tokens for ``images``, on the device ``images`` came on."""
        model = self._prefix.model if hasattr(self._prefix, "model") else self._prefix
        where = next(model.parameters()).device
        with torch.no_grad():
            return tail_tokens(self._prefix, images.to(where), self.k).to(images.device)


class TunedNet(nn.Module):
    """``trunk`` (a ``TailModule`` / ``FullBackboneModule``, or None for pooled features) + ``head``.

    Pooled heads get the trunk's ``pool`` vector; token heads the final tokens. ``frozen_trunk`` runs
    the trunk in eval without grads (``lp``).
    """

    def __init__(self, trunk: nn.Module | None, head: nn.Module, pool: str, frozen_trunk: bool):
        super().__init__()
        self.trunk: Any = trunk  # a TailModule / FullBackboneModule (their own methods are called)
        self.head, self.pool, self.frozen_trunk = head, pool, frozen_trunk

    def train(self, mode: bool = True) -> TunedNet:
        super().train(mode)
        if self.trunk is not None and self.frozen_trunk:
            self.trunk.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: the trunk's ``pool`` vector for pooled heads, its final tokens for token heads
        (the input itself without a trunk)."""
        if self.trunk is None:
            return x.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_trunk):
            feats = self.trunk.forward_features(x)
            return self.trunk.pooled(feats, (self.pool,))[self.pool] if self.head.input == "pooled" else feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tail_of(trunk: nn.Module) -> TailModule:
    tail = trunk.tail if isinstance(trunk, FullBackboneModule) else trunk
    assert isinstance(tail, TailModule)
    return tail


__all__ = ["FullBackboneModule", "TunedNet", "tail_of"]
