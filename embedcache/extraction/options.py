"""Every option of an extraction, declared once (:class:`ExtractOptions`).

``embedcache extract``'s flags are generated from these fields, :func:`embedcache.extract` takes the object
(``options=``) or any field as a keyword, and the plan and each Dask task carry it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS
from embedcache.options import Interval, OneOf, Options, option

ON_ERROR = ("fail", "skip")
STORE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
FITS = ("squash", "crop", "pad")
INTERPOLATIONS = ("bicubic", "bilinear")
PERTURB_ROWS = ("test", "all")
SHORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def short_name(name: str, value: Any) -> str | None:
    """A feature set's short name: letters, digits, '.', '_', '-' (no '/', '@' or ':', which keys and backbone
    names use), at most 64 characters."""
    if value is None or (isinstance(value, str) and SHORT_NAME.fullmatch(value)):
        return None
    return f"must be letters, digits, '.', '_' or '-' (at most 64, no '/', '@' or ':'), got {value!r}"


@dataclass(frozen=True)
class ExtractOptions(Options):
    """How one extraction runs. Defaults are the backbone's own where a field is None."""

    dataset: str | None = option(None, "dataset name inside the store (default: from the data path)")
    weights: str | None = option(None, "local .safetensors / torch checkpoint, or 'random' (tests and demos)")
    name: str | None = option(
        None,
        "a short name for these features in the store (e.g. lite0-chula for a --weights file): studies take it as "
        "--model (default: the backbone's name; with --weights FILE, name@<sha256 prefix>)",
        check=short_name,
    )
    revision: str | None = option(None, "hub revision (branch, tag or commit)")
    pool: str | None = option(None, "cls, mean or cls,mean (default: the backbone's)")
    input_size: int | None = option(None, "model input size (default: the backbone's)", check=Interval(int, 8))
    interpolation: str | None = option(
        None, "bicubic or bilinear (default: the backbone's)", check=OneOf(INTERPOLATIONS, none_ok=True)
    )
    fit: str = option("squash", "non-square cells: squash, crop (shorter side + centre crop) or pad", check=OneOf(FITS))
    batch_size: int = option(64, "cells per forward pass", check=Interval(int, 1, none_ok=False))
    num_workers: int | None = option(
        None, "decode workers (default: by device)", flags=("--num-workers", "--workers"), check=Interval(int, 0)
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    dtype: str = option(
        "auto",
        "compute dtype: auto (fastest that passes: fp16/bf16 on CUDA, bf16 on CPUs with native bf16, else fp32; "
        "see check-precision), bfloat16, float32, float16",
        check=OneOf(COMPUTE_DTYPES),
    )
    store_dtype: str = option("float16", "stored feature dtype: float16 or float32", check=OneOf(STORE_DTYPES))
    chunk_size: int = option(
        1024, "cells per stored row-chunk (the unit of resume)", check=Interval(int, 1, none_ok=False)
    )
    on_error: str = option(
        "fail", "unreadable image: fail (stop, naming it) or skip (record and go on)", check=OneOf(ON_ERROR)
    )
    label_column: str | None = option("label", "manifest column holding the labels (None: no labels)")
    working_size: int | None = option(
        None,
        "resize every cell to S×S first (the small-patch protocol uses 40); perturbed sets without it use the "
        "model's input size",
        check=Interval(int, 4),
    )
    perturb: tuple[str, ...] | None = option(
        None,
        "kind:values, repeatable, e.g. blur-post:0.4,0.8 (kinds: blur-pre, blur-post, jpeg, noise)",
    )
    perturb_rows: str = option(
        "test",
        "perturb the test split's cells (test; all cells when there is no split) or all",
        check=OneOf(PERTURB_ROWS),
    )
    max_image_pixels: int | None = option(
        DEFAULT_MAX_IMAGE_PIXELS,
        "refuse larger images (read from the header, before decoding); a recorded skip under --on-error skip",
        check=Interval(int, 1),
    )
    on_input_change: str = option(
        "fail",
        "a resumed set whose done chunks' images changed since they were written (size or mtime): fail (naming "
        "the cells) or recompute (those chunks again)",
        check=OneOf(("fail", "recompute")),
    )
    tail_blocks: int | None = option(
        None,
        "also cache the tokens entering the last k blocks (for probes ft-last / lora); prints the store size first",
        check=Interval(int, 1),
    )
    adapter: str | None = option(None, "embed with a fine-tuned model saved by --save-adapter DIR")
    compile: bool = option(False, "torch.compile the backbone (slow first batch; opt-in)", flags=("--compile",))
    cluster: str | None = option(None, "run on a Dask LocalCluster started for the job: local:N (N worker processes)")
    scheduler: str | None = option(None, "run on a running Dask cluster, e.g. tcp://head:8786 (workers must see --out)")
    progress: bool = option(
        True,
        "progress bar (plain lines when not a terminal); --quiet or -q: none",
        flags=("--progress/--no-progress", " /--quiet", " /-q"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.perturb, str):  # one spec given as a string
            object.__setattr__(self, "perturb", (self.perturb,))
        elif self.perturb is not None:
            object.__setattr__(self, "perturb", tuple(self.perturb))
        for name in ("weights", "adapter"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, str(value))  # a path-like
        super().__post_init__()
