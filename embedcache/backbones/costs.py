"""``models``: the backbone registry as a table, and with ``cost=True`` what each backbone costs to run here.

The cost table (one row per backbone, tidy, units in the column names) is measured on the device at hand with
random-init weights (speed and memory do not depend on the weights; nothing is downloaded), on ready,
normalised input tensors (the model alone, as the pipeline's ceiling):

* ``params``, ``weight_mb`` (parameters + buffers as held, float32), ``gflops_per_cell`` (one cell, counted
  by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention; 2 FLOPs per
  multiply-add; element-wise ops not counted);
* ``ms_per_cell_batch1`` and ``cells_per_s_best`` at ``best_batch`` (the fastest of ``batch_sizes``), under
  the compute dtype ``dtype`` resolves to for that backbone (:func:`embedcache.backbones.precision.choose_dtype`);
* ``peak_mem_mb``: CUDA ``max_memory_allocated`` over the timed runs (weights included); CPU the weights
  plus the peak rise of resident memory during the timed runs over just before them (sampled every
  millisecond, freed heap returned to the OS first): activations and allocator slack.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["models", "COST_COLUMNS", "DEFAULT_COST_MODELS"]

DEFAULT_COST_MODELS = ("timm:test_vit", "timm:test_resnet", "timm:vit_tiny_patch16_224")
COST_COLUMNS = (
    "model",
    "device",
    "device_name",
    "dtype",
    "weights",
    "input_size",
    "params",
    "weight_mb",
    "gflops_per_cell",
    "ms_per_cell_batch1",
    "best_batch",
    "cells_per_s_best",
    "peak_mem_mb",
    "mem_method",
)
REGISTRY_COLUMNS = (
    "name",
    "arch",
    "hub_id",
    "width",
    "input_size",
    "interpolation",
    "default_pool",
    "gated",
    "licence",
    "forbid_dtypes",
)
BATCHES = {"cpu": (1, 8, 32), "cuda": (1, 32, 128, 512)}


def models(
    *,
    cost: bool = False,
    model: str | Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_sizes: Sequence[int] | None = None,
    min_time: float = 0.3,
    out: str | Path | None = None,
) -> pd.DataFrame:
    """The registry (``cost=False``: one row per entry) or the cost table of ``model`` (``cost=True``).

    ``model``: names (a list or ``"a,b"``; registry or ``timm:<arch>``), ``"all"`` for every registry entry;
    default: the registry without ``cost``, :data:`DEFAULT_COST_MODELS` (seconds on a CPU) with it. Each
    timing repeats for at least ``min_time`` seconds after one warm-up call. ``out`` writes the table as CSV.
    """
    from embedcache.backbones.registry import get_spec, list_models

    if model is None:
        names = [s.name for s in list_models()] if not cost else list(DEFAULT_COST_MODELS)
    else:
        names = [m.strip() for m in model.split(",")] if isinstance(model, str) else [str(m) for m in model]
        if names == ["all"]:
            names = [s.name for s in list_models()]
        if not names or any(not n for n in names):
            raise ValueError(f"model must name one or more backbones, got {model!r}")
    if not cost:
        specs = [get_spec(n) for n in names]
        rows: list[dict[str, Any]] = [
            {c: list(v) if isinstance(v := getattr(s, c), tuple) else v for c in REGISTRY_COLUMNS} for s in specs
        ]
        table = pd.DataFrame(rows, columns=list(REGISTRY_COLUMNS))
    else:
        table = pd.DataFrame(
            [_cost_row(n, device, dtype, batch_sizes, min_time) for n in names], columns=list(COST_COLUMNS)
        )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    return table


def _cost_row(name: str, device: str, dtype: str, batch_sizes: Sequence[int] | None, min_time: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from embedcache.backbones.devices import cpu_model, resolve_device
    from embedcache.backbones.loading import load_backbone
    from embedcache.backbones.pooling import embed
    from embedcache.backbones.precision import choose_dtype

    dev = resolve_device(device)
    batches = tuple(batch_sizes or BATCHES.get(dev.type, BATCHES["cpu"]))
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be positive, got {batches}")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bb = load_backbone(name, weights="random")
    choice = choose_dtype(dtype, dev, bb)
    model = bb.model.to(dev).eval()
    spec, size = bb.spec, bb.spec.input_size
    pools = ("cls",) if bb.num_prefix_tokens else ("mean",)
    if spec.embed is None:
        run = lambda x: embed(model, x, pools, bb.num_prefix_tokens)  # noqa: E731
    else:
        run = lambda x: bb.embed(x, pools)  # noqa: E731
    tensors = list(model.parameters()) + list(model.buffers())
    one = torch.randn(1, 3, size, size, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run(one)
    speeds: dict[int, float] = {}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    _trim()
    sampler = _PeakRSS(_rss()) if dev.type == "cpu" else None
    with torch.inference_mode(), torch.autocast(dev.type, dtype=choice.dtype, enabled=choice.name != "float32"):
        for b in batches:
            speeds[b] = _cells_per_s(run, torch.randn(b, 3, size, size, device=dev), dev, min_time)
    if sampler is not None:
        peak, method = (weight_bytes + sampler.stop()) / 2**20, "cpu weights + rss delta"
    else:
        peak, method = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda max_memory_allocated"
    best = max(speeds, key=lambda b: speeds[b])
    return {
        "model": spec.name,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "dtype": choice.name,
        "weights": "random-init",
        "input_size": size,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_mb": weight_bytes / 2**20,
        "gflops_per_cell": counter.get_total_flops() / 1e9,
        "ms_per_cell_batch1": 1000.0 / speeds[1] if 1 in speeds else float("nan"),
        "best_batch": best,
        "cells_per_s_best": speeds[best],
        "peak_mem_mb": peak,
        "mem_method": method,
    }


def _cells_per_s(run: Any, x: torch.Tensor, dev: torch.device, min_time: float) -> float:
    run(x)  # warm-up
    _sync(dev)
    n, t = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t < min_time:
        for v in run(x).values():
            v.float().cpu()
        n += 1
    _sync(dev)
    return n * x.shape[0] / (time.perf_counter() - t)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so an RSS baseline is not inflated by the last model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakRSS:
    """Samples RSS every millisecond in a thread; ``stop()`` gives the peak above ``base`` in bytes."""

    def __init__(self, base: int):
        self.base, self.peak = base, _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return float(max(0, max(self.peak, _rss()) - self.base))
