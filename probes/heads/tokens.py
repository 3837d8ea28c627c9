"""Heads over a backbone's final tokens (B, T, D) or a pooled vector (B, D), for the fine-tunes.

``num_prefix_tokens`` (class + register tokens) separates prefix from patch tokens: ``cls`` is token 0,
``mean`` averages the patch tokens only, as :func:`embedcache.backbones.pooling.embed` does. Heads with
``input == "pooled"`` (``linear``, ``mlp``) also take an already pooled (B, D) vector; ``tokens`` heads
(``linear-cls-mean``, ``decoder``) need the token sequence. A CNN feature map (B, C, H, W) is read as
H*W tokens without prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TOKEN_HEADS = ("linear", "linear-cls-mean", "mlp", "decoder")


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens; a (B, C, H, W) feature map becomes (B, H*W, C)."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim != 3:
        raise ValueError(f"expected tokens (B, T, D) or a feature map (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def pool_tokens(x: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """``cls`` (token 0) or ``mean`` (patch tokens) of tokens / a feature map; (B, D) passes through."""
    if x.ndim == 2:
        return x
    x = as_tokens(x)
    if pool == "cls":
        if num_prefix_tokens == 0:
            raise ValueError("these tokens have no class token: use pool 'mean'")
        return x[:, 0]
    if pool == "mean":
        return x[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature with fixed moments (buffers, saved with the head): what a linear probe's
    input needs to learn at any feature scale, like the non-affine BatchNorm of MAE's linear probe but with the
    training cells' moments set once (:meth:`set_moments`), so training and prediction see the same map."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def set_moments(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class _PooledHead(nn.Module):
    input = "pooled"

    def __init__(self, net: nn.Module, dim: int, pool: str, num_prefix_tokens: int, standardize: bool = False):
        super().__init__()
        self.net, self.dim, self.pool, self.num_prefix_tokens = net, dim, pool, num_prefix_tokens
        self.standardize = Standardize(dim) if standardize else None

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The vector the head reads (before standardisation)."""
        return pool_tokens(x, self.pool, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.pooled(x)
        return self.net(self.standardize(v) if self.standardize is not None else v)


class LinearHead(_PooledHead):
    """One linear layer on the pooled vector (CLS by default; ``mean`` for models without one)."""

    def __init__(self, dim: int, n_classes: int, num_prefix_tokens: int, pool: str = "cls", standardize: bool = False):
        super().__init__(nn.Linear(dim, n_classes), dim, pool, num_prefix_tokens, standardize)


class MLPHead(_PooledHead):
    """Linear -> GELU -> dropout -> linear on the pooled vector."""

    def __init__(
        self,
        dim: int,
        n_classes: int,
        num_prefix_tokens: int,
        pool: str = "cls",
        hidden: int = 512,
        dropout: float = 0.2,
        standardize: bool = False,
    ):
        net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        super().__init__(net, dim, pool, num_prefix_tokens, standardize)


class ClsMeanLinearHead(nn.Module):
    """One linear layer on ``concat(CLS, mean of patch tokens)`` (2D inputs; Virchow2's embedding)."""

    input = "tokens"

    def __init__(self, dim: int, n_classes: int, num_prefix_tokens: int):
        super().__init__()
        if num_prefix_tokens == 0:
            raise ValueError("head 'linear-cls-mean' needs a class token; this backbone has none")
        self.dim, self.num_prefix_tokens = dim, num_prefix_tokens
        self.fc = nn.Linear(2 * dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_tokens(x)
        return self.fc(torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].mean(dim=1)], dim=1))


class DecoderHead(nn.Module):
    """``queries`` learned queries attend over all tokens through an ``nn.TransformerDecoder``
    (``layers`` layers, ``heads`` heads, pre-norm); their mean output -> LayerNorm -> linear."""

    input = "tokens"

    def __init__(
        self,
        dim: int,
        n_classes: int,
        num_prefix_tokens: int,
        queries: int = 1,
        layers: int = 1,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ):
        super().__init__()
        heads = heads or next(h for h in (8, 4, 2, 1) if dim % h == 0)
        if dim % heads:
            raise ValueError(f"decoder heads={heads} must divide the token width {dim}")
        self.dim, self.num_prefix_tokens = dim, num_prefix_tokens
        self.query = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None] if x.ndim == 2 else as_tokens(x)
        q = self.query.expand(x.shape[0], -1, -1)
        return self.fc(self.norm(self.decoder(q, x).mean(dim=1)))


def make_token_head(
    name: str, dim: int, n_classes: int, num_prefix_tokens: int, pool: str | None = None, **kwargs: Any
) -> nn.Module:
    """Head ``name`` (one of :data:`TOKEN_HEADS`) mapping tokens (or, for pooled heads, (B, D)) to logits.

    ``pool`` (``cls`` / ``mean``) applies to ``linear`` and ``mlp``; default ``cls`` when the backbone
    has a class token, else ``mean``. ``kwargs``: ``mlp`` hidden / dropout; ``decoder`` queries / layers /
    heads / mlp_ratio / dropout.
    """
    if n_classes < 2:
        raise ValueError(f"a head needs at least 2 classes, got {n_classes}")
    pool = pool or ("cls" if num_prefix_tokens > 0 else "mean")
    if name == "linear":
        return LinearHead(dim, n_classes, num_prefix_tokens, pool, **kwargs)
    if name == "mlp":
        return MLPHead(dim, n_classes, num_prefix_tokens, pool, **kwargs)
    kwargs.pop("standardize", None)  # the token heads normalise inside (LayerNorm)
    if pool != ("cls" if num_prefix_tokens > 0 else "mean"):
        raise ValueError(f"head {name!r} reads all tokens; pool={pool!r} does not apply to it")
    if name == "linear-cls-mean":
        return ClsMeanLinearHead(dim, n_classes, num_prefix_tokens, **kwargs)
    if name == "decoder":
        return DecoderHead(dim, n_classes, num_prefix_tokens, **kwargs)
    raise ValueError(f"unknown token head {name!r}; choose from {', '.join(TOKEN_HEADS)}")


__all__ = [
    "TOKEN_HEADS",
    "ClsMeanLinearHead",
    "DecoderHead",
    "LinearHead",
    "MLPHead",
    "Standardize",
    "as_tokens",
    "make_token_head",
    "pool_tokens",
]
