"""The extraction loop: decode in DataLoader workers, compute on the device, write chunks in a thread.

decode (DataLoader workers) -> uint8 to the device -> resize + normalise there -> frozen backbone under
inference_mode (+ autocast) -> pool -> writer thread -> Zarr. :func:`run_chunks` computes the pending
row-chunks of one feature set; the same function runs in this process and inside each Dask task
(:mod:`embedcache.extraction.distributed`), so both write the same bytes.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from embedcache.backbones.forward import compiled, compute_batch
from embedcache.backbones.loading import LoadedBackbone
from embedcache.backbones.preprocess import to_model_input
from embedcache.backbones.tail import TailModule, tail_tokens
from embedcache.extraction.plan import Compute, ExtractionError, ExtractPlan, ExtractResult
from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, StorageFetchError, pixel_digest
from embedcache.inputs.perturb import Perturbation
from embedcache.inputs.perturb import apply as perturb_apply
from embedcache.inputs.sources import CellSource
from embedcache.progress import progress as progress_bar
from embedcache.store.feature_set import FeatureSet, tokens_name
from embedcache.store.groups import OUTSIDE_SUBSET

__all__ = ["Cells", "run_chunks", "compute_batch_with_tokens", "say_token_size", "default_workers"]


class Cells(TorchDataset):
    """Decodes (and perturbs) cells in DataLoader workers; an unreadable one comes back as its error."""

    def __init__(
        self,
        source: CellSource,
        working_size: int | None = None,
        perturbation: Perturbation | None = None,
        subset: np.ndarray | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.source, self.working_size, self.perturbation, self.subset = source, working_size, perturbation, subset
        self.max_image_pixels = max_image_pixels
        self.rows = np.arange(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str, int, int]:
        """``(row, image or None, error, input fingerprint, pixel digest)``: the fingerprint is taken before the
        read, so a file that changes while it is read is seen as changed on the next resume; the digest is of
        the decoded pixels before any perturbation or resize (:func:`embedcache.inputs.images.pixel_digest`,
        0: not read)."""
        i = int(self.rows[j])
        if self.subset is not None and not self.subset[i]:
            return i, None, OUTSIDE_SUBSET, 0, 0
        fp = self.source.fingerprint(i)
        try:
            image = self.source.load(i, max_pixels=self.max_image_pixels)
            digest = pixel_digest(image)
            return i, perturb_apply(image, self.working_size, self.perturbation, row=i), "", fp, digest
        except ImageDecodeError as e:
            return i, None, e.reason, fp, 0
        except StorageFetchError:  # not the image's fault: fail the batch (a task retry, or the rerun, refetches)
            raise
        except Exception as e:  # noqa: BLE001  anything a decoder throws is recorded, never swallowed
            return i, None, f"{type(e).__name__}: {e}", fp, 0


def _collate(items: list[tuple[int, np.ndarray | None, str, int, int]]) -> dict[str, Any]:
    """Group readable images by shape into uint8 NHWC tensors (one resize call per shape)."""
    rows = torch.tensor([it[0] for it in items], dtype=torch.long)
    errors = [it[2] for it in items]
    fps = np.array([it[3] for it in items], dtype=np.int64)
    digests = np.array([it[4] for it in items], dtype=np.int64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, (_, img, _, _, _) in enumerate(items):
        if img is not None:
            by_shape.setdefault(img.shape, []).append(j)
    groups = [
        (torch.tensor(js), torch.from_numpy(np.stack([items[j][1] for j in js])))  # type: ignore[misc]
        for js in by_shape.values()
    ]  # (only readable images are grouped)
    return {"rows": rows, "errors": errors, "groups": groups, "inputs": fps, "pixels": digests}


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

    def __init__(self, fs: FeatureSet, arrays: dict[str, tuple[tuple[int, ...], str]], emit: Callable):
        self.fs, self.arrays, self.emit = fs, arrays, emit
        self.buffers: dict[int, dict[str, Any]] = {}

    def add(
        self,
        rows: np.ndarray,
        feats: dict[str, np.ndarray],
        ok: np.ndarray,
        errors: list[str],
        inputs: np.ndarray,
        pixels: np.ndarray,
    ) -> None:
        chunk_ids = rows // self.fs.chunk_size
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            rng = self.fs.chunk_rows(int(c))
            buf = self.buffers.get(int(c))
            if buf is None:
                m = rng.stop - rng.start
                buf = {
                    "feats": {p: np.zeros((m, *shape), dtype=dt) for p, (shape, dt) in self.arrays.items()},
                    "ok": np.zeros(m, dtype=bool),
                    "error": np.full(m, "", dtype=object),
                    "inputs": np.zeros(m, dtype=np.int64),
                    "pixels": np.zeros(m, dtype=np.int64),
                    "filled": 0,
                }
                self.buffers[int(c)] = buf
            pos = rows[sel] - rng.start
            for p in self.arrays:
                buf["feats"][p][pos] = feats[p][sel]
            buf["ok"][pos] = ok[sel]
            buf["error"][pos] = np.asarray(errors, dtype=object)[sel]
            buf["inputs"][pos] = inputs[sel]
            buf["pixels"][pos] = pixels[sel]
            buf["filled"] += int(sel.sum())
            if buf["filled"] == rng.stop - rng.start:
                del self.buffers[int(c)]
                self.emit((int(c), buf["feats"], buf["ok"], buf["error"].astype(str), buf["inputs"], buf["pixels"]))


# -- the loop -----------------------------------------------------------------------------------


def run_chunks(plan: ExtractPlan, cells: Cells, fs: FeatureSet, pending: Sequence[int], result: ExtractResult) -> None:
    """Decode, compute and write the ``pending`` chunks of ``fs``, counting into ``result``."""
    source, bb, c = plan.source, plan.backbone, plan.compute
    pools, dev, opt = c.pools, c.device, c.options
    cells.rows = np.concatenate([np.arange(fs.chunk_rows(c).start, fs.chunk_rows(c).stop) for c in pending])
    rows = cells.rows
    workers = default_workers(dev) if opt.num_workers is None else opt.num_workers
    loader = DataLoader(
        cells,
        batch_sampler=_chunk_aligned_batches(fs, pending, opt.batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    model = bb.model.to(dev).eval()
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if opt.compile:
        model = compiled(model)
    writer = _ChunkWriter(fs)
    writer.start()
    arrays = c.arrays
    assembler = _ChunkAssembler(fs, arrays, writer.put)
    tail = None
    if opt.tail_blocks is not None:
        tail = TailModule(bb, opt.tail_blocks, pool=pools[0]).to(dev).eval()
    bar = progress_bar(len(rows), f"extract {bb.spec.name} → {fs.key}", enabled=opt.progress)
    try:
        for batch in loader:
            rows_b = batch["rows"].numpy()
            errors = batch["errors"]
            ok = np.array([e == "" for e in errors])
            outside = np.array([e == OUTSIDE_SUBSET for e in errors])
            if opt.on_error == "fail" and not (ok | outside).all():
                j = int(np.flatnonzero(~ok & ~outside)[0])
                cell = source.cell_id(rows_b[j])
                raise ExtractionError(
                    f"cannot read cell {cell} ({source.cell_path(rows_b[j]) or cell}): {errors[j]}; "
                    "use --on-error skip to record it and go on"
                )
            feats = {p: np.zeros((len(rows_b), *shape), dtype=dt) for p, (shape, dt) in arrays.items()}
            if batch["groups"]:
                order = torch.cat([js for js, _ in batch["groups"]]).numpy()
                groups = [g for _, g in batch["groups"]]
                if tail is None:
                    out = compute_batch(
                        model,
                        groups,
                        c.prep,
                        dev,
                        c.dtype,
                        pools,
                        bb.num_prefix_tokens,
                        embed_fn=None if opt.compile else bb.embed,
                        channels_last=c.channels_last,
                    )
                else:
                    out = compute_batch_with_tokens(bb, tail, groups, c)
                for name in arrays:
                    if name not in pools:
                        feats[name][order] = out[name]
                for p in pools:
                    values = out[p].astype(opt.store_dtype)
                    bad = ~np.isfinite(values).all(axis=1)
                    if bad.any():
                        raise ExtractionError(
                            f"non-finite '{p}' features for cell "
                            f"{source.cell_id(rows_b[order[np.flatnonzero(bad)[0]]])}: "
                            "try --dtype float32 and --store-dtype float32"
                        )
                    feats[p][order] = values
            for bad_j in np.flatnonzero(~ok & ~outside):
                result.skipped.append((source.cell_id(rows_b[bad_j]), errors[bad_j]))
            assembler.add(rows_b, feats, ok, errors, batch["inputs"], batch["pixels"])
            result.cells_computed += int((~outside).sum())
            bar.advance(len(rows_b))
    finally:
        bar.close()
        writer.close()
        result.chunks_written = writer.written


def compute_batch_with_tokens(
    bb: LoadedBackbone, tail: TailModule, groups: Sequence[torch.Tensor], c: Compute
) -> dict[str, np.ndarray]:
    """Pooled features and the tokens entering the last k blocks, from one forward pass: the frozen
    prefix gives the tokens, the backbone's own tail turns them into the pooled features."""
    k = c.options.tail_blocks
    assert k is not None
    dev, dt = c.device, c.dtype
    x = to_model_input(groups, c.prep, dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
        tokens = tail_tokens(bb, x, k)
        out = tail.embed(tokens, c.pools)
    result = {p: v.float().cpu().numpy() for p, v in out.items()}
    values = tokens.float().cpu().numpy().astype(np.float16)
    if not np.isfinite(values).all():
        raise ExtractionError("non-finite tail tokens (float16 overflow?): try --dtype float32")
    result[tokens_name(k)] = values
    return result


def say_token_size(c: Compute, fs: FeatureSet, pending: Sequence[int], file: Any = None) -> None:
    """Print, before starting, what the tail tokens will take in the store."""
    assert c.token_shape is not None
    per_cell = 2 * int(np.prod(c.token_shape))
    cells = sum(fs.chunk_rows(c).stop - fs.chunk_rows(c).start for c in pending)
    shape = " x ".join(map(str, c.token_shape))
    print(
        f"tail tokens ({c.options.tail_blocks} block(s)): {shape} float16 = {per_cell / 1024:,.1f} KB per cell; "
        f"{cells:,} cells to write = {per_cell * cells / 2**30:,.2f} GiB before compression",
        file=file or sys.stderr,
    )


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
