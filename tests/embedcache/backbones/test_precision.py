"""Precision policy (measured checks steer --dtype auto), resume across machines, and the cost table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import embedcache
from embedcache.backbones import devices, precision
from embedcache.extraction.plan import ExtractionError


@pytest.fixture(autouse=True)
def own_record(tmp_path, monkeypatch):
    """Every test records precision checks in its own folder, never in the user's cache."""
    monkeypatch.setenv("EMBEDCACHE_CACHE_DIR", str(tmp_path / "cache"))


def native_bf16(monkeypatch, value: bool) -> None:
    """Simulate a CPU with (or without) native bf16 instructions."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: value)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)


def test_check_precision_on_real_cells_is_recorded(chula_subset, tiny_vit):
    table = precision.check_precision("timm:test_vit", chula_subset(40), backbone=tiny_vit, device="cpu", n_cells=24)
    rows = table.set_index("dtype")
    assert list(table.columns) == list(precision.COLUMNS)
    assert rows.loc["float32", "min_cosine"] == 1.0 and rows.loc["float32", "passed"]
    assert rows.loc["float16", "passed"] is None and "not run" in rows.loc["float16", "note"]  # a reported skip
    bf = rows.loc["bfloat16"]
    assert 0.99 < bf["min_cosine"] < 1.0 and bf["median_cosine"] >= bf["min_cosine"] and bf["max_rel_error"] > 0
    assert bf["non_finite_cells"] == 0 and bf["n_cells"] == 24
    rec = precision.recorded_check("timm:test_vit", tiny_vit.weights["sha256"], "cpu")
    assert rec is not None and {r["dtype"] for r in rec["rows"]} == {"float16", "bfloat16", "float32"}


def test_auto_never_picks_a_dtype_that_failed_its_check(chula_subset, tiny_vit, monkeypatch):
    native_bf16(monkeypatch, True)
    cpu = torch.device("cpu")
    assert precision.choose_dtype("auto", cpu, tiny_vit).name == "bfloat16"  # no check yet: the CPU's fastest
    table = precision.check_precision(
        "timm:test_vit", chula_subset(40), backbone=tiny_vit, device="cpu", n_cells=16, threshold=1.0
    )
    assert not table.set_index("dtype").loc["bfloat16", "passed"]  # bf16 is not bitwise fp32
    choice = precision.choose_dtype("auto", cpu, tiny_vit)
    assert choice.name == "float32" and "bfloat16 (failed the recorded check" in choice.reason
    # and extract under auto computes in float32, saying why in the provenance
    out = chula_subset(40)
    r = embedcache.extract(
        "timm:test_vit",
        out,
        out.parent / "c.zarr",
        backbone=tiny_vit,
        input_size=64,
        device="cpu",
        progress=False,
        num_workers=0,
    )
    compute = embedcache.open_store(r.store).dataset().feature_set(r.key).attrs["provenance"]["compute"]
    assert compute["dtype"] == "float32" and compute["dtype_requested"] == "auto"
    assert compute["precision_check"]["threshold"] == 1.0


def test_a_forbidden_dtype_is_refused_with_its_reason_and_skipped_by_auto(tiny_vit, monkeypatch):
    spec = dataclasses.replace(tiny_vit.spec, forbid_dtypes={"float16": "NaN under fp16 (mahmoodlab/UNI issue 18)"})
    bb = dataclasses.replace(tiny_vit, spec=spec)
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"forbids --dtype float16: NaN under fp16 \(mahmoodlab/UNI issue 18\)"):
        precision.choose_dtype("float16", cuda, bb)
    choice = precision.choose_dtype("auto", cuda, bb)
    assert choice.name == "bfloat16" and "float16 (forbidden" in choice.reason
    assert "float16" in embedcache.get_spec("uni").forbid_dtypes
    with pytest.raises(ValueError, match="forbid_dtypes"):
        dataclasses.replace(spec, forbid_dtypes={"float32": "the reference"})


def test_resume_on_a_machine_whose_auto_differs_keeps_the_sets_dtype(chula_subset, tiny_vit, monkeypatch):
    data = chula_subset(48)
    out = data.parent / "resume.zarr"
    kw = dict(backbone=tiny_vit, input_size=64, device="cpu", progress=False, num_workers=0, chunk_size=16)
    native_bf16(monkeypatch, True)  # machine A: native bf16, auto = bf16
    first = embedcache.extract("timm:test_vit", data, out, **kw)
    fs = embedcache.open_store(out, mode="a").dataset().feature_set(first.key)
    assert fs.attrs["fingerprint_fields"]["compute_dtype"] == "bfloat16"
    fs.clear_done([1, 2])  # as if machine A stopped after the first chunk
    native_bf16(monkeypatch, False)  # machine B: no native bf16, auto = fp32
    again = embedcache.extract("timm:test_vit", data, out, **kw)
    assert again.chunks_written == 2 and any("continuing in bfloat16" in n for n in again.notes)
    with pytest.raises(ExtractionError, match="computed in bfloat16; --dtype float32 would mix dtypes"):
        embedcache.extract("timm:test_vit", data, out, dtype="float32", **kw)
    # the resumed chunks equal a bf16 run from scratch: one dtype in the whole set
    fresh = embedcache.extract("timm:test_vit", data, data.parent / "fresh.zarr", dtype="bfloat16", **kw)
    a = embedcache.open_store(out).dataset().feature_set(again.key).to_numpy("cls")
    b = embedcache.open_store(fresh.store).dataset().feature_set(fresh.key).to_numpy("cls")
    np.testing.assert_array_equal(a, b)


def test_cost_table_columns_and_units(tmp_path):
    csv = tmp_path / "costs.csv"
    table = embedcache.models(
        cost=True, model="timm:test_vit", device="cpu", batch_sizes=(1, 4), min_time=0.05, out=csv
    )
    from embedcache.backbones.costs import COST_COLUMNS

    assert list(table.columns) == list(COST_COLUMNS) and csv.exists()
    r = table.iloc[0]
    params = sum(p.numel() for p in embedcache.load_backbone("timm:test_vit", weights="random").model.parameters())
    assert r["params"] == params and r["weights"] == "random-init"
    assert r["dtype"] == devices.default_dtype(torch.device("cpu"))  # auto: bf16 on native-bf16 CPUs, else fp32
    assert r["weight_mb"] == pytest.approx(params * 4 / 2**20, rel=0.05)  # float32 parameters (+ few buffers)
    assert 0.01 < r["gflops_per_cell"] < 1.0  # test_vit at 160 px: ~0.06 GFLOPs
    assert r["ms_per_cell_batch1"] > 0 and r["best_batch"] in (1, 4) and r["cells_per_s_best"] > 0
    assert r["peak_mem_mb"] >= r["weight_mb"]
    assert list(embedcache.models().columns)[:2] == ["name", "arch"]
