"""Extraction throughput, three ways on the same images in one run.

(a) ceiling: the backbone's forward pass alone, same dtype and batch, on real cells preprocessed once
    (ready tensors on the device: decoding, resizing and storing cost nothing);
(b) embedcache: ``extract`` from image files to a finished, verified Zarr store;
(c) naive: the loop people write by hand — PIL per image + torchvision transforms,
    default DataLoader, fp32, ``np.save`` per batch.

Prints cells/s and the ratios b/a and b/c, and writes JSON (CPU named, native bf16 or not) to
benchmarks/results/. ``--dtype auto`` resolves as ``extract`` does
(:func:`embedcache.backbones.precision.choose_dtype`).

    python benchmarks/extract_throughput.py --model timm:vit_small_patch16_224 --n 1024
    python benchmarks/extract_throughput.py --model timm:vit_large_patch16_224 --n 20000 --batch-size 256   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedcache
from embedcache.backbones.devices import (
    cpu_has_native_bf16,
    cpu_model,
    resolve_device,
)
from embedcache.backbones.forward import is_cnn
from embedcache.backbones.loading import load_backbone
from embedcache.backbones.pooling import embed
from embedcache.backbones.precision import choose_dtype
from embedcache.backbones.preprocess import Preprocessing, to_model_input

SHARED = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def image_manifest(n: int, workdir: Path) -> tuple[Path, str]:
    """The first ``n`` real Chula cells (64×64 JPEG) when present, else synthetic demo cells."""
    chula = SHARED / "chula_rbc12"
    if (chula / "manifest.csv").exists():
        df = pd.read_csv(chula / "manifest.csv").iloc[:n]
        df["path"] = [str(chula / p) for p in df["path"]]
        origin = f"chula_rbc12 (first {len(df)} real cells, 64x64 JPEG)"
    else:
        from embedcache_cli.demo import DEMO_CLASSES, make_synthetic_cells

        root = make_synthetic_cells(workdir / "cells", n_per_class=-(-n // len(DEMO_CLASSES)))
        src = embedcache.open_source(root)
        df = src.table.iloc[:n][["path", "label"]]
        origin = f"synthetic demo cells ({len(df)})"
    path = workdir / "bench.csv"
    df[["path", "label"]].to_csv(path, index=False)
    return path, origin


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ceiling(bb, manifest: Path, n: int, batch: int, dev: torch.device, dtype: torch.dtype, pools) -> float:
    """cells/s of the forward pass alone on one batch of real cells, preprocessed once, already on the device."""
    from embedcache.inputs.images import read_image

    spec = bb.spec
    prep = Preprocessing(size=spec.input_size, interpolation=spec.interpolation, mean=spec.mean, std=spec.std)
    paths = pd.read_csv(manifest)["path"].tolist()[:batch]
    imgs = [torch.from_numpy(read_image(p)) for p in paths]
    x = to_model_input([torch.stack(imgs)], prep, dev)  # the bench cells share one size (64x64)
    if len(paths) < batch:
        x = x.repeat(-(-batch // len(paths)), 1, 1, 1)[:batch]
    model = bb.model.to(dev).eval()
    if is_cnn(model):  # as the pipeline runs it
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(1, n // batch)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        embed(model, x, pools, bb.num_prefix_tokens)  # warm-up
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            out = embed(model, x, pools, bb.num_prefix_tokens)
            for v in out.values():
                v.float().cpu()
        sync(dev)
    return steps * batch / (time.perf_counter() - t)


def pipeline(
    bb, manifest: Path, workdir: Path, batch: int, device: str, dtype: str, workers: int | None, pools
) -> float:
    out = workdir / "bench.zarr"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = embedcache.extract(
        bb.spec.name,
        manifest,
        out,
        backbone=bb,
        batch_size=batch,
        device=device,
        dtype=dtype,
        num_workers=workers,
        pool=",".join(pools),
        progress=False,
    )
    elapsed = time.perf_counter() - t
    assert r.cells_computed == r.n_cells and not r.skipped
    return r.n_cells / elapsed


def naive(bb, manifest: Path, workdir: Path, batch: int, dev: torch.device) -> float:
    """The hand-written loop: PIL + torchvision per image, default DataLoader, fp32, np.save per batch."""
    from PIL import Image
    from torchvision import transforms

    spec = bb.spec
    tf = transforms.Compose(
        [
            transforms.Resize((spec.input_size, spec.input_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    paths = pd.read_csv(manifest)["path"].tolist()

    class Cells(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(paths[i]).convert("RGB"))

    out = workdir / "naive"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    model = bb.model.to(dev).eval().float()
    t = time.perf_counter()
    with torch.no_grad():
        for k, x in enumerate(torch.utils.data.DataLoader(Cells(), batch_size=batch)):
            feats = model(x.to(dev))
            np.save(out / f"batch_{k:05d}.npy", feats.cpu().numpy())
    sync(dev)
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--weights", default="random", help="'random' (speed does not depend on weights) or a file")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--json", default=None, help="output JSON (default benchmarks/results/extract_throughput-<device>-<model>.json)"
    )
    args = ap.parse_args()

    dev = resolve_device(args.device)
    bb = load_backbone(args.model, weights=args.weights)
    cdtype = choose_dtype(args.dtype, dev, bb).dtype
    pools = ("cls",) if bb.num_prefix_tokens else ("mean",)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        manifest, origin = image_manifest(args.n, workdir)
        n = len(pd.read_csv(manifest))
        print(
            f"model {args.model} | {n} cells from {origin} | device {dev} | dtype {cdtype} | "
            f"torch threads {torch.get_num_threads()}"
        )
        a = ceiling(bb, manifest, n, args.batch_size, dev, cdtype, pools)
        print(f"(a) ceiling, forward on ready tensors : {a:9.1f} cells/s")
        b = pipeline(
            bb, manifest, workdir, args.batch_size, args.device, str(cdtype).replace("torch.", ""), args.workers, pools
        )
        print(f"(b) embedcache extract, files -> store: {b:9.1f} cells/s")
        c = naive(bb, manifest, workdir, args.batch_size, dev)
        print(f"(c) naive loop (PIL, fp32, np.save)   : {c:9.1f} cells/s")
    bf16 = cpu_has_native_bf16()
    print(f"pipeline/ceiling b/a = {b / a:.3f}   (goal >= 0.9)")
    print(f"pipeline/naive   b/c = {b / c:.3f}   (goal >= 1.5 on a CPU with native bf16; this one: {bf16})")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_model()} x{os.cpu_count()}"
    kind = dev.type if dev.type == "cuda" else f"cpu{os.cpu_count()}-{'bf16' if bf16 else 'fp32'}"
    result = {
        "benchmark": "extract_throughput",
        "model": args.model,
        "input_size": bb.spec.input_size,
        "n_cells": n,
        "images": origin,
        "batch_size": args.batch_size,
        "device": device_name,
        "cpu_native_bf16": bf16 if dev.type == "cpu" else None,
        "torch_threads": torch.get_num_threads(),
        "compute_dtype": str(cdtype).replace("torch.", ""),
        "torch": torch.__version__,
        "cells_per_s": {"ceiling": a, "pipeline": b, "naive": c},
        "ratios": {"pipeline_over_ceiling": b / a, "pipeline_over_naive": b / c},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = (
        Path(args.json)
        if args.json
        else Path(__file__).parent / "results" / f"extract_throughput-{kind}-{args.model.replace(':', '-')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
