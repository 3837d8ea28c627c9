"""Extraction on a Dask cluster: ``extract(..., cluster="local:4")`` or ``scheduler="tcp://head:8786"``.

The process that calls :func:`embedcache.extract` (the driver) decides, as always, which row-chunks of a
feature set are pending, and holds the feature set's lock (a flock, or a lease on object stores) for the
whole job. Each pending chunk becomes one Dask task. A worker process loads the backbone once (cached per
process, keyed by model, weights, revision and adapter, its weights checked against the driver's), pins one
GPU where it has one, runs one torch thread on the CPU, computes its chunk from the same chunk-aligned
batches a single process uses, writes it into the store (opened from its URL) and flips its done flags
itself. The stored result is therefore bitwise equal to a single-process run.

A worker killed mid-chunk (SIGKILL, OOM) leaves that chunk's done flags unset; the scheduler runs the task
again on another worker (``distributed.scheduler.allowed-failures`` times, 3 by default), which rewrites
the chunk whole. When the whole cluster dies, a rerun of the same command computes only the chunks whose
flags are unset. ``memory://`` stores live in one process and are refused; a local path must be on a file
system every worker sees (on one machine it always is).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedcache.backbones.adapters import apply_adapter
from embedcache.backbones.loading import LoadedBackbone, load_backbone
from embedcache.extraction.options import ExtractOptions
from embedcache.extraction.pipeline import Cells, run_chunks
from embedcache.extraction.plan import Compute, ExtractionError, ExtractPlan, ExtractResult, Variant
from embedcache.faults import checkpoint
from embedcache.inputs.sources import CellSource
from embedcache.progress import progress as progress_bar
from embedcache.store import FeatureSet, open_store
from embedcache.store.locking.base import check_held

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "DaskRun",
    "BackboneRecipe",
    "ClusterError",
    "check_cluster_args",
    "parse_cluster",
    "worker_url",
    "TASK_RETRIES",
]

TASK_RETRIES = 2  # a task that raised (a transient storage error) is run again this often
_CLUSTER_RE = re.compile(r"^local(?::(\d+))?$")
_backbones: dict[tuple, LoadedBackbone] = {}  # per worker process


class ClusterError(RuntimeError):
    """The Dask cluster cannot be used as asked (bad --cluster, unreachable scheduler, memory:// store)."""


def parse_cluster(cluster: str) -> int:
    """``"local:4"`` -> 4 worker processes (``"local"``: one per core)."""
    m = _CLUSTER_RE.match(cluster.strip())
    if not m:
        raise ClusterError(f"--cluster must be local or local:N (N worker processes), got {cluster!r}")
    n = int(m.group(1)) if m.group(1) else (os.cpu_count() or 1)
    if n < 1:
        raise ClusterError(f"--cluster {cluster!r}: at least one worker is needed")
    return n


def check_cluster_args(cluster: str | None, scheduler: str | None, out: str) -> None:
    """Refuse a bad combination before anything is loaded or started."""
    if cluster is not None and scheduler is not None:
        raise ClusterError("give either --cluster local:N or --scheduler tcp://host:8786, not both")
    if cluster is not None:
        parse_cluster(cluster)
    worker_url(out)


def worker_url(url: str) -> str:
    """The store URL as a worker must open it: local paths made absolute; ``memory://`` refused."""
    if url.startswith("memory://"):
        raise ClusterError(
            f"{url} is a memory:// store, which lives inside one process: Dask workers cannot write it. "
            "Extract into a local path (on a file system all workers see) or an object-store URL (s3://...)"
        )
    if url.startswith("file://"):
        url = url[len("file://") :]
    return url if "://" in url else os.path.abspath(url)


@dataclass(frozen=True)
class BackboneRecipe:
    """How a worker loads the driver's backbone, and the weights digest it must find."""

    model: str
    weights: str | None
    revision: str | None
    adapter: str | None
    sha256: str | None
    key_name: str

    @property
    def cache_key(self) -> tuple:
        return (self.model, self.weights, self.revision, self.adapter)

    @classmethod
    def of(
        cls,
        model: str,
        weights: str | os.PathLike | None,
        revision: str | None,
        adapter: str | os.PathLike | None,
        loaded: LoadedBackbone,
    ) -> BackboneRecipe:
        """The recipe of the backbone ``loaded`` from these arguments (local paths made absolute)."""

        def where(p: str | os.PathLike | None) -> str | None:
            if p is None or str(p) == "random" or "://" in str(p):
                return None if p is None else str(p)
            return os.path.abspath(p)

        return cls(model, where(weights), revision, where(adapter), loaded.weights.get("sha256"), loaded.key_name)


@dataclass(frozen=True)
class _Job:
    """One feature set's chunk work, as sent to the workers (small, picklable)."""

    store_url: str
    dataset: str
    key: str
    recipe: BackboneRecipe
    compute: Compute  # the driver's, with the workers' decode processes and no progress bar


@dataclass
class DaskRun:
    """A connected Dask client for one ``extract`` call (see :meth:`open`)."""

    client: Client
    recipe: BackboneRecipe
    num_workers: int | None  # decode workers inside each Dask worker (None: decode in the task)
    backbone_future: Any = None  # the driver's backbone object, when one was passed in
    where: str = ""

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        options: ExtractOptions,
        *,
        recipe: BackboneRecipe,
        device: torch.device,
        backbone: LoadedBackbone | None = None,
    ) -> Iterator[DaskRun]:
        """Start ``options.cluster`` (``local:N``: a LocalCluster of N processes, one thread each; a
        LocalCUDACluster when dask-cuda is installed and the device is CUDA) or connect to
        ``options.scheduler``, yield, then close what was started."""
        from distributed import Client, LocalCluster

        cluster, scheduler, num_workers = options.cluster, options.scheduler, options.num_workers

        if (cluster is None) == (scheduler is None):
            raise ClusterError("give either cluster (local:N) or scheduler (tcp://host:8786), not both")
        with contextlib.ExitStack() as stack:
            if cluster is not None:
                n = parse_cluster(cluster)
                config: dict[str, Any] = {}
                if num_workers:  # decode workers are child processes: Dask's are daemonic unless told
                    config["distributed.worker.daemon"] = False
                import dask

                with dask.config.set(config):
                    lc = _cuda_cluster(n) if device.type == "cuda" else None
                    kind = "LocalCUDACluster" if lc is not None else "LocalCluster"
                    if lc is None:
                        lc = LocalCluster(
                            n_workers=n,
                            threads_per_worker=1,
                            processes=True,
                            dashboard_address=":0",
                            silence_logs=logging.ERROR,
                        )
                stack.enter_context(contextlib.closing(lc))
                client = stack.enter_context(Client(lc))
                where = f"{kind} of {n} processes"
            else:
                assert scheduler is not None
                try:
                    client = stack.enter_context(Client(scheduler, timeout="30s"))
                except OSError as e:
                    raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from e
                n = len(client.scheduler_info().get("workers", {}))
                where = f"the Dask cluster at {scheduler} ({n} workers now)"
            future = client.scatter([backbone], broadcast=True, hash=False)[0] if backbone is not None else None
            yield cls(client, recipe, num_workers, future, where)

    def run(self, plan: ExtractPlan, variant: Variant, fs: FeatureSet, pending: Sequence[int], result: ExtractResult):
        """Compute ``pending`` chunks of ``fs`` as one task each; count into ``result``; progress over all."""
        from distributed import as_completed

        job = _Job(
            worker_url(plan.store.url),
            plan.dataset.name,
            fs.key,
            self.recipe,
            replace(plan.compute, options=plan.options.replace(num_workers=self.num_workers or 0, progress=False)),
        )
        inputs = self.client.scatter(
            [(variant.perturbation, variant.subset, variant.working_size, self.backbone_future)],
            broadcast=True,
            hash=False,
        )[0]
        # each task is sent its own chunk's cells (ids, paths), never the whole cell table
        futures = {}
        for c in pending:
            span = fs.chunk_rows(c)
            cells = plan.source.rows(span.start, span.stop)
            task = self.client.submit(_compute_chunks, job, inputs, cells, [int(c)], retries=TASK_RETRIES, pure=False)
            futures[task] = int(c)
        total = sum(fs.chunk_rows(c).stop - fs.chunk_rows(c).start for c in pending)
        name = plan.backbone.spec.name
        bar = progress_bar(total, f"extract {name} → {fs.key} on {self.where}", enabled=plan.options.progress)
        skipped: dict[int, list[tuple[str, str]]] = {}
        try:
            for fut in as_completed(futures):
                c = futures[fut]
                try:
                    out = fut.result()
                except Exception as e:
                    raise ExtractionError(
                        f"chunk {c} of '{fs.key}' failed on the Dask cluster ({type(e).__name__}: {e}); the chunks "
                        "written so far are kept: rerun the same command to compute only the missing ones"
                    ) from e
                if "error" in out:
                    raise ExtractionError(out["error"])
                check_held()  # the driver's lease on a remote store: lost means another writer owns the set now
                result.chunks_written += out["chunks_written"]
                result.cells_computed += out["cells_computed"]
                skipped[c] = [tuple(s) for s in out["skipped"]]
                bar.advance(fs.chunk_rows(c).stop - fs.chunk_rows(c).start)
                checkpoint("distributed:chunk-finished")
        finally:
            bar.close()
            self.client.cancel(list(futures))
        for c in sorted(skipped):
            result.skipped += skipped[c]  # in row order, as a single process reports them


def _cuda_cluster(n: int) -> Any:
    """dask-cuda's LocalCUDACluster (one GPU per worker) when installed, else None."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    return LocalCUDACluster(n_workers=n, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR)


# -- on the worker ---------------------------------------------------------------------------------


def _worker_device(device_type: str) -> torch.device:
    """CPU, or one GPU per worker: dask-cuda's workers see only theirs; LocalCluster workers (named
    0..N-1) take GPU ``name % count``."""
    if device_type != "cuda":
        return torch.device(device_type)
    if not torch.cuda.is_available():
        raise ClusterError("the driver computes on CUDA but this Dask worker has no GPU")
    count = torch.cuda.device_count()
    index = 0
    with contextlib.suppress(ValueError, ImportError):
        from distributed import get_worker

        index = int(str(get_worker().name).rsplit("-", 1)[-1]) % count
    return torch.device("cuda", index)


def _worker_backbone(recipe: BackboneRecipe, shipped: LoadedBackbone | None) -> LoadedBackbone:
    """The backbone, loaded once per worker process (or the object the driver shipped)."""
    bb = shipped if shipped is not None else _backbones.get(recipe.cache_key)
    if bb is None:
        bb = load_backbone(recipe.model, weights=recipe.weights, revision=recipe.revision)
        if recipe.adapter is not None:
            bb = apply_adapter(recipe.adapter, bb)
        _backbones[recipe.cache_key] = bb
    if bb.key_name != recipe.key_name or bb.weights.get("sha256") != recipe.sha256:
        raise ClusterError(
            f"this worker loaded {bb.key_name} with weights sha256 {bb.weights.get('sha256')}, the driver "
            f"{recipe.key_name} with {recipe.sha256}: give every machine the same weights (or --revision)"
        )
    return bb


def _compute_chunks(job: _Job, inputs: tuple, source: CellSource, chunks: list[int]) -> dict[str, Any]:
    """One task: compute, write and mark done ``chunks`` of the job's feature set (``source``: their cells)."""
    perturbation, subset, working_size, shipped = inputs
    dev = _worker_device(job.compute.device.type)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # the cluster's processes are the parallelism
    opts = job.compute.options
    if opts.num_workers and multiprocessing.current_process().daemon:
        raise ClusterError(
            "decode workers (--num-workers > 0) need non-daemonic Dask workers: start them with "
            "distributed.worker.daemon: False, or use --num-workers 0"
        )
    bb = _worker_backbone(job.recipe, shipped)
    store = open_store(job.store_url, mode="a")
    ds = store.dataset(job.dataset)
    fs = FeatureSet(ds, job.key)
    plan = ExtractPlan(source=source, backbone=bb, store=store, dataset=ds, compute=replace(job.compute, device=dev))
    cells = Cells(
        source,
        working_size=working_size,
        perturbation=perturbation,
        subset=subset,
        max_image_pixels=opts.max_image_pixels,
    )
    result = ExtractResult(store.url, ds.name, job.key, ds.n, cache_hit=False)
    start = time.perf_counter()
    try:
        run_chunks(plan, cells, fs, chunks, result)
    except ExtractionError as e:  # deterministic (an unreadable cell under fail, non-finite values): no retry
        return {"error": str(e)}
    return {
        "chunks_written": result.chunks_written,
        "cells_computed": result.cells_computed,
        "skipped": [list(s) for s in result.skipped],
        "seconds": time.perf_counter() - start,
        "pid": os.getpid(),
        "rows": int(np.sum([fs.chunk_rows(c).stop - fs.chunk_rows(c).start for c in chunks])),
    }
