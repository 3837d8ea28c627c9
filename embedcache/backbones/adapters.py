"""Fine-tuned weights applied onto a backbone: the adapter format, and LoRA surgery on a tail.

An adapter directory (written by :func:`probes.tuning.adapter.save_adapter`) holds ``adapter.safetensors``
(``ft-last``: the unfrozen blocks and final norm under the backbone's own key names, e.g.
``blocks.11.attn.qkv.weight``; ``lora``: the LoRA matrices, e.g. ``blocks.11.attn.qkv.lora_A.default.weight``;
``lp``: none), ``head.safetensors`` and ``adapter.json`` (provenance: base backbone, its weights and their
sha256, method, k, head, classes, data digest, history; written last, so a directory without it is
incomplete). :func:`apply_adapter` gives the tuned backbone that ``extract --adapter`` and neighbour queries
embed with; the trained head is the probes' business (:func:`probes.tuning.adapter.load_adapter`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from embedcache.backbones.loading import LoadedBackbone, load_backbone, sha256_file
from embedcache.backbones.tail import TailModule

__all__ = [
    "FORMAT",
    "FILES",
    "LORA_TARGETS",
    "AdapterError",
    "apply_adapter",
    "backbone_key_to_tail",
    "inject_lora",
    "load_base",
    "lora_target_names",
    "merge_lora",
    "read_adapter_meta",
    "tail_key_to_backbone",
]

FORMAT = "embedcache-adapter/1"
FILES = ("adapter.safetensors", "head.safetensors", "adapter.json")
LORA_TARGETS = ("qkv", "q_proj", "k_proj", "v_proj", "proj")


class AdapterError(ValueError):
    """An adapter directory that is incomplete, or made for other backbone weights."""


REQUIRED_META = ("format", "backbone", "weights", "method", "k", "head", "classes", "sha256")


def read_adapter_meta(directory: str | os.PathLike, check_files: bool = True) -> dict:
    """The provenance JSON of an adapter directory, checked for completeness, and (``check_files``) its tensor
    files against the sha256 it records: an emptied or modified adapter is an error, never base-model features
    filed under the tuned key."""
    d = Path(directory)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise AdapterError(f"{str(d)!r} is not a complete adapter directory: missing {', '.join(missing)}")
    try:
        meta = json.loads((d / "adapter.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{str(d)!r}: adapter.json cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise AdapterError(f"{str(d)!r}: adapter.json holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{str(d)!r}: unknown adapter format {meta.get('format')!r} (expected {FORMAT})")
    lacking = [k for k in REQUIRED_META if k not in meta]
    if lacking:
        raise AdapterError(f"{str(d)!r}: adapter.json lacks {', '.join(lacking)} (written by another tool, or edited)")
    if check_files:
        recorded = meta["sha256"] if isinstance(meta["sha256"], dict) else {}
        for name in FILES[:2]:
            if recorded.get(name) != sha256_file(d / name):
                raise AdapterError(
                    f"{str(d / name)!r} does not match the sha256 its adapter.json records "
                    f"({str(recorded.get(name))[:12]}...): the adapter was modified or damaged; save it again"
                )
    return meta


def load_base(meta: dict) -> LoadedBackbone:
    """The base backbone an adapter was trained on, loaded as it was (random, a file or the hub)."""
    w = meta["weights"]
    if w["source"] == "random":
        return load_backbone(meta["backbone"], weights="random")
    if w["source"] == "file":
        return load_backbone(meta["backbone"], weights=w["path"])
    return load_backbone(meta["backbone"], revision=w.get("revision"))


def apply_adapter(directory: str | os.PathLike, backbone: LoadedBackbone | None = None, inplace: bool = False):
    """The backbone with the adapter in ``directory`` applied (default: the base backbone loaded afresh), as a
    :class:`LoadedBackbone` with its own key name and the adapter in its weights' provenance.

    The backbone's weights must have the sha256 the adapter was trained on, and the adapter's tensor file the
    sha256 its ``adapter.json`` records. ``lora`` adapters are merged into the attention weights, so the result
    is a plain timm model. Without ``inplace`` the backbone's model is copied first."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_adapter_meta(d)
    bb = backbone if backbone is not None else load_base(meta)
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
        tuned = TailModule(model, int(meta["k"]))  # every tensor of the tuned tail must be in the adapter
        wanted = {tail_key_to_backbone(k, tuned) for k in tuned.state_dict()}
        lacking = sorted(wanted - set(tensors))
        if lacking:
            raise AdapterError(
                f"adapter {str(d)!r} lacks {len(lacking)} tensors of the tuned tail (e.g. {lacking[0]}): incomplete"
            )
        own.update(tensors)
        model.load_state_dict(own, strict=True)
    elif meta["method"] == "lora":
        tail = TailModule(model, int(meta["k"]))  # shares the model's modules
        lora = meta["lora"]
        inject_lora(tail, int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]))
        start = tail.depth - tail.k
        back = {backbone_key_to_tail(k, start): v for k, v in tensors.items()}
        result = tail.load_state_dict(back, strict=False)
        lora_keys = {k for k in tail.state_dict() if ".lora_" in k}
        if result.unexpected_keys or lora_keys - set(back):
            raise AdapterError(
                f"LoRA tensors do not fit: unexpected {result.unexpected_keys[:5]}, "
                f"missing {sorted(lora_keys - set(back))[:5]}"
            )
        merge_lora(tail)
    model.eval().requires_grad_(False)
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
    return LoadedBackbone(model, bb.spec, weights, key, bb.num_prefix_tokens)


def lora_target_names(tail: TailModule) -> list[str]:
    """Names (inside ``tail``) of the layers LoRA adapts: a transformer's attention linears (qkv or q/k/v, and
    the output proj); a CNN's 1x1 convolutions (EfficientNet: each block's expansion and projection, and the
    head convolution), which carry most of its weights (the depthwise 3x3 / 5x5 ones are per channel)."""
    if tail.family == "efficientnet":
        names = [
            n for n, m in tail.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        ]
    else:
        names = [
            n
            for n, m in tail.named_modules()
            if isinstance(m, nn.Linear) and re.fullmatch(r"blocks\.\d+\.attn\.(" + "|".join(LORA_TARGETS) + ")", n)
        ]
    if not names:
        raise ValueError(
            f"no attention linears ({', '.join(LORA_TARGETS)}) in the tail of this {tail.family} model: "
            "LoRA needs transformer blocks or an EfficientNet's 1x1 convolutions (use ft-last for ResNet stages)"
        )
    return names


def inject_lora(tail: TailModule, rank: int, alpha: float, dropout: float) -> list[str]:
    """Add peft LoRA adapters to the tail's attention (in place); only they are left trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = lora_target_names(tail)
    tail.requires_grad_(False)
    # peft's annotation says int for lora_alpha; the scale alpha / rank is used as a float either way
    lora_kwargs: dict[str, Any] = {
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": names,
        "bias": "none",
    }
    inject_adapter_in_model(
        LoraConfig(**lora_kwargs),
        tail,
    )
    for n, p in tail.named_parameters():
        p.requires_grad_(".lora_" in n)
    return names


def merge_lora(module: nn.Module) -> int:
    """Fold every peft LoRA layer in ``module`` into its base linear and put the plain linear back."""
    from peft.tuners.lora import LoraLayer

    found = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in found:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(found)


def tail_key_to_backbone(key: str, tail: TailModule) -> str:
    """``blocks.i.*`` of a tail -> the backbone's own name (``blocks.{L-k+i}.*`` or ``layer{L-k+i+1}.*``)."""
    m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if not m:
        return key
    j = tail.depth - tail.k + int(m.group(1))
    return f"layer{j + 1}.{m.group(2)}" if tail.family == "resnet" else f"blocks.{j}.{m.group(2)}"


def backbone_key_to_tail(key: str, start: int) -> str:
    m = re.match(r"^(?:blocks\.|layer)(\d+)\.(.*)$", key)
    if not m:
        return key
    j = int(m.group(1)) - (1 if key.startswith("layer") else 0)
    return f"blocks.{j - start}.{m.group(2)}"
