"""Training augmentations on uint8 cell images, and the image reader that applies them (seeded).

Augmentations act on the decoded uint8 (H, W, 3) image *before* resizing and normalisation, and only
on training minibatches (:meth:`CellImages.read_train`, which :class:`~probes.tuning.FineTuneProbe`
calls when a reader has it); hold-out and test reads (:meth:`CellImages.read`) are never augmented.

* ``flip``: horizontal and vertical flips, each with probability 1/2;
* ``rot90``: a rotation by 0, 90, 180 or 270 degrees;
* ``color``: brightness, contrast and saturation factors drawn from [0.8, 1.2] (PIL ``ImageEnhance``);
* ``blur``: with probability 1/2, a Gaussian blur of sigma drawn from [0.1, 1.0] px (PIL ``GaussianBlur``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from probes.tuning.readers import ImageReader

AUGMENTATIONS = ("flip", "rot90", "color", "blur")


def parse_augment(augment: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"flip,rot90"`` / a list / None -> the checked names, in :data:`AUGMENTATIONS` order."""
    if augment is None:
        return ()
    names = [a.strip() for a in (augment.split(",") if isinstance(augment, str) else augment) if str(a).strip()]
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return tuple(a for a in AUGMENTATIONS if a in names)


def augment_image(image: np.ndarray, ops: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """One random draw of ``ops`` applied to a uint8 (H, W, 3) image (a new array)."""
    out = image
    if "flip" in ops:
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if rng.random() < 0.5:
            out = out[::-1]
    if "rot90" in ops:
        out = np.rot90(out, int(rng.integers(4)))
    if "color" in ops or "blur" in ops:
        img = Image.fromarray(np.ascontiguousarray(out))
        if "color" in ops:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enhance(img).enhance(float(rng.uniform(0.8, 1.2)))
        if "blur" in ops and rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 1.0))))
        out = np.array(img)
    return np.ascontiguousarray(out)


class CellImages(ImageReader):
    """:class:`ImageReader` with the store's ``working_size`` (cells resized to S x S first, as
    ``embedcache extract --working-size`` does) and seeded training augmentations.

    ``read_train`` draws a fresh augmentation for every call from ``(seed, call number)``, so a fresh
    reader gives the same sequence of augmented minibatches on every run.
    """

    def __init__(
        self,
        paths: Sequence[str],
        prep,
        working_size: int | None = None,
        augment: str | Sequence[str] | None = None,
        seed: int = 0,
        check: bool = True,
    ):
        super().__init__(paths, prep, check=check)
        self.working_size = working_size
        self.augment = parse_augment(augment)
        self.seed = int(seed)
        self._calls = 0

    def _images(self, rows: np.ndarray) -> list[np.ndarray]:
        from embedcache.inputs.images import read_image
        from embedcache.inputs.perturb import apply

        return [apply(read_image(self.paths[int(r)]), self.working_size, None, row=int(r)) for r in rows]

    def _to_input(self, images: list[np.ndarray]) -> np.ndarray:
        from embedcache.backbones.preprocess import to_model_input

        groups: list[list[torch.Tensor]] = []
        for im in (torch.from_numpy(np.ascontiguousarray(i)) for i in images):  # same-shape runs keep the order
            if groups and groups[-1][0].shape == im.shape:
                groups[-1].append(im)
            else:
                groups.append([im])
        return to_model_input([torch.stack(g) for g in groups], self.prep, torch.device("cpu")).numpy()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Normalised model input (N, 3, S, S) float32, never augmented."""
        return self._to_input(self._images(rows))

    def read_train(self, rows: np.ndarray) -> np.ndarray:
        """Like :meth:`read`, with one seeded draw of the augmentations per image."""
        if not self.augment:
            return self.read(rows)
        rng = np.random.default_rng([self.seed, self._calls])
        self._calls += 1
        return self._to_input([augment_image(im, self.augment, rng) for im in self._images(rows)])

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(f"{super().digest}|ws={self.working_size}".encode()).hexdigest()


__all__ = ["AUGMENTATIONS", "CellImages", "augment_image", "parse_augment"]
