"""Embed new images exactly as a stored feature set was made (for neighbour look-ups)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from embedcache.backbones.adapters import apply_adapter
from embedcache.backbones.devices import resolve_device
from embedcache.backbones.forward import compute_batch
from embedcache.backbones.loading import LoadedBackbone, load_backbone
from embedcache.backbones.preprocess import Preprocessing
from embedcache.extraction.importing import check_embeddable
from embedcache.inputs.images import read_image
from embedcache.inputs.perturb import apply as perturb_apply
from embedcache.store import FeatureSet, StoreError


def backbone_for(fs: FeatureSet) -> LoadedBackbone:
    """Reload the backbone a feature set was made with, and check its weights digest."""
    check_embeddable(fs)
    prov = fs.attrs["provenance"]
    name, w = prov["backbone"]["name"], prov["weights"]
    if w.get("source") == "file":
        bb = load_backbone(name, weights=w["path"])
    elif w.get("source") == "random":
        bb = load_backbone(name, weights="random")
    else:
        bb = load_backbone(name, revision=w.get("revision"))
    if bb.weights.get("sha256") != w.get("sha256"):
        raise StoreError(
            f"the weights of '{name}' found now (sha256 {str(bb.weights.get('sha256'))[:12]}) are not the ones "
            f"'{fs.key}' was made with (sha256 {str(w.get('sha256'))[:12]})"
        )
    adapter = w.get("adapter")
    if adapter:  # a feature set made with a fine-tuned model: apply the same adapter again
        tuned = apply_adapter(adapter["path"], bb)
        if tuned.weights.get("adapter", {}).get("sha256") != adapter.get("sha256"):
            raise StoreError(f"the adapter at {adapter['path']} is not the one '{fs.key}' was made with")
        return tuned
    return bb


def embed_images(
    fs: FeatureSet,
    images: Sequence[np.ndarray | str | os.PathLike],
    pool: str = "cls",
    *,
    device: str = "auto",
    backbone: LoadedBackbone | None = None,
) -> np.ndarray:
    """Features of new images with the feature set's backbone, preprocessing and working size.

    Returns float32 (n, D), rounded through the store's dtype so they compare exactly like
    stored features.
    """
    check_embeddable(fs)
    prov = fs.attrs["provenance"]
    if prov.get("perturbation"):
        raise StoreError(f"'{fs.key}' is a perturbed feature set; query against the clean one")
    bb = backbone or backbone_for(fs)
    p = prov["preprocessing"]
    prep = Preprocessing(
        size=p["size"], interpolation=p["interpolation"], mean=tuple(p["mean"]), std=tuple(p["std"]), fit=p["fit"]
    )
    dev = resolve_device(device)
    stored = prov["compute"]["dtype"]
    if dev.type == "cuda":
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored, torch.float32)
    else:
        dtype = torch.bfloat16 if stored == "bfloat16" else torch.float32
    arrays = [read_image(im) if not isinstance(im, np.ndarray) else im for im in images]
    arrays = [perturb_apply(a, prov.get("working_size"), None) for a in arrays]
    model = bb.model.to(dev).eval()
    out = []
    for a in arrays:
        batch = [torch.from_numpy(np.array(a, dtype=np.uint8))[None]]
        feats = compute_batch(model, batch, prep, dev, dtype, (pool,), bb.num_prefix_tokens, embed_fn=bb.embed)
        out.append(feats[pool].astype(fs.attrs["dtype"]).astype(np.float32))
    return np.concatenate(out)
