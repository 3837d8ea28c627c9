"""A backbone name resolves to the one clean feature set holding what the study needs (issue 28)."""

from __future__ import annotations

import numpy as np
import pytest

import embedcache
from probes import evaluate, robustness
from probes.errors import ProbeError
from probes.features.cells import open_cells

MODEL = "timm:test_vit"
KW = dict(weights="random", input_size=32, progress=False, num_workers=0, chunk_size=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """README's order: a plain extraction, then one at working size 40 with blur-post sets; and a third
    clean set at 48 px with mean pooling only."""
    root = tmp_path_factory.mktemp("names")
    df = chula_cells.iloc[:208].copy()  # 16 of each class... of the first classes, in path order
    df["split"] = np.where(df["smear"].astype(int) % 4 == 0, "test", "train")
    manifest = root / "cells.csv"
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(MODEL, manifest, out, **KW)
    embedcache.extract(MODEL, manifest, out, working_size=40, perturb=["blur-post:0.8,1.6"], **KW)
    embedcache.extract(MODEL, manifest, out, pool="mean", **{**KW, "input_size": 48})
    return out


def test_robustness_name_resolves_to_the_set_with_the_perturbation(store, tmp_path):
    res = robustness(store, MODEL, perturb="blur-post", probes="knn", out=tmp_path / "r", quiet=True)
    keys = set(res.results["feature_key"])
    assert keys >= {"timm-test_vit@random/32-bicubic-ws40/clean", "timm-test_vit@random/32-bicubic-ws40/blur-post-0.8"}
    assert not any(k.startswith("timm-test_vit@random/32-bicubic/") for k in keys)


def test_no_set_holding_the_perturbation_says_what_each_lacks(store, tmp_path):
    with pytest.raises(ProbeError, match=r"none holds what the study needs.*32-bicubic: no blur-pre feature sets"):
        robustness(store, MODEL, perturb="blur-pre", probes="knn", out=tmp_path / "r", quiet=True)


def test_pool_picks_the_set_that_has_it(store):
    cells = open_cells(store, MODEL, pool="mean")
    assert cells.feature_sets[MODEL].key == "timm-test_vit@random/48-bicubic/clean"


def test_still_ambiguous_when_several_sets_hold_what_is_needed(store, tmp_path):
    with pytest.raises(ProbeError, match=r"3 clean feature sets") as e:
        evaluate(store, MODEL, probes="knn", out=tmp_path / "e", quiet=True)
    for k in ("32-bicubic,", "32-bicubic-ws40", "48-bicubic"):
        assert k in str(e.value)
    with pytest.raises(ProbeError, match=r"2 clean feature sets.*each with what the study needs") as e:
        open_cells(store, MODEL, pool="cls")
    assert "48-bicubic" not in str(e.value)


def test_tail_token_probes_need_cached_tokens(store):
    from probes.tuning.options import TuneOptions, token_need

    fs = embedcache.open_store(store).dataset().feature_set("timm-test_vit@random/32-bicubic/clean")
    assert token_need("knn,logistic", None) is None  # nothing read from tokens: no need
    assert token_need("lp", TuneOptions(head="linear")) is None  # lp on pooled features
    assert token_need("ft-last", None)(fs) == "no cached tail tokens (extract --tail-blocks K)"
    assert token_need("lora", TuneOptions(tail_blocks=1))(fs) == "no tail tokens for 1 block(s)"
    with pytest.raises(ProbeError, match=r"none holds what the study needs.*no cached tail tokens"):
        open_cells(store, MODEL, needs=token_need("ft-last", None))
