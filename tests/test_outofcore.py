"""Out-of-core probes (probes.outofcore): rows read from the store in blocks give the in-memory results.

Real features: the 832 bundled Chula RBC-12 cells through a tiny random-init ViT, stored in chunks of
128 rows; blocks of 100 rows so that blocks and store chunks never line up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import embedcache
from probes import scale
from probes.data import ProbeError, open_cells
from probes.heads.knn import KNNProbe
from probes.heads.logistic import LogisticProbe
from probes.neighbors import NeighborIndex
from probes.outofcore import (
    ChunkedKNNProbe,
    ChunkedRows,
    MemoryPolicy,
    all_neighbors,
    exact_search,
    memory_policy,
    parse_memory,
    predict_blocks,
    proba_blocks,
)

MODEL = "timm:test_vit"
BLOCK = 100


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    root = tmp_path_factory.mktemp("outofcore")
    manifest = root / "chula.csv"
    df = chula_cells.copy()
    df["group"] = df["smear"]
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(
        MODEL,
        manifest,
        out,
        weights="random",
        input_size=64,
        label_column="label_name",
        progress=False,
        num_workers=2,
        chunk_size=128,
        batch_size=128,
    )
    return out


@pytest.fixture(scope="module")
def data(store):
    """``(feature set, X float32 in memory, labels, train positions, test positions)``."""
    ds = embedcache.open_store(store).dataset()
    fs = ds.find_feature_set(MODEL)
    assert fs.n_chunks > 1 and fs.array("cls").dtype == np.float16
    X, y = fs.to_numpy("cls"), ds.obs["label"].to_numpy(dtype=str)
    perm = np.random.default_rng(0).permutation(len(X))
    return fs, X, y, perm[:600], perm[600:]


def chunked(fs, rows, block=BLOCK, cache_bytes=None) -> ChunkedRows:
    return ChunkedRows(fs, "cls", np.asarray(rows), block_rows=block, cache_bytes=cache_bytes)


def test_blocks_cover_every_row_once_in_store_order(data):
    fs, X, _, train, _ = data
    C = chunked(fs, train)
    seen, sizes = [], []
    for pos, x in C.blocks():
        np.testing.assert_array_equal(x, X[train[pos]])
        seen.append(pos)
        sizes.append(len(pos))
    assert max(sizes) == BLOCK and sum(sizes) == len(train)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(train)))
    assert np.all(np.diff(train[np.concatenate(seen)]) > 0)  # store order: each store chunk read once a pass
    sub = C[np.array([5, 1, 5])]  # positions (repeats too) give another reader of those rows
    np.testing.assert_array_equal(sub.read(np.arange(3)), X[train[[5, 1, 5]]])
    with pytest.raises(ProbeError, match="read out of core"):
        np.asarray(C)


def test_exact_search_equals_the_in_memory_knn(data):
    """Merged block top-k == FAISS over all rows at once: same neighbours, same similarities."""
    fs, X, y, train, test = data
    sims, idx = exact_search(X[test], chunked(fs, train), 20)
    ref = KNNProbe(backend="faiss").fit(X[train], y[train])
    s_ref, i_ref = ref.kneighbors(X[test])
    np.testing.assert_array_equal(idx, i_ref)
    np.testing.assert_allclose(sims, s_ref, atol=1e-6)
    probe = ChunkedKNNProbe().fit(chunked(fs, train), y[train])
    assert probe.backend_ == "faiss-chunked"
    np.testing.assert_array_equal(probe.predict(X[test]), ref.predict(X[test]))
    np.testing.assert_allclose(probe.predict_proba(X[test]), ref.predict_proba(X[test]), atol=1e-6)
    # predictions on out-of-core queries, block by block, in their order
    np.testing.assert_array_equal(predict_blocks(probe, chunked(fs, test, 37)), ref.predict(X[test]))
    np.testing.assert_allclose(proba_blocks(probe, chunked(fs, test, 37)), ref.predict_proba(X[test]), atol=1e-6)
    one = ChunkedKNNProbe(k=1).fit(chunked(fs, train), y[train])
    np.testing.assert_array_equal(one.predict(X[test]), KNNProbe(k=1).fit(X[train], y[train]).predict(X[test]))


def test_ties_go_to_the_lower_position(data):
    """Every row twice (positions p and p + n): equal similarities, the lower position first, always."""
    fs, X, _, train, test = data
    rows = np.concatenate([train[:150], train[:150]])
    sims, idx = exact_search(X[test[:50]], chunked(fs, rows, 64), 6)
    assert np.array_equal(sims[:, 0::2], sims[:, 1::2])  # pairs of equal similarity
    assert np.array_equal(idx[:, 1::2], idx[:, 0::2] + 150) and (idx[:, 0::2] < 150).all()
    again = exact_search(X[test[:50]], chunked(fs, rows, 41), 6)  # other blocks, same answer
    np.testing.assert_array_equal(again[1], idx)


def test_all_neighbors_equals_the_audit_index(data):
    fs, X, _, _, _ = data
    sims, idx = all_neighbors(chunked(fs, np.arange(len(X))), 10)
    s_ref, i_ref = NeighborIndex(X).all_neighbors(10)
    np.testing.assert_array_equal(idx, i_ref)
    np.testing.assert_allclose(sims, s_ref, atol=1e-6)
    assert not (idx == np.arange(len(X))[:, None]).any()  # never itself
    s, i = exact_search(X[:3], chunked(fs, np.arange(4)), 6)  # fewer rows than k: padded
    assert (i[:, 4:] == -1).all() and np.isnan(s[:, 4:]).all()


def test_memory_policy():
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("512MB") == 512 * 10**6 and parse_memory(None) is None
    with pytest.raises(ProbeError, match="not a size"):
        parse_memory("lots")
    p = MemoryPolicy("auto", 1000)
    assert p.out_of_core(1001) and not p.out_of_core(1000)
    assert MemoryPolicy("always").out_of_core(1) and not MemoryPolicy("never").out_of_core(10**15)
    assert MemoryPolicy().budget > 0
    with pytest.raises(ProbeError, match="one of"):
        MemoryPolicy("sometimes")


def _gradient_max(probe: LogisticProbe, X: np.ndarray, y: np.ndarray) -> float:
    """The largest entry of the in-memory objective's gradient at ``probe``'s coefficients (standardised
    as the in-memory fit standardises)."""
    from probes.heads.base import encode_labels, standardize_t
    from probes.heads.lbfgs import _objective

    XT, _, _ = standardize_t(torch.from_numpy(X))
    codes = torch.from_numpy(encode_labels(y, len(y))[1])
    lam = 1.0 / (probe.C_ * len(y))
    W = probe.coef_.W.clone().requires_grad_(False)
    _, gWt, gb = _objective(XT, W.T.contiguous(), probe.coef_.b, codes, "softmax", lam, len(y))
    return float(max(gWt.abs().max(), gb.abs().max()))


def test_streamed_logistic_equals_the_in_memory_fit(data, monkeypatch):
    """One C, well conditioned: the streamed fit meets the in-memory objective's stopping rule, with the
    same predictions; never more than one block (or one store chunk) of rows is read at a time."""
    fs, X, y, train, test = data
    reads: list[int] = []
    original = ChunkedRows._read_store

    def counting(self, rows):
        reads.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(ChunkedRows, "_read_store", counting)
    mem = LogisticProbe(Cs=(0.01,), precision="float32").fit(X[train], y[train])
    ooc = LogisticProbe(Cs=(0.01,), precision="float32").fit(chunked(fs, train, cache_bytes=0), y[train])
    assert reads and max(reads) <= fs.chunk_size  # every read is one store chunk's rows
    n_reads, reads[:] = len(reads), []
    kept = LogisticProbe(Cs=(0.01,), precision="float32").fit(chunked(fs, train), y[train])
    assert len(reads) < n_reads / 3  # standardised blocks kept between passes (the budget allows all here)
    assert torch.equal(kept.coef_.W, ooc.coef_.W) and torch.equal(kept.coef_.b, ooc.coef_.b)  # same numbers
    assert ooc.converged_ and mem.converged_ and ooc.precision_ == "float32"
    tol = ooc.tol
    assert _gradient_max(ooc, X[train], y[train]) <= 1.5 * tol and _gradient_max(mem, X[train], y[train]) <= tol
    np.testing.assert_allclose(ooc.mean_.numpy(), mem.mean_.numpy(), atol=1e-6)
    np.testing.assert_allclose(ooc.scale_.numpy(), mem.scale_.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ooc.coef_.W.numpy(), mem.coef_.W.numpy(), atol=2e-4)
    np.testing.assert_array_equal(ooc.predict(X[test]), mem.predict(X[test]))
    np.testing.assert_allclose(ooc.predict_proba(X[test]), mem.predict_proba(X[test]), atol=1e-3)
    np.testing.assert_array_equal(predict_blocks(ooc, chunked(fs, test)), mem.predict(X[test]))


def test_streamed_logistic_sweep_chooses_as_in_memory(data):
    """The default C sweep on the same hold-out: the same C and the same predictions."""
    fs, X, y, train, test = data
    mem = LogisticProbe().fit(X[train], y[train])
    ooc = LogisticProbe().fit(chunked(fs, train), y[train])
    assert ooc.C_ == mem.C_ and set(ooc.val_f1_) == set(mem.val_f1_)
    np.testing.assert_array_equal(ooc.predict(X[test]), mem.predict(X[test]))


def test_studies_choose_the_out_of_core_path_and_say_so(store, tmp_path):
    """Above the budget the study reads its features out of core (fits.csv and a note say so); the kNN
    rows equal the in-memory study's; a probe without an out-of-core path is a clear error."""
    kw = dict(limits="16,48", probes="knn,logistic", seeds=1, quiet=True)
    mem = scale(store, MODEL, out=tmp_path / "mem", **kw)
    assert set(mem.fits["features"]) == {"in-memory"}
    assert not any("out of core" in n for n in mem.notes)
    with memory_policy("auto", max_memory="100KB", block_rows=100):  # 832 x 64 float32 = 213 KB
        ooc = scale(store, MODEL, out=tmp_path / "ooc", **kw)
    assert set(ooc.fits["features"]) == {"out-of-core"}
    assert any("fits read their features out of core" in n for n in ooc.notes)
    assert set(pd.read_csv(tmp_path / "ooc" / "fits.csv")["features"]) == {"out-of-core"}
    knn = [
        r[r["probe"] == "knn"].drop(columns=["seconds", "study"]).reset_index(drop=True)
        for r in (mem.results, ooc.results)
    ]
    pd.testing.assert_frame_equal(knn[0], knn[1])
    main = [r[(r["metric"] == "macro_f1") & (r["class"] == "")]["value"].to_numpy() for r in (mem.results, ooc.results)]
    np.testing.assert_allclose(main[0], main[1], atol=0.02)
    with memory_policy("always"), pytest.raises(ProbeError, match="no out-of-core path"):
        scale(store, MODEL, limits="16", probes="svm", seeds=1, quiet=True, out=tmp_path / "svm")
    with memory_policy("never", max_memory="1KB"):  # never: in memory whatever the budget
        assert not hasattr(open_cells(store, MODEL).features(MODEL, np.arange(10)), "blocks")


def test_audit_out_of_core_equals_in_memory(store, tmp_path):
    """An audit whose features are read in store chunks (kNN fits and the neighbour search merged to the
    exact top-k; logistic streamed) ranks like the in-memory audit: kNN-only identical, with logistic close."""
    from probes import audit

    kw = dict(folds=3, seeds=1, k=5, cache=False, html=False, quiet=True)
    mem = audit(store, MODEL, probes="knn", out=tmp_path / "mem", **kw)
    ooc = audit(store, MODEL, probes="knn", out=tmp_path / "ooc", out_of_core="always", **kw)
    cols = ["id", "score", "self_confidence", "neighbor_disagreement", "proposed_label"]
    pd.testing.assert_frame_equal(mem.table[cols], ooc.table[cols])
    mem2 = audit(store, MODEL, probes="logistic,knn", out=tmp_path / "mem2", **kw)
    ooc2 = audit(store, MODEL, probes="logistic,knn", out=tmp_path / "ooc2", max_memory="100KB", **kw)
    by_id = ooc2.table.set_index("id").loc[mem2.table["id"]]
    a, b = by_id["score"].to_numpy(), mem2.table["score"].to_numpy()
    rho = pd.Series(a).rank().corr(pd.Series(b).rank())
    top = len(set(mem2.table["id"][:50]) & set(ooc2.table["id"][:50]))
    print(f"out-of-core vs in-memory audit: spearman {rho:.4f}, top-50 overlap {top}, max |d| {abs(a - b).max():.3f}")
    # the streamed logistic stops at another point of a float32 L-BFGS run (same C, 99.6% equal predictions)
    assert rho > 0.97 and top >= 40
    with pytest.raises(ProbeError, match="no out-of-core path"):
        audit(store, MODEL, probes="mlp", out=tmp_path / "mlp", out_of_core="always", **kw)


def test_ties_between_distinct_store_rows_follow_positions_not_store_order(tmp_path):
    """Two store rows with identical features (a duplicated image), indexed in the reverse of store order:
    the tie goes to the lower *position*, whatever the block size."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[30] = x[2]
    cells = pd.DataFrame({"id": [f"c{i}" for i in range(40)], "label": ["a", "b"] * 20})
    embedcache.import_features(tmp_path / "dup.zarr", x, cells, backbone="dup", chunk_size=16)
    fs = embedcache.open_store(tmp_path / "dup.zarr").dataset().find_feature_set("dup")
    rows = np.arange(40)[::-1]  # position p is store row 39 - p: rows 30 and 2 are positions 9 and 37
    q = fs.to_numpy("cls")[[30, 2]]
    for block in (7, 16, 40):
        sims, got = exact_search(q, chunked(fs, rows, block), 3)
        assert (got[:, 0] == 9).all() and (got[:, 1] == 37).all(), (block, got)
        assert (sims[:, 0] == sims[:, 1]).all()
        _, first = exact_search(q, chunked(fs, rows, block), 1)  # the tie at the cut of a block's top-k
        assert (first[:, 0] == 9).all(), (block, first)
