"""Precision policy, measured: check each compute dtype against fp32 on real cells, record it, let ``auto`` obey.

:func:`check_precision` embeds a sample of the user's cells in float32 and in each lower dtype and compares:
per cell the cosine to the fp32 vector (the lowest over the pools) and ``||f - f32|| / ||f32||``; a dtype
passes when no cell is non-finite and the minimum cosine is >= ``threshold`` (0.999), unless the registry
entry forbids it (``BackboneSpec.forbid_dtypes``).

Where checks are recorded: one JSON file, ``precision.json`` in the user's cache folder
(``$EMBEDCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/embedcache``, else ``~/.cache/embedcache``), one entry per
(backbone name, weights SHA-256, device type): a check of random-init weights says nothing about pretrained
ones. :func:`choose_dtype` (what ``extract --dtype auto`` uses) takes the fastest dtype for the device at hand
(:func:`embedcache.backbones.devices.dtype_candidates`) that is neither forbidden nor failed in the recorded check; the
feature set's provenance keeps the choice, the reason and the check it relied on.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from embedcache.backbones.devices import DTYPES, cpu_has_native_bf16, dtype_candidates, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from embedcache.backbones.loading import LoadedBackbone
    from embedcache.inputs.sources import CellSource

__all__ = ["check_precision", "choose_dtype", "DtypeChoice", "recorded_check", "record_path", "THRESHOLD"]

THRESHOLD = 0.999
RECORD_VERSION = 1
COLUMNS = (
    "model",
    "device",
    "dtype",
    "n_cells",
    "min_cosine",
    "median_cosine",
    "max_rel_error",
    "non_finite_cells",
    "passed",
    "note",
)


def record_path() -> Path:
    """The JSON file holding recorded precision checks (see the module docstring for the folder)."""
    base = os.environ.get("EMBEDCACHE_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "precision.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "embedcache" / "precision.json"


def _key(model: str, weights_sha256: str | None, device_type: str) -> str:
    return f"{model}|{weights_sha256 or 'unknown-weights'}|{device_type}"


def _read_all() -> dict[str, Any]:
    path = record_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"the precision record {path} cannot be read ({e}); delete it and rerun check-precision"
        ) from e
    if data.get("version") != RECORD_VERSION:
        raise ValueError(f"the precision record {path} has version {data.get('version')!r}, expected {RECORD_VERSION}")
    return dict(data.get("checks", {}))


def recorded_check(model: str, weights_sha256: str | None, device_type: str) -> dict[str, Any] | None:
    """The recorded check of this backbone + weights on this device type, or None."""
    return _read_all().get(_key(model, weights_sha256, device_type))


def _save(entry: dict[str, Any]) -> Path:
    path = record_path()
    checks = _read_all()
    checks[_key(entry["model"], entry["weights_sha256"], entry["device"])] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": RECORD_VERSION, "checks": checks}, indent=1))
    os.replace(tmp, path)  # readers see the old or the new file, never half of one
    return path


# -- choosing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeChoice:
    """A compute dtype and why: what the provenance of a feature set records."""

    name: str
    requested: str
    reason: str
    check: dict[str, Any] | None = None  # the recorded check relied on, if any

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def _device_words(device: torch.device) -> str:
    if device.type == "cpu":
        return (
            "this CPU (native bf16)" if cpu_has_native_bf16() else "this CPU (no native bf16: bf16 is emulated, slower)"
        )
    return device.type.upper()


def _failed(check: dict[str, Any] | None) -> dict[str, str]:
    """dtype -> why, for the dtypes whose recorded check ran and failed."""
    out = {}
    for row in (check or {}).get("rows", []):
        if row.get("passed") is False:
            out[row["dtype"]] = (
                f"failed the recorded check ({row.get('note') or 'min cosine ' + str(row['min_cosine'])})"
            )
    return out


def choose_dtype(dtype: str, device: torch.device, backbone: LoadedBackbone) -> DtypeChoice:
    """The compute dtype for ``backbone`` on ``device``.

    ``"auto"``: the fastest of :func:`~embedcache.backbones.devices.dtype_candidates` that the registry entry does not
    forbid and whose recorded check did not fail. An explicit dtype is checked against the device and refused
    (``ValueError`` with the reason) when the entry forbids it; one that failed a recorded check is used as
    asked, with the failure in the reason.
    """
    spec = backbone.spec
    forbidden = dict(spec.forbid_dtypes)
    check = recorded_check(spec.name, backbone.weights.get("sha256"), device.type)
    failed = _failed(check)
    if dtype != "auto":
        resolve_dtype(dtype, device)  # unknown names, fp16 on the CPU
        if dtype in forbidden:
            raise ValueError(f"backbone {spec.name!r} forbids --dtype {dtype}: {forbidden[dtype]}; use --dtype auto")
        why = f"asked for; note: it {failed[dtype]}" if dtype in failed else "asked for"
        return DtypeChoice(dtype, dtype, why, check)
    skipped = []
    for name in dtype_candidates(device):
        if name in forbidden:
            skipped.append(f"{name} (forbidden: {forbidden[name]})")
        elif name in failed:
            skipped.append(f"{name} ({failed[name]})")
        else:
            basis = "a recorded check" if check else "no recorded precision check"
            why = f"auto: the fastest dtype for {_device_words(device)} ({basis})"
            return DtypeChoice(name, "auto", why + (f"; skipped {', '.join(skipped)}" if skipped else ""), check)
    raise ValueError(
        f"no compute dtype passes for {spec.name!r} on {device.type}: {', '.join(skipped)}; "
        f"rerun embedcache check-precision or pass --dtype float32"
    )


# -- checking -----------------------------------------------------------------------------------


def _sample_rows(source: CellSource, n_cells: int) -> np.ndarray:
    n = len(source.table)
    if n == 0:
        raise ValueError("the data has no cells")
    return np.unique(np.linspace(0, n - 1, min(n, n_cells)).round().astype(int))  # spread over the whole set


def _embed_all(
    bb: LoadedBackbone, images: list[np.ndarray], prep: Any, dev: torch.device, dt: torch.dtype, pools, batch: int
) -> dict[str, np.ndarray]:
    from embedcache.backbones.forward import compute_batch

    bb.model.to(dev).eval()
    parts: dict[str, list[np.ndarray]] = {p: [] for p in pools}
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        shapes = {im.shape for im in chunk}
        if len(shapes) > 1:  # one shape per call keeps the row order simple
            outs = [
                compute_batch(
                    bb.model,
                    [torch.from_numpy(im[None])],
                    prep,
                    dev,
                    dt,
                    pools,
                    bb.num_prefix_tokens,
                    embed_fn=bb.embed,
                )
                for im in chunk
            ]
            for p in pools:
                parts[p].append(np.concatenate([o[p] for o in outs]))
        else:
            out = compute_batch(
                bb.model,
                [torch.from_numpy(np.stack(chunk))],
                prep,
                dev,
                dt,
                pools,
                bb.num_prefix_tokens,
                embed_fn=bb.embed,
            )
            for p in pools:
                parts[p].append(out[p])
    return {p: np.concatenate(v) for p, v in parts.items()}


def _compare(feats: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    cos, rel = [], []
    finite = np.ones(len(next(iter(ref.values()))), dtype=bool)
    for p in ref:
        a, b = feats[p].astype(np.float64), ref[p].astype(np.float64)
        finite &= np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
            same = (a == b).all(axis=1)  # exactly equal vectors: cosine 1, not 1 - 1e-16
            cos.append(np.where(same, 1.0, np.minimum((a * b).sum(axis=1) / (na * nb), 1.0)))
            rel.append(np.linalg.norm(a - b, axis=1) / nb)
    c, r = np.min(cos, axis=0)[finite], np.max(rel, axis=0)[finite]
    return {
        "min_cosine": float(c.min()) if c.size else float("nan"),
        "median_cosine": float(np.median(c)) if c.size else float("nan"),
        "max_rel_error": float(r.max()) if r.size else float("nan"),
        "non_finite_cells": int((~finite).sum()),
    }


def check_precision(
    model: str,
    data: str | os.PathLike | CellSource,
    *,
    dtypes: Sequence[str] = ("float16", "bfloat16", "float32"),
    device: str = "auto",
    n_cells: int = 64,
    threshold: float = THRESHOLD,
    weights: str | os.PathLike | None = None,
    revision: str | None = None,
    pool: str | Sequence[str] | None = None,
    input_size: int | None = None,
    batch_size: int = 16,
    record: bool = True,
    backbone: LoadedBackbone | None = None,
) -> pd.DataFrame:
    """Compare each of ``dtypes`` with float32 on ``n_cells`` real cells of ``data`` (spread over the set).

    Returns one row per dtype (columns ``COLUMNS``: min / median cosine to fp32, max relative error, cells
    with a non-finite value, ``passed``, a note). float16 on the CPU is not run (a recorded skip: extraction
    refuses it there); a dtype the registry entry forbids is measured but never passes. With ``record`` the
    result is saved where ``auto`` finds it (:func:`record_path`), replacing an older check of the same
    backbone, weights and device type. ``df.attrs`` holds the threshold, the data and the record path.
    """
    from embedcache.backbones.loading import load_backbone
    from embedcache.backbones.pooling import check_pools, parse_pools
    from embedcache.backbones.preprocess import Preprocessing
    from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError
    from embedcache.inputs.sources import CellSource, open_source

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {', '.join(DTYPES)}, got {list(dtypes)}")
    dev = resolve_device(device)
    bb = backbone or load_backbone(model, weights=weights, revision=revision)
    spec = bb.spec
    pools = parse_pools(pool, spec.default_pool)
    if spec.embed is None:
        check_pools(pools, bb.num_prefix_tokens, spec.name)
    prep = Preprocessing(
        size=input_size or spec.input_size, interpolation=spec.interpolation, mean=spec.mean, std=spec.std
    )
    source = data if isinstance(data, CellSource) else open_source(data, label_column=None)
    images, unreadable = [], 0
    for i in _sample_rows(source, n_cells):
        try:
            images.append(source.load(int(i), max_pixels=DEFAULT_MAX_IMAGE_PIXELS))
        except ImageDecodeError:  # counted and reported in the table's attrs
            unreadable += 1
    if not images:
        raise ValueError(f"none of the {unreadable} sampled cells of {data} could be read")
    ref = _embed_all(bb, images, prep, dev, torch.float32, pools, batch_size)
    rows = []
    for name in dict.fromkeys(dtypes):
        row: dict[str, Any] = {"model": spec.name, "device": dev.type, "dtype": name, "n_cells": len(images)}
        if dev.type == "cpu" and name == "float16":
            rows.append({**row, "passed": None, "note": "not run: float16 is not a compute dtype on the CPU"})
            continue
        feats = ref if name == "float32" else _embed_all(bb, images, prep, dev, DTYPES[name], pools, batch_size)
        row.update(_compare(feats, ref))
        ok = row["non_finite_cells"] == 0 and row["min_cosine"] >= threshold
        note = (
            ""
            if ok
            else (
                f"{row['non_finite_cells']} cells non-finite"
                if row["non_finite_cells"]
                else f"min cosine {row['min_cosine']:.6f} < {threshold}"
            )
        )
        if name in spec.forbid_dtypes:
            ok, note = False, f"forbidden by the registry: {spec.forbid_dtypes[name]}"
        rows.append({**row, "passed": bool(ok), "note": note})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    origin = str(getattr(source, "origin", None) or data)
    table.attrs.update(threshold=threshold, data=origin, unreadable_cells=unreadable, weights=dict(bb.weights))
    if record:
        entry = {
            "model": spec.name,
            "weights_sha256": bb.weights.get("sha256"),
            "weights_source": bb.weights.get("source"),
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "cpu_native_bf16": cpu_has_native_bf16(),
            "threshold": threshold,
            "data": origin,
            "pools": list(pools),
            "input_size": prep.size,
            "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in rows],
        }
        table.attrs["record"] = str(_save(entry))
    return table
