"""Smoke test of benchmarks/data_issues.py: --quick on 200 real Chula cells with planted copies and BCCD outliers."""

from __future__ import annotations

import json

from tests.benchmarks import load_benchmark
from tests.conftest import shared


def test_wilson_interval_brackets_the_proportion():
    bench = load_benchmark("data_issues")
    lo, hi = bench.wilson(8, 10)
    assert 0.44 < lo < 0.8 < hi < 0.98  # 0.490, 0.943 by the formula
    assert bench.wilson(0, 10)[0] == 0.0 and bench.wilson(10, 10)[1] == 1.0


def test_shift_fills_the_edge_by_reflection():
    import numpy as np

    bench = load_benchmark("data_issues")
    img = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)
    moved = bench._shift(img, 0, 2)
    assert moved.shape == img.shape
    assert (moved[:, 2:] == img[:, :3]).all()  # content moved right by 2
    assert (moved[:, 0] == img[:, 2]).all() and (moved[:, 1] == img[:, 1]).all()  # reflected edge


def test_quick_run_finds_the_planted_copies(tmp_path):
    shared("chula_rbc12")
    shared("bccd_cells")
    bench = load_benchmark("data_issues")
    out = tmp_path / "data_issues.json"
    doc = bench.main(["--quick", "--cells", "200", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert out.exists()
    saved = json.loads(out.read_text())
    assert saved["planted"] == {"exact": 2, "jpeg": 2, "flip": 2, "shift": 2, "outlier": 6}
    assert saved["exact_copies_with_equal_digest"] == 2  # PNG re-saves decode to the same pixels
    ours = doc["methods"]["ours"]
    dup = ours["duplicates"]
    # pixel-identical copies are found by their digests, whatever the features
    assert dup["flagged"]["recall_by_kind"]["exact"]["value"] == 1.0
    # most planted (copy, original) pairs are ranked among the top m pairs, and flagged ones are mostly planted
    assert dup["at_m"]["recall"]["value"] >= 0.6  # 6 of 8 when written (the q75-90 JPEG copies are the hard ones)
    assert dup["flagged"]["recall"]["value"] >= 0.5
    assert dup["flagged"]["precision_verified"]["value"] >= 0.5
    # every planted copy sits across the split from its original: the flagged pairs are leaks
    assert ours["leaks"]["recall"]["value"] >= 0.5
    # foreign cells rank high among 214 cells (0.94 when written; 0.5 is chance)
    assert ours["outliers"]["auroc"] >= 0.85
    assert "| duplicates |" in saved["table"] and saved["cpu"]
