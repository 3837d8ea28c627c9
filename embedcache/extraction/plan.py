"""What an extraction computes and where it writes, fixed before any cell is read.

:class:`Compute` says how every chunk is computed (options, pools, preprocessing, device, dtype): it is
small and picklable, and a Dask task carries it as it is. :class:`ExtractPlan` adds what the driver holds
(the cells, the loaded backbone, the store). :class:`Variant` is one feature set of a plan: the clean cells
or one perturbation. The provenance and fingerprint every feature set records come from here.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from embedcache.backbones.devices import cpu_has_native_bf16, resolve_dtype
from embedcache.backbones.loading import LoadedBackbone
from embedcache.backbones.precision import DtypeChoice
from embedcache.backbones.preprocess import Preprocessing
from embedcache.extraction.options import ExtractOptions
from embedcache.inputs.perturb import Perturbation
from embedcache.inputs.sources import CellSource
from embedcache.store import Store, WriteResult
from embedcache.store.dataset import Dataset
from embedcache.store.feature_set import FeatureSet, tokens_name

__all__ = ["Compute", "ExtractPlan", "Variant", "ExtractResult", "ExtractionError", "provenance", "fingerprint"]


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


@dataclass(frozen=True)
class Compute:
    """How every chunk of a plan is computed (picklable: a Dask task carries it as it is)."""

    options: ExtractOptions
    pools: tuple[str, ...]
    prep: Preprocessing
    width: int
    device: torch.device
    dtype: torch.dtype
    dtype_choice: DtypeChoice | None = None  # how dtype was chosen (provenance)
    channels_last: bool = False  # run a CNN in channels-last memory format
    token_shape: tuple[int, ...] | None = None  # one cell's tail tokens (options.tail_blocks)

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every array a chunk writes: name -> (shape per cell, dtype)."""
        out: dict[str, tuple[tuple[int, ...], str]] = {p: ((self.width,), self.options.store_dtype) for p in self.pools}
        if self.options.tail_blocks is not None and self.token_shape is not None:
            out[tokens_name(self.options.tail_blocks)] = (self.token_shape, "float16")
        return out

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass(frozen=True)
class ExtractPlan:
    """The driver's plan: the cells, the loaded backbone, the store and dataset, and :class:`Compute`."""

    source: CellSource
    backbone: LoadedBackbone
    store: Store
    dataset: Dataset
    compute: Compute

    @property
    def options(self) -> ExtractOptions:
        return self.compute.options


@dataclass(frozen=True)
class Variant:
    """One feature set of a plan: the clean cells, or one perturbation of the cells in ``subset``."""

    key: str
    perturbation: Perturbation | None = None
    subset: np.ndarray | None = None  # rows to compute (None: all)
    subset_rule: str = "all"
    working_size: int | None = None  # S the cells are resized to first (None: none)
    working_size_from: str | None = None  # where S came from (WORKING_SIZE_GIVEN / WORKING_SIZE_DEFAULT)


WORKING_SIZE_GIVEN = "--working-size / working_size="
WORKING_SIZE_DEFAULT = "the backbone's input size (default)"


def fingerprint(plan: ExtractPlan, variant: Variant) -> dict[str, Any]:
    """What makes a feature set what it is; another value of any field is another set (or a conflict)."""
    bb, c = plan.backbone, plan.compute
    return {
        "backbone": bb.key_name,
        "weights_sha256": bb.weights.get("sha256"),
        "preprocessing": c.prep.as_dict(),
        "working_size": variant.working_size,
        "perturbation": variant.perturbation.name if variant.perturbation else None,
        "rows": variant.subset_rule,
        "store_dtype": c.options.store_dtype,
        "compute_dtype": c.dtype_name,
    }


def provenance(plan: ExtractPlan, variant: Variant) -> dict[str, Any]:
    """The full record of how a feature set was made (attrs of the set; never a token or a secret)."""
    import timm

    from embedcache import __version__

    bb, c = plan.backbone, plan.compute
    dev = c.device
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
    choice = c.dtype_choice
    return {
        "name": c.options.name,  # the short name the user gave (the key's first part), else None
        "backbone": backbone,
        "weights": dict(bb.weights),
        "preprocessing": c.prep.as_dict(),
        "working_size": variant.working_size,
        "working_size_from": variant.working_size_from,
        "perturbation": None
        if perturbation is None
        else {"kind": perturbation.kind, "param": perturbation.param, "rows": variant.subset_rule},
        "pools": list(c.pools),
        "compute": {
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "dtype": c.dtype_name,
            "dtype_requested": choice.requested if choice else None,
            "dtype_reason": choice.reason if choice else None,
            "precision_check": choice.check if choice else None,
            "cpu_native_bf16": cpu_has_native_bf16() if dev.type == "cpu" else None,
            "compile": c.options.compile,
            "channels_last": c.channels_last,
            "inference_mode": True,
        },
        "store_dtype": c.options.store_dtype,
        "versions": {
            "embedcache": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def stored_dtype(ds: Dataset, key: str) -> str | None:
    """The compute dtype an existing feature set was started with (None: no such set, or one from before)."""
    if key not in ds.feature_keys():
        return None
    value = FeatureSet(ds, key).attrs.get("fingerprint_fields", {}).get("compute_dtype")
    return str(value) if value else None


def settle_dtype(plan: ExtractPlan, stored: str | None, key: str) -> tuple[ExtractPlan, str | None]:
    """Never mix dtypes in one feature set: adopt the stored dtype under ``auto``, refuse otherwise."""
    c = plan.compute
    now = c.dtype_name
    if stored is None or stored == now:
        return plan, None
    choice = c.dtype_choice
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
        dt = resolve_dtype(stored, c.device)
    except ValueError as e:
        raise ExtractionError(
            f"feature set '{key}' was started in {stored}, which {c.device.type} here cannot compute ({e}); "
            f"resume it on a machine like the one that started it, or extract into another store"
        ) from e
    adopted = DtypeChoice(stored, "auto", f"adopted from the existing feature set (auto here: {now})")
    note = (
        f"feature set '{key}' was started in {stored}: continuing in {stored}, not {now} (what auto picks on "
        "this machine), so that one feature set never mixes dtypes"
    )
    return replace(plan, compute=replace(c, dtype=dt, dtype_choice=adopted)), note
