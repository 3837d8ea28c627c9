"""Label audit, nearest-neighbour look-ups and relabelling on real Chula RBC-12 cells.

The store is extracted once per module with tiny random-init timm backbones (no pretrained
weights here): ``timm:test_resnet`` (64 px, mean pool; its random features still separate
the red-cell morphologies well above chance, ~0.6 accuracy over 13 classes) and
``timm:test_vit`` (32 px, cls pool) as a second backbone.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import embedcache
import probes
from probes.errors import ProbeError
from probes.features.cells import open_cells
from probes.heads import make_probe
from probes.search.index import NeighborIndex
from probes.studies.audit import (
    EVIDENCE_COLUMNS,
    audit,
    audit_arrays,
    default_cache,
    evidence,
    make_folds,
    read_oof_cache,
    relabel,
)
from probes.studies.audit import run as audit_run
from probes.studies.audit.folds import oof_proba
from probes.studies.audit.run import JOINT_PROBE
from probes.studies.neighbors import neighbors

RESNET = "timm:test_resnet"
VIT = "timm:test_vit"
N_CELLS = 1200


@pytest.fixture(scope="module")
def built(tmp_path_factory, chula_manifest):
    """A store of 1,200 random Chula cells (label = class name, group = smear) with two backbones."""
    root = tmp_path_factory.mktemp("audit")
    df = chula_manifest.sample(N_CELLS, random_state=3).copy()
    df["label"] = df["label_name"]
    df["group"] = df["smear"]
    manifest = root / "chula.csv"
    df[["path", "label", "group"]].to_csv(manifest, index=False)
    out = root / "cache.zarr"
    kw = dict(weights="random", progress=False, num_workers=2, chunk_size=512, batch_size=128)
    embedcache.extract(RESNET, manifest, out, input_size=64, **kw)
    embedcache.extract(VIT, manifest, out, input_size=32, pool="cls,mean", **kw)
    return out


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the built store: tests may relabel and cache freely."""
    dst = tmp_path / "cache.zarr"
    shutil.copytree(built, dst)
    return dst


def counted_audit(store, calls: list, **kw):
    """A quiet single-thread audit of the mean-pooled test_resnet whose fits are counted in ``calls`` (with the
    joint member, which the counts below include: it is no longer the default)."""
    kw.setdefault("joint", True)
    return audit(store, RESNET, pool="mean", make_probe=counting_probe(calls), quiet=True, threads=1, **kw)


def counting_probe(calls: list):
    """A ``make_probe`` that counts every ``fit`` (same heads, same parameters)."""

    def make(name, seed=0, device="auto"):
        est = make_probe(name, seed=seed, device=device)
        fit = est.fit

        def counted(X, y):
            calls.append(name)
            return fit(X, y)

        est.fit = counted
        return est

    return make


def ranks_of(table: pd.DataFrame, ids) -> np.ndarray:
    return table.set_index("id").loc[list(ids), "rank"].to_numpy()


# -- the audit finds injected flips -------------------------------------------------------------
def test_injected_flips_rank_high_and_audit_reads_current_labels(store, tmp_path):
    from sklearn.metrics import roc_auc_score

    obs = embedcache.open_store(store).dataset().obs
    rng = np.random.default_rng(7)
    classes = sorted(obs["label"].unique())
    pick = rng.choice(len(obs), size=60, replace=False)  # 5 % of the cells
    new = [rng.choice([c for c in classes if c != obs["label"].iat[i]]) for i in pick]
    corr = pd.DataFrame({"id": obs["id"].to_numpy()[pick], "new_label": new, "note": "injected flip"})
    corr.to_csv(tmp_path / "flips.csv", index=False)
    assert relabel(store, tmp_path / "flips.csv") == 60

    res = audit(
        store, RESNET, pool="mean", probes="logistic,knn", seeds=1, folds=5, out=tmp_path / "a", quiet=True, threads=1
    )
    # the audit saw the flipped labels: every study reads labels/current
    given = res.table.set_index("id").loc[corr["id"], "given_label"]
    assert (given.to_numpy() == corr["new_label"].to_numpy()).all()
    flipped = res.table["id"].isin(set(corr["id"])).to_numpy()
    n = int(flipped.sum())
    assert n == 60 and len(res.table) == N_CELLS
    auroc = roc_auc_score(flipped, res.table["score"])
    precision = flipped[:n].mean()  # table is ranked: top n rows
    mean_pct = res.table["rank"][flipped].mean() / len(res.table)
    # chance: AUROC 0.5, precision 0.05, mean rank percentile 0.5
    assert auroc >= 0.8, auroc
    assert precision >= 0.25, precision
    assert mean_pct <= 0.25, mean_pct
    # the proposed label is often the true one for the flipped cells caught near the top
    top = res.table.head(n)
    truth = dict(zip(obs["id"], obs["label"]))
    caught = top[top["id"].isin(set(corr["id"]))]
    assert (caught["proposed_label"] == caught["id"].map(truth)).mean() >= 0.3


def test_evidence_pieces_and_score_formula():
    """Consensus, proposed label, self-confidence, the confident-learning flag and the documented score."""
    from cleanlab.filter import find_label_issues

    from probes.studies.audit import OOF, Ranking

    classes = ["a", "b", "c"]
    labels = np.array(["a", "a", "b", "c", "c", "b", "a"])
    p1 = np.array(
        [
            [0.9, 0.1, 0],
            [0.05, 0.9, 0.05],
            [0.1, 0.2, 0.7],
            [0, 0.1, 0.9],
            [0.1, 0.1, 0.8],
            [0.1, 0.8, 0.1],
            [0.2, 0.7, 0.1],
        ]
    )
    p2 = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.6, 0.2],
            [0.1, 0, 0.9],
            [0, 0.2, 0.8],
            [0.2, 0.7, 0.1],
            [0.1, 0.2, 0.7],
        ]
    )
    oofs = [OOF({}, classes, p.astype(np.float32), np.zeros(7)) for p in (p1, p2)]
    nd = np.array([0.0, 0.5, 1.0, 0.0, 0.25, 0.0, 0.5])
    ev = evidence(
        oofs, labels, classes, nd, Ranking(calibrate=False, flagged_first=False, neighbors=0.2, consensus=0.1)
    )
    np.testing.assert_allclose(ev["consensus"], [0, 1, 0.5, 0, 0, 0, 1])
    np.testing.assert_allclose(ev["self_confidence"][:3], [0.85, 0.075, 0.4], rtol=1e-6)
    assert ev["proposed_label"].iat[1] == "b" and ev["proposed_votes"].iat[1] == 1
    assert ev["proposed_label"].iat[2] == "c" and ev["proposed_votes"].iat[2] == 0.5
    # cell 6: one vote for b, one for c; b wins the tie on mean probability (0.45 against 0.4)
    assert ev["proposed_label"].iat[6] == "b" and ev["proposed_votes"].iat[6] == 0.5
    expect = 0.7 * (1 - ev["self_confidence"]) + 0.2 * nd + 0.1 * ev["consensus"]
    np.testing.assert_allclose(ev["score"], expect, rtol=1e-6)
    y = np.array([0, 0, 1, 2, 2, 1, 0])
    mean = (p1 + p2) / 2
    np.testing.assert_array_equal(ev["confident_learning"], find_label_issues(y, mean / mean.sum(1, keepdims=True)))
    # flags first: a flagged cell outranks every unflagged one
    ev2 = evidence(oofs, labels, classes, nd, "raw|flag|n0|c0")
    f = ev2["confident_learning"].to_numpy()
    assert f.any() and ev2["score"][f].min() >= ev2["score"][~f].max() and ev2["score"].between(0, 1).all()
    assert evidence(oofs, labels, classes, nd)["score"].between(0, 1).all()  # the default (calibrated) ranking
    with pytest.raises(ProbeError):
        evidence(oofs, np.array(["a", "a", "z", "c", "c", "b", "a"]), classes, nd)


# -- out-of-fold predictions never come from a model that saw the cell ---------------------------
def test_oof_predictions_never_from_a_model_trained_on_the_cell(built, monkeypatch):
    cells = open_cells(built, RESNET, pool="mean")
    x = cells.features(RESNET, np.arange(len(cells.obs)))
    labels, groups = cells.labels, cells.obs["group"].to_numpy()
    rowid = {x[i].tobytes(): i for i in range(len(x))}
    assert len(rowid) == len(x)  # every cell's feature row is distinct, so rows identify cells
    log = []
    joint_head = audit_run.joint_probe

    def recording(name, seed=0, device="auto"):
        head = joint_head if name == JOINT_PROBE else lambda **kw: make_probe(name, **kw)
        est = head(seed=seed, device=device)
        fit, proba = est.fit, est.predict_proba

        def rec_fit(X, y):
            log.append({"model": name, "seed": seed, "train": {rowid[r.tobytes()] for r in X}, "test": set()})
            return fit(X, y)

        def rec_proba(X):
            log[-1]["test"] |= {rowid[r.tobytes()] for r in X}
            return proba(X)

        est.fit, est.predict_proba = rec_fit, rec_proba
        return est

    # the joint member (one backbone: a plain logistic on its features) is recorded as well
    monkeypatch.setattr(audit_run, "joint_probe", lambda **kw: recording(JOINT_PROBE, **kw))
    res = audit_arrays(
        {RESNET: x},
        labels,
        ids=cells.obs["id"],
        groups=groups,
        probes="knn",
        seeds=[1, 2],
        folds=4,
        make_probe=recording,
        threads=1,
        joint=True,  # recorded too (not the default since the four-set benchmark chose by cost)
    )
    models = [(o.key["probe"], o.key["seed"]) for o in res.oofs]
    assert models == [("knn", 1), ("knn", 2), (JOINT_PROBE, 1), (JOINT_PROBE, 2)]
    assert res.params["scheme"] == "group" and len(log) == 4 * 4 and res.fits == 16
    for o in res.oofs:
        fits = [f for f in log if f["seed"] == o.key["seed"] and f["model"] == o.key["probe"]]
        assert len(fits) == 4
        predicted = np.zeros(len(x), dtype=int)
        for f, entry in enumerate(fits):
            assert not entry["train"] & entry["test"]  # never predicts a cell it was trained on
            assert entry["test"] == set(np.flatnonzero(o.fold == f))
            assert entry["train"] == set(np.flatnonzero(o.fold != f))
            # group-aware: no smear on both sides
            assert not set(groups[list(entry["train"])]) & set(groups[list(entry["test"])])
            predicted[list(entry["test"])] += 1
        assert (predicted == 1).all()  # every cell predicted exactly once per model
    assert not np.array_equal(res.oofs[0].fold, res.oofs[1].fold)  # folds reshuffled per seed
    # the fold helper: stratified when asked, refuses too few groups instead of silently ignoring them
    fold, scheme = make_folds(labels, groups, 5, 0, "stratified")
    assert scheme == "stratified" and sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    assert make_folds(labels, None, 5, 0)[1] == "stratified"
    with pytest.raises(ProbeError, match="groups"):
        make_folds(labels, np.where(np.arange(len(labels)) % 2, "s1", "s2"), 5, 0)


# -- out-of-fold cache: a second audit refits nothing ---------------------------------------------
@pytest.mark.slow
def test_second_audit_reuses_the_cache_and_refits_nothing(store, tmp_path):
    calls: list = []
    one = counted_audit(store, calls, probes="knn,logistic", seeds=2, folds=3, out=tmp_path / "one")
    # 2 probes x 2 seeds counted through make_probe, and the joint member per seed (its own head)
    assert one.computed == 6 and one.reused == 0 and len(calls) == 4 * 3 and one.fits == 6 * 3
    cache = default_cache(str(store), "chula")
    # side data lives beside the store, outside its Zarr tree
    assert one.files["oof"] == cache == f"{store}.embedcache/probes/audit-oof-chula.parquet"
    assert (store.parent / "cache.zarr.embedcache" / "probes" / "audit-oof-chula.parquet").is_file()
    assert not (store / ".probes").exists()
    assert embedcache.open_store(store).dataset().feature_keys()  # the store still opens and lists its sets
    calls.clear()
    two = counted_audit(store, calls, probes="knn,logistic", seeds=2, folds=3, out=tmp_path / "two")
    assert calls == [] and two.computed == 0 and two.reused == 6 and two.fits == 0
    pd.testing.assert_frame_equal(one.table, two.table)
    # one more seed: only its models are fitted; the others still come from the cache
    three = counted_audit(store, calls, probes="knn,logistic", seeds=3, folds=3, out=tmp_path / "three")
    assert three.reused == 6 and three.computed == 3 and len(calls) == 2 * 3
    cached = read_oof_cache(cache, one.obs["id"])
    assert len(cached) == 9
    # other folds or an explicit cache file are other keys / files
    calls.clear()
    counted_audit(store, calls, probes="knn", seeds=1, folds=4, out=tmp_path / "four")
    assert len(calls) == 4
    calls.clear()
    off = counted_audit(store, calls, probes="knn", seeds=1, folds=3, out=tmp_path / "five", cache=False)
    assert len(calls) == 3 and "oof" not in off.files


def test_a_cache_left_inside_an_old_store_is_still_read(store, tmp_path):
    calls: list = []
    one = counted_audit(store, calls, probes="knn", seeds=1, folds=3, out=tmp_path / "one")
    assert one.computed == 2 and len(calls) == 3  # knn and the joint member
    legacy = store / ".probes" / "audit-oof-chula.parquet"  # where earlier versions kept it
    legacy.parent.mkdir()
    shutil.move(one.files["oof"], legacy)
    calls.clear()
    two = counted_audit(store, calls, probes="knn", seeds=1, folds=3, out=tmp_path / "two")
    assert calls == [] and two.reused == 2 and two.computed == 0
    pd.testing.assert_frame_equal(one.table, two.table)
    # a new model is written to the new place, the legacy file's models carried over with it
    three = counted_audit(store, calls, probes="knn", seeds=2, folds=3, out=tmp_path / "three")
    assert three.reused == 2 and three.computed == 2 and len(calls) == 3
    assert three.files["oof"] == default_cache(str(store), "chula")
    assert len(read_oof_cache(three.files["oof"], one.obs["id"])) == 4


def test_cache_notices_changed_features(tmp_path, built):
    cells = open_cells(built, RESNET, pool="mean")
    x = cells.features(RESNET, np.arange(len(cells.obs)))
    kw = dict(
        ids=cells.obs["id"],
        probes="knn",
        seeds=1,
        folds=3,
        folds_by="stratified",
        cache=tmp_path / "oof.parquet",
        threads=1,
    )
    calls: list = []
    audit_arrays({"r": x}, cells.labels, make_probe=counting_probe(calls), **kw)
    audit_arrays({"r": x}, cells.labels, make_probe=counting_probe(calls), **kw)
    assert len(calls) == 3
    audit_arrays(
        {"r": x[:, ::-1].copy()}, cells.labels, make_probe=counting_probe(calls), **kw
    )  # same name, other features
    assert len(calls) == 6


# -- neighbours ----------------------------------------------------------------------------------
def brute_force(x: np.ndarray, q: np.ndarray, k: int, exclude=None):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ xn.astype(np.float64).T
    if exclude is not None:
        sims[np.arange(len(q)), exclude] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def check_against_reference(table: pd.DataFrame, names, ref_sims, ref_idx, ids):
    for qi, name in enumerate(names):
        got = table[table["query"] == name].sort_values("rank")
        np.testing.assert_allclose(got["similarity"].to_numpy(), ref_sims[qi], atol=2e-5)
        kth = ref_sims[qi][-1]
        # ids agree except where similarities tie within float32 precision at the k-th place
        sure = ref_sims[qi] > kth + 1e-5
        assert set(ids[ref_idx[qi][sure]]) <= set(got["id"])
        assert got["rank"].tolist() == list(range(1, len(ref_sims[qi]) + 1))


def test_neighbors_by_id_agree_with_bruteforce(built, tmp_path):
    index = NeighborIndex.from_store(built, RESNET, pool="mean")
    x = embedcache.open_store(built).dataset().find_feature_set(RESNET).to_numpy("mean")
    ids = index.obs["id"].to_numpy()
    q = np.random.default_rng(0).choice(len(ids), 25, replace=False)
    table = index.query_ids(ids[q], k=12)
    ref_sims, ref_idx = brute_force(x, x[q], 12, exclude=q)
    check_against_reference(table, ids[q], ref_sims, ref_idx, ids)
    assert not (table["id"] == table["query"]).any()  # a cell is never its own neighbour
    # every cell at once (the audit's path) agrees too
    sims, idx = index.all_neighbors(5, batch=500)
    ref_sims, ref_idx = brute_force(x, x, 5, exclude=np.arange(len(x)))
    np.testing.assert_allclose(sims, ref_sims, atol=2e-5)
    assert (idx != np.arange(len(x))[:, None]).all()
    # the one-call API and its files
    res = neighbors(built, RESNET, id=list(ids[q[:3]]), k=6, pool="mean", out=tmp_path / "nb", index=index)
    assert len(res.table) == 18 and list(res.table.columns) == ["query", "rank", "id", "label", "similarity", "path"]
    assert (tmp_path / "nb" / "neighbors.csv").is_file()
    with Image.open(tmp_path / "nb" / "neighbors.png") as im:
        assert im.width >= 7 * 90 and im.height >= 3 * 90
    with pytest.raises(ProbeError, match="unknown cell id"):
        index.query_ids(["no-such-cell"])
    # the package-level API: probes.neighbors(...) is the same call
    again = probes.neighbors(built, RESNET, id=list(ids[q[:3]]), k=6, pool="mean", index=index)
    pd.testing.assert_frame_equal(again.table, res.table)


def test_neighbors_by_new_image(built, tmp_path):
    index = NeighborIndex.from_store(built, VIT)
    x = embedcache.open_store(built).dataset().find_feature_set(VIT).to_numpy("cls")
    ids, paths = index.obs["id"].to_numpy(), index.obs["path"].to_numpy()
    # a cell's own image file, embedded on the fly, finds the cell itself first
    res = neighbors(built, VIT, image=[paths[10], paths[500]], k=8, index=index, device="cpu")
    for p, i in ((paths[10], 10), (paths[500], 500)):
        got = res.table[res.table["query"] == p].sort_values("rank")
        assert got["id"].iat[0] == ids[i] and got["similarity"].iat[0] > 0.999
    # a new image (the cell mirrored: not in the store) agrees with the numpy reference
    img = np.asarray(Image.open(paths[42]).convert("RGB"))[:, ::-1]
    new = tmp_path / "mirrored.png"
    Image.fromarray(img).save(new)
    q = index.embed([str(new)], device="cpu")
    table = index.query_images([str(new)], k=10, device="cpu")
    ref_sims, ref_idx = brute_force(x, q, 10)
    check_against_reference(table, [str(new)], ref_sims, ref_idx, ids)
    with pytest.raises(ProbeError, match="image not found"):
        neighbors(built, VIT, image=str(tmp_path / "missing.png"), index=index)
    with pytest.raises(ProbeError, match="one backbone"):
        neighbors(built, f"{VIT},{RESNET}", id=ids[0])


# -- relabelling --------------------------------------------------------------------------------
def test_relabel_round_trip_keeps_history(store, tmp_path):
    ds = embedcache.open_store(store).dataset()
    obs = ds.obs
    ids = obs["id"].to_numpy()[[3, 4, 5]]
    old = obs.set_index("id").loc[ids, "label"].tolist()
    new = ["teardrop" if o != "teardrop" else "burr" for o in old]
    pd.DataFrame({"id": ids, "new_label": new, "note": ["rev A"] * 3}).to_csv(tmp_path / "c1.csv", index=False)
    assert relabel(store, tmp_path / "c1.csv") == 3
    assert relabel(store, tmp_path / "c1.csv") == 0  # applying the same file again changes nothing
    back = ["normal" if n != "normal" else "target" for n in new[:1]]
    assert probes.relabel(store, pd.DataFrame({"id": ids[:1], "new_label": back}), source="reviewer 2") == 1
    ds = embedcache.open_store(store).dataset()
    after = ds.obs.set_index("id")
    assert after.loc[ids, "label"].tolist() == back + new[1:]
    assert after.loc[ids, "label_original"].tolist() == old  # the original is never overwritten
    assert (after["label_original"].to_numpy() == obs.set_index("id")["label_original"].to_numpy()).all()
    hist = ds.label_history()
    assert len(hist) == 4 and hist["old"].tolist() == old + new[:1] and hist["new"].tolist() == new + back
    assert hist["source"].tolist()[-1] == "reviewer 2" and hist["note"].tolist()[:3] == ["rev A"] * 3
    # bad corrections are refused with a clear message, and nothing is written
    bad = {
        "unknown": (pd.DataFrame({"id": ["nope"], "new_label": ["normal"]}), "not cells"),
        "typo": (pd.DataFrame({"id": ids[:1], "new_label": ["normall"]}), "no cell carries"),
        "dup": (pd.DataFrame({"id": [ids[0], ids[0]], "new_label": ["burr", "target"]}), "more than once"),
        "columns": (pd.DataFrame({"cell": ids[:1], "label": ["burr"]}), "id and new_label"),
    }
    for corr, msg in bad.values():
        with pytest.raises(ProbeError, match=msg):
            relabel(store, corr)
    with pytest.raises(ProbeError, match="not found"):
        relabel(store, tmp_path / "missing.csv")
    assert len(embedcache.open_store(store).dataset().label_history()) == 4
    assert relabel(store, pd.DataFrame({"id": ids[:1], "new_label": ["brand-new"]}), allow_new_labels=True) == 1
    # a later audit reads the new labels, and its cached models are refitted for them
    calls: list = []
    res = audit(
        store,
        RESNET,
        pool="mean",
        probes="knn",
        seeds=1,
        folds=3,
        out=tmp_path / "a",
        quiet=True,
        threads=1,
        make_probe=counting_probe(calls),
        joint=True,  # counted below
    )
    given = res.table.set_index("id")["given_label"]
    assert given[ids[0]] == "brand-new" and given[ids[1]] == new[1]
    n_fits = len(calls)
    relabel(store, pd.DataFrame({"id": ids[:1], "new_label": [old[0]]}))
    res2 = audit(
        store,
        RESNET,
        pool="mean",
        probes="knn",
        seeds=1,
        folds=3,
        out=tmp_path / "b",
        quiet=True,
        threads=1,
        make_probe=counting_probe(calls),
        joint=True,
    )
    assert res2.computed == 2 and len(calls) == 2 * n_fits  # knn and the joint member refitted
    assert res2.table.set_index("id")["given_label"][ids[0]] == old[0]


# -- outputs ------------------------------------------------------------------------------------
def test_outputs_csv_png_and_self_contained_html(store, tmp_path):
    res = audit(
        store,
        f"{RESNET}",
        pool="mean",
        probes="knn",
        seeds=1,
        folds=3,
        k=8,
        top=12,
        out=tmp_path / "o",
        quiet=True,
        threads=1,
    )
    out = tmp_path / "o"
    csv = pd.read_csv(out / "suspects.csv", keep_default_na=False)
    assert list(csv.columns[: len(EVIDENCE_COLUMNS)]) == EVIDENCE_COLUMNS and len(csv) == N_CELLS
    assert csv["rank"].tolist() == list(range(1, N_CELLS + 1))
    assert (np.diff(csv["score"].to_numpy()) <= 1e-12).all()  # ranked by score
    assert csv["path"].str.endswith(".jpg").all() and (csv["given_label"] != csv["proposed_label"]).all()
    for col in ("consensus", "self_confidence", "neighbor_disagreement", "proposed_votes", "score"):
        assert csv[col].between(0, 1).all(), col
    tmpl = pd.read_csv(out / "corrections-template.csv", keep_default_na=False)
    assert list(tmpl.columns) == ["id", "new_label", "note"] and len(tmpl) == 12
    with Image.open(out / "suspects.png") as im:
        im.load()
        assert im.format == "PNG" and im.width >= 9 * 90 and im.height >= 12 * 90
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.lower().startswith("<!doctype html>") and html.count("<tr>") >= 12
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    assert refs and all(r.startswith("data:") for r in refs), [r[:40] for r in refs if not r.startswith("data:")]
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html
    for cell in csv["id"].head(12):
        assert cell in html
    assert res.params["formula"] in html.replace("&#x27;", "'")
    meta = pd.read_json(out / "audit.json", typ="series")
    assert meta["n_cells"] == N_CELLS and meta["scheme"] == "group"


def test_several_backbones_give_per_backbone_evidence(store, tmp_path):
    res = audit(
        store,
        f"{RESNET},{VIT}",
        pool="mean",
        probes="knn",
        seeds=2,
        folds=3,
        k=5,
        top=6,
        out=tmp_path / "two",
        quiet=True,
        threads=1,
        joint=True,  # its models are listed below
    )
    assert res.params["n_runs"] == 6 and set(res.neighbors) == {RESNET, VIT}
    # one count of models everywhere: the header's and each cell's why count backbone x probe (3 here)
    counted = res.table["why"].str.extractall(r"\d+/(\d+) models predict")[0]
    assert res.params["n_models"] == 3 and len(counted) > 0 and set(counted) == {"3"}
    page = (tmp_path / "two" / "report.html").read_text()
    assert "3 (backbone × probe, as each cell&#x27;s why counts them) × 2 seeds = 6 out-of-fold runs" in page or (
        "3 (backbone × probe, as each cell's why counts them) × 2 seeds = 6 out-of-fold runs" in page
    )
    # knn per backbone and seed; the joint member (a logistic on both side by side) per seed
    assert [(o.key["backbone"], o.key["probe"]) for o in res.oofs] == [(RESNET, "knn")] * 2 + [(VIT, "knn")] * 2 + [
        (f"{RESNET}+{VIT}", JOINT_PROBE)
    ] * 2
    cols = [f"neighbor_disagreement:{RESNET}", f"neighbor_disagreement:{VIT}"]
    np.testing.assert_allclose(res.table["neighbor_disagreement"], res.table[cols].mean(axis=1))
    # each backbone's disagreement is the fraction of its own 5 nearest cells with another label
    idx, _ = res.neighbors[VIT]
    labels = res.obs["label"].to_numpy()
    own = (labels[idx] != labels[:, None]).mean(1)
    np.testing.assert_allclose(res.table.sort_index()[cols[1]], own)
    csv = pd.read_csv(tmp_path / "two" / "suspects.csv")
    assert set(cols) <= set(csv.columns)
    page = (tmp_path / "two" / "report.html").read_text(encoding="utf-8")
    assert "<small class=nb title='timm:test_vit'>timm:test_vit " in page  # each backbone's share, under the mean


def test_joint_member_is_a_plain_logistic_on_the_backbones_side_by_side(store, tmp_path):
    from probes.engine.threads import limit_threads
    from probes.features.chunked import SideBySide, side_by_side
    from probes.features.policy import memory_policy
    from probes.heads.logistic import LogisticProbe

    cells = open_cells(store, f"{RESNET},{VIT}", pool="mean")
    pos = np.arange(len(cells.obs))
    feats = {b: cells.features(b, pos) for b in (RESNET, VIT)}
    kw = dict(
        ids=cells.obs["id"], groups=cells.obs["group"], probes="knn", seeds=[7], folds=3, k=5, threads=1, joint=True
    )
    res = audit_arrays(feats, cells.labels, **kw)
    (joint,) = [o for o in res.oofs if o.key["probe"] == JOINT_PROBE]
    assert joint.key["backbone"] == f"{RESNET}+{VIT}" and res.params["joint"].startswith(f"{RESNET}+{VIT}")
    # its probabilities: out of fold (the audit's folds), logistic at C=1 without a sweep, on both side by side
    side = np.concatenate([feats[RESNET], feats[VIT]], axis=1)
    with limit_threads(1):  # as the audit fits (threads=1): the same reductions
        expected = oof_proba(
            side, cells.labels, joint.fold, res.classes, lambda: LogisticProbe(Cs=(1.0,), seed=7), "logistic"
        )
    np.testing.assert_array_equal(joint.proba, expected)
    # the why column names it beside the backbones' own models
    assert res.table["models_disagreeing"].str.contains(f"test_resnet+test_vit/{JOINT_PROBE}", regex=False).any()
    # joined in memory only when the parts and their copy fit the budget
    with memory_policy("auto", max_memory=int(1.5 * side.nbytes)):
        assert isinstance(side_by_side(list(feats.values())), SideBySide)
    with memory_policy("auto", max_memory=3 * side.nbytes):
        np.testing.assert_array_equal(side_by_side(list(feats.values())), side)
    # out of core: the side-by-side matrix is read block by block, to the same probabilities bit for bit
    with memory_policy("always"):
        streamed = side_by_side(list(feats.values()))
        assert isinstance(streamed, SideBySide) and streamed.shape == side.shape
        np.testing.assert_array_equal(streamed.read(np.array([5, 0, 9])), side[[5, 0, 9]])
        np.testing.assert_array_equal(np.concatenate([x for _, x in streamed.blocks(7)]), side)
        ooc = audit_arrays(feats, cells.labels, **kw)
    np.testing.assert_array_equal([o for o in ooc.oofs if o.key["probe"] == JOINT_PROBE][0].proba, joint.proba)
    pd.testing.assert_frame_equal(ooc.table, res.table)
    # from the store with both backbones read out of core: parts of the side-by-side matrix are ChunkedRows
    kw_store = dict(
        pool="mean", probes="knn", seeds=[7], folds=3, k=5, threads=1, quiet=True, html=False, cache=False, joint=True
    )
    a = audit(store, f"{RESNET},{VIT}", out=tmp_path / "mem", **kw_store)
    b = audit(store, f"{RESNET},{VIT}", out=tmp_path / "ooc", out_of_core="always", **kw_store)
    pd.testing.assert_frame_equal(a.table, b.table)
    # without it: only the backbones' own models
    plain = audit_arrays(feats, cells.labels, **{**kw, "joint": False})
    assert [o.key["probe"] for o in plain.oofs] == ["knn", "knn"] and plain.params["joint"] is None
    # --probes none: the joint member alone (one of the label-noise benchmark's cost options); without it, nothing
    alone = audit_arrays(feats, cells.labels, **{**kw, "probes": "none"})
    assert [o.key["probe"] for o in alone.oofs] == [JOINT_PROBE] and alone.params["probes"] == []
    np.testing.assert_array_equal(alone.oofs[0].proba, joint.proba)
    with pytest.raises(ProbeError, match="needs the joint member"):
        audit_arrays(feats, cells.labels, **{**kw, "probes": "none", "joint": False})


# -- the CLI -------------------------------------------------------------------------------------
def one_line_error(result) -> str:
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    assert result.exit_code == 1, result.output
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in text, text
    return text


def test_cli_audit_neighbors_relabel(store, tmp_path):
    from embedcache_cli.probes_app import app

    runner = CliRunner()
    out = tmp_path / "cli-audit"
    r = runner.invoke(
        app,
        [
            "audit",
            "--store",
            str(store),
            "--model",
            RESNET,
            "--pool",
            "mean",
            "--probes",
            "knn",
            "--seeds",
            "1",
            "--folds",
            "3",
            "--top",
            "5",
            "--threads",
            "1",
            "--ranking",
            "cal|flag|n0.2|c0",
            "--no-joint",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "label audit" in r.output and (out / "suspects.csv").is_file() and (out / "report.html").is_file()
    meta = pd.read_json(out / "audit.json", typ="series")
    assert meta["ranking"] == "cal|flag|n0.2|c0" and meta["joint"] is None
    assert meta["n_models"] == 1 and meta["n_runs"] == 1
    first = pd.read_csv(out / "suspects.csv", keep_default_na=False)["id"].iat[0]

    r = runner.invoke(
        app,
        [
            "neighbors",
            "--store",
            str(store),
            "--model",
            RESNET,
            "--pool",
            "mean",
            "--id",
            first,
            "-k",
            "4",
            "--out",
            str(tmp_path / "nb"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "nearest cells" in r.output and (tmp_path / "nb" / "neighbors.png").is_file()
    image = embedcache.open_store(store).dataset().obs["path"].iat[0]
    r = runner.invoke(
        app, ["neighbors", "--store", str(store), "--model", VIT, "--image", image, "-k", "3", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output

    pd.DataFrame({"id": [first], "new_label": ["burr"]}).to_csv(tmp_path / "fix.csv", index=False)
    r = runner.invoke(app, ["relabel", "--store", str(store), "--corrections", str(tmp_path / "fix.csv")])
    assert r.exit_code == 0 and "changed" in r.output, r.output
    assert embedcache.open_store(store).dataset().obs.set_index("id")["label"][first] == "burr"

    # bad inputs: one clear line, exit code 1
    assert "no-such-model" in one_line_error(
        runner.invoke(app, ["audit", "--store", str(store), "--model", "no-such-model", "--out", str(tmp_path / "x")])
    )
    assert "probe" in one_line_error(
        runner.invoke(
            app,
            [
                "audit",
                "--store",
                str(store),
                "--model",
                RESNET,
                "--pool",
                "mean",
                "--probes",
                "knn,magic",
                "--out",
                str(tmp_path / "y"),
            ],
        )
    )
    assert "unknown cell id" in one_line_error(
        runner.invoke(app, ["neighbors", "--store", str(store), "--model", RESNET, "--pool", "mean", "--id", "nope"])
    )
    assert "image not found" in one_line_error(
        runner.invoke(app, ["neighbors", "--store", str(store), "--model", VIT, "--image", str(tmp_path / "nope.png")])
    )
    assert "not found" in one_line_error(
        runner.invoke(app, ["relabel", "--store", str(store), "--corrections", str(tmp_path / "nope.csv")])
    )
    assert "cal|flag" in one_line_error(
        runner.invoke(
            app, ["audit", "--store", str(store), "--model", RESNET, "--pool", "mean", "--ranking", "cleanlab"]
        )
    )
    assert "store" in one_line_error(
        runner.invoke(app, ["neighbors", "--store", str(tmp_path / "none.zarr"), "--model", VIT, "--id", first])
    )


def test_a_failed_audit_leaves_no_empty_output_folder(built, tmp_path, monkeypatch):
    """The default output folder (audit-<models>-<date>, in the working folder) is made before any fit;
    an audit that then fails removes it again rather than leaving an empty folder per failed try."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError, match="too few"):
        audit(built, RESNET, pool="mean", probes="knn", folds=N_CELLS + 1, quiet=True, cache=False)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    (kept / "note.txt").parent.mkdir()
    (kept / "note.txt").write_text("mine")
    with pytest.raises(ProbeError, match="too few"):
        audit(built, RESNET, pool="mean", probes="knn", folds=N_CELLS + 1, quiet=True, cache=False, out=kept)
    assert (kept / "note.txt").read_text() == "mine"


def test_a_python_audit_writes_its_report_only_where_asked(store, tmp_path, monkeypatch, capsys):
    here = tmp_path / "notebook"
    here.mkdir()
    monkeypatch.chdir(here)
    res = counted_audit(store, [], probes="knn", seeds=1, folds=3, issues="label,outlier")
    assert list(here.iterdir()) == [] and res.out is None and capsys.readouterr().out == ""
    files = res.save(here / "report")
    assert {"suspects.csv", "issues.csv", "report.html", "audit.json"} <= set(files)
    assert pd.read_csv(files["suspects.csv"])["id"].tolist() == res.table["id"].tolist()
