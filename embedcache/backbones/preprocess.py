"""On-device preprocessing: uint8 cells in, normalised model input out.

Images travel to the device as uint8 (4x less traffic than float32); resizing and
normalisation run there, batched by image shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

FITS = ("squash", "crop", "pad")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How a cell image becomes model input.

    ``fit`` decides what happens to non-square cells: ``squash`` resizes to size×size
    (the whole cell, aspect changed; identical to the others for square crops),
    ``crop`` resizes the shorter side and centre-crops (timm's eval transform),
    ``pad`` pads to a square with white background, then resizes.
    """

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: str = "squash"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.size < 8:
            raise ValueError(f"input size {self.size} is too small")

    def tag(self) -> str:
        """The preprocessing part of a feature key, e.g. ``224-bicubic``."""
        return f"{self.size}-{self.interpolation}" + ("" if self.fit == "squash" else f"-{self.fit}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def to_model_input(groups: Sequence[torch.Tensor], prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """Resize and normalise groups of same-shape uint8 NHWC images into one NCHW float batch."""
    out = [_resize(g.to(device, non_blocking=True), prep) for g in groups]
    x = out[0] if len(out) == 1 else torch.cat(out)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255.0
    return x.sub_(mean).div_(std)  # x is a fresh tensor: normalise in place


def _resize(batch_nhwc: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    # NCHW-contiguous: the antialiased resize runs ~2x faster than on the channels-last view, same values
    x = batch_nhwc.permute(0, 3, 1, 2).contiguous().float()
    h, w = x.shape[-2:]
    s = prep.size
    if prep.fit == "pad" and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=255.0)
        h = w = side
    if prep.fit == "crop" and h != w:
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        x = _interpolate(x, (nh, nw), prep.interpolation)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top : top + s, left : left + s]
    elif (h, w) != (s, s):
        x = _interpolate(x, (s, s), prep.interpolation)
    return x.clamp_(0.0, 255.0)  # bicubic overshoots


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
