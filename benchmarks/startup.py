"""How long the small commands take to answer: commands that fit nothing should answer in ≤ 2 s.

Each command runs as a fresh process (what a user types), ``--repeats`` times, median wall time reported,
beside the floor of any Python command here: ``python -c pass``. A store of ``--cells`` cells is made
first with ``embedcache.import_features`` (random features: no model, no torch). For each command the
heaviest modules it imported (``python -X importtime``, cumulative) are listed, so a regression names its
cause. Commands:

* ``embedcache --help``, ``probes --help`` — the CLI skins;
* ``embedcache info STORE`` — read the store's description;
* ``probes relabel`` — apply 3 label corrections;
* ``probes neighbors --id`` — exact nearest cells of one stored cell (FAISS).

    python benchmarks/startup.py                  # writes benchmarks/results/startup-<cpu kind>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedcache.backbones.devices import cpu_model  # noqa: E402

GOAL_S = 2.0


def make_store(folder: Path, n: int) -> tuple[Path, Path]:
    """A store of ``n`` cells with random 256-wide features, and a 3-row corrections file."""
    import embedcache

    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"id": [f"c{i}" for i in range(n)], "label": rng.choice(["a", "b", "c"], size=n)})
    store = folder / "store.zarr"
    x = rng.normal(size=(n, 256)).astype(np.float32)
    embedcache.import_features(store, x, cells, backbone="demo")
    corrections = folder / "corrections.csv"
    pd.DataFrame({"id": ["c0", "c1", "c2"], "new_label": ["b", "c", "a"]}).to_csv(corrections, index=False)
    return store, corrections


def timed(cmd: list[str], repeats: int) -> dict:
    """Median wall seconds of ``cmd`` and the modules that cost most to import in its first run."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    heavy = importtime(cmd)
    return {
        "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
        "median_s": statistics.median(times),
        "runs_s": times,
        "heaviest_imports": heavy,
    }


def importtime(cmd: list[str], top: int = 6) -> list[tuple[str, float]]:
    """The top-level modules with the largest cumulative import time (s) in one run of ``cmd``."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    cumulative: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not name.startswith(" ") and "." not in name.strip():
            cumulative[name.strip()] = cumulative.get(name.strip(), 0.0) + int(cum) / 1e6
    return sorted(cumulative.items(), key=lambda kv: -kv[1])[:top]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bin_dir = Path(sys.executable).parent
    embedcache_cli, probes_cli = str(bin_dir / "embedcache"), str(bin_dir / "probes")
    with tempfile.TemporaryDirectory() as tmp:
        store, corrections = make_store(Path(tmp), args.cells)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "embedcache --help": [embedcache_cli, "--help"],
            "probes --help": [probes_cli, "--help"],
            "embedcache info": [embedcache_cli, "info", str(store)],
            "probes relabel": [probes_cli, "relabel", "--store", str(store), "--corrections", str(corrections)],
            "probes neighbors --id": [
                probes_cli,
                "neighbors",
                "--store",
                str(store),
                "--model",
                "demo",
                "--id",
                "c5",
                "--out",
                str(Path(tmp) / "nbrs"),
            ],
        }
        rows = {name: timed(cmd, args.repeats) for name, cmd in commands.items()}
    floor = rows["python -c pass"]["median_s"]
    print(f"{'command':<24} {'median s':>9} {'goal':>6}  heaviest imports (cumulative s)")
    for name, r in rows.items():
        ok = "" if name == "python -c pass" else ("ok" if r["median_s"] <= GOAL_S else "MISS")
        heavy = ", ".join(f"{m} {s:.2f}" for m, s in r["heaviest_imports"][:4])
        print(f"{name:<24} {r['median_s']:9.2f} {ok:>6}  {heavy}")
    from embedcache.backbones.devices import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    kind = f"cpu{os.cpu_count()}-{'bf16' if native_bf16 else 'fp32'}"  # as probe_speed names its files
    result = {
        "benchmark": "startup",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_native_bf16": native_bf16,
        "load": [round(v, 2) for v in os.getloadavg()],
        "cells": args.cells,
        "repeats": args.repeats,
        "goal_s": GOAL_S,
        "python_floor_s": floor,
        "commands": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"startup-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
