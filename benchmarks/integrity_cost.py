"""What the integrity checks cost: opening and reading a 185,000-cell store, and an extraction, against the code
before the checks (a git worktree of ``--baseline`` run on the same data, alternately, in the same run).

    python benchmarks/integrity_cost.py --baseline 46e6de4 --cells 185000 --repeats 5

Reading: ``open_store`` + the cell table (``obs``, checked against its CRCs and digest) + ``ok()`` + one feature
set's features as float32 (every chunk against its CRC, the array against its metadata record). Extraction:
``timm:test_vit`` (random init, 64 px) on real Chula cells, files to a verified store (per-cell input
fingerprints, metadata records). Prints seconds and the ratio checked / baseline; writes JSON to
``benchmarks/results/integrity_cost-<cpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedcache.backbones.devices import cpu_has_native_bf16, cpu_model  # noqa: E402

SHARED = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))

READ = """
import sys, time, embedcache
t = time.perf_counter()
st = embedcache.open_store(sys.argv[1])
ds = st.dataset()
obs = ds.obs
fs = ds.feature_set(ds.feature_keys()[0])
ok = fs.ok()
x = fs.to_numpy("cls")
print(time.perf_counter() - t)
"""

EXTRACT = """
import sys, time, embedcache
t = time.perf_counter()
embedcache.extract("timm:test_vit", sys.argv[1], sys.argv[2], weights="random", input_size=64, progress=False,
                   num_workers=1, batch_size=128, chunk_size=1024, dtype="float32")
print(time.perf_counter() - t)
"""


def _time(code: str, args: list[str], pythonpath: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git commit of the code before the checks")
    ap.add_argument("--cells", type=int, default=185_000, help="cells of the store that is read")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--extract-cells", type=int, default=2048, help="real Chula cells extracted")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()

    import numpy as np
    import pandas as pd

    import embedcache

    work = Path(tempfile.mkdtemp(prefix="integrity-cost-"))
    base = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), a.baseline], check=True)
    try:
        # the store to read: written once, by the baseline code, so both read the same bytes (the checked code
        # adds its records when it writes; a baseline-written store has none, so the checked read is the same
        # work plus the cell-table CRCs it can check). A second copy written by this code has the records.
        rng = np.random.default_rng(0)
        x = rng.normal(size=(a.cells, a.width)).astype(np.float16)
        labels = rng.integers(0, 20, a.cells).astype(str)
        np.save(work / "x.npy", x)
        pd.DataFrame({"label": labels}).to_csv(work / "labels.csv", index=False)
        imp = (
            "import sys, numpy as np, pandas as pd, embedcache; "
            "embedcache.import_features(sys.argv[1], np.load(sys.argv[2]), "
            "labels=pd.read_csv(sys.argv[3])['label'].astype(str).tolist(), backbone='synthetic', chunk_size=1024)"
        )
        for name, path in (("checked", REPO), ("baseline", base)):
            env = dict(os.environ, PYTHONPATH=str(path))
            subprocess.run(
                [sys.executable, "-c", imp, str(work / f"{name}.zarr"), str(work / "x.npy"), str(work / "labels.csv")],
                env=env,
                check=True,
            )
        reads: dict[str, list[float]] = {"checked": [], "baseline": []}
        for _ in range(a.repeats):  # alternately: the machine's drift hits both
            reads["checked"].append(_time(READ, [str(work / "checked.zarr")], REPO))
            reads["baseline"].append(_time(READ, [str(work / "baseline.zarr")], base))
        manifest = pd.read_csv(SHARED / "chula_rbc12" / "manifest.csv").iloc[: a.extract_cells]
        manifest["path"] = [str(SHARED / "chula_rbc12" / p) for p in manifest["path"]]
        manifest.to_csv(work / "m.csv", index=False)
        extracts: dict[str, list[float]] = {"checked": [], "baseline": []}
        for i in range(a.repeats):
            extracts["checked"].append(_time(EXTRACT, [str(work / "m.csv"), str(work / f"e-new-{i}.zarr")], REPO))
            extracts["baseline"].append(_time(EXTRACT, [str(work / "m.csv"), str(work / f"e-old-{i}.zarr")], base))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)

    def summary(d: dict[str, list[float]]) -> dict[str, float]:
        c, b = statistics.median(d["checked"]), statistics.median(d["baseline"])
        return {"checked_s": c, "baseline_s": b, "ratio": c / b}

    result = {
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "baseline_commit": a.baseline,
        "embedcache": embedcache.__version__,
        "read": {"cells": a.cells, "width": a.width, **summary(reads), "runs": reads},
        "extract": {"cells": a.extract_cells, **summary(extracts), "runs": extracts},
        "repeats": a.repeats,
    }
    for what in ("read", "extract"):
        r = result[what]
        print(f"{what}: checked {r['checked_s']:.2f} s, baseline {r['baseline_s']:.2f} s, ratio {r['ratio']:.3f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "bf16" if cpu_has_native_bf16() else "fp32"
    (out / f"integrity_cost-cpu2-{tag}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
