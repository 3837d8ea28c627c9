"""Save a fine-tune's trained weights in the adapter format of :mod:`embedcache.backbones.adapters`, and load
them back with the trained head (:func:`load_adapter`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from embedcache.backbones.adapters import (
    FILES,
    FORMAT,
    AdapterError,
    apply_adapter,
    read_adapter_meta,
    tail_key_to_backbone,
)
from embedcache.backbones.loading import sha256_file
from probes.heads.tokens import make_token_head
from probes.tuning.nets import tail_of


def save_adapter(probe, directory: str | os.PathLike) -> Path:
    """Write ``probe``'s (a fitted :class:`FineTuneProbe`) adapter files to ``directory``; returns it."""
    from safetensors.torch import save_file

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
            "kwargs": probe.head_params(),
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


def load_adapter(directory: str | os.PathLike, backbone=None, inplace: bool = False) -> Adapter:
    """The tuned backbone (:func:`embedcache.backbones.adapters.apply_adapter`) and the trained head of the
    adapter in ``directory``."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_adapter_meta(d)
    tuned = apply_adapter(d, backbone, inplace=inplace)
    h = meta["head"]
    head = make_token_head(
        h["name"], int(h["dim"]), len(meta["classes"]), int(h["num_prefix_tokens"]), h.get("pool"), **h["kwargs"]
    )
    head.load_state_dict(load_file(str(d / "head.safetensors")), strict=True)
    head.eval().requires_grad_(False)
    return Adapter(tuned, head, list(meta["classes"]), meta)


__all__ = ["FORMAT", "Adapter", "AdapterError", "load_adapter", "read_adapter_meta", "save_adapter"]
