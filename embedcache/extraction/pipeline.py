"""The extraction pipeline: image files in, a finished feature set in the store out.

decode (DataLoader workers) -> uint8 to the device -> resize + normalise there ->
frozen backbone under inference_mode (+ autocast) -> pool -> writer thread -> Zarr.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from embedcache.backbones.devices import DTYPES, cpu_has_native_bf16, resolve_device, resolve_dtype
from embedcache.backbones.loading import LoadedBackbone, load_backbone
from embedcache.backbones.pooling import check_pools, embed, parse_pools
from embedcache.backbones.precision import DtypeChoice, choose_dtype
from embedcache.backbones.preprocess import Preprocessing, to_model_input
from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, StorageFetchError
from embedcache.inputs.perturb import Perturbation, parse_perturbations
from embedcache.inputs.perturb import apply as perturb_apply
from embedcache.inputs.sources import CellSource, label_collisions, open_source
from embedcache.progress import progress as progress_bar
from embedcache.store.store import (
    OUTSIDE_SUBSET,
    STORE_DTYPES,
    Dataset,
    FeatureSet,
    Store,
    WriteResult,
    open_store,
    safe_key,
    tokens_name,
)

if TYPE_CHECKING:
    from embedcache.backbones.tail import TailModule
    from embedcache.extraction.distributed import DaskRun

ON_ERROR = ("fail", "skip")
__all__ = [
    "extract",
    "ExtractResult",
    "ExtractionError",
    "ExtractPlan",
    "Variant",
    "compute_batch",
    "default_workers",
    "resolve_device",
    "resolve_dtype",
    "DTYPES",
    "ON_ERROR",
]


class ExtractionError(RuntimeError):
    """Extraction stopped: an unreadable image under ``on_error='fail'``, or bad features."""


@dataclass
class ExtractResult(WriteResult):
    """What one ``extract`` call did."""

    cells_computed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cell id, reason), this run
    seconds: float = 0.0
    variants: list[ExtractResult] = field(default_factory=list)  # perturbed feature sets
    notes: list[str] = field(default_factory=list)  # things about the input worth a word (label spellings, ...)

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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    tail_blocks: int | None = None,
    adapter: str | os.PathLike | None = None,
    compile: bool = False,
    cluster: str | None = None,
    scheduler: str | None = None,
) -> ExtractResult:
    """Extract pooled features of ``data`` with backbone ``model`` into the store ``out``.

    Rerunning the same call is a cache hit; a killed run resumes where it stopped.
    ``working_size`` resizes every cell to S×S first; each ``perturb`` value (e.g.
    ``"blur-post:0.4,0.8"``) becomes its own feature set beside the clean one, computed
    for the cells of the test split (``perturb_rows="test"``, or all cells when the data
    has no split column — reported) or for all cells (``"all"``). ``backbone`` may pass an
    already loaded backbone. ``max_image_pixels`` refuses larger images from their header,
    before decoding (``None``: no limit); under ``on_error="skip"`` such a cell is a recorded
    skip. Returns the clean feature set's result; perturbed ones are in ``result.variants``;
    ``result.notes`` says what in the input deserves a look (e.g. labels ``1`` / ``01`` / ``1.0``,
    kept as distinct classes).

    ``tail_blocks=k`` also caches, beside the pooled features, the tokens entering the last ``k``
    blocks (ViT / Eva: CLS, registers and patch tokens; CNNs: the input feature map of the last
    ``k`` stages) as float16, chunk by chunk with the same guarantees: what fine-tunes of the tail
    (``probes`` ``ft-last`` / ``lora``) train on. The store size they take is printed first.
    ``adapter`` embeds with a fine-tuned model saved by ``probes ... --save-adapter DIR`` (its base
    backbone is ``model``, loaded as usual, or the one named in the adapter): a new feature set
    with its own key.

    ``dtype="auto"`` takes the fastest compute dtype that passes on this device
    (:func:`embedcache.backbones.precision.choose_dtype`: never one the registry entry forbids or whose recorded
    check failed). A feature set started in one dtype is always continued in it: under ``auto`` the stored
    dtype is adopted (said in ``result.notes``), or the run is refused when this device cannot compute it;
    an explicit other ``dtype`` is refused. ``compile=True`` runs the backbone's ``forward_features``
    through ``torch.compile`` (timm-pooled backbones without ``tail_blocks``; measured no faster on a 2-core
    AVX2 EPYC after a ~50 s compile, hence opt-in). CNNs run channels-last (resnet18 on that CPU: 1.35x).

    ``cluster="local:N"`` runs the pending chunks on a Dask LocalCluster of N processes started for this
    call (a LocalCUDACluster, one GPU per worker, when dask-cuda is installed and the device is CUDA);
    ``scheduler="tcp://host:8786"`` on a running Dask cluster. Each worker loads the backbone once, writes
    its chunks and flips their done flags; the result is bitwise equal to a single-process run, a killed
    worker's chunks are retried, and a rerun computes only missing chunks (:mod:`embedcache.extraction.distributed`).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be positive or None, got {max_image_pixels}")
    if cluster is not None or scheduler is not None:
        from embedcache.extraction.distributed import check_cluster_args

        check_cluster_args(cluster, scheduler, str(out))  # before any model is loaded
    if isinstance(data, CellSource):
        source = data
    else:
        source = open_source(data, labels=labels, label_column=label_column, name=dataset)
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # a bad name fails before any model is built
    bb = backbone or load_backbone(model, weights=weights, revision=revision)
    if adapter is not None:
        from probes.tuning.adapter import load_adapter  # the format belongs with the fine-tunes that write it

        bb = cast(LoadedBackbone, load_adapter(adapter, backbone=bb).backbone)  # Adapter.backbone is typed object
    spec = bb.spec
    choice = choose_dtype(dtype, dev, bb)
    if compile and (spec.embed is not None or tail_blocks is not None):
        raise ValueError("--compile works for timm-pooled backbones without an embed hook and without --tail-blocks")
    token_shape = None
    if tail_blocks is not None:
        from embedcache.backbones.tail import check_k, tail_token_shape

        check_k(bb, tail_blocks)  # beyond the depth: a clear error before anything is written
    pools = parse_pools(pool, spec.default_pool)
    if spec.embed is None:  # an embed hook says itself which pools it can give
        check_pools(pools, bb.num_prefix_tokens, spec.name)
    prep = Preprocessing(
        size=input_size or spec.input_size,
        interpolation=interpolation or spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        fit=fit,
    )
    if working_size is not None and working_size < 4:
        raise ValueError(f"working size {working_size} is too small")
    perturbations = parse_perturbations(perturb)
    if perturb_rows not in ("test", "all"):
        raise ValueError(f"perturb_rows must be 'test' or 'all', got {perturb_rows!r}")
    prep_tag = prep.tag() + (f"-ws{working_size}" if working_size else "")
    if tail_blocks is not None:
        token_shape = tail_token_shape(bb, tail_blocks, prep.size)
    store = open_store(out, mode="a")
    ds = store.require_dataset(source, name=dataset)
    source = source.as_stored(str(ds.attrs["digest"]))  # a store written under older ids: report its ids
    subset_rule, subset = "all", None
    if perturbations and perturb_rows == "test":
        test = source.table["split"].to_numpy() == "test"
        if test.any():
            subset_rule, subset = "split == test", test
        else:
            subset_rule = "all (the data has no split column with 'test' cells)"
    plan = ExtractPlan(
        source=source,
        backbone=bb,
        store=store,
        dataset=ds,
        pools=pools,
        prep=prep,
        working_size=working_size,
        device=dev,
        compute_dtype=choice.dtype,
        dtype_choice=choice,
        compile=compile,
        channels_last=is_cnn(bb.model),
        store_dtype=store_dtype,
        chunk_size=chunk_size,
        batch_size=batch_size,
        num_workers=num_workers,
        on_error=on_error,
        progress=progress,
        max_image_pixels=max_image_pixels,
        tail_blocks=tail_blocks,
        token_shape=token_shape,
    )
    base = f"{safe_key(bb.key_name)}/{prep_tag}"
    with contextlib.ExitStack() as stack:
        if cluster is not None or scheduler is not None:
            from embedcache.extraction.distributed import BackboneRecipe, DaskRun

            recipe = BackboneRecipe.of(model, weights, revision, adapter, bb)
            plan = replace(
                plan,
                dask=stack.enter_context(
                    DaskRun.open(
                        cluster=cluster,
                        scheduler=scheduler,
                        recipe=recipe,
                        device=dev,
                        num_workers=num_workers,
                        backbone=bb if backbone is not None else None,  # as used here: adapter applied
                    )
                ),
            )
        result = _extract_variant(plan, Variant(key=f"{base}/clean"))
        result.notes += label_collisions(source.table["label"])
        for p in perturbations:
            variant = Variant(key=f"{base}/{p.name}", perturbation=p, subset=subset, subset_rule=subset_rule)
            result.variants.append(_extract_variant(plan, variant))
            result.notes += result.variants[-1].notes
    return result


@dataclass(frozen=True)
class ExtractPlan:
    """What one ``extract`` call computes and where it writes: fixed before any cell is read."""

    source: CellSource
    backbone: LoadedBackbone
    store: Store
    dataset: Dataset
    pools: tuple[str, ...]
    prep: Preprocessing
    device: torch.device
    compute_dtype: torch.dtype
    store_dtype: str
    chunk_size: int
    batch_size: int
    num_workers: int | None
    on_error: str
    progress: bool
    working_size: int | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    tail_blocks: int | None = None  # also cache the tokens entering the last k blocks
    token_shape: tuple[int, ...] | None = None  # one cell's tail tokens
    dtype_choice: DtypeChoice | None = None  # how compute_dtype was chosen (provenance)
    compile: bool = False  # torch.compile the backbone's forward_features
    channels_last: bool = False  # run a CNN in channels-last memory format
    dask: DaskRun | None = None  # run the pending chunks on this Dask cluster (None: in this process)

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every array a chunk of this plan writes: name -> (shape per cell, dtype)."""
        out: dict[str, tuple[tuple[int, ...], str]] = {
            p: ((int(self.backbone.spec.width),), self.store_dtype) for p in self.pools
        }
        if self.tail_blocks is not None and self.token_shape is not None:
            out[tokens_name(self.tail_blocks)] = (self.token_shape, "float16")
        return out


@dataclass(frozen=True)
class Variant:
    """One feature set of a plan: the clean cells, or one perturbation of the cells in ``subset``."""

    key: str
    perturbation: Perturbation | None = None
    subset: np.ndarray | None = None  # rows to compute (None: all)
    subset_rule: str = "all"


def _extract_variant(plan: ExtractPlan, variant: Variant) -> ExtractResult:
    """Compute the pending chunks of one feature set (none: a cache hit)."""
    bb, ds, store = plan.backbone, plan.dataset, plan.store
    with store.lock(f"features::{ds.name}::{variant.key}"):
        plan, note = _settle_dtype(plan, _stored_dtype(ds, variant.key), variant.key)
        fs = ds.require_feature_set(
            variant.key,
            width=int(bb.spec.width),
            pools=plan.pools,
            chunk_size=plan.chunk_size,
            dtype=plan.store_dtype,
            tokens={n: shape for n, (shape, _) in plan.arrays.items() if n not in plan.pools},
            provenance=_provenance(plan, variant),
            fingerprint={
                "backbone": bb.key_name,
                "weights_sha256": bb.weights.get("sha256"),
                "preprocessing": plan.prep.as_dict(),
                "working_size": plan.working_size,
                "perturbation": variant.perturbation.name if variant.perturbation else None,
                "rows": variant.subset_rule,
                "store_dtype": plan.store_dtype,
                "compute_dtype": str(plan.compute_dtype).replace("torch.", ""),
            },
        )
        pending = fs.pending_chunks(list(plan.arrays))
        result = ExtractResult(store.url, ds.name, variant.key, ds.n, cache_hit=not pending)
        result.notes += [note] if note else []
        if not pending:
            return result
        if plan.tail_blocks is not None and plan.progress:
            _say_token_size(plan, fs, pending)
        start = time.perf_counter()
        if plan.dask is not None:
            plan.dask.run(plan, variant, fs, pending, result)
        else:
            cells = _Cells(
                plan.source,
                working_size=plan.working_size,
                perturbation=variant.perturbation,
                subset=variant.subset,
                max_image_pixels=plan.max_image_pixels,
            )
            _run(plan, cells, fs, pending, result)
        result.seconds = time.perf_counter() - start
    return result


def _stored_dtype(ds: Dataset, key: str) -> str | None:
    """The compute dtype an existing feature set was started with (None: no such set, or one from before)."""
    if key not in ds.feature_keys():
        return None
    value = FeatureSet(ds, key).attrs.get("fingerprint_fields", {}).get("compute_dtype")
    return str(value) if value else None


def _settle_dtype(plan: ExtractPlan, stored: str | None, key: str) -> tuple[ExtractPlan, str | None]:
    """Never mix dtypes in one feature set: adopt the stored dtype under ``auto``, refuse otherwise."""
    now = str(plan.compute_dtype).replace("torch.", "")
    if stored is None or stored == now:
        return plan, None
    choice = plan.dtype_choice
    if choice is not None and choice.requested != "auto":
        raise ExtractionError(
            f"feature set '{key}' was computed in {stored}; --dtype {now} would mix dtypes in one feature set. "
            f"Resume with --dtype {stored} (or auto), or extract into another store"
        )
    if stored in plan.backbone.spec.forbid_dtypes:
        raise ExtractionError(
            f"feature set '{key}' was started in {stored}, which {plan.backbone.spec.name!r} forbids "
            f"({plan.backbone.spec.forbid_dtypes[stored]}); delete it or extract into another store"
        )
    try:
        dt = resolve_dtype(stored, plan.device)
    except ValueError as e:
        raise ExtractionError(
            f"feature set '{key}' was started in {stored}, which {plan.device.type} here cannot compute ({e}); "
            f"resume it on a machine like the one that started it, or extract into another store"
        ) from e
    adopted = DtypeChoice(stored, "auto", f"adopted from the existing feature set (auto here: {now})")
    note = (
        f"feature set '{key}' was started in {stored}: continuing in {stored}, not {now} (what auto picks on "
        "this machine), so that one feature set never mixes dtypes"
    )
    return replace(plan, compute_dtype=dt, dtype_choice=adopted), note


def is_cnn(model: torch.nn.Module) -> bool:
    """A convolutional backbone (more than a patch-embedding conv): runs channels-last."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 3


# -- decoding -----------------------------------------------------------------------------------


OUTSIDE = OUTSIDE_SUBSET


class _Cells(TorchDataset):
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

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str]:
        i = int(self.rows[j])
        if self.subset is not None and not self.subset[i]:
            return i, None, OUTSIDE
        try:
            image = self.source.load(i, max_pixels=self.max_image_pixels)
            return i, perturb_apply(image, self.working_size, self.perturbation, row=i), ""
        except ImageDecodeError as e:
            return i, None, e.reason
        except StorageFetchError:  # not the image's fault: fail the batch (a task retry, or the rerun, refetches)
            raise
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
    groups = [
        (torch.tensor(js), torch.from_numpy(np.stack([items[j][1] for j in js])))  # type: ignore[misc]
        for js in by_shape.values()
    ]  # (only readable images are grouped)
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

    def __init__(self, fs: FeatureSet, arrays: dict[str, tuple[tuple[int, ...], str]], emit: Callable):
        self.fs, self.arrays, self.emit = fs, arrays, emit
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
                    "feats": {p: np.zeros((m, *shape), dtype=dt) for p, (shape, dt) in self.arrays.items()},
                    "ok": np.zeros(m, dtype=bool),
                    "error": np.full(m, "", dtype=object),
                    "filled": 0,
                }
                self.buffers[int(c)] = buf
            pos = rows[sel] - rng.start
            for p in self.arrays:
                buf["feats"][p][pos] = feats[p][sel]
            buf["ok"][pos] = ok[sel]
            buf["error"][pos] = np.asarray(errors, dtype=object)[sel]
            buf["filled"] += int(sel.sum())
            if buf["filled"] == rng.stop - rng.start:
                del self.buffers[int(c)]
                self.emit((int(c), buf["feats"], buf["ok"], buf["error"].astype(str)))


# -- the loop -----------------------------------------------------------------------------------


def _run(plan: ExtractPlan, cells: _Cells, fs: FeatureSet, pending: Sequence[int], result: ExtractResult) -> None:
    """Decode, compute and write the ``pending`` chunks of ``fs``, counting into ``result``."""
    source, bb, pools, dev = plan.source, plan.backbone, plan.pools, plan.device
    cells.rows = np.concatenate([np.arange(fs.chunk_rows(c).start, fs.chunk_rows(c).stop) for c in pending])
    rows = cells.rows
    workers = default_workers(dev) if plan.num_workers is None else plan.num_workers
    loader = DataLoader(
        cells,
        batch_sampler=_chunk_aligned_batches(fs, pending, plan.batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    model = bb.model.to(dev).eval()
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if plan.compile:
        model = compiled(model)
    writer = _ChunkWriter(fs)
    writer.start()
    arrays = plan.arrays
    assembler = _ChunkAssembler(fs, arrays, writer.put)
    tail = None
    if plan.tail_blocks is not None:
        from embedcache.backbones.tail import TailModule

        tail = TailModule(bb, plan.tail_blocks, pool=pools[0]).to(dev).eval()
    bar = progress_bar(len(rows), f"extract {bb.spec.name} → {fs.key}", enabled=plan.progress)
    try:
        for batch in loader:
            rows_b = batch["rows"].numpy()
            errors = batch["errors"]
            ok = np.array([e == "" for e in errors])
            outside = np.array([e == OUTSIDE for e in errors])
            if plan.on_error == "fail" and not (ok | outside).all():
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
                        plan.prep,
                        dev,
                        plan.compute_dtype,
                        pools,
                        bb.num_prefix_tokens,
                        embed_fn=None if plan.compile else bb.embed,
                        channels_last=plan.channels_last,
                    )
                else:
                    out = compute_batch_with_tokens(bb, tail, groups, plan, dev)
                for name in arrays:
                    if name not in pools:
                        feats[name][order] = out[name]
                for p in pools:
                    values = out[p].astype(plan.store_dtype)
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
            assembler.add(rows_b, feats, ok, errors)
            result.cells_computed += int((~outside).sum())
            bar.advance(len(rows_b))
    finally:
        bar.close()
        writer.close()
        result.chunks_written = writer.written


def compute_batch(
    model: torch.nn.Module,
    groups: Sequence[torch.Tensor],
    prep: Preprocessing,
    dev: torch.device,
    compute_dtype: torch.dtype,
    pools: Sequence[str],
    num_prefix_tokens: int,
    embed_fn: Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]] | None = None,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """Same-shape uint8 NHWC groups -> pooled float32 features (rows in group order).

    ``embed_fn(x, pools)`` (e.g. :meth:`LoadedBackbone.embed`, which honours a spec's ``embed`` hook)
    replaces the default timm-style pooling of ``model``. ``channels_last`` feeds the batch in that
    memory format (for a model converted with ``model.to(memory_format=torch.channels_last)``).
    """
    x = to_model_input(groups, prep, dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        if embed_fn is None:
            out = embed(model, x, pools, num_prefix_tokens)
        else:
            with torch.inference_mode():
                out = embed_fn(x, pools)
    return {p: v.float().cpu().numpy() for p, v in out.items()}


_compiled_models: weakref.WeakKeyDictionary[torch.nn.Module, _Compiled] = weakref.WeakKeyDictionary()


def compiled(model: torch.nn.Module) -> _Compiled:
    """``model`` with ``forward_features`` through ``torch.compile``, made once per model object in this
    process: a Dask worker's tasks (one per chunk) reuse one compiled backbone instead of compiling for each."""
    hit = _compiled_models.get(model)
    if hit is None:
        hit = _compiled_models[model] = _Compiled(model)
    return hit


class _Compiled(torch.nn.Module):
    """A timm model whose ``forward_features`` runs through ``torch.compile`` (what :func:`embed` calls)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        net: Any = model
        self.forward_features = torch.compile(net.forward_features, dynamic=False)
        self.forward_head = net.forward_head


def compute_batch_with_tokens(
    bb: LoadedBackbone, tail: TailModule, groups: Sequence[torch.Tensor], plan: ExtractPlan, dev: torch.device
) -> dict[str, np.ndarray]:
    """Pooled features and the tokens entering the last k blocks, from one forward pass: the frozen
    prefix gives the tokens, the backbone's own tail turns them into the pooled features."""
    from embedcache.backbones.tail import tail_tokens

    assert plan.tail_blocks is not None
    x = to_model_input(groups, plan.prep, dev)
    dt = plan.compute_dtype
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
        tokens = tail_tokens(bb, x, plan.tail_blocks)
        out = tail.embed(tokens, plan.pools)
    result = {p: v.float().cpu().numpy() for p, v in out.items()}
    values = tokens.float().cpu().numpy().astype(np.float16)
    if not np.isfinite(values).all():
        raise ExtractionError("non-finite tail tokens (float16 overflow?): try --dtype float32")
    result[tokens_name(plan.tail_blocks)] = values
    return result


def _say_token_size(plan: ExtractPlan, fs: FeatureSet, pending: Sequence[int]) -> None:
    """Print, before starting, what the tail tokens will take in the store."""
    import sys

    assert plan.token_shape is not None
    per_cell = 2 * int(np.prod(plan.token_shape))
    cells = sum(fs.chunk_rows(c).stop - fs.chunk_rows(c).start for c in pending)
    shape = " x ".join(map(str, plan.token_shape))
    print(
        f"tail tokens ({plan.tail_blocks} block(s)): {shape} float16 = {per_cell / 1024:,.1f} KB per cell; "
        f"{cells:,} cells to write = {per_cell * cells / 2**30:,.2f} GiB before compression",
        file=sys.stderr,
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


def _provenance(plan: ExtractPlan, variant: Variant) -> dict[str, Any]:
    import timm

    from embedcache import __version__

    bb, dev = plan.backbone, plan.device
    spec = bb.spec
    backbone: dict[str, Any] = {
        "name": spec.name,
        "arch": spec.arch,
        "hub_id": spec.hub_id,
        "kwargs": dict(spec.kwargs),
        "layers": dict(spec.layers),
        "width": spec.width,
        "num_prefix_tokens": bb.num_prefix_tokens,
    }
    for hook in ("build", "embed"):  # a non-timm backbone: record which code built / pooled it
        fn = getattr(spec, hook)
        if fn is not None:
            backbone[hook] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    perturbation = variant.perturbation
    return {
        "backbone": backbone,
        "weights": dict(bb.weights),
        "preprocessing": plan.prep.as_dict(),
        "working_size": plan.working_size,
        "perturbation": None
        if perturbation is None
        else {"kind": perturbation.kind, "param": perturbation.param, "rows": variant.subset_rule},
        "pools": list(plan.pools),
        "compute": {
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "dtype": str(plan.compute_dtype).replace("torch.", ""),
            "dtype_requested": plan.dtype_choice.requested if plan.dtype_choice else None,
            "dtype_reason": plan.dtype_choice.reason if plan.dtype_choice else None,
            "precision_check": plan.dtype_choice.check if plan.dtype_choice else None,
            "cpu_native_bf16": cpu_has_native_bf16() if dev.type == "cpu" else None,
            "compile": plan.compile,
            "channels_last": plan.channels_last,
            "inference_mode": True,
        },
        "store_dtype": plan.store_dtype,
        "versions": {
            "embedcache": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
