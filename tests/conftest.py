"""Shared fixtures: real cells bundled in tests/data (always there) or from ../shared/data (larger sets),
tiny random-init backbones.

Bundled (tests/data, see its README): ``chula_cells`` (832 Chula RBC-12 cells, 64 per class, 246
smears), ``chula_subset``, ``chula_labels`` (label and smear of all 22,106 Chula cells, no images),
``chula_features``, and ``bundled("bccd_wbc")`` / ``bundled("bccd_cells")`` ImageFolders.

Shared (``EMBEDCACHE_SHARED_DATA``, default ../shared/data): ``chula_manifest`` and ``shared(name)``.
When the folder is missing the test is skipped with the path as reason, except under ``CI=true``,
where it fails: CI must run every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tests.paths import REPO as _REPO

REPO = _REPO
DATA = Path(__file__).resolve().parent / "data"
SHARED_DATA = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))


def in_ci() -> bool:
    """True when the environment variable ``CI`` says so (``true``/``1``/``yes``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def shared(name: str) -> Path:
    """A dataset folder under ../shared/data: skipped with the reason when absent, a failure under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        msg = f"real cell data not found at {path} (set EMBEDCACHE_SHARED_DATA to the folder holding {name}/)"
        if in_ci():
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    return path


def bundled(name: str) -> Path:
    """A dataset bundled in tests/data (part of the repository: its absence is a failure, never a skip)."""
    path = DATA / name
    if not path.exists():
        pytest.fail(f"bundled test data missing: {path} (regenerate with tests/data/make_subset.py)", pytrace=False)
    return path


def _manifest(root: Path) -> pd.DataFrame:
    df = pd.read_csv(root / "manifest.csv", dtype=str)
    df["path"] = [str(root / p) for p in df["path"]]
    return df


@pytest.fixture(scope="session")
def chula_cells() -> pd.DataFrame:
    """The bundled Chula RBC-12 subset with absolute paths: 832 cells, 64 of each of the 13 classes,
    246 smears (at most 4 cells of one class per smear), sorted by path (first: cells/001_000.jpg)."""
    return _manifest(bundled("chula_rbc12"))


@pytest.fixture(scope="session")
def chula_labels() -> pd.DataFrame:
    """``label`` and ``smear`` (str) of all 22,106 cells of the full Chula RBC-12 set, in path order (no images)."""
    return pd.read_csv(bundled("chula_rbc12_labels.csv.gz"), dtype=str)


@pytest.fixture(scope="session")
def chula_manifest() -> pd.DataFrame:
    """The full Chula RBC-12 manifest from ../shared/data with absolute paths (22,106 cells, 13 classes,
    smear groups). Skips (fails under CI=true) where the shared data is missing."""
    return _manifest(shared("chula_rbc12"))


@pytest.fixture
def chula_subset(tmp_path, chula_cells):
    """Write a manifest of the first ``n`` bundled Chula cells (with smear as group); returns its path."""

    def make(n: int = 200, name: str = "chula.csv", **extra) -> Path:
        if n > len(chula_cells):
            raise ValueError(f"the bundled Chula subset has {len(chula_cells)} cells, {n} asked for")
        df = chula_cells.iloc[:n].copy()
        df["group"] = df["smear"]
        for k, v in extra.items():
            df[k] = v
        path = tmp_path / name
        df.to_csv(path, index=False)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_vit():
    from embedcache.backbones.loading import load_backbone

    return load_backbone("timm:test_vit", weights="random")


@pytest.fixture(scope="session")
def chula_features(tmp_path_factory, chula_cells):
    """Real features for the probe heads: the 832 bundled Chula cells (64 per class, 13 classes, class
    names as labels), extracted once into a store with a tiny random-init ViT at 64 px.

    Returns ``(X float32 (n, 64), y str (n,))`` read back through the store API."""

    import embedcache

    root = tmp_path_factory.mktemp("heads")
    manifest = root / "chula_heads.csv"
    chula_cells.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(
        "timm:test_vit",
        manifest,
        out,
        weights="random",
        input_size=64,
        label_column="label_name",
        progress=False,
        num_workers=2,
        chunk_size=512,
        batch_size=128,
    )
    ds = embedcache.open_store(out).dataset()
    fs = ds.find_feature_set("timm:test_vit")
    assert fs.ok().all()
    return fs.to_numpy("cls"), ds.obs["label"].to_numpy(dtype=str)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, chula_cells) -> Path:
    """A store of the 832 bundled Chula cells extracted with real ImageNet weights (EfficientNet-Lite0, from
    its package: no network), with the cells' smear as group and the tokens entering the last stage cached
    (``--tail-blocks 1``). For tests whose meaning depends on feature quality; ~15 s once per session."""
    import embedcache

    root = tmp_path_factory.mktemp("real")
    manifest = root / "chula.csv"
    chula_cells.assign(group=chula_cells["smear"], label=chula_cells["label_name"]).to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract("efficientnet-lite0", manifest, out, progress=False, chunk_size=512, tail_blocks=1)
    return out


@pytest.fixture(scope="session")
def real_features(real_store) -> tuple:
    """``(X float32 (832, 1280), y str (832,))``: EfficientNet-Lite0 ImageNet features of the bundled Chula cells."""
    import embedcache

    ds = embedcache.open_store(real_store).dataset()
    fs = ds.find_feature_set("efficientnet-lite0")
    assert fs.ok().all()
    return fs.to_numpy("mean"), ds.obs["label"].to_numpy(dtype=str)
