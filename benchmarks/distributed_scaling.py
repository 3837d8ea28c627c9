"""Distributed extraction: the same job with 1, 2 and 4 local Dask workers, and into S3 vs local disk.

A tiny backbone (``timm:test_vit`` at 64 px by default, CPU) makes decoding and storage dominate, as they do
for a lab's 10^7 cells on GPUs. For each worker count a LocalCluster of that many processes (one thread each)
is started and warmed first (each worker loads the backbone once); then the timed extraction runs on it
(``extract(..., scheduler=...)``) into a fresh store on local disk. Efficiency per worker is
``rate(k) / (k * rate(1))``; counts beyond the machine's cores are marked (they share cores). Then the same
extraction with the largest count that fits the cores goes into a loopback S3 server (moto's server mode, a
separate process on 127.0.0.1) instead of local disk. A single process without Dask is measured too, with
torch's default threads (what ``extract`` does without ``--cluster``) and with one (what each worker runs).

Real cells: the first ``--n`` Chula RBC-12 cells of ../shared/data (64×64 JPEG), else the bundled 832
repeated under distinct ids. Prints a table and writes JSON (CPU named) to benchmarks/results/.

    python benchmarks/distributed_scaling.py                      # ~3 min on 2 cores
    python benchmarks/distributed_scaling.py --n 256 --workers 1,2 --no-s3   # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedcache
from embedcache.backbones.devices import cpu_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))


def manifest(n: int, workdir: Path) -> tuple[Path, str]:
    """``n`` real cells: the shared Chula set when present, else the bundled subset repeated (distinct ids)."""
    shared = SHARED / "chula_rbc12"
    root = shared if (shared / "manifest.csv").exists() else REPO / "tests" / "data" / "chula_rbc12"
    df = pd.read_csv(root / "manifest.csv")
    reps = -(-n // len(df))
    df = pd.concat([df] * reps, ignore_index=True).iloc[:n]
    df["id"] = [f"{i:08d}" for i in range(len(df))]
    df["path"] = [str(root / p) for p in df["path"]]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cells.csv"
    df[["id", "path", "label"]].to_csv(path, index=False)
    kind = "shared" if root == shared else "bundled"
    return path, f"{kind} {root.name}: {n} real cells" + (f" ({reps} passes over the set)" if reps > 1 else "")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timed(data: Path, out: str, args, **kw) -> dict:
    """One extraction; its wall time and cells/s (the store is fresh, so every chunk is computed)."""
    t0 = time.perf_counter()
    r = embedcache.extract(
        args.model,
        data,
        out,
        weights="random",
        input_size=args.input_size,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        progress=False,
        **kw,
    )
    s = time.perf_counter() - t0
    assert r.cells_computed == args.n and not r.cache_hit, r
    return {"seconds": round(s, 3), "cells_per_s": round(args.n / s, 1), "chunks": r.chunks_written}


def on_cluster(k: int, data: Path, warm: tuple[Path, argparse.Namespace], out_of, args) -> dict:
    """Start a LocalCluster of ``k`` processes, warm it (backbone loaded on each worker), time one extraction."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(
        n_workers=k, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as lc:
        with Client(lc):
            # warm-up: a small job whose chunks land on every worker (each loads the backbone once)
            timed(warm[0], out_of("warm"), warm[1], scheduler=lc.scheduler_address)
            start_s = time.perf_counter() - t0
            row = timed(data, out_of("run"), args, scheduler=lc.scheduler_address)
    row["cluster_start_and_warmup_s"] = round(start_s, 1)
    return row


class MotoServer:
    """moto's S3 server in its own process on a free loopback port (so that it does not share our GIL)."""

    def __enter__(self) -> MotoServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}",
        )
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        deadline = time.monotonic() + 30
        while True:
            try:
                s3fs.S3FileSystem().mkdir("bench")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:test_vit")
    ap.add_argument("--n", type=int, default=8192, help="cells per extraction")
    ap.add_argument("--workers", default="1,2,4", help="Dask worker counts, comma separated")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=256, help="cells per row-chunk = per Dask task")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True, help="also S3 vs local disk")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/distributed_scaling-cpuN.json)")
    args = ap.parse_args()
    counts = [int(k) for k in args.workers.split(",") if k.strip()]
    ncores = cores()
    work = Path(tempfile.mkdtemp(prefix="embedcache-dist-"))
    try:
        data, origin = manifest(args.n, work)
        runs = iter(range(10**6))

        def out_of(tag: str) -> str:
            return str(work / f"{tag}-{next(runs)}.zarr")

        warm, _ = manifest(args.chunk_size * 2 * max(counts), work / "warm")
        print(f"{origin}; {args.model} @ {args.input_size} px, {args.dtype}, CPU: {cpu_model()}, {ncores} cores")
        warm_args = argparse.Namespace(**dict(args.__dict__, n=args.chunk_size * 2 * max(counts)))
        timed(warm, out_of("warm"), warm_args)  # imports, the backbone, the page cache
        single = []
        threads = torch.get_num_threads()
        for t in sorted({threads, 1}, reverse=True):  # as extract runs without --cluster, then as one worker does
            torch.set_num_threads(t)
            single.append({"torch_threads": t, **timed(data, out_of("single"), args, num_workers=0)})
            print(f"one process, no Dask, {t} torch thread(s): {single[-1]['cells_per_s']:,.0f} cells/s")
        torch.set_num_threads(threads)
        scaling = []
        for k in counts:
            row = {"workers": k, "oversubscribed": k > ncores, **on_cluster(k, data, (warm, warm_args), out_of, args)}
            scaling.append(row)
        base = scaling[0]["cells_per_s"] / scaling[0]["workers"]
        print(f"{'workers':>8} {'cells/s':>9} {'efficiency/worker':>18} {'start+warm s':>13}")
        for row in scaling:
            row["efficiency_per_worker"] = round(row["cells_per_s"] / (row["workers"] * base), 3)
            note = "  (more workers than cores)" if row["oversubscribed"] else ""
            print(
                f"{row['workers']:>8} {row['cells_per_s']:>9,.0f} {row['efficiency_per_worker']:>18.2f} "
                f"{row['cluster_start_and_warmup_s']:>13.1f}{note}"
            )
        storage = None
        if args.s3:
            k = max([c for c in counts if c <= ncores] or [counts[0]])
            with MotoServer():
                s3 = on_cluster(k, data, (warm, warm_args), lambda tag: f"s3://bench/{tag}-{next(runs)}.zarr", args)
            disk = next(r for r in scaling if r["workers"] == k)
            storage = {"workers": k, "local_disk": disk, "s3_loopback": s3}
            storage["s3_over_disk"] = round(s3["cells_per_s"] / disk["cells_per_s"], 3)
            print(
                f"{k} workers into loopback S3 (moto): {s3['cells_per_s']:,.0f} cells/s, local disk "
                f"{disk['cells_per_s']:,.0f} cells/s (S3/disk {storage['s3_over_disk']:.2f})"
            )
        result = {
            "benchmark": "distributed_scaling",
            "data": origin,
            "model": args.model,
            "input_size": args.input_size,
            "dtype": args.dtype,
            "n_cells": args.n,
            "chunk_size": args.chunk_size,
            "batch_size": args.batch_size,
            "cpu": cpu_model(),
            "cores": ncores,
            "single_process": single,
            "dask_local": scaling,
            "storage": storage,
            "versions": {"embedcache": embedcache.__version__, "python": platform.python_version()},
        }
        path = (
            Path(args.json)
            if args.json
            else Path(__file__).parent / "results" / f"distributed_scaling-cpu{ncores}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
