"""Data-set issues (near-duplicates, leaks across a split, outliers) on real features.

A module store holds 200 bundled Chula RBC-12 cells, 10 altered copies of some of them (identical
pixels re-saved as PNG, re-encoded as JPEG q95, 1 px shifts, horizontal flips) and 8 foreign cells (the bundled
BCCD platelets and white cells, labelled as Chula classes), extracted with EfficientNet-Lite0 (ImageNet
weights from its package, no network) in store chunks of 64 rows so that the out-of-core path reads
several chunks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import embedcache
from embedcache.inputs.images import pixel_digest
from probes.errors import ProbeError
from probes.features.chunked import ChunkedRows
from probes.studies.audit.data_issues import (
    DEFAULT_THRESHOLD,
    Duplicates,
    data_issues,
    duplicate_sets,
    knn,
    merge_duplicates,
    near_duplicate_pairs,
    near_duplicates,
    outlier_scores,
    pixel_duplicates,
    split_leaks,
)
from tests.conftest import bundled

MODEL = "efficientnet-lite0"
N_CHULA = 200
# (original's position among the 200 Chula cells, how it is altered)
PLANTED = [
    (3, "same"),
    (40, "same"),
    (61, "jpeg95"),
    (133, "jpeg95"),
    (11, "shift1"),
    (57, "shift1"),
    (90, "shift1"),
    (123, "shift1"),
    (25, "flip"),
    (150, "flip"),
]


# a real duplicate among the 832 bundled cells: one macrocyte filed under smears 577 and 623 (the same
# pixels up to a (1, 3) px shift: grey-level difference 0.83), cosine 0.975
REAL_DUPLICATE = {"chula:577_005.jpg", "chula:623_000.jpg"}


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved by (dx, dy) pixels, the uncovered border filled by its edge pixels."""
    h, w = a.shape[:2]
    padded = np.pad(a, ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    return padded[max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]


def _altered(img: Image.Image, how: str) -> Image.Image:
    a = np.asarray(img.convert("RGB"))
    if how in ("same", "jpeg95"):
        return Image.fromarray(a)
    if how == "flip":
        return Image.fromarray(a[:, ::-1])
    return Image.fromarray(_shift(a, 1, 0))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, chula_cells):
    """``dict``: the store, the cells (manifest order = store order) with ``kind`` (chula / copy /
    foreign) and ``source`` (the original's position, -1), features ``X`` and pixel hashes."""
    root = tmp_path_factory.mktemp("data_issues")
    chula = chula_cells.iloc[np.arange(0, 4 * N_CHULA, 4)].reset_index(drop=True)
    rows = [chula.assign(kind="chula", source=-1)]
    copies = []
    for n, (src, how) in enumerate(PLANTED):
        path = root / f"copy_{n:02d}_{how}.{'jpg' if how == 'jpeg95' else 'png'}"
        _altered(Image.open(chula.path[src]), how).save(path, **({"quality": 95} if how == "jpeg95" else {}))
        copies.append({**chula.iloc[src].to_dict(), "path": str(path), "kind": "copy", "source": src})
    rows.append(pd.DataFrame(copies))
    # foreign cells filed under Chula classes (one class after another, as misfiled cells would be)
    classes = sorted(chula["label_name"].unique())
    paths = [p for folder in ("Platelets", "WBC") for p in sorted((bundled("bccd_cells") / folder).glob("*.jpg"))]
    foreign = pd.DataFrame({"path": [str(p) for p in paths], "smear": "bccd", "source": -1, "kind": "foreign"})
    foreign["label_name"] = [classes[3 * n % len(classes)] for n in range(len(paths))]
    rows.append(foreign)
    cells = pd.concat(rows, ignore_index=True)
    cells["id"] = [f"{k}:{p.rsplit('/', 1)[-1]}" for k, p in zip(cells["kind"], cells["path"])]
    manifest = root / "cells.csv"
    cells.assign(label=cells["label_name"], group=cells["smear"])[["path", "label", "group"]].to_csv(
        manifest, index=False
    )
    store = root / "cache.zarr"
    embedcache.extract(MODEL, manifest, store, progress=False, chunk_size=64)
    fs = embedcache.open_store(store).dataset().find_feature_set(MODEL)
    assert fs.ok().all()
    obs = embedcache.open_store(store).dataset().obs
    assert list(map(str, obs["path"])) == list(cells["path"])  # store rows in manifest order
    hashes = [pixel_digest(np.asarray(Image.open(p).convert("RGB"))) for p in cells["path"]]
    return {"store": store, "fs": fs, "cells": cells, "X": fs.to_numpy("mean"), "hashes": np.array(hashes)}


def _copies(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the planted copies, positions of their originals)."""
    copy = np.flatnonzero(cells["kind"].to_numpy() == "copy")
    return copy, cells["source"].to_numpy()[copy].astype(np.int64)


# -- near-duplicates ---------------------------------------------------------------------------------
def test_planted_copies_are_near_duplicates_of_their_originals(planted):
    cells, X = planted["cells"], planted["X"]
    dup = near_duplicates(X, cells["id"])
    copy, orig = _copies(cells)
    sets = dup.cells["duplicate_set"].to_numpy()
    assert (sets[copy] >= 0).all() and (sets[copy] == sets[orig]).all()  # recall 10/10 at the default
    pairs = set(zip(dup.pairs["i"], dup.pairs["j"]))
    assert {(min(a, b), max(a, b)) for a, b in zip(copy, orig)} <= pairs  # each directly, not only by a chain
    # precision: every other pair is the real duplicate of the bundled subset (no distinct cells)
    involved = np.isin(dup.pairs["i"], copy) | np.isin(dup.pairs["j"], copy)
    real = dup.pairs[~involved]
    assert [set(real.iloc[0][["id_i", "id_j"]])] == [REAL_DUPLICATE] and len(real) == 1
    assert dup.n_sets == len(PLANTED) + 1
    assert (dup.pairs["similarity"] >= DEFAULT_THRESHOLD).all() and (dup.pairs["i"] < dup.pairs["j"]).all()
    flagged = dup.cells[dup.cells["flag"]]
    assert set(flagged.index) == set(copy) | set(orig) | {real.iloc[0]["i"], real.iloc[0]["j"]}
    row = dup.cells.loc[copy[0]]  # an identical copy: cosine 1 to its original
    assert row["why"] == f"cosine 1.000 to {cells['id'][orig[0]]} (set {row['duplicate_set']} of 2 cells)"
    assert row["max_similarity"] == pytest.approx(1.0, abs=1e-6) and row["score"] == row["max_similarity"]
    # the per-cell table agrees with the pairs
    assert (dup.cells.loc[~dup.cells["flag"], "duplicate_set"] == -1).all()
    assert dup.cells.loc[copy, "set_size"].eq(2).all()


def test_the_real_duplicate_of_the_bundled_cells_is_found_and_leaks_a_smear_split(real_features, chula_cells):
    X, _ = real_features
    ids = chula_cells["path"].str.rsplit("/", n=1).str[-1].to_numpy()
    dup = near_duplicates(X, ids)
    assert list(zip(dup.pairs["id_i"], dup.pairs["id_j"])) == [("577_005.jpg", "623_000.jpg")]
    # 0.9749 from bf16 features (dtype auto on a CPU with native bf16), 0.9728 from fp32 (AVX2 only)
    assert dup.pairs["similarity"].iloc[0] == pytest.approx(0.974, abs=3e-3)
    # a split by smear (the group) keeps smears apart, not this cell: 577 in train, 623 in test
    smear = chula_cells["smear"].to_numpy()
    parts = np.where(smear.astype(int) >= 600, "test", "train")
    leaks = split_leaks(dup, parts, smear)
    assert leaks.groups.empty and leaks.note == ""
    assert leaks.sets["cells"].tolist() == [["577_005.jpg", "623_000.jpg"]]
    assert leaks.cells.loc[leaks.cells["flag"], "why"].tolist() == ["set 0 spans train and test"] * 2


def test_threshold_one_finds_identical_features_only(planted):
    cells, X = planted["cells"], planted["X"]
    i, j, sim, excluded = near_duplicate_pairs(X, 1.0)
    same = [(src, c) for c, (src, how) in zip(_copies(cells)[0], PLANTED) if how == "same"]
    assert sorted(zip(i.tolist(), j.tolist())) == same
    assert excluded == 0 and np.allclose(sim, 1.0, rtol=0, atol=1e-6)  # float32 dot of equal unit rows


def test_out_of_core_rows_give_the_same_pairs_and_neighbours(planted):
    cells, X, fs = planted["cells"], planted["X"], planted["fs"]
    n = len(cells)
    # the rows in another order than the store's, so that positions and store rows differ
    perm = np.random.default_rng(0).permutation(n)
    rows = ChunkedRows(fs, "mean", perm, ids=cells["id"].to_numpy()[perm], block_rows=50)
    assert fs.chunk_size == 64 and len(rows) == n
    mem = near_duplicate_pairs(X[perm], DEFAULT_THRESHOLD)
    ooc = near_duplicate_pairs(rows, DEFAULT_THRESHOLD, query_rows=16)
    for a, b in zip(mem, ooc):
        np.testing.assert_array_equal(a, b)
    assert len(mem[0]) >= len(PLANTED)
    # smaller query blocks in memory: the same again
    for a, b in zip(mem, near_duplicate_pairs(X[perm], DEFAULT_THRESHOLD, query_rows=7)):
        np.testing.assert_array_equal(a, b)
    sets = duplicate_sets(n, mem[0], mem[1])
    s_mem, i_mem, _ = knn(X[perm], 10, sets)
    s_ooc, i_ooc, _ = knn(rows, 10, sets, query_rows=32)
    np.testing.assert_array_equal(i_mem, i_ooc)
    np.testing.assert_array_equal(s_mem, s_ooc)
    o_mem = outlier_scores(X[perm], cells["label_name"].to_numpy()[perm], k=10, duplicate_set=sets)
    o_ooc = outlier_scores(rows, cells["label_name"].to_numpy()[perm], k=10, duplicate_set=sets, block_rows=40)
    pd.testing.assert_frame_equal(o_mem.cells, o_ooc.cells)


def test_pixel_hashes_group_identical_decoded_pixels(planted):
    cells, hashes = planted["cells"], planted["hashes"]
    img = np.asarray(Image.open(cells["path"][0]).convert("RGB"))
    assert pixel_digest(img) == pixel_digest(img.copy()) and pixel_digest(img) != 0
    assert pixel_digest(img) != pixel_digest(img[:, ::-1]) and pixel_digest(img) != pixel_digest(img.reshape(-1, 3))
    changed = img.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_digest(changed) != pixel_digest(img)
    # the PNG copies hold the JPEG original's decoded pixels: the same hash; the altered ones differ
    copy, orig = _copies(cells)
    same = np.array([how == "same" for _, how in PLANTED])
    assert (hashes[copy[same]] == hashes[orig[same]]).all() and (hashes[copy[~same]] != hashes[orig[~same]]).all()
    missing = hashes.astype(object)
    missing[[5, 6]] = ["", None]
    pix = pixel_duplicates(missing, cells["id"])
    assert pix.missing_hash == 2 and pix.n_sets == int(same.sum())
    assert set(zip(pix.pairs["i"], pix.pairs["j"])) == set(zip(orig[same], copy[same]))
    assert (pix.pairs["evidence"] == "pixel").all() and pix.pairs["similarity"].isna().all()
    c = pix.cells.loc[copy[same][0]]
    assert c["why"] == f"same decoded pixels as cell {cells['id'][orig[same][0]]} (set {c['duplicate_set']} of 2 cells)"
    # integer hashes work too
    as_int = pd.factorize(hashes)[0].astype(np.int64)
    assert pixel_duplicates(as_int).n_sets == int(same.sum())


def test_merged_evidence_marks_pixel_pairs_and_joins_sets(planted):
    cells, X, hashes = planted["cells"], planted["X"], planted["hashes"]
    ids = cells["id"].to_numpy()
    near = near_duplicates(X, ids)
    merged = merge_duplicates(near, pixel_duplicates(hashes, ids))
    copy, orig = _copies(cells)
    same = np.array([how == "same" for _, how in PLANTED])
    ev = {(i, j): e for i, j, e in zip(merged.pairs["i"], merged.pairs["j"], merged.pairs["evidence"])}
    for c, o, s in zip(copy, orig, same):
        assert ev[(o, c)] == ("pixel" if s else "near")
    assert (merged.cells["duplicate_set"] == near.cells["duplicate_set"]).all()  # nothing new here
    assert merged.cells.loc[copy[same], "why"].str.startswith("same decoded pixels as cell").all()
    assert merged.cells.loc[copy[~same], "why"].str.startswith("cosine 0.9").all()
    # a pixel pair the feature search cannot see (its features are NaN) still joins the set
    Xbad = X.copy()
    Xbad[copy[0]] = np.nan
    near_bad = near_duplicates(Xbad, ids)
    assert near_bad.excluded_nonfinite == 1 and near_bad.cells.loc[copy[0], "duplicate_set"] == -1
    merged_bad = merge_duplicates(near_bad, pixel_duplicates(hashes, ids))
    row = merged_bad.pairs[(merged_bad.pairs["i"] == orig[0]) & (merged_bad.pairs["j"] == copy[0])].iloc[0]
    assert row["evidence"] == "pixel" and np.isnan(row["similarity"])
    assert merged_bad.cells.loc[copy[0], "duplicate_set"] == merged_bad.cells.loc[orig[0], "duplicate_set"] >= 0


# -- leaks --------------------------------------------------------------------------------------------
def test_a_duplicate_across_a_group_split_is_a_leak(planted):
    cells, X = planted["cells"], planted["X"]
    ids = cells["id"].to_numpy()
    dup = near_duplicates(X, ids)
    copy, orig = _copies(cells)
    # a split by smear (no group leaks), except that the first copy is put in the other part
    smears = cells["smear"].to_numpy()
    test_smears = set(pd.Series(np.unique(smears)).sample(frac=0.3, random_state=1))
    parts = np.where(np.isin(smears, list(test_smears)), "test", "train").astype(object)
    parts[copy] = parts[orig]
    parts[copy[0]] = "test" if parts[orig[0]] == "train" else "train"
    leaks = split_leaks(dup, parts, smears)
    s = dup.cells.loc[copy[0], "duplicate_set"]
    assert leaks.sets["duplicate_set"].tolist() == [s]
    row = leaks.sets.iloc[0]
    assert row["size"] == 2 and set(row["cells"]) == {ids[copy[0]], ids[orig[0]]}
    assert set(row["parts"].split(", ")) == {"train", "test"}
    flagged = leaks.cells[leaks.cells["leak_duplicate"]]
    assert set(flagged.index) == {copy[0], orig[0]}
    assert flagged["why"].str.startswith(f"set {s} spans train and test").all()
    # the copy carries its original's smear: that smear now lies in both parts
    g = smears[orig[0]]
    assert leaks.groups["group"].tolist() == [g]
    counts = pd.Series(parts[smears == g]).value_counts()
    assert leaks.groups.iloc[0][["train", "test"]].to_dict() == {p: counts.get(p, 0) for p in ("train", "test")}
    assert set(leaks.cells.index[leaks.cells["leak_group"]]) == set(np.flatnonzero(smears == g))
    expect = f"group {g} in " + " and ".join(f"{p} ({counts[p]})" for p in ("train", "test"))
    assert expect in leaks.cells.loc[orig[0], "why"]
    # score: the cells of its set or group in the other part
    assert leaks.cells.loc[orig[0], "score"] == (parts[smears == g] != parts[orig[0]]).sum()
    assert leaks.cells.loc[~leaks.cells["flag"], "score"].eq(0).all()


def test_a_split_that_ignores_groups_reports_each_group_with_its_counts(planted):
    cells = planted["cells"]
    n = len(cells)
    parts = np.random.default_rng(2).choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    smears = cells["smear"].to_numpy()
    leaks = split_leaks(np.full(n, -1), parts, smears, cells["id"])
    table = pd.crosstab(smears, parts)
    spans = table[(table > 0).sum(axis=1) > 1]
    assert sorted(leaks.groups["group"]) == sorted(spans.index)
    got = leaks.groups.set_index("group")[["train", "val", "test"]].sort_index()
    pd.testing.assert_frame_equal(got, spans[["train", "val", "test"]].sort_index(), check_names=False)
    sizes = pd.Series(parts).value_counts()
    assert list(leaks.groups.columns[3:]) == sorted(sizes.index, key=lambda p: (-sizes[p], p))  # largest first
    assert leaks.sets.empty and not leaks.cells["leak_duplicate"].any()
    assert leaks.cells["leak_group"].sum() == int(np.isin(smears, spans.index).sum())


def test_no_groups_means_no_group_leaks(planted):
    cells = planted["cells"]
    n = len(cells)
    parts = np.where(np.arange(n) % 3 == 0, "test", "train")
    for groups in (None, np.full(n, ""), [None] * n):
        leaks = split_leaks(np.full(n, -1), parts, groups)
        assert leaks.note == "no groups" and leaks.groups.empty and not leaks.cells["flag"].any()
    # cells outside the split ("") never leak
    sets = np.full(n, -1)
    sets[[0, 1]] = 0
    parts2 = parts.astype(object)
    parts2[[0, 1]] = ["train", ""]
    assert not split_leaks(sets, parts2).cells["flag"].any()


# -- outliers -----------------------------------------------------------------------------------------
def test_foreign_cells_rank_at_the_top_of_the_outlier_score(planted):
    from sklearn.metrics import roc_auc_score

    cells, X = planted["cells"], planted["X"]
    foreign = cells["kind"].to_numpy() == "foreign"
    dup = near_duplicates(X, cells["id"])
    for labels in (cells["label_name"].to_numpy(), None):
        out = outlier_scores(X, labels, cells["id"], duplicate_set=dup)
        assert out.k == 20 and out.by_class == (labels is not None)
        top = out.ranking().index[: foreign.sum() + 3]
        assert set(np.flatnonzero(foreign)) <= set(top), out.ranking().head(12)
        assert roc_auc_score(foreign, out.cells["score"]) > 0.99
        # flags: half the foreign cells or more (the platelets are each other's neighbours), few others
        assert out.cells["flag"][foreign].sum() >= foreign.sum() // 2
        assert out.cells["flag"][~foreign].sum() <= 3
    first = out.cells.loc[out.ranking().index[0]]
    assert first["why"].startswith("mean distance to its 20 nearest cells ")
    assert first["why"].endswith("x the median of all cells")
    by_class = outlier_scores(X, cells["label_name"], cells["id"], duplicate_set=dup)
    row = by_class.cells.loc[by_class.ranking().index[0]]
    assert foreign[by_class.ranking().index[0]]
    expect = f"mean distance to its 20 nearest cells {row['score']:.1f}x its class median (class: {row['label']})"
    assert row["why"] == expect
    assert row["score"] == pytest.approx(row["knn_distance"] / row["reference"])
    assert row["global_score"] != row["score"]


def test_a_copied_cell_does_not_look_typical(planted):
    """With its duplicate set left out, a copied cell's neighbours are other cells, not its copy at a
    distance of ~0; the scores equal a brute-force computation that leaves the set out."""
    cells, X = planted["cells"], planted["X"]
    copy, orig = _copies(cells)
    dup = near_duplicates(X, cells["id"])
    sets = dup.cells["duplicate_set"].to_numpy()
    k = 20
    with_sets = outlier_scores(X, cells["label_name"], cells["id"], k=k, duplicate_set=dup)
    without = outlier_scores(X, cells["label_name"], cells["id"], k=k).cells
    # brute force: all cosines, itself and its set masked, the k largest
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn.astype(np.float64) @ Xn.T.astype(np.float64)
    same = (sets[:, None] == sets[None, :]) & (sets[:, None] >= 0) | np.eye(len(X), dtype=bool)
    S[same] = -np.inf
    top = -np.sort(-S, axis=1)[:, :k]
    np.testing.assert_allclose(with_sets.cells["knn_distance"], (1 - top).mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(with_sets.cells["kth_distance"], 1 - top[:, -1], rtol=1e-5, atol=1e-6)
    assert not (with_sets.neighbors[orig] == copy[:, None]).any()
    assert (without["knn_distance"].to_numpy()[orig] < with_sets.cells["knn_distance"].to_numpy()[orig]).all()
    assert (without["nearest"].to_numpy()[orig] == cells["id"].to_numpy()[copy]).all()
    assert (with_sets.cells["nearest"].to_numpy()[orig] != cells["id"].to_numpy()[copy]).all()


def test_outliers_on_the_bundled_cells_are_few_and_explained(real_features):
    X, y = real_features
    out = outlier_scores(X, y, k=10)
    c = out.cells
    assert len(c) == len(y) and (c["rank"] > 0).all() and sorted(c["rank"]) == list(range(1, len(y) + 1))
    assert 0 < c["flag"].mean() < 0.03  # robust z > 3: a tail, not a fixed share of every class
    ranked = out.ranking()
    assert ranked["score"].is_monotonic_decreasing
    assert (ranked["why"][ranked["flag"]].str.contains(r"x its class median \(class: ")).all()
    assert (c["why"][~c["flag"]] == "").all()
    # relative to the class median: every class's median score is 1
    med = c.groupby("label")["score"].median()
    np.testing.assert_allclose(med.to_numpy(), 1.0, rtol=0.05)
    assert out.neighbors.shape == (len(y), 10) and (out.neighbors != np.arange(len(y))[:, None]).all()


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, -0.5, 1.01, float("nan"), "high"])
def test_a_threshold_outside_0_1_is_refused(real_features, threshold):
    X, _ = real_features
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(X[:20], threshold=threshold)


def test_nonfinite_rows_are_excluded_and_counted(real_features):
    X, y = real_features
    X = X[:300].copy()
    y = y[:300]
    X[[4, 9]] = np.nan
    X[17, 3] = np.inf
    X[20] = 0.0
    X[21] = X[22]  # a duplicate, to show the search still runs
    dup = near_duplicates(X)
    assert dup.excluded_nonfinite == 4
    assert not np.isin(dup.pairs[["i", "j"]].to_numpy(), [4, 9, 17, 20]).any()
    assert (21, 22) in set(zip(dup.pairs["i"], dup.pairs["j"]))
    out = outlier_scores(X, y, k=5)
    bad = out.cells.loc[[4, 9, 17, 20]]
    assert out.excluded_nonfinite == 4 and (bad["rank"] == 0).all() and bad["score"].isna().all()
    assert (bad["why"] == "features not finite: excluded").all() and not bad["flag"].any()
    assert not np.isin(out.neighbors, [4, 9, 17, 20]).any()
    issues = data_issues(X, labels=y, k=5)
    assert issues.notes == ["4 cell(s) with NaN/inf or all-zero features excluded"]


def test_lengths_and_k_are_checked(real_features):
    X, y = real_features
    X, y = X[:50], y[:50]
    with pytest.raises(ValueError, match="ids has 49 entries for 50 cells"):
        near_duplicates(X, ids=np.arange(49).astype(str))
    with pytest.raises(ValueError, match="labels has 10 entries for 50 cells"):
        outlier_scores(X, y[:10], k=3)
    with pytest.raises(ValueError, match="parts has 49 entries for 50 cells"):
        split_leaks(np.full(50, -1), ["train"] * 49)
    with pytest.raises(ValueError, match="groups has 3 entries for 50 cells"):
        split_leaks(np.full(50, -1), ["train"] * 50, ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate_set has 5 entries for 50 cells"):
        knn(X, 3, np.full(5, -1))
    with pytest.raises(ValueError, match="at most k=49"):
        outlier_scores(X, y, k=50)
    X2 = X.copy()
    X2[0] = np.nan
    with pytest.raises(ValueError, match=r"at most k=48 \(1 excluded"):
        outlier_scores(X2, y, k=49)
    assert outlier_scores(X, y, k=49).cells["rank"].min() == 1
    with pytest.raises(ValueError, match="k must be a positive integer"):
        outlier_scores(X, y, k=0)
    with pytest.raises(ValueError, match="2-D"):
        near_duplicates(X[0])
    with pytest.raises(ValueError, match="cover 50 cells, pixel duplicates 3"):
        merge_duplicates(near_duplicates(X), pixel_duplicates(["a", "a", "b"]))


def test_too_low_a_threshold_is_refused_not_run_out_of_memory(real_features):
    X, _ = real_features
    with pytest.raises(ProbeError, match="raise the threshold"):
        near_duplicate_pairs(X[:200], 0.05, max_pairs=1000)


def test_data_issues_joins_the_three_audits(planted):
    cells, X = planted["cells"], planted["X"]
    copy, orig = _copies(cells)
    parts = np.where(np.arange(len(cells)) % 5 == 0, "test", "train").astype(object)
    parts[copy] = np.where(parts[orig] == "train", "test", "train")  # every copy across the split
    issues = data_issues(
        X, cells["id"], labels=cells["label_name"], parts=parts, groups=cells["smear"], hashes=planted["hashes"]
    )
    assert isinstance(issues.duplicates, Duplicates) and issues.leaks is not None and issues.outliers is not None
    t = issues.table()
    assert list(t.columns) == ["id"] + [
        f"{a}_{b}" for a in ("duplicate", "leak", "outlier") for b in ("score", "flag", "why")
    ]
    assert t.loc[copy, "duplicate_flag"].all() and t.loc[copy, "leak_flag"].all()
    assert len(issues.leaks.sets) == len(PLANTED)
    foreign = cells["kind"].to_numpy() == "foreign"
    assert t.loc[foreign, "outlier_flag"].sum() >= foreign.sum() // 2
    assert set(np.flatnonzero(foreign)) <= set(issues.outliers.ranking().index[: foreign.sum() + 3])
    assert issues.notes == []
