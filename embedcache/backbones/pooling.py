"""Turn a backbone's token or feature-map output into pooled vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

POOLS = ("cls", "mean")


def parse_pools(pool: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """``"cls,mean"`` or ``["cls"]`` -> ``("cls", "mean")``; validates the names."""
    if pool is None or pool == "" or pool == ():
        names = list(default)
    elif isinstance(pool, str):
        names = [p.strip() for p in pool.split(",") if p.strip()]
    else:
        names = list(pool)
    bad = [p for p in names if p not in POOLS]
    if bad or not names:
        raise ValueError(f"pooling must be one or more of {', '.join(POOLS)} (comma separated), got {pool!r}")
    return tuple(dict.fromkeys(names))


def check_pools(pools: Sequence[str], num_prefix_tokens: int, name: str) -> None:
    """A model without a class token can only give ``mean``."""
    if "cls" in pools and num_prefix_tokens == 0:
        raise ValueError(f"backbone '{name}' has no class token: use --pool mean")


@torch.inference_mode()
def embed(
    model: torch.nn.Module, x: torch.Tensor, pools: Sequence[str], num_prefix_tokens: int
) -> dict[str, torch.Tensor]:
    """Run ``model.forward_features`` and pool.

    ``cls`` is the first token after the final norm; ``mean`` averages the patch tokens
    only (class and register tokens excluded). For CNN / Swin feature maps, ``mean`` is
    the model's own global average pool (``forward_head(pre_logits=True)``).
    """
    net: Any = model  # a timm model: forward_features / forward_head are methods, not submodules
    feats = net.forward_features(x)
    out: dict[str, torch.Tensor] = {}
    if feats.ndim == 3:
        if "cls" in pools:
            out["cls"] = feats[:, 0]
        if "mean" in pools:
            out["mean"] = feats[:, num_prefix_tokens:].mean(dim=1)
    elif feats.ndim == 4:
        if "cls" in pools:
            raise ValueError("this backbone gives a feature map, not tokens: use --pool mean")
        out["mean"] = net.forward_head(feats, pre_logits=True)
    else:
        raise ValueError(f"unexpected forward_features output of shape {tuple(feats.shape)}")
    return out
