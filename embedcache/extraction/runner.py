"""``extract``: image files in, a finished, verified feature set in the store out.

:func:`extract` checks the options, loads the backbone, makes the plan (:mod:`.plan`) and computes each
feature set's pending chunks, in this process (:mod:`.pipeline`) or as Dask tasks (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedcache.backbones.devices import resolve_device, resolve_dtype
from embedcache.backbones.forward import is_cnn
from embedcache.backbones.loading import LoadedBackbone, load_backbone
from embedcache.backbones.pooling import check_pools, parse_pools
from embedcache.backbones.precision import choose_dtype
from embedcache.backbones.preprocess import Preprocessing
from embedcache.backbones.registry import list_models
from embedcache.backbones.tail import check_k, tail_token_shape
from embedcache.extraction.distributed import BackboneRecipe, DaskRun, check_cluster_args
from embedcache.extraction.options import ExtractOptions
from embedcache.extraction.pipeline import Cells, run_chunks, say_token_size
from embedcache.extraction.plan import (
    WORKING_SIZE_DEFAULT,
    WORKING_SIZE_GIVEN,
    Compute,
    ExtractionError,
    ExtractPlan,
    ExtractResult,
    Variant,
    fingerprint,
    provenance,
    settle_dtype,
    stored_dtype,
)
from embedcache.inputs.perturb import parse_perturbations
from embedcache.inputs.sources import CellSource, SourceError, label_collisions, open_source
from embedcache.inputs.urls import refuse_credentials
from embedcache.options import UNSET, given
from embedcache.store import FeatureSet, StoreError, open_store, safe_key

__all__ = ["extract", "ExtractResult", "ExtractionError", "ExtractOptions"]


def extract(
    model: str,
    data: str | os.PathLike | np.ndarray | CellSource,
    out: str | os.PathLike,
    *,
    dataset: str | None = UNSET,
    weights: str | os.PathLike | None = UNSET,
    pool: str | Sequence[str] | None = UNSET,
    device: str = UNSET,
    batch_size: int = UNSET,
    working_size: int | None = UNSET,
    perturb: str | Sequence[str] | None = UNSET,
    tail_blocks: int | None = UNSET,
    labels: Sequence[Any] | None = None,
    backbone: LoadedBackbone | None = None,
    options: ExtractOptions | None = None,
    **more: Any,
) -> ExtractResult:
    """Extract pooled features of ``data`` with backbone ``model`` into the store ``out``.

    The common options are keywords here; every other field of :class:`ExtractOptions` (``dtype``,
    ``store_dtype``, ``chunk_size``, ``on_error``, ``num_workers``, ``max_image_pixels``, ``adapter``,
    ``cluster``, ``scheduler``, ``progress`` ...) is a keyword too, or comes in ``options``; a keyword
    given here replaces the same field of ``options``.

    Rerunning the same call is a cache hit; a killed run resumes where it stopped. ``working_size`` resizes
    every cell to S×S first; each ``perturb`` value (e.g. ``"blur-post:0.4,0.8"``) becomes its own feature set
    beside the clean one, computed for the cells of the test split (``perturb_rows="test"``, or all cells when
    the data has no split column — reported) or for all cells (``"all"``). ``labels`` label an in-memory
    array of images; ``backbone`` passes an already loaded backbone. Returns the clean feature set's result;
    perturbed ones are in ``result.variants``; ``result.notes`` says what in the input deserves a look.

    ``name`` gives the features a short name in the store's keys, which studies then take as ``model`` (the
    features of a weights file are otherwise ``<backbone>@<sha256 prefix>``).

    ``tail_blocks=k`` also caches the tokens entering the last ``k`` blocks (what ``ft-last`` / ``lora``
    train on). ``dtype="auto"`` takes the fastest compute dtype that passes on this device
    (:func:`embedcache.backbones.precision.choose_dtype`); a feature set started in one dtype is always
    continued in it. ``cluster="local:N"`` or ``scheduler="tcp://host:8786"`` computes the pending chunks as
    Dask tasks, bitwise equal to one process (:mod:`embedcache.extraction.distributed`).
    """
    opts = ExtractOptions.build(
        options,
        **given(
            dataset=dataset,
            weights=weights,
            pool=pool,
            device=device,
            batch_size=batch_size,
            working_size=working_size,
            perturb=perturb,
            tail_blocks=tail_blocks,
        ),
        **more,
    )
    refuse_credentials(str(out), "store", StoreError)  # before any library (fsspec, botocore) sees or prints it
    if isinstance(data, (str, os.PathLike)):
        refuse_credentials(str(data), "data", SourceError)
    if opts.cluster is not None or opts.scheduler is not None:
        check_cluster_args(opts.cluster, opts.scheduler, str(out))  # before any model is loaded
    if isinstance(data, CellSource):
        source = data
    else:
        source = open_source(data, labels=labels, label_column=opts.label_column, name=opts.dataset)
    dev = resolve_device(opts.device)
    resolve_dtype(opts.dtype, dev)  # a bad name fails before any model is built
    bb = backbone or load_backbone(model, weights=opts.weights, revision=opts.revision)
    if opts.adapter is not None:
        from embedcache.backbones.adapters import apply_adapter

        bb = apply_adapter(opts.adapter, bb)
    spec = bb.spec
    if opts.name is not None and opts.name != spec.name and opts.name in {m.name for m in list_models()}:
        raise ValueError(
            f"name {opts.name!r} is a registry backbone: studies would take these {spec.name} features for it; "
            "choose another --name (name=)"
        )
    choice = choose_dtype(opts.dtype, dev, bb)
    if opts.compile and (spec.embed is not None or opts.tail_blocks is not None):
        raise ValueError("--compile works for timm-pooled backbones without an embed hook and without --tail-blocks")
    if opts.tail_blocks is not None:
        check_k(bb, opts.tail_blocks)  # beyond the depth: a clear error before anything is written
    pools = parse_pools(opts.pool, spec.default_pool)
    if spec.embed is None:  # an embed hook says itself which pools it can give
        check_pools(pools, bb.num_prefix_tokens, spec.name)
    prep = Preprocessing(
        size=opts.input_size or spec.input_size,
        interpolation=opts.interpolation or spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        fit=opts.fit,
    )
    perturbations = parse_perturbations(opts.perturb)
    # The working size S: what the perturbations are measured on (blur-pre blurs before resizing to S,
    # blur-post after). Without --working-size the perturbed sets use the model's input size, so the two blurs
    # differ whenever the cells are not already that size; the clean set keeps the model's own resize.
    if opts.working_size is not None:
        ws, ws_from = opts.working_size, WORKING_SIZE_GIVEN
    else:
        ws, ws_from = prep.size, WORKING_SIZE_DEFAULT
    if perturbations and opts.working_size is None and prep.fit != "squash":
        raise ValueError(
            f"perturbations without --working-size resize each cell to the input size {prep.size}×{prep.size} "
            f"(squashing non-square cells) while the clean set uses --fit {prep.fit}: pass --working-size "
            "(working_size=) to resize every set, clean included, the same way"
        )
    prep_tag = prep.tag() + (f"-ws{opts.working_size}" if opts.working_size else "")
    token_shape = tail_token_shape(bb, opts.tail_blocks, prep.size) if opts.tail_blocks is not None else None
    store = open_store(out, mode="a")
    ds = store.require_dataset(source, name=opts.dataset)
    source = source.as_stored(str(ds.attrs["digest"]))  # a store written under older ids: report its ids
    subset_rule, subset = "all", None
    if perturbations and opts.perturb_rows == "test":
        test = source.table["split"].to_numpy() == "test"
        if test.any():
            subset_rule, subset = "split == test", test
        else:
            subset_rule = "all (the data has no split column with 'test' cells)"
    compute = Compute(
        options=opts,
        pools=pools,
        prep=prep,
        width=int(spec.width),
        device=dev,
        dtype=choice.dtype,
        dtype_choice=choice,
        channels_last=is_cnn(bb.model),
        token_shape=token_shape,
    )
    plan = ExtractPlan(source=source, backbone=bb, store=store, dataset=ds, compute=compute)
    base = f"{safe_key(opts.name or bb.key_name)}/{prep_tag}"
    with contextlib.ExitStack() as stack:
        dask = None
        if opts.cluster is not None or opts.scheduler is not None:
            recipe = BackboneRecipe.of(model, opts.weights, opts.revision, opts.adapter, bb)
            shipped = bb if backbone is not None else None  # as used here: adapter applied
            dask = stack.enter_context(DaskRun.open(opts, recipe=recipe, device=dev, backbone=shipped))
        given_ws = opts.working_size is not None
        clean = Variant(
            key=f"{base}/clean", working_size=opts.working_size, working_size_from=ws_from if given_ws else None
        )
        result = _extract_variant(plan, clean, dask)
        result.notes += label_collisions(source.table["label"])
        if perturbations and not given_ws:
            result.notes.append(
                f"perturbations measured on working size {ws} ({ws}×{ws} cells), the backbone's input size (no "
                f"--working-size): blur-pre blurs each cell before resizing it to {ws}, blur-post after; "
                "the clean set keeps the model's own resize"
            )
        for p in perturbations:
            variant = Variant(
                key=f"{base}/{p.name}",
                perturbation=p,
                subset=subset,
                subset_rule=subset_rule,
                working_size=ws,
                working_size_from=ws_from,
            )
            result.variants.append(_extract_variant(plan, variant, dask))
            result.notes += result.variants[-1].notes
    return result


def _extract_variant(plan: ExtractPlan, variant: Variant, dask: DaskRun | None) -> ExtractResult:
    """Compute the pending chunks of one feature set (none: a cache hit), here or on ``dask``."""
    ds, store = plan.dataset, plan.store
    with store.lock(f"features::{ds.name}::{variant.key}"):
        plan, note = settle_dtype(plan, stored_dtype(ds, variant.key), variant.key)
        c = plan.compute
        fs = ds.require_feature_set(
            variant.key,
            width=c.width,
            pools=c.pools,
            chunk_size=c.options.chunk_size,
            dtype=c.options.store_dtype,
            tokens={n: shape for n, (shape, _) in c.arrays.items() if n not in c.pools},
            provenance=provenance(plan, variant),
            fingerprint=fingerprint(plan, variant),
        )
        pending = fs.pending_chunks(list(c.arrays))
        if pending and len(pending) < fs.n_chunks:  # a resume: the done chunks must still be of these images
            pending = _check_inputs(plan, fs, pending)
        result = ExtractResult(store.url, ds.name, variant.key, ds.n, cache_hit=not pending)
        result.notes += [note] if note else []
        if not pending:
            return result
        if c.options.tail_blocks is not None and c.options.progress:
            say_token_size(c, fs, pending, sys.stderr)
        start = time.perf_counter()
        if dask is not None:
            dask.run(plan, variant, fs, pending, result)
        else:
            cells = Cells(
                plan.source,
                working_size=variant.working_size,
                perturbation=variant.perturbation,
                subset=variant.subset,
                max_image_pixels=c.options.max_image_pixels,
            )
            run_chunks(plan, cells, fs, pending, result)
        result.seconds = time.perf_counter() - start
    return result


def _check_inputs(plan: ExtractPlan, fs: FeatureSet, pending: list[int]) -> list[int]:
    """Compare the done chunks' recorded input fingerprints with the inputs now; a change fails naming the cells
    (``on_input_change="fail"``) or sends those chunks back to be computed (``"recompute"``)."""
    if not fs.records_inputs:
        return pending  # written before input fingerprints existed
    done = [c for c in range(fs.n_chunks) if c not in set(pending)]
    rows = np.concatenate([np.arange(fs.chunk_rows(c).start, fs.chunk_rows(c).stop) for c in done])
    recorded = fs.input_fingerprints(rows)
    known = recorded != 0  # 0: not fingerprinted (outside a perturbed subset, URLs)
    now = np.array([plan.source.fingerprint(int(i)) if k else 0 for i, k in zip(rows, known)], dtype=np.int64)
    changed = rows[known & (now != recorded)]
    if not len(changed):
        return pending
    if plan.options.on_input_change == "recompute":
        again = sorted({int(i) // fs.chunk_size for i in changed})
        fs.clear_done(again)
        return sorted(set(pending) | set(again))
    shown = ", ".join(plan.source.cell_id(int(i)) for i in changed[:5]) + (" ..." if len(changed) > 5 else "")
    raise ExtractionError(
        f"the images of {len(changed)} cells changed since their chunks of '{fs.key}' were written (e.g. {shown}): "
        "resuming would mix features of the old and the new images in one set. Rerun with --on-input-change "
        "recompute (on_input_change='recompute') to compute those chunks again, or restore the images"
    )
