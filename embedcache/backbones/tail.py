"""Split a loaded backbone into a frozen prefix and a trainable tail of its last ``k`` blocks.

The tokens entering block ``L-k`` never change while the tail is trained, so they can be cached once
(:func:`tail_tokens`) and the tail (:class:`TailModule`, the backbone's own modules) run on them.
Supported:

* timm ``VisionTransformer`` (class + register tokens, ``no_embed_class``, ``dynamic_img_size``,
  LayerScale): tokens ``(B, T, D)`` after patch embedding, position embedding, patch dropout and
  ``norm_pre``; ``T = num_prefix_tokens + patches``.
* timm ``Eva`` (DINOv3, EVA-02; RoPE): the same tokens; the tail recomputes the rotary embedding
  from the patch grid (never with RoPE's training-time coordinate augmentation).
* timm ``ResNet`` (ResNet-RS50 and friends): the "blocks" are the 4 stages ``layer1..layer4``; tokens
  are the feature map ``(B, C, H, W)`` entering stage ``layer{5-k}`` (``k=1``: the input of ``layer4``).
* timm ``EfficientNet`` (EfficientNet-Lite0/1/2, MobileNet-like): the "blocks" are its block stages
  (``blocks.0..blocks.6``); tokens are the feature map entering the last ``k`` stages, and the tail is those
  stages + ``conv_head`` + ``bn2`` + the global pool: what the small-patch paper's FT_last means for a CNN
  ("the final stage").

Pools are those of :func:`embedcache.backbones.pooling.embed`: ``cls`` (first token after the final norm),
``mean`` (patch tokens only; for ResNets the model's own global pool), plus ``head``: the model's own
``forward_head(pre_logits=True)`` (its ``global_pool``, ``attn_pool``, ``fc_norm``).
"""

from __future__ import annotations

import copy as _copy
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

POOLS = ("cls", "mean", "head")
SUPPORTED = (
    "timm VisionTransformer, timm Eva (DINOv3/EVA RoPE ViTs), timm ResNet (stages layer1..layer4) and timm "
    "EfficientNet (block stages)"
)
CNN_FAMILIES = ("resnet", "efficientnet")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class TailError(ValueError):
    """The backbone cannot be split (unsupported architecture) or ``k`` does not fit it."""


def _model_and_prefix(bb) -> tuple[Any, int, str | None]:
    """``(model, num_prefix_tokens, default pool)`` from a ``LoadedBackbone`` or a bare timm model.

    The model is typed ``Any``: its timm submodules are read by attribute, which ``nn.Module`` types as
    ``Tensor | Module``.
    """
    if isinstance(bb, nn.Module):
        model = bb
        npt = int(getattr(model, "num_prefix_tokens", 0) or 0)
        default = "cls" if getattr(model, "cls_token", None) is not None else "mean"
        return model, npt, default
    model = bb.model
    return model, int(bb.num_prefix_tokens), bb.spec.default_pool[0]


def _family(model: nn.Module) -> str:
    from timm.models.efficientnet import EfficientNet
    from timm.models.eva import Eva
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, Eva):
        return "eva"
    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, EfficientNet):
        return "efficientnet"
    raise TailError(
        f"cannot split a {type(model).__module__}.{type(model).__name__} into prefix and tail; supported: {SUPPORTED}"
    )


def _blocks(model: Any, family: str) -> list[nn.Module]:
    if family == "resnet":
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.blocks)


def tail_depth(bb) -> int:
    """``L``: transformer blocks of a ViT / Eva, stages of a ResNet (4) or an EfficientNet (7)."""
    model, _, _ = _model_and_prefix(bb)
    return len(_blocks(model, _family(model)))


def check_k(bb, k: int) -> int:
    """``k`` as an int in ``1..L``, or a :class:`TailError` naming the depth."""
    model, _, _ = _model_and_prefix(bb)
    depth = len(_blocks(model, _family(model)))
    unit = "stages" if _family(model) in CNN_FAMILIES else "blocks"
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= depth:
        raise TailError(
            f"tail of k={k!r} {unit} does not fit {type(model).__name__} with {depth} {unit}: use 1..{depth}"
        )
    return k


def _rope(model: Any, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """Eva's rotary embedding for a patch grid, as ``Eva._pos_embed`` computes it (eval mode, no augmentation)."""
    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    was = rope.training
    rope.eval()
    try:
        if model.dynamic_img_size:
            emb = rope.get_embed(shape=grid)
        elif hasattr(rope, "feat_shape"):
            emb = rope.get_embed()
        else:
            emb = rope.get_embed(shape=model.patch_embed.grid_size)
    finally:
        rope.train(was)
    return emb.to(device)


def _grid_of(model: Any, n_patches: int) -> tuple[int, int]:
    """The patch grid of ``n_patches`` tokens: the model's own grid if it matches, else a square one."""
    gh, gw = model.patch_embed.grid_size
    if gh * gw == n_patches:
        return int(gh), int(gw)
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise TailError(f"{n_patches} patch tokens are neither the model's {gh}x{gw} grid nor a square grid")
    return side, side


@torch.no_grad()
def tail_tokens(bb, x: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens entering block ``L-k`` for images ``x`` (B, 3, H, W), normalised model input.

    ViT / Eva: ``(B, T, D)``, class and register tokens first, then patch tokens. ResNet / EfficientNet: the
    feature map ``(B, C, H', W')`` entering the last ``k`` stages. The prefix runs as in ``eval()``.
    """
    model, _, _ = _model_and_prefix(bb)
    family = _family(model)
    k = check_k(bb, k)
    was = model.training
    model.eval()
    try:
        return _prefix_forward(model, family, x, len(_blocks(model, family)) - k)
    finally:
        model.train(was)


def _prefix_forward(model: Any, family: str, x: torch.Tensor, stop: int) -> torch.Tensor:
    blocks = _blocks(model, family)
    if family in CNN_FAMILIES:
        if family == "resnet":
            x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        else:
            x = model.bn1(model.conv_stem(x))
        for stage in blocks[:stop]:
            x = stage(x)
        return x
    x = model.patch_embed(x)
    if family == "vit":
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        for blk in blocks[:stop]:
            x = blk(x)
        return x
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    mixed = getattr(model, "rope_mixed", False) and rope is not None
    for i, blk in enumerate(blocks[:stop]):
        x = blk(x, rope=rope[i] if mixed else rope)
    return x


class TailModule(nn.Module):
    """The backbone's own last ``k`` blocks, final norm and pooling, run on :func:`tail_tokens`.

    ``forward(tokens)`` gives the ``pool`` vector (B, D) (default: the spec's first default pool);
    :meth:`forward_features` the final tokens (B, T, D) / feature map; :meth:`embed` several pools.
    ``copy=True`` deep-copies the modules (training then leaves the backbone untouched); otherwise they
    are shared with the backbone. Float16 tokens are cast to the tail's parameter dtype.
    """

    def __init__(self, bb, k: int, pool: str | None = None, copy: bool = False):
        super().__init__()
        model, npt, default = _model_and_prefix(bb)
        self.family = _family(model)
        self.k = check_k(bb, k)
        self.depth = len(_blocks(model, self.family))
        self.num_prefix_tokens = npt
        chosen = pool or default
        if chosen is None or chosen not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {chosen!r}")
        self.pool: str = chosen
        if self.pool == "cls" and (self.family in CNN_FAMILIES or npt == 0):
            raise ValueError(f"{type(model).__name__} has no class token: use pool='mean'")
        take = _copy.deepcopy if copy else (lambda m: m)
        self.blocks = nn.ModuleList([take(b) for b in _blocks(model, self.family)[self.depth - self.k :]])
        if self.family in CNN_FAMILIES:
            if self.family == "efficientnet":  # the head convolution and its norm follow the last stage
                self.conv_head = take(model.conv_head)
                self.bn2 = take(model.bn2)
            self.global_pool = take(model.global_pool)
            self.drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
            return
        self.norm = take(model.norm)
        self.fc_norm = take(model.fc_norm)
        self.attn_pool = take(model.attn_pool) if getattr(model, "attn_pool", None) is not None else None
        self.global_pool_type = model.global_pool
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        self.rope = take(model.rope) if self.family == "eva" and model.rope is not None else None
        self.rope_mixed = bool(getattr(model, "rope_mixed", False))
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False))
        self.patch_embed_grid = tuple(int(g) for g in model.patch_embed.grid_size)

    def train(self, mode: bool = True) -> TailModule:
        super().train(mode)
        if getattr(self, "rope", None) is not None:
            self.rope.eval()  # RoPE's coordinate augmentation belongs to the prefix's input, never the tail
        return self

    def _param_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def _rope_for(self, n_patches: int, device: torch.device) -> torch.Tensor | None:
        if self.rope is None:
            return None
        shim = _GridShim(self.patch_embed_grid, self.dynamic_img_size, self.rope)
        grid = _grid_of(shim, n_patches)
        return _rope(shim, grid, device)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Blocks ``L-k..L-1`` and the final norm: what ``model.forward_features`` returns."""
        x = tokens.to(self._param_dtype())
        if self.family in CNN_FAMILIES:
            for stage in self.blocks:
                x = stage(x)
            if self.family == "efficientnet":
                x = self.bn2(self.conv_head(x))
            return x
        if self.family == "vit":
            for blk in self.blocks:
                x = blk(x)
        else:
            rope = self._rope_for(x.shape[1] - self.num_prefix_tokens, x.device)
            for i, blk in enumerate(self.blocks):
                r = rope[self.depth - self.k + i] if (self.rope_mixed and rope is not None) else rope
                x = blk(x, rope=r)
        return self.norm(x)

    def pooled(self, feats: torch.Tensor, pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pool :meth:`forward_features` output as :func:`embedcache.backbones.pooling.embed` does (+ ``head``)."""
        out: dict[str, torch.Tensor] = {}
        for p in pools:
            if p not in POOLS:
                raise ValueError(f"pool must be one of {POOLS}, got {p!r}")
            if self.family in CNN_FAMILIES:
                if p == "cls":
                    raise ValueError("this backbone gives a feature map, not tokens: use pool 'mean'")
                v = self.global_pool(feats)
                out[p] = nn.functional.dropout(v, self.drop_rate, self.training) if self.drop_rate else v
            elif p == "cls":
                out[p] = feats[:, 0]
            elif p == "mean":
                out[p] = feats[:, self.num_prefix_tokens :].mean(dim=1)
            else:
                out[p] = self._head_pool(feats)
        return out

    def _head_pool(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.vision_transformer import global_pool_nlc

        if self.attn_pool is not None:
            if self.family == "vit" and not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens :]
            x = self.attn_pool(x)
        elif self.family == "vit":
            x = global_pool_nlc(
                x,
                pool_type=self.global_pool_type,
                num_prefix_tokens=self.num_prefix_tokens,
                reduce_include_prefix=self.pool_include_prefix,
            )
        else:
            x = global_pool_nlc(x, pool_type=self.global_pool_type, num_prefix_tokens=self.num_prefix_tokens)
        return self.fc_norm(x)

    def embed(self, tokens: torch.Tensor, pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """Several pools of the tail's output at once."""
        return self.pooled(self.forward_features(tokens), pools)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.forward_features(tokens), (self.pool,))[self.pool]


class _GridShim:
    """Just enough of an Eva for :func:`_rope` / :func:`_grid_of` (the tail keeps no patch embedding)."""

    def __init__(self, grid: tuple[int, ...], dynamic: bool, rope: nn.Module):
        self.patch_embed = type("PE", (), {"grid_size": grid})()
        self.dynamic_img_size = dynamic
        self.rope = rope


def tail_token_shape(bb, k: int, input_size: int) -> tuple[int, ...]:
    """Per-cell shape of :func:`tail_tokens` at ``input_size`` px: ``(T, D)`` or ``(C, H, W)``."""
    model, npt, _ = _model_and_prefix(bb)
    family = _family(model)
    k = check_k(bb, k)
    if family in CNN_FAMILIES:
        dev = next(model.parameters()).device
        x = torch.zeros(1, 3, input_size, input_size, device=dev)
        was = model.training
        model.eval()
        try:
            return tuple(tail_tokens(bb, x, k).shape[1:])
        finally:
            model.train(was)
    pe = model.patch_embed
    size = (input_size, input_size)
    if not getattr(model, "dynamic_img_size", False) and tuple(pe.img_size) != size and pe.strict_img_size:
        raise TailError(
            f"{type(model).__name__} takes {pe.img_size[0]}x{pe.img_size[1]} input only, not {input_size}x{input_size}"
        )
    gh, gw = pe.dynamic_feat_size(size)
    return (npt + int(gh) * int(gw), int(model.embed_dim))


def tail_bytes_per_cell(bb, k: int, input_size: int, dtype: str = "float16") -> int:
    """Bytes one cell's tail tokens take in ``dtype`` (ViT-L/16 at 224: 197 * 1024 * 2 = 403,456)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPE_BYTES)}, got {dtype!r}")
    return math.prod(tail_token_shape(bb, k, input_size)) * _DTYPE_BYTES[dtype]


__all__ = [
    "POOLS",
    "SUPPORTED",
    "TailError",
    "TailModule",
    "check_k",
    "tail_bytes_per_cell",
    "tail_depth",
    "tail_token_shape",
    "tail_tokens",
]
