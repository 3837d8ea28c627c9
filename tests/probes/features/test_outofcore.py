"""Out-of-core probes (probes.features.chunked, probes.heads.rows): rows read from the store in blocks give
the in-memory results.

Real features: the 832 bundled Chula RBC-12 cells through a tiny random-init ViT, stored in chunks of
128 rows; blocks of 100 rows so that blocks and store chunks never line up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import embedcache
from probes import scale
from probes.errors import ProbeError
from probes.features.cells import open_cells
from probes.features.chunked import ChunkedRows, predict_blocks, proba_blocks
from probes.features.policy import MemoryPolicy, memory_policy, parse_memory
from probes.heads.knn import ChunkedKNNProbe, KNNProbe
from probes.heads.logistic import LogisticProbe
from probes.search.exact import all_neighbors, exact_search
from probes.search.index import NeighborIndex

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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_streamed_logistic_equals_the_in_memory_fit_bit_for_bit(data, monkeypatch, precision):
    """The C sweep and refit on rows read from the store in blocks (several blocks, cut across store
    chunks) give the in-memory fit's coefficients exactly, kept between passes or read again on every
    pass, in float32 and with the bfloat16 first phase; never more than one block is read at a time."""
    import probes.heads.blocks as blocks
    import probes.heads.logistic as logistic

    monkeypatch.setattr(blocks, "block_rows", lambda width: BLOCK)  # 600 training rows: 6 blocks, chunks of 128
    monkeypatch.setattr(logistic, "PRECOND_ROWS", 64)  # the preconditioner's sample: one block too
    fs, X, y, train, test = data
    reads: list[int] = []
    original = ChunkedRows._read_store

    def counting(self, rows):
        reads.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(ChunkedRows, "_read_store", counting)
    mem = LogisticProbe(precision=precision).fit(X[train], y[train])
    ooc = LogisticProbe(precision=precision).fit(chunked(fs, train, cache_bytes=0), y[train])
    assert reads and max(reads) <= BLOCK
    n_reads, reads[:] = len(reads), []
    kept = LogisticProbe(precision=precision).fit(chunked(fs, train), y[train])
    assert len(reads) < n_reads / 3  # standardised blocks kept between passes (the budget allows all here)
    assert len(mem.val_f1_) > 1 and ooc.precision_ == mem.precision_ == precision
    for other in (ooc, kept):
        assert other.C_ == mem.C_ and other.val_f1_ == mem.val_f1_ and other.n_iter_ == mem.n_iter_
        assert torch.equal(other.mean_, mem.mean_) and torch.equal(other.scale_, mem.scale_)
        assert torch.equal(other.coef_.W, mem.coef_.W) and torch.equal(other.coef_.b, mem.coef_.b)
    np.testing.assert_array_equal(ooc.predict_proba(X[test]), mem.predict_proba(X[test]))
    np.testing.assert_array_equal(predict_blocks(ooc, chunked(fs, test)), mem.predict(X[test]))
    np.testing.assert_allclose(proba_blocks(ooc, chunked(fs, test)), mem.predict_proba(X[test]), atol=1e-6)


def test_streamed_logistic_meets_the_stopping_rule(data):
    """The blocked objective is the objective: the fit's gradient, computed in one piece, meets the rule."""
    from probes.heads.base import encode_labels, standardize_t
    from probes.heads.lbfgs import _objective

    fs, X, y, train, _ = data
    ooc = LogisticProbe(Cs=(0.01,), precision="float32").fit(chunked(fs, train), y[train])
    XT, _, _ = standardize_t(torch.from_numpy(X[train]))
    codes = torch.from_numpy(encode_labels(y[train], len(train))[1])
    lam = 1.0 / (ooc.C_ * len(train))
    _, gWt, gb = _objective(XT, ooc.coef_.W.T.contiguous(), ooc.coef_.b, codes, "softmax", lam, len(train))
    assert ooc.converged_ and float(max(gWt.abs().max(), gb.abs().max())) <= 1.5 * ooc.tol


def test_studies_choose_the_out_of_core_path_and_say_so(store, tmp_path):
    """Above the budget the study reads its features out of core (fits.csv and a note say so); its
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
    same = [r.drop(columns=["seconds", "study"]).reset_index(drop=True) for r in (mem.results, ooc.results)]
    pd.testing.assert_frame_equal(same[0], same[1], check_exact=True)  # kNN and logistic alike
    with memory_policy("always"), pytest.raises(ProbeError, match="no out-of-core path"):
        scale(store, MODEL, limits="16", probes="svm", seeds=1, quiet=True, out=tmp_path / "svm")
    with memory_policy("never", max_memory="1KB"):  # never: in memory whatever the budget
        assert not hasattr(open_cells(store, MODEL).features(MODEL, np.arange(10)), "blocks")


@pytest.mark.slow
def test_audit_out_of_core_equals_in_memory(store, tmp_path):
    """An audit whose features are read in store chunks (kNN fits and the neighbour search merged to the
    exact top-k; logistic streamed) gives the in-memory audit's table, with kNN alone and with logistic."""
    from probes import audit

    kw = dict(folds=3, seeds=1, k=5, cache=False, html=False, quiet=True)
    mem = audit(store, MODEL, probes="knn", out=tmp_path / "mem", **kw)
    ooc = audit(store, MODEL, probes="knn", out=tmp_path / "ooc", out_of_core="always", **kw)
    cols = ["id", "score", "self_confidence", "neighbor_disagreement", "proposed_label"]
    pd.testing.assert_frame_equal(mem.table[cols], ooc.table[cols])
    mem2 = audit(store, MODEL, probes="logistic,knn", out=tmp_path / "mem2", **kw)
    ooc2 = audit(store, MODEL, probes="logistic,knn", out=tmp_path / "ooc2", out_of_core="always", **kw)
    pd.testing.assert_frame_equal(mem2.table[cols], ooc2.table[cols], check_exact=True)  # exact fits, same table
    # the out-of-fold probabilities stay in memory whatever the features do: a budget below them is refused
    with pytest.raises(ProbeError, match="GiB of probabilities"):
        audit(store, MODEL, probes="logistic,knn", out=tmp_path / "tiny", max_memory="100KB", **kw)
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


@pytest.mark.slow
def test_probability_studies_out_of_core_equal_in_memory(store, tmp_path):
    """calibrate above the memory budget (logistic streamed, kNN searched in blocks) gives the in-memory tables
    exactly, and fits.csv says which path the fits took. ensemble and selective fit through the same function
    (probes.engine.proba_fits.fit_proba), so this covers their fits too."""
    from probes import calibrate

    kw = dict(probes="logistic,knn", quiet=True)
    mem = calibrate(store, MODEL, out=tmp_path / "mem", **kw)
    ooc = calibrate(store, MODEL, out=tmp_path / "ooc", max_memory="100KB", **kw)
    for table in ("results", "reliability"):
        a, b = (getattr(r, table).drop(columns=["seconds", "study"], errors="ignore") for r in (mem, ooc))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=table)
    assert set(pd.read_csv(tmp_path / "ooc" / "fits.csv")["features"]) == {"out-of-core"}
    assert set(pd.read_csv(tmp_path / "mem" / "fits.csv")["features"]) == {"in-memory"}


def test_an_audit_counts_every_backbone_it_holds_against_the_budget(tmp_path):
    """Two backbones of 40 KB each under a 64 KB budget: each alone fits, both together do not, so the audit's
    matrices are all read out of core; under a budget that holds both they stay in memory."""
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"id": [f"c{i}" for i in range(500)], "label": ["a", "b"] * 250})
    for name in ("one", "two"):
        embedcache.import_features(
            tmp_path / "two.zarr", rng.normal(size=(500, 20)).astype(np.float32), cells, backbone=name
        )
    both = open_cells(tmp_path / "two.zarr", "one,two")
    pos = np.arange(500)
    with memory_policy("auto", max_memory=64_000):
        assert not hasattr(both.features("one", pos), "blocks")  # 40 KB alone: in memory
        held = both.features_of_all(pos)
        assert set(held) == {"one", "two"} and all(hasattr(x, "blocks") for x in held.values())
    with memory_policy("auto", max_memory=100_000):
        assert not any(hasattr(x, "blocks") for x in both.features_of_all(pos).values())
