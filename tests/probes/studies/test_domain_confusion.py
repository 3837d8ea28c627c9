"""Out-of-domain confusion tables keep every class the probes were trained on (issue 28)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import embedcache
from probes import evaluate

MODEL = "timm:test_vit"


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """The 832 bundled Chula cells; siteB holds only the last 8 of the 13 classes, siteA every class."""
    root = tmp_path_factory.mktemp("domconf")
    df = chula_cells.copy()
    df["group"] = df["smear"]
    classes = sorted(df["label"].unique(), key=int)
    odd = df["smear"].astype(int) % 2 == 1
    df["domain"] = np.where(odd & df["label"].isin(classes[5:]), "siteB", "siteA")
    manifest = root / "cells.csv"
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(MODEL, manifest, out, weights="random", input_size=32, progress=False, num_workers=0)
    return out


def test_out_of_domain_confusion_keeps_predictions_into_classes_the_test_domain_lacks(store, tmp_path):
    res = evaluate(
        store, MODEL, probes="knn", train_domain="siteA", test_domain="siteB", out=tmp_path / "e", quiet=True
    )
    obs = embedcache.open_store(store).dataset().obs
    site_b = obs[obs["domain"] == "siteB"]
    trained = sorted(obs.loc[obs["domain"] == "siteA", "label"].unique())
    absent = sorted(set(trained) - set(site_b["label"]))
    assert len(absent) == 5
    conf = pd.read_csv(tmp_path / "e" / "confusion.csv", dtype={"true": str, "pred": str})
    ood = conf[conf["test_domain"] == "siteB"]
    assert len(ood) and set(ood["pred"]) == set(trained)  # a column for every training class
    assert set(ood["true"]) == set(site_b["label"])  # rows: the test domain's classes
    # each true class's row sums to its test cells: nothing predicted into an absent class is dropped
    sums = ood.groupby("true")["count"].sum()
    assert sums.to_dict() == site_b["label"].value_counts().to_dict()
    assert ood[ood["pred"].isin(absent)]["count"].sum() > 0  # the random-init model does predict them
    # the accuracy agrees with the table
    acc = res.results[(res.results.test_domain == "siteB") & (res.results.metric == "accuracy")]["value"].iat[0]
    hits = ood[ood["true"] == ood["pred"]]["count"].sum()
    assert acc == pytest.approx(hits / len(site_b))
    # confusion.json: one non-square matrix per fit, rows and columns named
    m = next(m for m in json.loads((tmp_path / "e" / "confusion.json").read_text()) if m["test_domain"] == "siteB")
    assert set(m["predicted"]) == set(trained) and set(m["labels"]) == set(site_b["label"])
    assert np.asarray(m["matrix"]).sum() == len(site_b)
    note = next(n for n in res.notes if "siteB" in n and "absent" in n)
    assert all(c in note for c in absent)
