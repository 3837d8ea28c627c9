"""cli.demo: deterministic, decodable, separable synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.inputs.images import read_image
from embedcache_cli.demo import DEMO_CLASSES, make_synthetic_cells, synthetic_cell


def _load(root, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([read_image(root / k / f"{k}_{i:04d}.png") for k in DEMO_CLASSES for i in range(n)])
    y = np.repeat(np.arange(len(DEMO_CLASSES)), n)
    return x, y


@pytest.fixture(scope="module")
def demo60(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo60")
    out = make_synthetic_cells(root, n_per_class=60, size=64, seed=0)
    assert out == root
    return root, None


def _central_cell(img: np.ndarray) -> tuple[int, float, float]:
    """(area in px, aspect ratio of its second moments, darkest grey level) of the stained blob at the
    centre: pixels 20 grey levels darker than the border's background, the component nearest the centre."""
    from scipy import ndimage

    g = img.astype(np.float64).mean(axis=2)
    border = np.concatenate([g[:3].ravel(), g[-3:].ravel(), g[:, :3].ravel(), g[:, -3:].ravel()])
    lab, _ = ndimage.label(g < np.median(border) - 20)
    h, w = g.shape
    iy, ix = ndimage.distance_transform_edt(lab == 0, return_indices=True)[1]
    blob = lab == lab[iy[h // 2, w // 2], ix[h // 2, w // 2]]
    ev = np.linalg.eigvalsh(np.cov(np.stack(np.nonzero(blob)).astype(np.float64)))
    return int(blob.sum()), float(np.sqrt(ev[1] / max(ev[0], 1e-9))), float(g[blob].min())


def test_each_class_has_the_morphology_its_name_says(demo60):
    """The four demo classes (README: 4 morphologies) look like their names: round discs, elongated
    (elliptocyte-like) cells, nucleated cells with a dark nucleus, small platelet-like fragments."""
    assert DEMO_CLASSES == ("round", "elongated", "nucleated", "small")
    x, y = _load(demo60[0], 60)
    med = {k: np.median([_central_cell(img) for img in x[y == c]], axis=0) for c, k in enumerate(DEMO_CLASSES)}
    area, aspect, darkest = ({k: m[i] for k, m in med.items()} for i in range(3))
    assert aspect["round"] < 1.2 and aspect["elongated"] > 1.6, aspect
    assert area["small"] < 0.4 * area["round"] and area["nucleated"] > area["round"], area
    assert darkest["nucleated"] < 100 and min(darkest["round"], darkest["elongated"]) > 140, darkest


def test_layout_counts_and_decoding(demo60):
    root, _ = demo60
    assert sorted(p.name for p in root.iterdir()) == sorted(DEMO_CLASSES)
    for k in DEMO_CLASSES:
        names = sorted(p.name for p in (root / k).iterdir())
        assert names == [f"{k}_{i:04d}.png" for i in range(60)]
    x, _ = _load(root, 60)
    assert x.shape == (240, 64, 64, 3) and x.dtype == np.uint8


def test_deterministic_under_seed(tmp_path, demo60):
    root, _ = demo60
    again = make_synthetic_cells(tmp_path / "a", n_per_class=60, seed=0)
    np.testing.assert_array_equal(_load(again, 60)[0], _load(root, 60)[0])
    prefix = make_synthetic_cells(tmp_path / "b", n_per_class=5, seed=0)  # image i depends on (seed, class, i)
    np.testing.assert_array_equal(_load(prefix, 5)[0], _load(root, 5)[0])
    other = make_synthetic_cells(tmp_path / "c", n_per_class=5, seed=1)
    assert not np.array_equal(_load(other, 5)[0], _load(root, 5)[0])


def test_within_class_variation(demo60):
    x, y = _load(demo60[0], 60)
    for c in range(len(DEMO_CLASSES)):
        imgs = x[y == c].astype(np.float32)
        assert imgs.std(axis=0).mean() > 5  # images of one class differ from each other


def test_synthetic_cell_api():
    a = synthetic_cell("nucleated", 48, np.random.default_rng(7))
    b = synthetic_cell("nucleated", 48, np.random.default_rng(7))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    assert synthetic_cell("small", 96, np.random.default_rng(0)).shape == (96, 96, 3)
    with pytest.raises(ValueError):
        synthetic_cell("banana", 64, np.random.default_rng(0))


def test_background_is_pinkish_white(demo60):
    x, _ = _load(demo60[0], 10)
    corners = np.concatenate([x[:, :4, :4].reshape(-1, 3), x[:, -4:, -4:].reshape(-1, 3)]).astype(float)
    r, g, b = np.median(corners, axis=0)
    assert min(r, g, b) > 200 and r >= g  # bright, tinted towards red


def _features(x: np.ndarray) -> np.ndarray:
    """Simple pixel statistics: 8x8 downsampled grayscale + a grayscale histogram + mean colour."""
    gray = x.astype(np.float32).mean(axis=3)
    n, h, w = gray.shape
    down = gray.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, -1)
    hist = np.stack([np.histogram(g, bins=16, range=(0, 256))[0] for g in gray]).astype(np.float32)
    colour = x.reshape(n, -1, 3).astype(np.float32).mean(axis=1)
    return np.concatenate([down, hist, colour], axis=1)


def test_classes_separable_by_simple_pixel_statistics(demo60):
    x, y = _load(demo60[0], 60)
    f = _features(x)
    rng = np.random.default_rng(0)
    train = np.zeros(len(y), bool)
    for c in np.unique(y):  # stratified half / half split
        idx = rng.permutation(np.flatnonzero(y == c))
        train[idx[: len(idx) // 2]] = True
    mu, sd = f[train].mean(0), f[train].std(0) + 1e-6
    z = (f - mu) / sd
    centroids = np.stack([z[train & (y == c)].mean(0) for c in np.unique(y)])
    pred = np.argmin(((z[~train, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    acc = (pred == y[~train]).mean()
    assert acc > 0.6, f"nearest-centroid accuracy {acc:.2f} (chance 0.25)"


def test_demo_command_extracts_and_probes(tmp_path):
    """README's first quickstart command: synthetic cells -> store -> probe table, on a fresh folder."""
    import pandas as pd
    from typer.testing import CliRunner

    import embedcache
    from embedcache_cli.embedcache_app import app

    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-per-class", "25"])
    assert res.exit_code == 0, res.output
    fs = embedcache.open_store(out / "cache.zarr").dataset().find_feature_set("timm:test_vit")
    assert fs.to_numpy("cls").shape == (100, 64) and fs.ok().all()
    results = pd.read_csv(out / "eval" / "results.csv")
    assert set(results["probe"]) == {"logistic", "knn"}
    # the synthetic classes are separable: even random-init features beat chance (0.25) clearly
    f1 = results[results["metric"] == "macro_f1"].set_index("probe")["value"]
    assert (f1 > 0.5).all(), f1
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-per-class", "25", "--no-probe"])
    assert again.exit_code == 0 and "cache hit" in again.output
