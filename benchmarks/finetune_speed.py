"""FT_last (and LoRA) from cached tail tokens vs through the full backbone from images: seconds per epoch.

The same fine-tune (:class:`probes.tuning.FineTuneProbe`, same cells, model, seed, hold-out, batches) runs

(a) on the tokens entering the last ``k`` blocks, computed once (the ``embedcache extract --tail-blocks k``
    cost, reported separately as ``cache_build_s``) and held as float16 (what the store holds);
(b) through the full backbone from the images (decode, resize, normalise, frozen prefix, tail) every step.

Reported per method: seconds per epoch of each, the measured ratio b/a, and the ideal ratio from the
model's FLOPs on one training batch (``torch.utils.flop_counter.FlopCounterMode``: frozen prefix forward +
tail forward/backward, vs tail forward/backward). The issue's goal: b/a >= 0.7 x ideal. Also: the per-cell
costs (seconds per cell-epoch, prefix seconds per cell, token bytes per cell) and the costed plan of the
small-patch paper's FT_last study with and without the tail cache (see ``plan`` in the JSON).

    python benchmarks/finetune_speed.py                       # vit_small at 224, 1000 Chula cells, 2 epochs
    python benchmarks/finetune_speed.py --cells 64 --epochs 1  # smoke
    python benchmarks/finetune_speed.py --device cuda --model timm:vit_large_patch16_224 --dtype bfloat16

Writes ``benchmarks/results/finetune_speed-<cpu<cores>-bf16|fp32 | cuda>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe_speed import cpu_model, machine_kind, versions

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chula_rbc12"
# the small-patch paper's FT_last study: 185,432 cells, 20 classes, 7 FlagLimits x 5 seeds x 50 epochs, 80% train
PAPER = {
    "cells": 185_432,
    "classes": 20,
    "limits": [256, 512, 1024, 2048, 4096, 8192, 16384],
    "seeds": 5,
    "epochs": 50,
    "train_fraction": 0.8,
    "uni_token_bytes": 197 * 1024 * 2,
}


def pick_cells(data: Path, n: int) -> tuple[list[str], np.ndarray]:
    """``n`` real cells, as class-balanced as the set allows (round-robin over classes, file order)."""
    import pandas as pd

    df = pd.read_csv(data / "manifest.csv", dtype=str)
    df["path"] = [str(data / p) for p in df["path"]]
    df["rank"] = df.groupby("label_name").cumcount()
    df = df.sort_values(["rank", "label_name"], kind="stable").head(n)
    if len(df) < n:
        raise SystemExit(f"{data} has {len(df)} cells, {n} asked for")
    return df["path"].tolist(), df["label_name"].to_numpy(dtype=str)


def count_flops(probe, reader, y_codes: np.ndarray, batch: int) -> int:
    """FLOPs of one training step (forward + backward) of the fitted probe's network on one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = probe.net_
    net.train()
    rows = np.arange(min(batch, len(reader)))
    xb = torch.from_numpy(np.asarray(reader.read(rows))).to(probe.device_)
    yb = torch.from_numpy(y_codes[rows]).to(probe.device_)
    with FlopCounterMode(display=False) as fc:
        loss = torch.nn.functional.cross_entropy(net(xb).float(), yb)
        loss.backward()
    net.zero_grad(set_to_none=True)
    net.eval()
    return int(fc.get_total_flops())


def plan(per_cell: dict, token_bytes: int) -> dict:
    """The paper's FT_last study costed from measured per-cell costs (upper bound: every class capped at
    min(its size, limit) is taken as min(classes x limit, all cells))."""
    cells = [min(PAPER["classes"] * lim, PAPER["cells"]) for lim in PAPER["limits"]]
    cell_epochs = sum(cells) * PAPER["train_fraction"] * PAPER["seeds"] * PAPER["epochs"]
    without = cell_epochs * per_cell["full_s_per_cell_epoch"]
    build = PAPER["cells"] * per_cell["prefix_s_per_cell"]
    with_cache = build + cell_epochs * per_cell["tail_s_per_cell_epoch"]
    return {
        "formula": "without = E x c_full; with = N x c_prefix + E x c_tail; E = sum_L min(K*L, N) x 0.8 x seeds x "
        "epochs (upper bound), N = 185,432 cells, K = 20 classes",
        "cell_epochs_E": cell_epochs,
        "cells_per_limit_upper_bound": cells,
        "without_cache_hours": without / 3600,
        "with_cache_hours": with_cache / 3600,
        "cache_build_hours": build / 3600,
        "speedup": without / with_cache if with_cache else None,
        "cache_bytes_measured_model": PAPER["cells"] * token_bytes,
        "cache_bytes_uni_k1": PAPER["cells"] * PAPER["uni_token_bytes"],
        "note": "per-cell costs are this run's model and device; for UNI use a ViT-L/16 run",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--weights", default="random", help="'random' (default) or a weights file / None for the hub")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=1, help="tail blocks trained")
    ap.add_argument("--methods", default="ft-last,lora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from embedcache.backbones.loading import load_backbone
    from embedcache.backbones.preprocess import Preprocessing
    from embedcache.backbones.tail import tail_bytes_per_cell, tail_tokens
    from probes.heads.base import cpu_has_native_bf16, resolve_device
    from probes.tuning import ArrayTokens, FineTuneProbe
    from probes.tuning.augment import CellImages

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    bb = load_backbone(args.model, weights=None if args.weights == "None" else args.weights)
    bb.model.to(dev)
    paths, y = pick_cells(Path(args.data), args.cells)
    prep = Preprocessing(args.size, "bicubic", bb.spec.mean, bb.spec.std)
    images = CellImages(paths, prep)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    def autocast():
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # (a)'s one-off cost: the frozen prefix once per cell (what extract --tail-blocks pays)
    t0 = time.perf_counter()
    chunks = []
    with autocast():
        for i in range(0, len(paths), args.batch_size):
            x = torch.from_numpy(images.read(np.arange(i, min(i + args.batch_size, len(paths))))).to(dev)
            chunks.append(tail_tokens(bb, x, args.k).float().cpu().numpy().astype(np.float16))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    cache_s = time.perf_counter() - t0
    tokens = ArrayTokens(np.concatenate(chunks))
    token_bytes = tail_bytes_per_cell(bb, args.k, args.size)

    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        row = {}
        for tag, reader in (("tokens", tokens), ("images", images)):
            probe = FineTuneProbe(
                bb, method=method, k=args.k, epochs=args.epochs, batch_size=args.batch_size, seed=0, device=str(dev)
            )
            t0 = time.perf_counter()
            with autocast():
                probe.fit(reader, y)
            wall = time.perf_counter() - t0
            per_epoch = [h["seconds"] for h in probe.history_]
            codes = np.searchsorted(probe.classes_, y)
            with autocast():
                flops = count_flops(probe, reader, codes, args.batch_size)
            row[tag] = {
                "seconds_per_epoch": float(np.mean(per_epoch)),
                "epoch_seconds": per_epoch,
                "fit_seconds": wall,
                "flops_per_batch": flops,
                "first_losses": probe.step_losses_[:3],
                "n_trainable": probe.n_trainable_,
            }
        a, b = row["tokens"], row["images"]
        row["ratio_b_over_a"] = b["seconds_per_epoch"] / a["seconds_per_epoch"]
        row["ideal_ratio_flops"] = b["flops_per_batch"] / a["flops_per_batch"]
        row["efficiency"] = row["ratio_b_over_a"] / row["ideal_ratio_flops"]
        row["goal_met"] = bool(row["efficiency"] >= 0.7)
        results[method] = row
        print(
            f"{method:8s} tokens {a['seconds_per_epoch']:8.2f} s/epoch | "
            f"images {b['seconds_per_epoch']:8.2f} s/epoch "
            f"| b/a {row['ratio_b_over_a']:6.2f} | ideal (FLOPs) {row['ideal_ratio_flops']:6.2f} "
            f"| b/a / ideal {row['efficiency']:.2f}{'' if row['goal_met'] else '  (below the 0.7 goal)'}"
        )

    n = len(paths)
    first = results[next(iter(results))]
    per_cell = {
        "prefix_s_per_cell": cache_s / n,
        "tail_s_per_cell_epoch": first["tokens"]["seconds_per_epoch"] / n,
        "full_s_per_cell_epoch": first["images"]["seconds_per_epoch"] / n,
    }
    costed = plan(per_cell, token_bytes)
    print(
        f"cache build {cache_s:.1f} s ({n} cells, {token_bytes / 1e3:.0f} KB/cell); paper FT_last study: "
        f"{costed['without_cache_hours']:.0f} h without the tail cache, {costed['with_cache_hours']:.0f} h with it "
        f"(x{costed['speedup']:.1f}) on this device and model"
    )
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_model()} x{os.cpu_count()}"
    out = {
        "benchmark": "finetune_speed",
        "device": device_name,
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "args": vars(args),
        "model": {
            "name": bb.spec.name,
            "weights": bb.weights.get("source"),
            "k": args.k,
            "size": args.size,
            "token_bytes_per_cell": token_bytes,
        },
        "cells": n,
        "classes": int(len(np.unique(y))),
        "cache_build_s": cache_s,
        "per_cell": per_cell,
        "methods": results,
        "plan": costed,
        "caveats": "(a) holds the tokens in memory (the store reads float16 sub-chunks; add its read time for a "
        "store-backed run); both runs include one hold-out prediction per epoch (10% of the cells)",
    }
    default = Path(__file__).parent / "results" / f"finetune_speed-{machine_kind(dev)}.json"
    path = Path(args.out) if args.out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
