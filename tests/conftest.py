"""Shared fixtures: real cells from ../shared/data, tiny random-init backbones."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(name: str) -> Path:
    """A dataset folder under ../shared/data; skip (with the reason) when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real cell data not found at {path} (set EMBEDCACHE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def chula_manifest() -> pd.DataFrame:
    """The Chula RBC-12 manifest with absolute paths (22,106 cells, 13 classes, smear groups)."""
    root = shared("chula_rbc12")
    df = pd.read_csv(root / "manifest.csv", dtype=str)
    df["path"] = [str(root / p) for p in df["path"]]
    return df


@pytest.fixture
def chula_subset(tmp_path, chula_manifest):
    """Write a manifest of the first ``n`` Chula cells (with smear as group); returns its path."""

    def make(n: int = 200, name: str = "chula.csv", **extra) -> Path:
        df = chula_manifest.iloc[:n].copy()
        df["group"] = df["smear"]
        for k, v in extra.items():
            df[k] = v
        path = tmp_path / name
        df.to_csv(path, index=False)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_vit():
    from embedcache.loading import load_backbone

    return load_backbone("timm:test_vit", weights="random")


@pytest.fixture(scope="session")
def chula_features(tmp_path_factory, chula_manifest):
    """Real features for the probe heads: up to 100 Chula cells per class (1,300 cells, 13 classes,
    class names as labels), extracted once into a store with a tiny random-init ViT at 64 px.

    Returns ``(X float32 (n, 64), y str (n,))`` read back through the store API."""

    import embedcache

    root = tmp_path_factory.mktemp("heads")
    df = pd.concat([g.sample(min(len(g), 100), random_state=0) for _, g in chula_manifest.groupby("label")])
    manifest = root / "chula_heads.csv"
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract("timm:test_vit", manifest, out, weights="random", input_size=64, label_column="label_name",
                       progress=False, num_workers=2, chunk_size=512, batch_size=128)
    ds = embedcache.open_store(out).dataset()
    fs = ds.find_feature_set("timm:test_vit")
    assert fs.ok().all()
    return fs.to_numpy("cls"), ds.obs["label"].to_numpy(dtype=str)
