"""Named, parameterised, deterministic image perturbations, applied on the CPU in decode workers.

A perturbation is ``kind:param`` (e.g. ``blur-post:0.8``); each one is cached as its own
feature set (``uni/224-bicubic-ws40/blur-post-0.8``). The working size S (``--working-size``)
resizes every cell to S×S first, as the small-patch protocol does with 40×40 cells. ``extract`` always
passes an S to the perturbed sets (without ``--working-size``: the backbone's input size), so the two blurs
below differ; ``apply`` with ``working_size=None`` blurs the image as it is (then both are the same).

* ``blur-post:σ`` — Gaussian blur of standard deviation σ on the S×S image (PIL's
  ``ImageFilter.GaussianBlur``, whose radius is the standard deviation), after resizing.
* ``blur-pre:σ``  — blur at the original resolution S0 with σ·S0/S, then resize to S: the
  same blur measured on the S grid.
* ``jpeg:q``      — JPEG re-encoding at quality q.
* ``noise:σ``     — additive Gaussian noise of σ grey levels, seeded by the cell's row.

New kinds register with :func:`register_perturbation` and need no change elsewhere.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

PerturbFn = Callable[[Image.Image, float, "int | None", int], Image.Image]
_KINDS: dict[str, PerturbFn] = {}
RESAMPLE = Image.Resampling.BICUBIC


def register_perturbation(kind: str) -> Callable[[PerturbFn], PerturbFn]:
    """Register ``fn(image, param, working_size, row) -> image`` under ``kind``."""

    def deco(fn: PerturbFn) -> PerturbFn:
        _KINDS[kind] = fn
        return fn

    return deco


def perturbation_kinds() -> list[str]:
    return sorted(_KINDS)


@dataclass(frozen=True)
class Perturbation:
    kind: str
    param: float

    @property
    def name(self) -> str:
        """The perturbation part of a feature key, e.g. ``blur-post-0.8``."""
        return f"{self.kind}-{self.param:g}"


def parse_perturbations(specs: str | Sequence[str] | None) -> list[Perturbation]:
    """``["blur-pre:0.1,0.2", "jpeg:50"]`` -> one :class:`Perturbation` per value."""
    if not specs:
        return []
    out: list[Perturbation] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        kind, _, values = spec.partition(":")
        kind = kind.strip()
        if kind not in _KINDS:
            raise ValueError(f"unknown perturbation '{kind}' (known: {', '.join(perturbation_kinds())})")
        if not values.strip():
            raise ValueError(f"perturbation '{spec}' needs values, e.g. {kind}:0.4,0.8")
        for v in values.split(","):
            try:
                p = float(v)
            except ValueError:
                raise ValueError(f"perturbation '{spec}': '{v}' is not a number") from None
            if p < 0 or not np.isfinite(p):
                raise ValueError(f"perturbation '{spec}': value {v} must be finite and >= 0")
            out.append(Perturbation(kind, p))
    return out


def resize_to(img: Image.Image, size: int) -> Image.Image:
    return img if img.size == (size, size) else img.resize((size, size), RESAMPLE)


def apply(image: np.ndarray, working_size: int | None, perturbation: Perturbation | None, row: int = 0) -> np.ndarray:
    """Working-size resize and one perturbation on an (H, W, 3) uint8 cell."""
    if working_size is None and perturbation is None:
        return image
    img = Image.fromarray(image)
    if perturbation is None:
        img = resize_to(img, working_size)  # type: ignore[arg-type]
    else:
        img = _KINDS[perturbation.kind](img, perturbation.param, working_size, row)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _blur(img: Image.Image, sigma: float) -> Image.Image:
    return img if sigma == 0 else img.filter(ImageFilter.GaussianBlur(radius=sigma))


@register_perturbation("blur-post")
def _blur_post(img: Image.Image, sigma: float, working_size: int | None, row: int) -> Image.Image:
    if working_size is not None:
        img = resize_to(img, working_size)
    return _blur(img, sigma)


@register_perturbation("blur-pre")
def _blur_pre(img: Image.Image, sigma: float, working_size: int | None, row: int) -> Image.Image:
    if working_size is None:
        return _blur(img, sigma)
    s0 = (img.size[0] + img.size[1]) / 2  # S0; the mean side for non-square crops
    return resize_to(_blur(img, sigma * s0 / working_size), working_size)


@register_perturbation("jpeg")
def _jpeg(img: Image.Image, quality: float, working_size: int | None, row: int) -> Image.Image:
    if working_size is not None:
        img = resize_to(img, working_size)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@register_perturbation("noise")
def _noise(img: Image.Image, sigma: float, working_size: int | None, row: int) -> Image.Image:
    if working_size is not None:
        img = resize_to(img, working_size)
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    rng = np.random.default_rng(row)  # deterministic per cell
    return Image.fromarray(np.clip(np.rint(a + rng.normal(0, sigma, a.shape)), 0, 255).astype(np.uint8))
