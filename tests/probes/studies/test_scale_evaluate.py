"""Probe studies end to end on real Chula RBC-12 cells, extracted once with a tiny random-init ViT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr

import embedcache
from embedcache.store.checksums import crc_values
from probes import evaluate, scale
from probes.engine.split_fits import RESULT_COLUMNS
from probes.errors import ProbeError
from probes.features.cells import open_cells
from probes.sampling import Sampler
from tests.conftest import REPO

MODEL = "timm:test_vit"
N_CELLS = 3000
REQUIRED = [
    "study",
    "dataset",
    "backbone",
    "feature_key",
    "pool",
    "probe",
    "limit",
    "seed",
    "split",
    "n_train",
    "n_test",
    "n_classes",
    "metric",
    "value",
    "seconds",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_manifest):
    """3,000 random Chula cells (many smears), group = smear, split column by smear; two feature sets."""
    root = tmp_path_factory.mktemp("probes")
    df = chula_manifest.sample(N_CELLS, random_state=0).copy()
    df["group"] = df["smear"]
    smear = df["smear"].astype(int)
    df["split"] = np.where(smear % 5 == 0, "test", np.where(smear % 5 == 1, "val", "train"))
    df["domain"] = np.array(["siteA", "siteB", "siteC"])[smear % 3]  # three "sites", whole smears each
    manifest = root / "chula.csv"
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    kw = dict(weights="random", progress=False, num_workers=2, chunk_size=512, batch_size=128)
    embedcache.extract(MODEL, manifest, out, input_size=64, **kw)  # small input: fast on 2 CPU cores
    embedcache.extract(MODEL, manifest, out, input_size=32, **kw)  # a second "backbone" for comparisons
    return out


@pytest.fixture(scope="module")
def keys(store):
    return embedcache.open_store(store).dataset().feature_keys()


@pytest.fixture(scope="module")
def study(store, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "scale-test"
    return scale(store, keys[1], limits="16..64", probes="logistic,knn", seeds=2, out=out, quiet=True)


def test_fits_table_records_each_fit_and_what_it_chose(study):
    """fits.csv: one row per fit with the logistic sweep's chosen C (one of its scores' best) and
    solver facts; kNN rows carry their search precision and no C."""
    fits = pd.read_csv(study.out / "fits.csv", keep_default_na=False)
    assert len(fits) == len(study.fits) == 2 * 3 * 2  # probes x limits x seeds
    assert not fits.duplicated(["probe", "limit", "seed"]).any()
    lr = fits[fits["probe"] == "logistic"]
    from probes.heads import make_probe

    max_iter = make_probe("logistic").max_iter
    for _, row in lr.iterrows():
        scores = {float(c): f for c, f in json.loads(row["val_f1"]).items()}
        assert float(row["C"]) in scores and scores[float(row["C"])] == max(scores.values())
        assert str(row["converged"]) in ("True", "False") and 0 <= int(row["n_iter"]) <= max_iter
    assert (lr["n_iter"].astype(int) > 0).any()  # the solver's real iteration count, not a placeholder
    # the note is there exactly when some fit stopped short, and counts them
    stopped = lr[lr["converged"].astype(str) == "False"]
    notes = [n for n in study.notes if "fits stopped at their iteration limit" in n]
    assert [n.split(" fits stopped")[0] for n in notes] == ([f"{len(stopped)} of {len(fits)}"] if len(stopped) else [])
    knn = fits[fits["probe"] == "knn"]
    assert (knn["C"] == "").all() and set(knn["precision"]) <= {"float32", "bfloat16"}
    # n_train matches the results table for the same fit
    res = study.results.drop_duplicates(["probe", "limit", "seed"]).set_index(["probe", "limit", "seed"])["n_train"]
    for _, row in fits.iterrows():
        assert res[(row["probe"], int(row["limit"]), int(row["seed"]))] == row["n_train"]


def test_fits_that_hit_their_iteration_limit_are_reported(store, keys, tmp_path, monkeypatch):
    from probes.heads import logistic

    init = logistic.LogisticProbe.__init__
    monkeypatch.setattr(logistic.LogisticProbe, "__init__", lambda self, **kw: init(self, **{**kw, "max_iter": 2}))
    r = scale(store, keys[1], limits="32", probes="logistic", seeds=1, out=tmp_path / "s", quiet=True)
    assert (r.fits["converged"] == False).all() and (r.fits["n_iter"] == 2).all()  # noqa: E712
    assert any("1 of 1 fits stopped at their iteration limit" in n for n in r.notes), r.notes
    assert any("fits stopped" in n for n in json.loads((tmp_path / "s" / "study.json").read_text())["notes"])


def test_outputs_are_well_formed(study, keys):
    out = study.out
    for name in (
        "results.csv",
        "results.parquet",
        "summary.csv",
        "curves.csv",
        "exclusions.csv",
        "confusion.csv",
        "confusion.json",
        "study.json",
        "scaling.png",
        "fits.csv",
    ):
        assert (out / name).is_file(), name
    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    pq = pd.read_parquet(out / "results.parquet")
    assert set(REQUIRED) <= set(csv.columns) and list(pq.columns) == RESULT_COLUMNS
    assert len(csv) == len(pq) == len(study.results)
    np.testing.assert_allclose(pq["value"].to_numpy(), csv["value"].to_numpy(dtype=float))
    # one row per backbone x probe x limit x seed x metric (+ per-class F1 rows)
    assert sorted(pq["limit"].unique()) == [16, 32, 64] and sorted(pq["seed"].unique()) == [42, 43]
    agg = pq[pq["class"] == ""]
    assert len(agg) == 2 * 3 * 2 * 8 and not agg.duplicated(["probe", "limit", "seed", "metric"]).any()
    assert {"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_precision"} <= set(agg["metric"])
    assert agg["value"].between(0, 1).all() and (pq["seconds"] > 0).all()
    assert (pq["feature_key"] == keys[1]).all() and (pq["split"] == "stratified").all()
    per_class = pq[pq["metric"] == "class_f1"]
    assert (per_class.groupby(["probe", "limit", "seed"]).size() == 13).all()
    # summary: the smallest limit reaching 95% of each curve's best mean macro-F1
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 and {"limit_reaching", "best_mean", "best_limit"} <= set(summary.columns)
    for r in summary.itertuples():
        curve = study.curves[(study.curves.probe == r.probe) & (study.curves.metric == "macro_f1")]
        ok = curve[curve["mean"] >= 0.95 * curve["mean"].max()]
        assert r.limit_reaching == ok["limit"].min()
    # confusion matrices per fit: counts add up to the test cells
    conf = json.loads((out / "confusion.json").read_text())
    assert len(conf) == 2 * 3 * 2
    n_test = agg.groupby(["probe", "limit", "seed"])["n_test"].first()
    for m in conf:
        assert np.sum(m["matrix"]) == n_test[(m["probe"], m["limit"], m["seed"])]
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_same_seed_same_numbers_other_seed_other_split(study, store, keys, tmp_path):
    again = scale(store, keys[1], limits="16..64", probes="logistic,knn", seeds=2, out=tmp_path / "a", quiet=True)
    cols = ["probe", "limit", "seed", "metric", "class", "n_train", "n_test", "value"]
    pd.testing.assert_frame_equal(study.results[cols], again.results[cols])
    cells = open_cells(store, keys[1])
    s = Sampler(cells.labels)
    assert not np.array_equal(s.split(32, 42).test, s.split(32, 43).test)
    other = scale(store, keys[1], limits="32", probes="knn", seeds=[7], out=tmp_path / "b", quiet=True)
    mine = study.results.query("probe == 'knn' and limit == 32 and seed == 42 and metric == 'macro_f1'")
    assert other.results.query("metric == 'macro_f1'")["value"].iat[0] != mine["value"].iat[0]


def test_two_backbones_share_splits_column_split_fixed_test(store, keys, tmp_path):
    r = scale(store, ",".join(keys), limits="16,64", probes="knn", seeds=1, split="column", out=tmp_path, quiet=True)
    agg = r.results[r.results["metric"] == "macro_f1"]
    assert sorted(agg["feature_key"].unique()) == sorted(keys) and len(agg) == 2 * 2
    # every backbone and every limit is scored on the same test cells: the split column's test cells
    obs = embedcache.open_store(store).dataset().obs
    assert agg["n_test"].nunique() == 1 and agg["n_test"].iat[0] == int((obs["split"] == "test").sum())
    assert agg.groupby("limit")["n_train"].nunique().eq(1).all()
    assert {"summary.csv", "scaling.png"} <= set(r.files)


def test_group_split_study_has_no_leak(store, keys, tmp_path):
    cells = open_cells(store, keys[0])
    groups = cells.obs["group"].to_numpy()
    sp = Sampler(cells.labels, "group", groups=groups).split(64, 42)
    assert not set(groups[sp.train]) & set(groups[sp.test])
    r = scale(store, keys[0], limits="64", probes="knn", seeds=1, split="group", out=tmp_path, quiet=True)
    row = r.results.query("metric == 'macro_f1'").iloc[0]
    assert (row["n_train"], row["n_test"]) == (len(sp.train), len(sp.test))


def test_evaluate_logistic_matches_sklearn(store, keys, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    r = evaluate(store, keys[0], probes="logistic", out=tmp_path, quiet=True)
    ours = r.results.query("metric == 'macro_f1'")["value"].iat[0]
    assert r.results["limit"].isna().all()
    pngs = [f for name, f in r.files.items() if name.startswith("confusion-") and name.endswith(".png")]
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0
    cells = open_cells(store, keys[0])
    sp = Sampler(cells.labels).split(None, 42)  # the same split evaluate used
    x_tr, x_te = cells.features(keys[0], sp.train), cells.features(keys[0], sp.test)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x_tr, cells.labels[sp.train])
    theirs = f1_score(cells.labels[sp.test], ref.predict(x_te), average="macro", labels=sp.classes, zero_division=0)
    assert abs(ours - theirs) < 0.02, (ours, theirs)
    assert 0.2 < ours < 1  # the random-init ViT still separates some classes


@pytest.fixture(scope="module")
def broken(store, tmp_path_factory):
    """A copy of the store with NaN features in one cell, 10 unreadable and 5 unlabelled cells."""
    path = tmp_path_factory.mktemp("broken") / "cache.zarr"
    shutil.copytree(store, path)
    ds = embedcache.open_store(path, mode="a").dataset()
    fs = ds.feature_set(ds.feature_keys()[0])
    rows = fs.chunk_rows(0)  # rewrite chunk 0 as an extraction that could not read its first 10 images would
    ok = fs.ok()[rows]
    ok[:10] = False
    error = np.where(ok, "", "unreadable image (test)")
    fs.write_chunk(0, {p: fs.group[p][rows] for p in fs.pools}, ok, error)
    group = zarr.open_group(str(path), mode="a")[ds.name]
    g = group["obs"]["label"]
    labels = np.asarray(g[:], dtype=object).astype(str)
    labels[10:15] = ""
    g[:] = labels
    # the cell table is checksummed: record the new labels' CRC as a writer of unlabelled cells would have
    group.update_attributes({"obs_crc": {**group.attrs["obs_crc"], "label": crc_values(labels)}})
    return path, fs


def test_exclusions_are_counted(broken, tmp_path):
    path, fs = broken
    cells = open_cells(path, fs.key)
    assert cells.excluded == {f"not_ok:{fs.key}": 10, "no_label": 5}
    assert len(cells.obs) == N_CELLS - 15 and cells.obs["row"].min() == 15
    r = scale(path, fs.key, limits="16", probes="knn", seeds=1, out=tmp_path, quiet=True)
    assert any("10 of 3000 cells excluded" in n for n in r.notes)
    ex = pd.read_csv(tmp_path / "exclusions.csv")
    assert set(ex["cells"]) >= {10, 5}


def test_nan_features_are_a_clear_error(broken, tmp_path):
    path, fs = broken
    cells = open_cells(path, fs.key)
    top = cells.obs["label"].value_counts().index[0]
    row = int(cells.obs.loc[cells.obs["label"] == top, "row"].iat[0])  # a cell every split reads
    c = row // fs.chunk_size  # rewrite its chunk with NaN features marked ok (checksummed: not damage)
    rows = fs.chunk_rows(c)
    values = {p: fs.group[p][rows] for p in fs.pools}
    values["cls"][row - rows.start] = np.nan
    fs.write_chunk(c, values, fs.ok()[rows], fs.errors().to_numpy()[rows])
    with pytest.raises(ProbeError, match="NaN or inf"):
        scale(path, fs.key, limits="4096", probes="knn", seeds=1, out=tmp_path, quiet=True)


def test_bad_input_is_a_probe_error(store, keys, tmp_path):
    cases = [
        (dict(model="uni"), "no features for 'uni'"),
        (dict(model=keys[0], probes="forest"), "unknown probe"),
        (dict(model=keys[0], pool="mean"), "no 'mean' features"),
        (dict(model=keys[0], limits="65536"), "no class qualifies"),
        (dict(model=keys[0], split="group", dataset="nope"), "no dataset 'nope'"),
        (dict(model=keys[0], seeds=0), "at least 1"),
    ]
    for kw, msg in cases:
        with pytest.raises(ProbeError, match=msg):
            scale(store, out=tmp_path, quiet=True, **{"limits": "16", "probes": "knn", **kw})
    with pytest.raises(ProbeError, match="no embedcache store"):
        scale(tmp_path / "missing.zarr", MODEL, out=tmp_path, quiet=True)


@pytest.mark.slow
def test_cli_end_to_end(store, keys, tmp_path):
    out = tmp_path / "cli-study"
    cmd = [
        sys.executable,
        "-m",
        "cli.probes_app",
        "scale",
        "--store",
        str(store),
        "--model",
        keys[0],
        "--limits",
        "16..32",
        "--probes",
        "knn",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "macro-F1" in p.stdout and "95% at" in p.stdout and "wrote" in p.stdout
    assert len(pd.read_parquet(out / "results.parquet")) > 0 and (out / "scaling.png").stat().st_size > 0
    p = subprocess.run([*cmd[:6], "--model", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no features for 'nope'" in lines[0]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.probes_app",
            "eval",
            "--store",
            str(store),
            "--model",
            keys[1],
            "--probe",
            "knn",
            "--out",
            str(tmp_path / "ev"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "per-class F1" in p.stdout and (tmp_path / "ev" / "results.csv").is_file()


def test_domain_study_never_mixes_domains(store, keys, tmp_path):
    res = scale(
        store,
        keys[0],
        limits="32,64",
        probes="logistic",
        seeds=2,
        train_domain="siteA",
        test_domain="siteB,siteC",
        out=tmp_path / "dom",
        quiet=True,
    )
    domain = res_domain = open_cells(store, keys[0]).obs["domain"].to_numpy()
    for key, sp in res.splits.items():
        assert set(domain[sp.train]) == {"siteA"}  # training cells only from the training domain
        evals = {d: (ind, pos, classes) for d, ind, pos, classes in res.evaluations[key]}
        assert set(evals) == {"siteA", "siteB", "siteC"}
        assert evals["siteA"][0] and set(domain[evals["siteA"][1]]) == {"siteA"}
        assert not set(evals["siteA"][1]) & set(sp.train)  # in-domain test cells are held out
        for d in ("siteB", "siteC"):
            ind, pos, classes = evals[d]
            assert not ind and set(res_domain[pos]) == {d}
            # every cell of the unseen domain whose class was trained on is scored
            labels = open_cells(store, keys[0]).labels
            assert len(pos) == int(((domain == d) & np.isin(labels, sp.classes)).sum())
    r = res.results
    assert set(r["test_domain"]) == {"siteA", "siteB", "siteC"} and (r["train_domain"] == "siteA").all()
    assert (
        (r.loc[r["test_domain"] == "siteA", "in_domain"]).all()
        and not r.loc[r["test_domain"] != "siteA", "in_domain"].any()
    )
    gaps = pd.read_csv(res.out / "domains.csv")
    assert len(gaps) == 2 * 2  # 2 limits x 2 unseen domains
    main = res.curves[(res.curves.metric == "macro_f1") & (res.curves["class"] == "")]
    for g in gaps.itertuples():
        ind = main[(main.limit == g.limit) & main.in_domain]["mean"].iat[0]
        ood = main[(main.limit == g.limit) & (main.test_domain == g.test_domain)]["mean"].iat[0]
        assert g.in_domain_mean == pytest.approx(ind) and g.gap == pytest.approx(ind - ood)


def test_domain_defaults_and_errors(store, keys, tmp_path):
    res = evaluate(store, keys[0], probes="knn", train_domain="siteB,siteC", out=tmp_path / "d2", quiet=True)
    assert set(res.results["test_domain"]) == {"siteB+siteC", "siteA"}  # default test domains: all others
    with pytest.raises(ProbeError, match="unknown domain.*siteZ.*siteA, siteB, siteC"):
        scale(store, keys[0], limits="32", train_domain="siteZ", out=tmp_path / "e1", quiet=True)
    with pytest.raises(ProbeError, match="both training and test"):
        scale(store, keys[0], limits="32", train_domain="siteA", test_domain="siteA", out=tmp_path / "e2", quiet=True)
    with pytest.raises(ProbeError, match="needs --train-domain"):
        scale(store, keys[0], limits="32", test_domain="siteB", out=tmp_path / "e3", quiet=True)


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_sklearns(seed):
    """score() computes every metric from one confusion matrix; it must equal scikit-learn's
    functions, including predictions outside the split's classes and classes never predicted."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    from probes.metrics import score

    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(6)]
    y_true = rng.choice(classes[:5] if seed % 2 else classes, 300)  # seed 1, 3: c5 has no test cell
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice(classes[1:] + ["other", "zz"], 300))
    s = score(y_true, y_pred, classes)
    assert s.values["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        ref_bal = balanced_accuracy_score(y_true, y_pred)
    assert s.values["balanced_accuracy"] == pytest.approx(ref_bal, abs=1e-12)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, average=avg, zero_division=0)
        assert [s.values[f"{avg}_{m}"] for m in ("precision", "recall", "f1")] == pytest.approx([p, r, f], abs=1e-12)
    _, _, f_each, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, average=None, zero_division=0)
    assert list(s.class_f1.values()) == pytest.approx(list(f_each), abs=1e-12)
    assert np.array_equal(s.confusion, confusion_matrix(y_true, y_pred, labels=classes))


# -- 95% intervals over test cells and paired comparisons -------------------------------------------------
class CentroidProbe:
    """A deterministic probe (nearest class mean) whose predictions a test can recompute exactly."""

    def __init__(self, **_):
        pass

    def fit(self, x, y):
        self.classes_ = np.unique(y)
        self.means_ = np.stack([x[y == c].mean(axis=0) for c in self.classes_])
        return self

    def predict(self, x):
        return self.classes_[((x[:, None, :] - self.means_[None]) ** 2).sum(-1).argmin(1)]


def test_intervals_and_comparisons_are_the_bootstrap_of_the_fits_predictions(store, keys):
    """results' low / high are bootstrap_ci of each fit's own test predictions (seeded by the split's seed);
    compare.csv is compare_all of the fits on the same test cells; curves' interval is that of the seed mean."""
    from probes.engine.split_fits import fit_splits, over_seeds
    from probes.stats import bootstrap_ci, compare_all

    cells = open_cells(store, keys)
    fits = fit_splits(
        "t", cells, [None], [42, 43], ["logistic"], split="stratified", val="train", test_size=0.25,
        device="cpu", quiet=True, make_probe=lambda name, **kw: CentroidProbe(),
    )  # fmt: skip
    for seed in (42, 43):
        sp = fits.splits[(None, seed)]
        truth = cells.labels[sp.test]
        preds = {}
        for key in keys:
            pred = (
                CentroidProbe()
                .fit(cells.features(key, sp.train), cells.labels[sp.train])
                .predict(cells.features(key, sp.test))
            )
            preds[f"{key} · logistic"] = pred
            expected = bootstrap_ci(truth, pred, sp.classes, seed=seed)
            rows = fits.results.query("backbone == @key and seed == @seed and `class` == ''").set_index("metric")
            for metric, interval in expected.items():
                assert rows.at[metric, "value"] == pytest.approx(interval.estimate, abs=1e-12)
                assert (rows.at[metric, "low"], rows.at[metric, "high"]) == (interval.low, interval.high)
            assert rows.loc[["macro_precision", "balanced_accuracy"], "low"].isna().all()  # no interval asked
        row = fits.compare.query("seed == @seed").iloc[0]
        theirs = compare_all(truth, preds, sp.classes, seed=seed).iloc[0]
        assert (row["backbone_a"], row["backbone_b"]) == tuple(keys)
        for col in ("diff", "diff_low", "diff_high", "p_bootstrap", "mcnemar_b", "mcnemar_c", "p_mcnemar"):
            assert row[col] == theirs[col], col
        # McNemar's discordant cells are the accuracy difference in cells
        assert row["mcnemar_b"] - row["mcnemar_c"] == round((row["accuracy_a"] - row["accuracy_b"]) * len(truth))
    curves = over_seeds(fits.results, fits.replicates).query("metric == 'macro_f1'")
    per_seed = fits.results.query("metric == 'macro_f1'")
    for key in keys:
        c = curves[curves["backbone"] == key].iloc[0]
        p = per_seed[per_seed["backbone"] == key]
        assert c["low"] < c["mean"] < c["high"]
        # the mean of two independently resampled test sets is tighter than either seed's own interval
        assert c["high"] - c["low"] < (p["high"] - p["low"]).min()


def test_study_tables_carry_intervals_and_compare_csv(study):
    """scale: every aggregate score has its interval, summary.csv the best limit's, compare.csv every pair."""
    res = pd.read_csv(study.out / "results.csv", keep_default_na=False, na_values=[""])
    agg = res[res["metric"].isin(["macro_f1", "accuracy", "weighted_f1"]) & res["class"].isna()]
    assert len(agg) and (agg["low"] <= agg["value"]).all() and (agg["value"] <= agg["high"]).all()
    assert (agg["low"] < agg["high"]).all()
    summary = pd.read_csv(study.out / "summary.csv")
    assert ((summary["best_low"] <= summary["best_mean"]) & (summary["best_mean"] <= summary["best_high"])).all()
    compare = pd.read_csv(study.out / "compare.csv")
    # two probes on one backbone: one pair per limit x seed, Holm over a family of one changes nothing
    assert len(compare) == 3 * 2 and set(compare["probe_a"]) == {"logistic"} and set(compare["probe_b"]) == {"knn"}
    assert (compare["p_bootstrap_holm"] == compare["p_bootstrap"]).all()
    assert compare[["p_bootstrap", "p_mcnemar"]].stack().between(0, 1).all()


def test_python_writes_and_prints_only_when_asked_the_cli_always(store, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = scale(store, keys[0], limits="16", probes="knn", seeds=1)
    assert list(tmp_path.iterdir()) == [] and res.out is None and res.files == {}
    assert capsys.readouterr().out == ""  # a notebook call stays silent
    files = res.save(tmp_path / "later")
    assert res.out == tmp_path / "later" and {"results.csv", "scaling.png", "study.json"} <= set(files)
    assert pd.read_csv(files["results.csv"])["value"].notna().all()
    ev = evaluate(store, keys[0], probes="knn", show=True)
    assert "per-class F1" in capsys.readouterr().out and ev.out is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later"]
    cmd = [sys.executable, "-m", "embedcache_cli.probes_app", "scale", "--store", str(store), "--model", keys[0]]
    p = subprocess.run([*cmd, "--limits", "16", "--probes", "knn", "--seeds", "1", "-q"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    written = [d for d in tmp_path.iterdir() if d.name.startswith("scale-")]
    assert len(written) == 1 and (written[0] / "results.csv").is_file() and "macro-F1" in p.stdout
