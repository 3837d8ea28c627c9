"""benchmarks/paper_findings.py in --quick mode (a tiny random-init ViT, a few real cells per class): every
finding runs through the studies and lands in the JSON and the docs table with finite figures."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks import load_benchmark
from tests.conftest import shared


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in finite_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_every_finding_runs_and_is_reported(tmp_path):
    shared("chula_rbc12"), shared("bccd_wbc"), shared("tecom_wbc")  # skip (or fail under CI) without the data
    bench = load_benchmark("paper_findings")
    out, doc = tmp_path / "pf.json", tmp_path / "pf.md"
    result = bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--doc", str(doc)])
    saved = json.loads(out.read_text())
    assert saved["findings"] == json.loads(json.dumps(result["findings"], default=float))
    assert saved["cpu"] and saved["quick"] is True
    papers = {f["paper"] for f in saved["findings"]}
    assert papers == {"small-patch", "white-cell ensemble", "bone-marrow", "mitotic"}
    assert len(saved["findings"]) == 11
    for f in saved["findings"]:
        assert isinstance(f["holds"], bool) and f["ours"] and f["paper_figure"]
        numbers = finite_numbers(f["figures"])
        assert numbers, f["claim"]
        assert not any(math.isnan(x) for x in numbers), f["claim"]  # an odds ratio may be inf (no flip elsewhere)
    table = [line for line in doc.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 11  # header + one row per finding
    # the planted flips are all in the enrichment table: flipped cells counted once
    enrich = next(f for f in saved["findings"] if "enriched" in f["claim"])
    (a, b), (c, d) = enrich["figures"]["table"]
    assert a + c == round(0.05 * saved["wbc_cells"]) and a + b + c + d == saved["wbc_cells"]
