"""The bundled demo (:func:`demo`) and its synthetic single-cell blood-smear images (real data cannot ship).

Cells are rendered with a Beer-Lambert stain model (eosin pink, Giemsa/haematoxylin
purple) on a pinkish-white smear background, so colours and textures resemble
stained bright-field crops. Four classes differ in morphology, with within-class
variation in size, shape, rotation, position, stain density, neighbours and noise.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["DEMO_CLASSES", "synthetic_cell", "make_synthetic_cells", "demo", "DemoResult"]

DEMO_CLASSES: tuple[str, ...] = ("round", "elongated", "nucleated", "small")

# Optical density per unit stain in R, G, B (higher = more absorbed).
_EOSIN = np.array([0.05, 0.75, 0.45])  # pink-red (RBC haemoglobin / eosin)
_GIEMSA = np.array([0.70, 0.95, 0.30])  # purple-blue (nuclei, platelets)
_BACKGROUND = np.array([249.0, 238.0, 242.0])  # pinkish white


def _blob(yy, xx, cy, cx, r, ratio, theta, wobble, rng):
    """Soft mask (0..1) and normalised radius (0 centre, 1 edge) of a rotated, wobbly ellipse."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = (c * dx + s * dy), (-s * dx + c * dy) / ratio
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    edge = np.ones_like(phi)
    for k in range(2, 6):  # low-order harmonics make the outline irregular
        edge += wobble * rng.normal(0, 1.0 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    rn = rho / (r * edge)
    mask = 1.0 / (1.0 + np.exp(np.clip((rn - 1.0) * r / 0.7, -50, 50)))  # ~0.7 px soft edge
    return mask, rn


def _rbc_density(yy, xx, cy, cx, r, ratio, theta, pallor, rng, wobble=0.03):
    """Eosin density of a biconcave disc: dense rim, pale centre."""
    mask, rn = _blob(yy, xx, cy, cx, r, ratio, theta, wobble, rng)
    profile = 1.0 - pallor * np.exp(-((rn / 0.55) ** 2))
    return mask * profile * rng.uniform(0.8, 1.15)


def synthetic_cell(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic cell of class ``kind`` (see ``DEMO_CLASSES``) as ``(size, size, 3)`` uint8."""
    if kind not in DEMO_CLASSES:
        raise ValueError(f"unknown cell kind {kind!r}; expected one of {DEMO_CLASSES}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    eosin, giemsa = np.zeros((size, size)), np.zeros((size, size))
    centre = (size - 1) / 2.0
    cy, cx = centre + rng.normal(0, 0.05 * size, 2)
    theta = rng.uniform(0, np.pi)
    scale = size * rng.uniform(0.9, 1.1)

    for _ in range(rng.integers(0, 3)):  # partial neighbouring red cells at the border
        ang, dist = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.65, 0.8)
        eosin += 0.8 * _rbc_density(
            yy,
            xx,
            centre + dist * np.sin(ang),
            centre + dist * np.cos(ang),
            0.27 * scale,
            rng.uniform(0.85, 1.0),
            rng.uniform(0, np.pi),
            0.5,
            rng,
        )

    if kind == "round":  # normal red cell: disc with central pallor
        eosin += _rbc_density(
            yy, xx, cy, cx, scale * rng.uniform(0.23, 0.29), rng.uniform(0.88, 1.0), theta, rng.uniform(0.45, 0.7), rng
        )
    elif kind == "elongated":  # elliptocyte: cigar-shaped, little pallor
        eosin += _rbc_density(
            yy, xx, cy, cx, scale * rng.uniform(0.27, 0.34), rng.uniform(0.38, 0.6), theta, rng.uniform(0.1, 0.3), rng
        )
    elif kind == "nucleated":  # white cell: pale lilac cytoplasm, dark lobed nucleus
        r = scale * rng.uniform(0.3, 0.38)
        mask, _ = _blob(yy, xx, cy, cx, r, rng.uniform(0.85, 1.0), theta, 0.04, rng)
        grain = rng.random((size, size)) < 0.08
        eosin += mask * (0.18 + 0.15 * grain)
        giemsa += mask * rng.uniform(0.06, 0.12)
        n_lobes = rng.integers(2, 5)
        arc = rng.uniform(0.6, 1.6)  # lobes sit along a curved band
        for a in np.linspace(-arc / 2, arc / 2, n_lobes) + theta:
            ly, lx = cy + 0.35 * r * np.sin(a + np.pi / 2), cx + 0.35 * r * np.cos(a + np.pi / 2)
            lobe, _ = _blob(
                yy, xx, ly, lx, r * rng.uniform(0.28, 0.38), rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 0.08, rng
            )
            giemsa = np.maximum(giemsa, lobe * rng.uniform(1.3, 1.8))
    else:  # "small": platelet-like fragment(s), irregular and granular
        for _ in range(rng.choice([1, 1, 1, 2])):
            oy, ox = rng.normal(0, 0.06 * size, 2)
            mask, rn = _blob(
                yy,
                xx,
                cy + oy,
                cx + ox,
                scale * rng.uniform(0.08, 0.13),
                rng.uniform(0.6, 1.0),
                rng.uniform(0, np.pi),
                0.25,
                rng,
            )
            granules = rng.random((size, size)) < 0.25
            giemsa += mask * (rng.uniform(0.5, 0.8) + 0.6 * granules * (rn < 0.7))
            eosin += mask * 0.15

    od = eosin[..., None] * _EOSIN + giemsa[..., None] * _GIEMSA
    background = _BACKGROUND * rng.uniform(0.95, 1.0) + rng.normal(0, 1.0, 3)
    shade = 1.0 + 0.03 * ((xx - centre) * np.cos(theta) + (yy - centre) * np.sin(theta)) / size
    rgb = background * shade[..., None] * np.exp(-od)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9)))  # optics
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 3.0, (size, size, 3))
    return np.ascontiguousarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def make_synthetic_cells(
    out_dir: str | os.PathLike, n_per_class: int = 60, size: int = 64, seed: int = 0
) -> pathlib.Path:
    """Write ``out_dir/<class>/<class>_<i:04d>.png`` for every class in ``DEMO_CLASSES``.

    Deterministic: image ``i`` of class ``c`` depends only on ``(seed, c, i)``, so the
    first ``k`` images are the same whatever ``n_per_class`` is. Returns ``out_dir``.
    """
    root = pathlib.Path(out_dir)
    for c, kind in enumerate(DEMO_CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng((seed, c, i))
            Image.fromarray(synthetic_cell(kind, size, rng)).save(folder / f"{kind}_{i:04d}.png")
    return root


@dataclass
class DemoResult:
    """What :func:`demo` made: the cells, the store and its feature set, and the probe study (if run)."""

    cells: pathlib.Path
    store: str
    extract: Any  # embedcache.ExtractResult
    info: dict  # the store's info()
    evaluation: Any | None = None  # probes' StudyResult of logistic + kNN, or None (probe=False)
    eval_out: pathlib.Path | None = None
    random_weights: bool = True


def demo(
    out: str | os.PathLike = "demo_out",
    *,
    model: str = "timm:test_vit",
    weights: str | None = "random",
    n_per_class: int = 60,
    probe: bool = True,
    progress: bool = True,
    show: bool = False,
    on_step: Callable[[str, Any], None] | None = None,
) -> DemoResult:
    """The main job on synthetic cells: generate ``n_per_class`` cells per class into ``out/cells``,
    extract them with ``model`` into ``out/cache.zarr``, read the store's summary, and (``probe``)
    fit logistic and kNN probes into ``out/eval`` (``show`` prints their summary).

    ``weights="random"`` needs no download (features then show the pipeline, not a pretrained
    model); ``None`` takes the hub's. ``on_step(step, value)`` is called after each step with
    ``("cells", path)``, ``("extract", ExtractResult)``, ``("store", url)`` and ``("probes", result)``.
    """
    from embedcache.extraction.runner import extract
    from embedcache.store import open_store

    def step(name: str, value: Any) -> None:
        if on_step is not None:
            on_step(name, value)

    root = pathlib.Path(out)
    cells = make_synthetic_cells(root / "cells", n_per_class=n_per_class)
    step("cells", cells)
    store = str(root / "cache.zarr")
    r = extract(model, cells, store, weights=weights, chunk_size=64, progress=progress)
    step("extract", r)
    result = DemoResult(cells, store, r, open_store(store).info(), random_weights=weights == "random")
    step("store", store)
    if probe:
        from probes import evaluate  # probes builds on embedcache: imported only when the demo probes

        result.eval_out = root / "eval"
        result.evaluation = evaluate(
            store, r.key, probes="logistic,knn", out=result.eval_out, show=show, quiet=not progress
        )
        step("probes", result.evaluation)
    return result
