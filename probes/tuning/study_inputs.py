"""Fine-tunes as study probes: what each fine-tune reads for a job, and the probe it builds.

The study skeleton (:mod:`probes.engine.split_fits`) fits ``lp``, ``ft-last``, ``lora`` and ``scratch-vit``
like any probe; for them a :class:`~probes.engine.skeleton.FitJob` carries, instead of a feature matrix, a
:class:`RowsReader`: a view of a token / image reader restricted to the job's cells, read in minibatches.

* ``lp`` with a pooled head (``linear`` / ``mlp``): the store's pooled features, no backbone;
  with a token head (``linear-cls-mean`` / ``decoder``): the cached tail tokens through the frozen tail;
* ``ft-last`` / ``lora``: the tokens cached by ``embedcache extract --tail-blocks K`` (``tail_blocks=K``),
  or with ``blocks`` (``"all"`` or K) the images re-read from the store's paths through the full backbone;
* ``scratch-vit``: the images at the working size (the store's, else 40 px).

The backbone is rebuilt from the feature set's provenance (name, weights source) and refused when its
weights' sha256 differs from the one the cache was made with.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from probes.errors import ProbeError
from probes.features.cells import Cells
from probes.heads.registry import tune_probes
from probes.tuning.options import POOLED_HEADS, TuneOptions, source_of
from probes.tuning.readers import reader_kind

TUNE_PROBES = tuple(tune_probes())  # lp, ft-last, lora, scratch-vit
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # scratch-vit's normalisation


def restrict_hierarchy(h: Any, classes: Any) -> Any:
    """``h`` without the classes not in ``classes`` (lineage members and penalties that name them)."""
    import dataclasses

    keep = {str(c) for c in classes}
    lineages = {k: [m for m in v if m in keep] for k, v in h.lineages.items()}
    return dataclasses.replace(
        h,
        lineages=lineages,
        class_lines={c: n for c, n in h.class_lines.items() if c in keep},
        penalties=[p for p in h.penalties if p[0] in keep and p[1] in keep],
    )


class RowsReader:
    """``base`` restricted to ``rows`` (any order, repeats allowed): row ``i`` here is ``base`` row ``rows[i]``.

    Forwards ``kind``, ``read_train`` (augmenting readers) and a digest naming base and rows.
    """

    def __init__(self, base, rows: np.ndarray):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.kind = reader_kind(base)
        if hasattr(base, "read_train"):
            self.read_train = lambda r: self._read(base.read_train, r)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, fn, rows: np.ndarray) -> np.ndarray:
        idx = self.rows[np.asarray(rows, dtype=np.int64)]
        order = np.argsort(idx, kind="stable")
        data = np.asarray(fn(idx[order]))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return data[back]

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self._read(self.base.read, rows)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(str(getattr(self.base, "digest", None)).encode())
        h.update(self.rows.tobytes())
        return h.hexdigest()


def backbone_from_provenance(fs) -> Any:
    """The backbone ``fs`` (a FeatureSet) was extracted with, loaded afresh and checked against its sha256."""
    from embedcache.backbones.loading import load_backbone

    prov = fs.attrs.get("provenance") or {}
    name = (prov.get("backbone") or {}).get("name")
    w = prov.get("weights") or {}
    if not name or not w:
        raise ProbeError(
            f"'{fs.key}' records no backbone provenance (imported features?): a fine-tune needs the "
            "backbone the cache was extracted with"
        )
    try:
        if w.get("source") == "random":
            bb = load_backbone(name, weights="random")
        elif w.get("source") == "file":
            bb = load_backbone(name, weights=w["path"])
        else:
            bb = load_backbone(name, revision=w.get("revision"))
    except Exception as e:
        raise ProbeError(f"cannot load the backbone of '{fs.key}' ({name}, weights {w.get('source')}): {e}") from e
    want, got = w.get("sha256"), bb.weights.get("sha256")
    if want != got:
        raise ProbeError(
            f"'{fs.key}' is a token cache made by other weights than the ones loaded: {name} weights "
            f"sha256 {got} now, {want} when extracted; restore those weights, or re-extract"
        )
    return bb


class TuneInputs:
    """Per backbone of ``cells``: the loaded backbone and base readers (by usable-cell position) the
    fine-tune probes of a study read; everything checked up front by :meth:`check`."""

    def __init__(self, cells: Cells, options: TuneOptions, device: str = "auto"):
        self.cells, self.options, self.device = cells, options, device
        self._backbones: dict[str, Any] = {}
        self._readers: dict[tuple[str, str], Any] = {}

    # -- what each probe reads ---------------------------------------------------------------
    def source(self, probe: str) -> str:
        """``features``, ``tokens`` or ``images``."""
        return source_of(probe, self.options)

    def k(self, backbone: str) -> int:
        from embedcache.backbones.tail import tail_depth

        o = self.options
        if o.blocks == "all":
            return tail_depth(self.backbone(backbone))
        k = o.blocks if o.blocks is not None else o.tail_blocks
        if k is None:
            k = self.cached_depth(backbone)
        if k is None:
            raise ValueError("a fine-tune of the tail needs --tail-blocks (or --blocks)")
        return int(k)

    def cached_depth(self, backbone: str) -> int | None:
        """The tail depth whose tokens the store caches for ``backbone`` when it caches exactly one (what
        ``--tail-blocks`` defaults to); None when it caches none or several."""
        from embedcache.store.feature_set import TOKENS_PREFIX

        depths = [int(t[len(TOKENS_PREFIX) :]) for t in self.cells.feature_sets[backbone].token_sets]
        return depths[0] if len(depths) == 1 else None

    def backbone(self, name: str) -> Any:
        if name not in self._backbones:
            from probes.heads.base import resolve_device

            bb = backbone_from_provenance(self.cells.feature_sets[name])
            bb.model.to(resolve_device(self.device))  # the frozen prefix of image fine-tunes runs there too
            self._backbones[name] = bb
        return self._backbones[name]

    def check(self, probes: list[str]) -> None:
        """Fail before any fit: tail depth, cached tokens, images present, heads that fit the input."""
        from embedcache.backbones.tail import TailError, check_k

        o = self.options
        if o.hierarchy is not None:  # a class the file names but the data lacks: an error naming the line
            try:
                o.hierarchy.matrices(sorted(set(self.cells.labels)))
            except ValueError as e:
                raise ProbeError(str(e)) from e
        for probe in (p for p in probes if p in TUNE_PROBES):
            src = self.source(probe)
            if probe == "scratch-vit" and o.head != "linear":
                raise ProbeError(f"scratch-vit has its own class-token head; --head {o.head} does not apply")
            unknown = [b for b in self.cells.backbones if self.cached_depth(b) is None]
            if src == "tokens" and o.tail_blocks is None and unknown:
                have = self.cells.feature_sets[unknown[0]].token_sets
                raise ProbeError(
                    f"probe {probe!r} trains the last blocks from cached tail tokens and {unknown[0]} caches "
                    f"{'several depths (' + ', '.join(have) + ')' if have else 'none'}: give --tail-blocks K "
                    "(tokens cached by embedcache extract --tail-blocks K), or train from the images with "
                    "probes finetune --blocks K|all"
                )
            for name in self.cells.backbones:
                if src in ("tokens", "images") and probe != "scratch-vit":
                    bb = self.backbone(name)
                    try:
                        check_k(bb, self.k(name))
                    except TailError as e:
                        raise ProbeError(f"--tail-blocks / --blocks for {name}: {e}") from e
                if src != "features":
                    self.base(name, probe)

    # -- readers ------------------------------------------------------------------------------
    def base(self, name: str, probe: str) -> Any:
        """The reader over the usable cells (row i = usable cell i) that ``probe`` reads for backbone ``name``."""
        src = self.source(probe)
        key = (name, "scratch" if probe == "scratch-vit" else src)
        if key in self._readers:
            return self._readers[key]
        fs = self.cells.feature_sets[name]
        store_rows = self.cells.obs["row"].to_numpy()
        if src == "tokens":
            try:
                reader = fs.tokens(self.k(name))
            except Exception as e:  # StoreError: the message names the extract flag
                raise ProbeError(str(e)) from e
        else:
            reader = self._images(name, probe, store_rows)
            store_rows = np.arange(len(store_rows))
        self._readers[key] = RowsReader(reader, store_rows)
        return self._readers[key]

    def _images(self, name: str, probe: str, store_rows: np.ndarray) -> Any:
        from embedcache.backbones.preprocess import Preprocessing

        prov = self.cells.feature_sets[name].attrs.get("provenance") or {}
        paths = self.cells.obs["path"].astype(str).tolist()
        if probe == "scratch-vit":
            size = int(prov.get("working_size") or self.options.scratch_size)
            prep, ws = Preprocessing(size, "bicubic", *IMAGENET), None
            if prov.get("working_size"):
                ws = int(prov["working_size"])
        else:
            p = dict(prov.get("preprocessing") or {})
            if not p:
                raise ProbeError(
                    f"'{self.cells.feature_sets[name].key}' records no preprocessing: cannot re-read "
                    "its images as the backbone saw them"
                )
            prep = Preprocessing(
                int(p["size"]), p["interpolation"], tuple(p["mean"]), tuple(p["std"]), p.get("fit", "squash")
            )
            ws = prov.get("working_size")
        try:
            return _ImagesBySeed(paths, prep, ws, self.options.augment)
        except FileNotFoundError as e:
            raise ProbeError(f"{probe} on {name} re-reads the cell images from the paths in the store: {e}") from e

    def reader(self, name: str, probe: str, positions: np.ndarray, seed: int) -> RowsReader:
        """The job's reader: the usable cells at ``positions``; augmentations seeded with ``seed``."""
        base = self.base(name, probe)
        if isinstance(base.base, _ImagesBySeed):
            base = RowsReader(base.base.seeded(seed), base.rows)
        return RowsReader(base, positions)

    def pooled(self, probe: str, x: np.ndarray) -> Any:
        """Pooled features as a fine-tune reads them (``lp`` with a pooled head); other probes take ``x``."""
        from probes.tuning.readers import ArrayTokens

        return ArrayTokens(x) if probe in TUNE_PROBES else x

    def params(self, name: str, probe: str, classes: Any = None) -> dict[str, Any]:
        """The probe keywords a job of ``probe`` on ``name`` adds (its backbone and k; the hierarchy
        restricted to the job's ``classes``: a class left out at a limit leaves its lineage)."""
        if probe not in TUNE_PROBES:
            return {}
        out = self.options.probe_params()
        if out["hierarchy"] is not None and classes is not None:
            out["hierarchy"] = restrict_hierarchy(out["hierarchy"], classes)
        if probe != "scratch-vit" and self.source(probe) != "features":
            out.update(backbone=self.backbone(name), k=self.k(name))
        return out


class _ImagesBySeed:
    """Image reader factory: the gone-files check once, a fresh seeded :class:`CellImages` per fit."""

    kind = "images"

    def __init__(self, paths, prep, working_size, augment):
        from probes.tuning.augment import CellImages

        self._first = CellImages(paths, prep, working_size, augment, seed=0, check=True)
        self.paths, self.prep, self.working_size, self.augment = paths, prep, working_size, augment

    def seeded(self, seed: int):
        from probes.tuning.augment import CellImages

        return CellImages(self.paths, self.prep, self.working_size, self.augment, seed=seed, check=False)

    def __len__(self) -> int:
        return len(self._first)

    def read(self, rows):
        return self._first.read(rows)

    @property
    def digest(self) -> str:
        return self._first.digest


def study_inputs(
    cells: Cells, probes: list[str], device: str = "auto", options: TuneOptions | None = None
) -> tuple[TuneInputs | None, dict[str, Any]]:
    """A study's fine-tune inputs (None when it has no fine-tune probe) and the options for ``study.json``."""
    opts = options or TuneOptions()
    if not any(p in TUNE_PROBES for p in probes):
        return None, {}
    return TuneInputs(cells, opts, device), {"finetune": opts.as_dict()}


__all__ = [
    "POOLED_HEADS",
    "TUNE_PROBES",
    "RowsReader",
    "TuneInputs",
    "TuneOptions",
    "backbone_from_provenance",
    "study_inputs",
]
