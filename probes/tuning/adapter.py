"""Save a fine-tune's trained weights, and apply them onto a freshly loaded backbone.

A directory holds ``adapter.safetensors`` (``ft-last``: the unfrozen blocks and final norm under the
backbone's own key names, e.g. ``blocks.11.attn.qkv.weight``; ``lora``: the LoRA matrices, e.g.
``blocks.11.attn.qkv.lora_A.default.weight``; ``lp``: none), ``head.safetensors`` and ``adapter.json``
(provenance: base backbone, its weights and their sha256, method, k, head, classes, data digest,
history; written last, so a directory without it is incomplete).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from probes.heads.tokens import make_token_head
from probes.tuning.nets import inject_lora, merge_lora, tail_key_to_backbone, tail_of

FORMAT = "embedcache-adapter/1"
FILES = ("adapter.safetensors", "head.safetensors", "adapter.json")


class AdapterError(ValueError):
    """An adapter directory that is incomplete, or made for other backbone weights."""


def save_adapter(probe, directory: str | os.PathLike) -> Path:
    """Write ``probe``'s (a fitted :class:`FineTuneProbe`) adapter files to ``directory``; returns it."""
    from safetensors.torch import save_file

    from embedcache.backbones.loading import sha256_file

    if not hasattr(probe, "net_"):
        raise RuntimeError("the fine-tune is not fitted; call fit first")
    bb = probe.backbone
    if bb is None:
        raise AdapterError("an 'lp' fit on pooled features without a backbone has no backbone to adapt")
    net = probe.net_
    tail = tail_of(net.trunk)
    own = bb.model.state_dict()
    if probe.method == "ft-last":
        tensors = {tail_key_to_backbone(k, tail): v for k, v in tail.state_dict().items()}
    elif probe.method == "lora":
        tensors = {tail_key_to_backbone(k, tail): v for k, v in tail.state_dict().items() if ".lora_" in k}
    else:
        tensors = {}
    if probe.method == "ft-last":
        stray = [k for k in tensors if k not in own]
        if stray:
            raise AdapterError(f"tail keys not in the backbone: {', '.join(stray[:5])}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter.json").unlink(missing_ok=True)  # incomplete until rewritten last
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
    head_sd = {k: v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}
    save_file(head_sd, str(out / "head.safetensors"))
    head = net.head
    meta = {
        "format": FORMAT,
        "backbone": bb.spec.name,
        "key_name": bb.key_name,
        "weights": bb.weights,
        "method": probe.method,
        "k": tail.k,
        "pool": net.pool,
        "head": {
            "name": probe.head,
            "kwargs": probe.head_kwargs or {},
            "dim": int(head.dim),
            "num_prefix_tokens": int(getattr(head, "num_prefix_tokens", 0)),
            "pool": getattr(head, "pool", None),
        },
        "classes": [str(c) for c in probe.classes_],
        "lora": (
            {"rank": probe.lora_rank, "alpha": probe.lora_alpha, "dropout": probe.lora_dropout}
            if probe.method == "lora"
            else None
        ),
        "loss": probe.loss,
        "data_digest": probe.data_digest_,
        "reader_kind": probe.reader_kind_,
        "best_epoch": probe.best_epoch_,
        "n_trainable": probe.n_trainable_,
        "history": probe.history_,
        "sha256": {f: sha256_file(out / f) for f in FILES[:2]},
    }
    tmp = out / "adapter.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(out / "adapter.json")
    return out


@dataclass
class Adapter:
    """A tuned backbone (a ``LoadedBackbone`` that embeds with the tuned weights) and the trained head."""

    backbone: object
    head: nn.Module
    classes: list[str]
    meta: dict


def read_adapter_meta(directory: str | os.PathLike) -> dict:
    """The provenance JSON of an adapter directory, checked for completeness."""
    d = Path(directory)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise AdapterError(f"{str(d)!r} is not a complete adapter directory: missing {', '.join(missing)}")
    meta = json.loads((d / "adapter.json").read_text())
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{str(d)!r}: unknown adapter format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def _load_base(meta: dict):
    from embedcache.backbones.loading import load_backbone

    w = meta["weights"]
    if w["source"] == "random":
        return load_backbone(meta["backbone"], weights="random")
    if w["source"] == "file":
        return load_backbone(meta["backbone"], weights=w["path"])
    return load_backbone(meta["backbone"], revision=w.get("revision"))


def load_adapter(directory: str | os.PathLike, backbone=None, inplace: bool = False) -> Adapter:
    """Apply the adapter in ``directory`` onto ``backbone`` (default: the base backbone loaded afresh).

    The backbone's weights must have the sha256 the adapter was trained on. ``lora`` adapters are merged
    into the attention weights, so the result is a plain timm model. Without ``inplace`` the backbone's
    model is copied first.
    """
    from safetensors.torch import load_file

    from embedcache.backbones.loading import LoadedBackbone
    from embedcache.backbones.tail import TailModule

    d = Path(directory)
    meta = read_adapter_meta(d)
    bb = backbone if backbone is not None else _load_base(meta)
    if bb.weights.get("sha256") != meta["weights"].get("sha256"):
        raise AdapterError(
            f"adapter {str(d)!r} was trained on {meta['backbone']} weights sha256 "
            f"{meta['weights'].get('sha256')}, the loaded backbone has {bb.weights.get('sha256')}"
        )
    model = bb.model if inplace else copy.deepcopy(bb.model)
    tensors = load_file(str(d / "adapter.safetensors"))
    if meta["method"] == "ft-last":
        own = model.state_dict()
        stray = [k for k in tensors if k not in own]
        if stray:
            raise AdapterError(f"adapter keys not in {meta['backbone']}: {', '.join(stray[:5])}")
        own.update(tensors)
        model.load_state_dict(own, strict=True)
    elif meta["method"] == "lora":
        tail = TailModule(model, int(meta["k"]))  # shares the model's modules
        lora = meta["lora"]
        inject_lora(tail, int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]))
        start = tail.depth - tail.k
        back = {_backbone_key_to_tail(k, start): v for k, v in tensors.items()}
        result = tail.load_state_dict(back, strict=False)
        lora_keys = {k for k in tail.state_dict() if ".lora_" in k}
        if result.unexpected_keys or lora_keys - set(back):
            raise AdapterError(
                f"LoRA tensors do not fit: unexpected {result.unexpected_keys[:5]}, "
                f"missing {sorted(lora_keys - set(back))[:5]}"
            )
        merge_lora(tail)
    model.eval().requires_grad_(False)
    h = meta["head"]
    head = make_token_head(
        h["name"], int(h["dim"]), len(meta["classes"]), int(h["num_prefix_tokens"]), h.get("pool"), **h["kwargs"]
    )
    head.load_state_dict(load_file(str(d / "head.safetensors")), strict=True)
    head.eval().requires_grad_(False)
    weights = {
        **bb.weights,
        "adapter": {
            "path": str(d.resolve()),
            "method": meta["method"],
            "k": meta["k"],
            "sha256": meta["sha256"]["adapter.safetensors"],
        },
    }
    key = f"{bb.key_name}+{meta['method']}@{meta['sha256']['adapter.safetensors'][:8]}"
    tuned = LoadedBackbone(model, bb.spec, weights, key, bb.num_prefix_tokens)
    return Adapter(tuned, head, list(meta["classes"]), meta)


def _backbone_key_to_tail(key: str, start: int) -> str:
    m = re.match(r"^(?:blocks\.|layer)(\d+)\.(.*)$", key)
    if not m:
        return key
    j = int(m.group(1)) - (1 if key.startswith("layer") else 0)
    return f"blocks.{j - start}.{m.group(2)}"


__all__ = ["FORMAT", "Adapter", "AdapterError", "load_adapter", "read_adapter_meta", "save_adapter"]
