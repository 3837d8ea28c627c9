"""Regenerate the bundled test cells in tests/data/ from the full sets in ../shared/data.

Deterministic: the same source data gives byte-identical files (images are copied, not re-encoded).

    python tests/data/make_subset.py [--source ../shared/data]

What it writes (see tests/data/README.md):
- ``chula_rbc12/``: 64 cells of each of the 13 classes (832), at most 4 cells of one class per smear,
  smears drawn in a seeded random order (smear 1 first for ``normal``, so that the subset begins with
  the full set's first cell ``cells/001_000.jpg``); ``manifest.csv`` with the full set's columns
  ``path,label,label_name,smear`` (relative paths), sorted by path; the JPEGs as they are.
- ``chula_rbc12_labels.csv.gz``: ``label,smear`` of all 22,106 cells of the full set (no images), for
  the sampling tests that need the real class imbalance and smear structure.
- ``bccd_wbc/``: an ImageFolder of 4 white cells per type (Basophil: all 3), seeded.
- ``bccd_cells/``: an ImageFolder of 4 crops per class (RBC, WBC, Platelets), seeded; sizes vary.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
PER_CLASS = 64  # Chula cells per class
PER_SMEAR = 4  # at most this many cells of one class from one smear
PER_FOLDER = 4  # BCCD crops per class folder
SEED = 0


def chula(src: Path, dst: Path) -> pd.DataFrame:
    """A stratified, smear-spread sample of Chula RBC-12: ``PER_CLASS`` cells of each class."""
    df = pd.read_csv(src / "manifest.csv", dtype=str).sort_values("path", kind="stable")
    rng = np.random.default_rng(SEED)
    picked = []
    for label in sorted(df["label"].unique(), key=int):
        cells = df[df["label"] == label]
        smears = sorted(cells["smear"].unique(), key=int)
        order = list(rng.permutation(smears))
        if label == "0":  # 'normal': the full set's first cell (smear 1) comes first
            order.remove("1")
            order.insert(0, "1")
        by_smear = {s: g for s, g in cells.groupby("smear")}
        take: list[pd.DataFrame] = []
        for s in order:
            take.append(by_smear[s].iloc[:PER_SMEAR])
            if sum(map(len, take)) >= PER_CLASS:
                break
        chosen = pd.concat(take).iloc[:PER_CLASS]
        if len(chosen) < PER_CLASS:
            raise SystemExit(f"class {label} has only {len(chosen)} cells at {PER_SMEAR} per smear")
        picked.append(chosen)
    sub = pd.concat(picked).sort_values("path", kind="stable").reset_index(drop=True)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "cells").mkdir(parents=True)
    for p in sub["path"]:
        shutil.copyfile(src / p, dst / p)
    sub.to_csv(dst / "manifest.csv", index=False)
    shutil.copyfile(src / "LICENSE", dst / "LICENSE")
    return sub


def chula_labels(src: Path, dst: Path) -> None:
    """``label,smear`` of every cell of the full set, gzip without a timestamp (reproducible bytes)."""
    df = pd.read_csv(src / "manifest.csv", dtype=str).sort_values("path", kind="stable")
    data = df[["label", "smear"]].to_csv(index=False).encode()
    with open(dst, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(data)


def image_folder(src: Path, dst: Path, licence: Path) -> dict[str, int]:
    """``PER_FOLDER`` seeded files of each class folder of ``src`` (all of a smaller class)."""
    rng = np.random.default_rng(SEED)
    if dst.exists():
        shutil.rmtree(dst)
    counts = {}
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        files = sorted(p.name for p in (src / cls).iterdir() if p.is_file())
        chosen = sorted(rng.choice(files, min(PER_FOLDER, len(files)), replace=False))
        (dst / cls).mkdir(parents=True)
        for name in chosen:
            shutil.copyfile(src / cls / name, dst / cls / name)
        counts[cls] = len(chosen)
    shutil.copyfile(licence, dst / "LICENSE")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=HERE.parents[2] / "shared" / "data")
    src = ap.parse_args().source
    sub = chula(src / "chula_rbc12", HERE / "chula_rbc12")
    chula_labels(src / "chula_rbc12", HERE / "chula_rbc12_labels.csv.gz")
    bccd_licence = src / "bccd_cells" / "LICENSE"  # the BCCD dataset's MIT licence (bccd_wbc is derived from it)
    wbc = image_folder(src / "bccd_wbc", HERE / "bccd_wbc", bccd_licence)
    cells = image_folder(src / "bccd_cells", HERE / "bccd_cells", bccd_licence)
    print(f"chula_rbc12: {len(sub)} cells, {sub['label'].nunique()} classes, {sub['smear'].nunique()} smears")
    print(f"bccd_wbc: {wbc}\nbccd_cells: {cells}")


if __name__ == "__main__":
    main()
