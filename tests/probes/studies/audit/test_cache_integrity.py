"""The audit's out-of-fold cache is checked before it is reused (issue 26, case 6), and a cache that cannot be
written never throws away a finished audit."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import probes
from probes.errors import ProbeError
from probes.studies.audit import cache as cache_module
from probes.studies.audit import default_cache

KW = dict(probes="knn", seeds=1, folds=3, quiet=True, threads=1, joint=False)


@pytest.fixture
def store(real_store, tmp_path):
    dst = tmp_path / "cache.zarr"
    shutil.copytree(real_store, dst)
    return dst


def test_an_edited_cache_entry_is_refitted_not_reused(store, tmp_path):
    first = probes.audit(store, "efficientnet-lite0", out=tmp_path / "one", **KW)
    assert first.computed == 1
    path = default_cache(str(store), first.params["dataset"])
    table = pq.read_table(path)
    proba = table.column("proba").combine_chunks()
    values = proba.flatten().to_numpy().copy()
    values[:50] = values[::-1][:50]  # probabilities edited by hand: the ranking would move
    edited = pa.ListArray.from_arrays(proba.offsets, pa.array(values.astype(np.float32)))
    pq.write_table(table.set_column(table.column_names.index("proba"), "proba", edited), path)
    with pytest.warns(RuntimeWarning, match="fails its checksum: it is refitted"):
        second = probes.audit(store, "efficientnet-lite0", out=tmp_path / "two", **KW)
    assert second.reused == 0 and second.computed == 1  # the old code: "1 reused, 0 fitted"
    np.testing.assert_array_equal(first.table["score"].to_numpy(), second.table["score"].to_numpy())


def test_a_cache_that_cannot_be_written_still_gives_the_audit(store, tmp_path, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_oof_cache", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        res = probes.audit(store, "efficientnet-lite0", out=tmp_path / "a", **KW)
    assert (tmp_path / "a" / "suspects.csv").is_file() and res.notes  # the old code: no outputs at all
    assert "oof" not in res.files


def test_an_audit_of_all_unique_labels_says_what_is_wrong(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    labels = [f"cell{i}" for i in range(30)]  # the old code failed inside scikit-learn's fold splitter
    with pytest.raises(ProbeError, match="every class has fewer cells than --folds 3"):
        probes.audit_arrays({"x": x}, labels, probes="knn", folds=3, seeds=1, folds_by="stratified", joint=False)


def test_an_audit_checks_k_and_its_memory_before_any_fit():
    from probes.features.policy import memory_policy

    x = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
    labels = [f"c{i % 4}" for i in range(120)]
    with pytest.raises(ProbeError, match="-k 5000 neighbours per cell needs more than 5000 cells; the audit has 120"):
        probes.audit_arrays({"x": x}, labels, probes="knn", k=5000, seeds=1, joint=False)
    many = [f"class{i}" for i in range(60)] * 2  # 60 classes x 120 cells: the probabilities of every model
    with memory_policy("auto", "100KB"):
        with pytest.raises(ProbeError, match=r"about 0\.0 GiB of probabilities \(120 cells x 60 classes x 3 models"):
            probes.audit_arrays({"x": x}, many, probes="knn,logistic", seeds=1, joint=True, folds=2)
