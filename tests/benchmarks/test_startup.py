"""benchmarks/startup.py on a small store: every small command runs as a fresh process and is timed."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_benchmark


@pytest.mark.slow
def test_startup_times_every_small_command(tmp_path):
    bench = load_benchmark("startup")
    result = bench.main(["--cells", "300", "--repeats", "1", "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert set(saved["commands"]) == set(result["commands"]) and len(saved["commands"]) == 6
    for row in saved["commands"].values():
        assert row["median_s"] > 0 and row["heaviest_imports"], row
    # no small command imports torch: the start-up goal depends on it
    assert not any(m == "torch" for r in saved["commands"].values() for m, _ in r["heaviest_imports"])
