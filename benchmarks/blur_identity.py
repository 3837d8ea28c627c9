"""Does PIL's Gaussian blur leave a small cell unchanged at small sigma?

Resizes real Chula RBC-12 cells to the working size (40x40, as ``extract --working-size 40``),
applies ``blur-post:sigma`` exactly as embedcache does (``embedcache.inputs.perturb.apply``) and reports
per sigma: the largest |delta| in 8-bit levels over all cells, the share of unchanged pixel values,
and the share of cells left bit-identical, with the Pillow version. Prints a table, saves JSON.

    python benchmarks/blur_identity.py [--cells 50] [--size 40] [--data tests/data/chula_rbc12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import PIL

from embedcache.inputs.images import read_image
from embedcache.inputs.perturb import Perturbation, apply

REPO = Path(__file__).resolve().parents[1]


def measure(paths: list[Path], size: int, sigmas: list[float]) -> list[dict]:
    """One row per sigma: max |delta|, share of unchanged pixel values, share of identical cells."""
    clean = [apply(read_image(str(p)), size, None) for p in paths]
    rows = []
    for s in sigmas:
        blurred = [apply(read_image(str(p)), size, Perturbation("blur-post", s)) for p in paths]
        deltas = [np.abs(b.astype(np.int16) - c.astype(np.int16)) for b, c in zip(blurred, clean)]
        rows.append(
            dict(
                sigma=s,
                max_abs_delta=int(max(int(d.max()) for d in deltas)),
                unchanged_pixel_share=float(np.mean([float((d == 0).mean()) for d in deltas])),
                identical_cell_share=float(np.mean([float((d == 0).all()) for d in deltas])),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "tests" / "data" / "chula_rbc12")
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--sigmas", default="0.1,0.2,0.4,0.8,1.6")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "blur_identity.json")
    a = ap.parse_args()
    manifest = pd.read_csv(a.data / "manifest.csv", dtype=str)
    # spread over the classes: every k-th cell of the path-sorted manifest
    picked = manifest.iloc[np.linspace(0, len(manifest) - 1, a.cells).astype(int)]
    paths = [a.data / p for p in picked["path"]]
    rows = measure(paths, a.size, [float(s) for s in a.sigmas.split(",")])
    print(f"Pillow {PIL.__version__}, {len(paths)} real Chula cells at {a.size}x{a.size}, blur-post (GaussianBlur)")
    print(f"{'sigma':>6} {'max |delta|':>12} {'unchanged pixels':>17} {'identical cells':>16}")
    for r in rows:
        print(
            f"{r['sigma']:>6g} {r['max_abs_delta']:>12d} {r['unchanged_pixel_share']:>16.2%} "
            f"{r['identical_cell_share']:>15.1%}"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"pillow": PIL.__version__, "cells": len(paths), "size": a.size, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
