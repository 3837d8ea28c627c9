"""The extraction pipeline: image files in, a finished feature set in the store out.

decode (DataLoader workers) -> uint8 to the device -> resize + normalise there ->
frozen backbone under inference_mode (+ autocast) -> pool -> writer thread -> Zarr.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from .images import ImageDecodeError
from .loading import LoadedBackbone, load_backbone
from .perturb import Perturbation, parse_perturbations
from .perturb import apply as perturb_apply
from .pooling import check_pools, embed, parse_pools
from .preprocess import Preprocessing, to_model_input
from .sources import CellSource, open_source
from .store import OUTSIDE_SUBSET, STORE_DTYPES, FeatureSet, WriteResult, open_store, safe_key

ON_ERROR = ("fail", "skip")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExtractionError(RuntimeError):
    """Extraction stopped: an unreadable image under ``on_error='fail'``, or bad features."""


@dataclass
class ExtractResult(WriteResult):
    """What one ``extract`` call did."""

    cells_computed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cell id, reason), this run
    seconds: float = 0.0
    variants: list["ExtractResult"] = field(default_factory=list)  # perturbed feature sets

    @property
    def cells_per_second(self) -> float:
        return self.cells_computed / self.seconds if self.seconds > 0 else 0.0


def extract(
    model: str,
    data: str | os.PathLike | np.ndarray | CellSource,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    weights: str | os.PathLike | None = None,
    revision: str | None = None,
    pool: str | Sequence[str] | None = None,
    input_size: int | None = None,
    interpolation: str | None = None,
    fit: str = "squash",
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    store_dtype: str = "float16",
    chunk_size: int = 1024,
    on_error: str = "fail",
    label_column: str | None = "label",
    labels: Sequence[Any] | None = None,
    working_size: int | None = None,
    perturb: str | Sequence[str] | None = None,
    perturb_rows: str = "test",
    progress: bool = True,
    backbone: LoadedBackbone | None = None,
) -> ExtractResult:
    """Extract pooled features of ``data`` with backbone ``model`` into the store ``out``.

    Rerunning the same call is a cache hit; a killed run resumes where it stopped.
    ``working_size`` resizes every cell to S×S first; each ``perturb`` value (e.g.
    ``"blur-post:0.4,0.8"``) becomes its own feature set beside the clean one, computed
    for the cells of the test split (``perturb_rows="test"``, or all cells when the data
    has no split column — reported) or for all cells (``"all"``). ``backbone`` may pass an
    already loaded backbone. Returns the clean feature set's result; perturbed ones are in
    ``result.variants``.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    source = data if isinstance(data, CellSource) else open_source(data, labels=labels, label_column=label_column, name=dataset)
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    bb = backbone or load_backbone(model, weights=weights, revision=revision)
    spec = bb.spec
    pools = parse_pools(pool, spec.default_pool)
    check_pools(pools, bb.num_prefix_tokens, spec.name)
    prep = Preprocessing(
        size=input_size or spec.input_size,
        interpolation=interpolation or spec.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        fit=fit,
    )
    if working_size is not None and working_size < 4:
        raise ValueError(f"working size {working_size} is too small")
    perturbations = parse_perturbations(perturb)
    if perturb_rows not in ("test", "all"):
        raise ValueError(f"perturb_rows must be 'test' or 'all', got {perturb_rows!r}")
    prep_tag = prep.tag() + (f"-ws{working_size}" if working_size else "")
    store = open_store(out, mode="a")
    ds = store.require_dataset(source, name=dataset)
    subset_rule, subset = "all", None
    if perturbations and perturb_rows == "test":
        test = source.table["split"].to_numpy() == "test"
        if test.any():
            subset_rule, subset = "split == test", test
        else:
            subset_rule = "all (the data has no split column with 'test' cells)"
    common = dict(
        source=source, bb=bb, ds=ds, store=store, pools=pools, prep=prep, working_size=working_size, dev=dev,
        compute_dtype=compute_dtype, store_dtype=store_dtype, chunk_size=chunk_size, batch_size=batch_size,
        num_workers=num_workers, on_error=on_error, progress=progress,
    )
    result = _extract_variant(key=f"{safe_key(bb.key_name)}/{prep_tag}/clean", perturbation=None, subset=None, subset_rule="all", **common)
    for p in perturbations:
        key = f"{safe_key(bb.key_name)}/{prep_tag}/{p.name}"
        result.variants.append(_extract_variant(key=key, perturbation=p, subset=subset, subset_rule=subset_rule, **common))
    return result


def _extract_variant(*, source, bb, ds, store, key, pools, prep, working_size, perturbation, subset, subset_rule, dev, compute_dtype, store_dtype, chunk_size, batch_size, num_workers, on_error, progress) -> ExtractResult:
    with store.lock(f"features::{ds.name}::{key}"):
        fs = ds.require_feature_set(
            key,
            width=int(bb.spec.width),
            pools=pools,
            chunk_size=chunk_size,
            dtype=store_dtype,
            provenance=_provenance(bb, prep, pools, dev, compute_dtype, store_dtype, working_size, perturbation, subset_rule),
            fingerprint={
                "backbone": bb.key_name,
                "weights_sha256": bb.weights.get("sha256"),
                "preprocessing": prep.as_dict(),
                "working_size": working_size,
                "perturbation": perturbation.name if perturbation else None,
                "rows": subset_rule,
                "store_dtype": store_dtype,
                "compute_dtype": str(compute_dtype).replace("torch.", ""),
            },
        )
        pending = fs.pending_chunks(pools)
        result = ExtractResult(store.url, ds.name, key, ds.n, cache_hit=not pending)
        if not pending:
            return result
        start = time.perf_counter()
        cells = _Cells(source, working_size=working_size, perturbation=perturbation, subset=subset)
        _run(cells, bb, fs, pending, pools, prep, dev, compute_dtype, store_dtype, batch_size, num_workers, on_error, progress, result)
        result.seconds = time.perf_counter() - start
    return result


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA by default, fp32 on the CPU (bf16 on request on either)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 compute on the CPU is slow and poorly supported: use bfloat16 or float32")
    return DTYPES[dtype]


# -- decoding -----------------------------------------------------------------------------------


OUTSIDE = OUTSIDE_SUBSET


class _Cells(TorchDataset):
    """Decodes (and perturbs) cells in DataLoader workers; an unreadable one comes back as its error."""

    def __init__(self, source: CellSource, working_size: int | None = None, perturbation: Perturbation | None = None, subset: np.ndarray | None = None):
        self.source, self.working_size, self.perturbation, self.subset = source, working_size, perturbation, subset
        self.rows = np.arange(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str]:
        i = int(self.rows[j])
        if self.subset is not None and not self.subset[i]:
            return i, None, OUTSIDE
        try:
            return i, perturb_apply(self.source.load(i), self.working_size, self.perturbation, row=i), ""
        except ImageDecodeError as e:
            return i, None, e.reason
        except Exception as e:  # noqa: BLE001  anything a decoder throws is recorded, never swallowed
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> dict[str, Any]:
    """Group readable images by shape into uint8 NHWC tensors (one resize call per shape)."""
    rows = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    errors = [e for _, _, e in items]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, (_, img, _) in enumerate(items):
        if img is not None:
            by_shape.setdefault(img.shape, []).append(j)
    groups = [(torch.tensor(js), torch.from_numpy(np.stack([items[j][1] for j in js]))) for js in by_shape.values()]
    return {"rows": rows, "errors": errors, "groups": groups}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# -- writing ------------------------------------------------------------------------------------


class _ChunkWriter(threading.Thread):
    """Writes finished row-chunks so that compute never waits on storage."""

    def __init__(self, fs: FeatureSet, depth: int = 4):
        super().__init__(daemon=True, name="embedcache-writer")
        self.fs = fs
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.fs.write_chunk(*item)
                    self.written += 1
                except BaseException as e:  # noqa: BLE001  re-raised in the main thread
                    self.error = e

    def put(self, item) -> None:
        self._raise()
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class _ChunkAssembler:
    """Collects rows of each pending chunk; hands a chunk on once all its rows are in."""

    def __init__(self, fs: FeatureSet, pools: Sequence[str], width: int, store_dtype: str, emit: Callable):
        self.fs, self.pools, self.width, self.dtype, self.emit = fs, pools, width, store_dtype, emit
        self.buffers: dict[int, dict[str, Any]] = {}

    def add(self, rows: np.ndarray, feats: dict[str, np.ndarray], ok: np.ndarray, errors: list[str]) -> None:
        chunk_ids = rows // self.fs.chunk_size
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            rng = self.fs.chunk_rows(int(c))
            buf = self.buffers.get(int(c))
            if buf is None:
                m = rng.stop - rng.start
                buf = {
                    "feats": {p: np.zeros((m, self.width), dtype=self.dtype) for p in self.pools},
                    "ok": np.zeros(m, dtype=bool),
                    "error": np.full(m, "", dtype=object),
                    "filled": 0,
                }
                self.buffers[int(c)] = buf
            pos = rows[sel] - rng.start
            for p in self.pools:
                buf["feats"][p][pos] = feats[p][sel]
            buf["ok"][pos] = ok[sel]
            buf["error"][pos] = np.asarray(errors, dtype=object)[sel]
            buf["filled"] += int(sel.sum())
            if buf["filled"] == rng.stop - rng.start:
                del self.buffers[int(c)]
                self.emit((int(c), buf["feats"], buf["ok"], buf["error"].astype(str)))


# -- the loop -----------------------------------------------------------------------------------


def _run(cells, bb, fs, pending, pools, prep, dev, compute_dtype, store_dtype, batch_size, num_workers, on_error, progress, result):
    source = cells.source
    cells.rows = np.concatenate([np.arange(fs.chunk_rows(c).start, fs.chunk_rows(c).stop) for c in pending])
    rows = cells.rows
    workers = default_workers(dev) if num_workers is None else num_workers
    loader = DataLoader(
        cells,
        batch_sampler=_chunk_aligned_batches(fs, pending, batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    model = bb.model.to(dev).eval()
    ids = source.table["id"].to_numpy()
    writer = _ChunkWriter(fs)
    writer.start()
    assembler = _ChunkAssembler(fs, pools, int(bb.spec.width), store_dtype, writer.put)
    bar = _progress(progress, len(rows), f"{bb.spec.name} → {fs.key}")
    try:
        for batch in loader:
            rows_b = batch["rows"].numpy()
            errors = batch["errors"]
            ok = np.array([e == "" for e in errors])
            outside = np.array([e == OUTSIDE for e in errors])
            if on_error == "fail" and not (ok | outside).all():
                j = int(np.flatnonzero(~ok & ~outside)[0])
                where = source.table["path"].iat[rows_b[j]] or ids[rows_b[j]]
                raise ExtractionError(f"cannot read cell {ids[rows_b[j]]} ({where}): {errors[j]}; use --on-error skip to record it and go on")
            feats = {p: np.zeros((len(rows_b), bb.spec.width), dtype=store_dtype) for p in pools}
            if batch["groups"]:
                order = torch.cat([js for js, _ in batch["groups"]]).numpy()
                out = compute_batch(model, [g for _, g in batch["groups"]], prep, dev, compute_dtype, pools, bb.num_prefix_tokens)
                for p in pools:
                    values = out[p].astype(store_dtype)
                    bad = ~np.isfinite(values).all(axis=1)
                    if bad.any():
                        raise ExtractionError(
                            f"non-finite '{p}' features for cell {ids[rows_b[order[np.flatnonzero(bad)[0]]]]}: "
                            "try --dtype float32 and --store-dtype float32"
                        )
                    feats[p][order] = values
            for j in np.flatnonzero(~ok & ~outside):
                result.skipped.append((str(ids[rows_b[j]]), errors[j]))
            assembler.add(rows_b, feats, ok, errors)
            result.cells_computed += int((~outside).sum())
            bar.advance(len(rows_b))
    finally:
        bar.close()
        writer.close()
        result.chunks_written = writer.written


def compute_batch(model, groups, prep: Preprocessing, dev: torch.device, compute_dtype: torch.dtype, pools, num_prefix_tokens: int) -> dict[str, np.ndarray]:
    """Same-shape uint8 NHWC groups -> pooled float32 features (rows in group order)."""
    x = to_model_input(groups, prep, dev)
    with torch.autocast(dev.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        out = embed(model, x, pools, num_prefix_tokens)
    return {p: v.float().cpu().numpy() for p, v in out.items()}


def _chunk_aligned_batches(fs: FeatureSet, pending: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches that never straddle a row-chunk, so a resumed run computes each chunk
    from exactly the same batches as an uninterrupted one (bitwise-equal features)."""
    batches, offset = [], 0
    for c in pending:
        m = fs.chunk_rows(c).stop - fs.chunk_rows(c).start
        batches += [list(range(offset + s, offset + min(s + batch_size, m))) for s in range(0, m, batch_size)]
        offset += m
    return batches


def default_workers(device: torch.device) -> int:
    """Decode workers: enough to feed a GPU; on the CPU, leave the cores to the model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, cpus - 1)) if device.type == "cuda" else min(2, max(1, cpus // 4))


def _provenance(bb: LoadedBackbone, prep: Preprocessing, pools, dev, compute_dtype, store_dtype, working_size=None, perturbation=None, subset_rule="all") -> dict[str, Any]:
    import timm

    from . import __version__

    spec = bb.spec
    return {
        "backbone": {
            "name": spec.name,
            "arch": spec.arch,
            "hub_id": spec.hub_id,
            "kwargs": dict(spec.kwargs),
            "layers": dict(spec.layers),
            "width": spec.width,
            "num_prefix_tokens": bb.num_prefix_tokens,
        },
        "weights": dict(bb.weights),
        "preprocessing": prep.as_dict(),
        "working_size": working_size,
        "perturbation": None if perturbation is None else {"kind": perturbation.kind, "param": perturbation.param, "rows": subset_rule},
        "pools": list(pools),
        "compute": {
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "dtype": str(compute_dtype).replace("torch.", ""),
            "inference_mode": True,
        },
        "store_dtype": store_dtype,
        "versions": {
            "embedcache": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class _NoBar:
    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.p.start()
        self.task = self.p.add_task(description, total=total, rate="")
        self.t0 = time.perf_counter()
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.p.update(self.task, advance=n, rate=f"{rate:,.0f} cells/s")

    def close(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int, description: str):
    return _RichBar(total, description) if enabled else _NoBar()
