"""benchmarks/gpu_suite.sh --dry-run: every GPU measurement's step runs on the CPU at tiny sizes and leaves its
JSON, so that the script runs unchanged on the first machine with a GPU."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.paths import REPO


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert steps == dict.fromkeys(["extract-float32", "extract-bfloat16", "probes", "study", "finetune"], 0)
    expected = {f"extract_throughput-{d}.json" for d in ("float32", "bfloat16")}
    expected |= {"probe_speed.json", "study_speed.json", "finetune_speed.json"}
    assert set(summary["results"]) == expected
    extract = json.loads((out / "extract_throughput-bfloat16.json").read_text())
    assert extract["device"] and extract["compute_dtype"] == "bfloat16" and extract["cells_per_s"]["pipeline"] > 0


def test_gpu_suite_refuses_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
