"""The embedcache CLI is a thin skin: same-named Python functions with the same parameter names, and what
`embedcache import` (a features file) does is callable from Python."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache_cli import embedcache_app as cli


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_extract_option_spellings(tmp_path, chula_subset):
    m = str(chula_subset(6))
    base = ["extract", "-m", "timm:test_vit", "--weights", "random", "-d", m, "--input-size", "32"]
    for i, extra in enumerate(
        (["--workers", "0", "--quiet"], ["--num-workers", "0", "-q"], ["--num-workers", "0", "--no-progress"])
    ):
        res = _invoke(*base, "-o", str(tmp_path / f"{i}.zarr"), *extra)
        assert res.exit_code == 0, res.output
        assert "wrote" in res.output and "cells/s, " not in res.output.split("wrote")[0], res.output  # no progress


@pytest.fixture
def features(tmp_path, chula_cells):
    rng = np.random.default_rng(0)
    cls, mean = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", cls=cls, mean=mean)
    np.save(tmp_path / "f.npy", cls)
    cells = tmp_path / "cells.csv"
    chula_cells.iloc[:40][["path", "label"]].assign(id=[f"c{i}" for i in range(40)]).to_csv(cells, index=False)
    return tmp_path, cls, mean, cells


def test_import_features_file_equals_import_features(features):
    root, cls, mean, cells = features
    r = embedcache.import_features_file(root / "a.zarr", root / "f.npz", cells, backbone="theirs", chunk_size=16)
    fs = embedcache.open_store(root / "a.zarr").dataset(r.dataset).feature_set(r.key)
    np.testing.assert_array_equal(fs.to_numpy("cls"), cls.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fs.to_numpy("mean"), mean.astype(np.float16).astype(np.float32))
    assert fs.attrs["provenance"]["imported"]["source"] == str((root / "f.npz").resolve())
    again = embedcache.import_features(
        root / "a.zarr",
        {"cls": cls, "mean": mean},
        cells,
        backbone="theirs",
        chunk_size=16,
        source=str((root / "f.npz").resolve()),
    )
    assert again.cache_hit and again.key == r.key
    one = embedcache.load_features(root / "f.npy")
    assert isinstance(one, np.ndarray) and one.shape == (40, 8)
    with pytest.raises(ValueError, match=r"\.npy .* or a \.npz"):
        embedcache.load_features(cells)
    with pytest.raises(FileNotFoundError, match="features file not found"):
        embedcache.import_features_file(root / "b.zarr", root / "nope.npy", backbone="x")


def test_cli_import_takes_backbone_and_the_readme_model_spelling(features):
    root, cls, _, cells = features
    for i, flag in enumerate(("--backbone", "--model", "-m")):
        res = _invoke(
            "import",
            "--features",
            str(root / "f.npy"),
            flag,
            "theirs",
            "--cells",
            str(cells),
            "--out",
            str(root / f"{i}.zarr"),
        )
        assert res.exit_code == 0 and "wrote" in res.output, res.output
        ds = embedcache.open_store(root / f"{i}.zarr").dataset()
        assert ds.feature_keys() == ["theirs/imported/clean"]
    bad = _invoke("import", "--features", str(root / "missing.npy"), "--backbone", "x", "--out", str(root / "x.zarr"))
    assert bad.exit_code == 1 and "error:" in bad.output and "features file not found" in bad.output
