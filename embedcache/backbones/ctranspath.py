"""CTransPath's convolutional patch stem for timm's Swin Transformer.

Layout follows the CTransPath code and the ``1aurent/swin_tiny_patch4_window7_224.CTransPath``
card: two [conv3x3 stride 2 (no bias) -> BatchNorm -> ReLU] blocks with embed_dim/8 and
embed_dim/4 channels, then a 1x1 conv to embed_dim, output channels-last (NHWC) as timm's
Swin expects. State-dict keys: ``proj.{0,1,3,4,6}.*`` and ``norm.*``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvStem(nn.Module):
    """Patch embedding by two strided convs (patch size 4), NHWC output."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,  # timm may pass more (e.g. flatten); none change this stem
    ) -> None:
        super().__init__()
        if _pair(patch_size) != (4, 4):
            raise ValueError(f"ConvStem only supports patch_size 4, got {patch_size}")
        if embed_dim % 8:
            raise ValueError(f"ConvStem needs embed_dim divisible by 8, got {embed_dim}")
        if output_fmt not in ("NHWC", "NCHW"):
            raise ValueError(f"ConvStem output_fmt must be NHWC or NCHW, got {output_fmt!r}")
        dd = {"device": device, "dtype": dtype}
        self.img_size = _pair(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.output_fmt = output_fmt
        layers: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(cout, **dd),
                nn.ReLU(inplace=True),
            ]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Called by timm's ``SwinTransformer.set_input_size``; the patch size is fixed at 4."""
        if patch_size is not None and _pair(patch_size) != (4, 4):
            raise ValueError("ConvStem only supports patch_size 4")
        if img_size is not None:
            self.img_size = _pair(img_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        x = self.proj(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        x = self.norm(x)
        return x if self.output_fmt == "NHWC" else x.permute(0, 3, 1, 2)
