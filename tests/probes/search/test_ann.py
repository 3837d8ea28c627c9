"""Approximate neighbour look-ups (probes.search.ann, ApproxNeighborIndex, `probes neighbors --index`): candidates
re-ranked exactly, recall measured and kept, the index kept beside the store and reused, rebuilt when the
features change, exact search unchanged, the CLI flags.

Data: clustered synthetic features imported into a store (a few thousand rows), and real bundled Chula
cells extracted with a tiny random-init backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache.store import side_url
from probes.errors import ProbeError
from probes.search import ann
from probes.search.index import ApproxNeighborIndex, NeighborIndex
from probes.search.vectors import l2_normalize
from probes.studies.neighbors import neighbors

N, D, MODEL = 3000, 64, "synthetic"


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Cells of 60 clusters in a 12-d latent space mapped to ``d`` dims, plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, 12)) * 2.0
    z = centres[rng.integers(0, 60, n)] + rng.standard_normal((n, 12)) * 0.6
    return (z @ rng.standard_normal((12, d)) + rng.standard_normal((n, d)) * 0.05 + 0.5).astype(np.float32)


@pytest.fixture
def store(tmp_path) -> Path:
    out = tmp_path / "cache.zarr"
    cells = pd.DataFrame({"id": [f"c{i:05d}" for i in range(N)], "label": [f"k{i % 7}" for i in range(N)]})
    embedcache.import_features(out, clustered(N, D), cells, backbone=MODEL, chunk_size=512)
    return out


def ann_dir(store: Path) -> Path:
    return Path(side_url(store, "probes", "ann"))


def kept_files(store: Path) -> list[str]:
    return sorted(p.name for p in ann_dir(store).rglob("*") if p.is_file())


def brute(x: np.ndarray, q: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ xn.T
    if exclude is not None:
        s[np.arange(len(q)), exclude] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def test_rerank_and_exact_topk_helpers_agree_with_bruteforce():
    rng = np.random.default_rng(1)
    x = clustered(900, 32, seed=1).astype(np.float16)
    q = l2_normalize(x[:40])
    ref_s, ref_i = brute(x.astype(np.float32), q, 7, exclude=np.arange(40))
    s, i = ann.exact_topk(x, q, 7, exclude=np.arange(40))
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    assert ann.recall_at_k(i, ref_i) == 1.0
    # re-ranking every cell is exact search; candidates -1 and the excluded cell never come back
    cand = np.tile(np.arange(900), (40, 1))
    cand[:, 5] = -1
    s2, i2 = ann.rerank(x, q, cand, 7, exclude=np.arange(40))
    keep = ref_i != 5
    np.testing.assert_allclose(s2[:, :3][keep[:, :3]], ref_s[:, :3][keep[:, :3]], atol=2e-6)
    assert not (i2 == np.arange(40)[:, None]).any() and not (i2 == 5).any()
    # fewer candidates than k: padded with -1 / NaN
    s3, i3 = ann.rerank(x, q, rng.integers(0, 900, (40, 3)), 5)
    assert (i3[:, 3:] == -1).all() and np.isnan(s3[:, 3:]).all()
    assert ann.recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, 4]])) == pytest.approx(1 / 3)


def test_ivf_reranked_answers_are_exact_and_recall_is_measured(store):
    exact = NeighborIndex.from_store(store, MODEL, index="exact")
    approx = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert type(exact) is NeighborIndex and isinstance(approx, ApproxNeighborIndex) and approx.kind == "ivf"
    p = approx.ann.params
    assert p.factory() == f"IVF{p.nlist},PQ{D // 8}x4fs" and 32 <= p.nlist <= N // 39
    q = exact.vectors(np.arange(0, N, 30))
    ref_s, ref_i = exact.search(q, 10)
    got_s, got_i = approx.search(q, 10)
    assert ann.recall_at_k(got_i, ref_i) >= 0.95
    for rs, ri, gs, gi in zip(ref_s, ref_i, got_s, got_i):  # where both found a cell, the similarity is exact
        common = {int(i): s for i, s in zip(ri, rs)}
        for i, s in zip(gi, gs):
            if int(i) in common:
                assert s == pytest.approx(common[int(i)], abs=1e-5)
    # the build measured recall@20 on a sample of indexed cells, and the index line says so
    (entry,) = approx.ann.recall
    assert entry["k"] == 20 and entry["sample"] == ann.RECALL_SAMPLE and entry["recall"] >= 0.95
    assert entry["settings"] == {"nprobe": ann.DEFAULT_NPROBE, "rerank": ann.DEFAULT_RERANK}
    assert f"recall@20 {entry['recall']:.3f}" in approx.describe()
    # a deliberately poor setting: measured recall over every cell equals recall computed independently
    approx.nprobe, approx.rerank = 1, 5
    m = approx.measure_recall(5, sample=N)
    x = embedcache.open_store(store).dataset().find_feature_set(MODEL).to_numpy()
    _, truth = brute(x, x, 5, exclude=np.arange(N))
    _, found = approx.all_neighbors(5)
    assert m["recall"] == pytest.approx(ann.recall_at_k(found, truth), abs=1e-4) and m["recall"] < 1.0
    assert "measured with" not in approx.describe() and f"recall@5 {m['recall']:.3f}" in approx.describe()
    approx.nprobe = 2  # settings without a measurement: the line names the settings the figure is for
    assert "measured with nprobe 1, rerank 5" in approx.describe()


def test_index_is_kept_reused_and_rebuilt_when_features_change(store, monkeypatch):
    first = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert not first.ann.loaded and first.ann.url
    files = kept_files(store)
    assert len(files) == 2 and files[0].endswith(".faiss") and files[1] == files[0] + ".json"
    assert first.ann.digest in files[0]
    record = json.loads((Path(first.ann.url[: -len(".faiss")] + ".faiss.json")).read_text())
    assert record["n"] == N and record["digest"] == first.ann.digest and record["recall"] == first.ann.recall
    # the second look-up loads it: nothing is trained or added
    built = ann.AnnIndex.build
    monkeypatch.setattr(ann.AnnIndex, "build", classmethod(lambda *a, **k: pytest.fail("rebuilt a kept index")))
    second = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert isinstance(second, ApproxNeighborIndex) and second.ann.loaded
    assert "loaded from" in second.describe() and second.ann.recall == first.ann.recall
    q = second.vectors(np.arange(0, N, 97))
    for a, b in zip(first.search(q, 8), second.search(q, 8)):
        np.testing.assert_array_equal(a, b)
    # other search settings and --recall: the new figure is recorded beside the kept index
    second.nprobe = 4
    entry = second.measure_recall(8, sample=100)
    third = NeighborIndex.from_store(store, MODEL, index="ivf", nprobe=4)
    assert entry in third.ann.recall and f"recall@8 {entry['recall']:.3f}" in third.describe()
    monkeypatch.setattr(ann.AnnIndex, "build", built)
    # a rewritten chunk (a re-extract) changes the digest: a new index, the stale one removed
    fs = embedcache.open_store(store, "a").dataset().find_feature_set(MODEL)
    rows = fs.chunk_rows(0)
    changed = clustered(rows.stop - rows.start, D, seed=9).astype(np.float16)
    fs.write_chunk(0, {"cls": changed}, np.ones(len(changed), bool), np.array([""] * len(changed)))
    fourth = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert not fourth.ann.loaded and fourth.ann.digest != first.ann.digest
    assert kept_files(store) == sorted([Path(fourth.ann.url).name, Path(fourth.ann.url).name + ".json"])
    np.testing.assert_allclose(fourth.vectors([0]), l2_normalize(changed[:1]), atol=1e-6)
    # a record that does not match its features (or a damaged file) is never used: rebuilt, and said so
    rec_path = Path(fourth.ann.url + ".json")
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "n": N + 1}))
    fifth = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert not fifth.ann.loaded and "unusable" in fifth.describe() and "does not match" in fifth.describe()
    Path(fifth.ann.url).write_bytes(b"not an index")
    sixth = NeighborIndex.from_store(store, MODEL, index="ivf")
    assert not sixth.ann.loaded and "unusable" in sixth.ann.note
    assert NeighborIndex.from_store(store, MODEL, index="ivf").ann.loaded


def test_auto_picks_by_size_and_exact_is_unchanged(store, tmp_path):
    small = NeighborIndex.from_store(store, MODEL)  # 3,000 cells: far below the threshold
    assert type(small) is NeighborIndex and small.describe().startswith("index: exact")
    assert not ann_dir(store).exists()  # exact search keeps nothing
    big = NeighborIndex.from_store(store, MODEL, exact_below=1000, keep=False)
    assert isinstance(big, ApproxNeighborIndex) and big.kind == "ivf" and "not kept (keep=False)" in big.describe()
    assert not ann_dir(store).exists()
    with pytest.raises(ProbeError, match="unknown neighbour index 'annoy'"):
        NeighborIndex.from_store(store, MODEL, index="annoy")
    with pytest.raises(ProbeError, match="parameters given are for ivf"):
        NeighborIndex.from_store(store, MODEL, index="hnsw", params=ann.AnnParams("ivf"))
    # --index exact answers exactly what the exact index answers
    ids = [f"c{i:05d}" for i in (3, 1500, 2999)]
    ref = neighbors(store, MODEL, id=ids, k=6, index=NeighborIndex.from_store(store, MODEL, index="exact"))
    res = neighbors(store, MODEL, id=ids, k=6, index="exact", out=tmp_path / "nb")
    pd.testing.assert_frame_equal(res.table, ref.table)
    assert res.recall is None and res.index_info.startswith("index: exact")
    # the ANN answer of the same look-up, with its recall measured for the look-up's k and settings
    got = neighbors(store, MODEL, id=ids, k=6, index="ivf", nprobe=8, rerank=50, recall=True)
    assert got.recall["k"] == 6 and got.recall["settings"] == {"nprobe": 8, "rerank": 50}
    assert f"recall@6 {got.recall['recall']:.3f}" in got.index_info
    merged = got.table.merge(ref.table, on=["query", "id"], suffixes=("", "_exact"))
    assert len(merged) >= 0.9 * len(ref.table)
    np.testing.assert_allclose(merged["similarity"], merged["similarity_exact"], atol=1e-5)


def test_hnsw_index(store):
    h = NeighborIndex.from_store(store, MODEL, index="hnsw")
    assert isinstance(h, ApproxNeighborIndex) and h.ann.params.factory() == "HNSW32_SQ8"
    assert h.ann.recall[0]["recall"] >= 0.95 and "ef 128" in h.describe()
    assert NeighborIndex.from_store(store, MODEL, index="hnsw").ann.loaded
    assert len(kept_files(store)) == 2  # hnsw and ivf indexes are kept side by side, by parameters
    NeighborIndex.from_store(store, MODEL, index="ivf")
    assert len(kept_files(store)) == 4


def test_digest_names_the_rows_and_the_checksums(store):
    fs = embedcache.open_store(store).dataset().find_feature_set(MODEL)
    rows = np.arange(N)
    d = ann.features_digest(fs, "cls", rows)
    assert d == ann.features_digest(fs, "cls", rows) and len(d) == 16
    assert ann.features_digest(fs, "cls", rows[1:]) != d  # another cell subset: another index


def test_memory_store_keeps_its_index_through_fsspec(tmp_path):
    url = "memory://embedcache-ann-test/cache.zarr"
    embedcache.import_features(url, clustered(1500, D, seed=3), backbone=MODEL, chunk_size=512)
    first = NeighborIndex.from_store(url, MODEL, index="ivf")
    assert first.ann.url.startswith("memory://") and not first.ann.loaded
    second = NeighborIndex.from_store(url, MODEL, index="ivf")
    assert second.ann.loaded and second.ann.recall == first.ann.recall


def test_cli_index_flags(store):
    import inspect

    from embedcache_cli import probes_app

    assert inspect.signature(probes_app.neighbors).parameters["exact_below"].default == ann.AUTO_EXACT_BELOW

    def run(*extra: str):
        return CliRunner().invoke(
            probes_app.app, ["neighbors", "--store", str(store), "--model", MODEL, "--id", "c00010", "-k", "5", *extra]
        )

    res = run("--index", "ivf", "--nprobe", "8", "--rerank", "40", "--recall")
    assert res.exit_code == 0, res.output
    assert "index: ivf" in res.output and "nprobe 8, 40 candidates re-ranked exactly" in res.output
    assert "recall@5" in res.output and "c00010" in res.output
    again = run("--index", "ivf")
    assert again.exit_code == 0 and "loaded from" in again.output, again.output
    exact = run()
    assert exact.exit_code == 0 and "index: exact" in exact.output, exact.output
    bad = run("--index", "annoy")
    assert bad.exit_code != 0 and "unknown neighbour index 'annoy'" in bad.output


def test_real_cells_ivf_against_exact(tmp_path, chula_subset):
    out = tmp_path / "cells.zarr"
    kw = dict(weights="random", progress=False, num_workers=0, chunk_size=256, batch_size=64)
    embedcache.extract("timm:test_resnet", chula_subset(832), out, input_size=64, **kw)
    exact = NeighborIndex.from_store(out, "timm:test_resnet", index="exact", pool="mean")
    approx = NeighborIndex.from_store(out, "timm:test_resnet", index="ivf", pool="mean")
    ids = exact.obs["id"].to_numpy()[::40]
    a, b = exact.query_ids(ids, k=8), approx.query_ids(ids, k=8)
    assert approx.ann.recall[0]["recall"] >= 0.9
    merged = b.merge(a, on=["query", "id"], suffixes=("", "_exact"))
    assert len(merged) >= 0.9 * len(a)
    np.testing.assert_allclose(merged["similarity"], merged["similarity_exact"], atol=1e-5)
    # a cell's own image, embedded on the fly, finds the cell itself first through the ANN index too
    path = approx.obs["path"].iat[17]
    hit = approx.query_images([path], k=3, device="cpu")
    assert hit["id"].iat[0] == approx.obs["id"].iat[17] and hit["similarity"].iat[0] > 0.999
