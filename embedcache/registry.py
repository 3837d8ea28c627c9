"""Backbone registry: short names -> how to build a frozen timm backbone and feed it.

Entries follow /work/shared/REGISTRY_REFERENCE.md, checked against the installed timm. Any
``timm:<arch>[.<tag>]`` name also resolves, from timm's own ``pretrained_cfg``. Nothing here
downloads anything; :mod:`embedcache.loading` builds models and fetches weights.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Mapping

IN_MEAN = (0.485, 0.456, 0.406)
IN_STD = (0.229, 0.224, 0.225)
HO_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0
HO_STD = (0.211883, 0.230117, 0.177517)
POOLS = ("cls", "mean")
INTERPOLATIONS = ("bicubic", "bilinear")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone (timm, ``pretrained=False``), where its weights live, how to feed it."""

    name: str
    arch: str
    hub_id: str | None
    filenames: tuple[str, ...]
    kwargs: Mapping[str, Any]
    layers: Mapping[str, str]
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    width: int
    default_pool: tuple[str, ...]
    gated: bool
    licence: str
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.name or self.name != self.name.strip():
            problems.append("name must be non-empty without surrounding spaces")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {INTERPOLATIONS}")
        if not self.default_pool or any(p not in POOLS for p in self.default_pool):
            problems.append(f"default_pool must be a non-empty subset of {POOLS}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need 3 values")
        if self.width <= 0 or self.input_size <= 0:
            problems.append("width and input_size must be positive")
        if self.hub_id is not None and not self.filenames:
            problems.append("a hub_id needs at least one filename")
        if problems:
            raise ValueError(f"invalid BackboneSpec {self.name!r}: " + "; ".join(problems))
        for attr in ("filenames", "mean", "std", "default_pool"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "layers", dict(self.layers))


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec, overwrite: bool = False) -> None:
    """Add ``spec`` under ``spec.name``; an existing name needs ``overwrite=True``."""
    if spec.name.startswith(TIMM_PREFIX):
        raise ValueError(f"names starting with {TIMM_PREFIX!r} are reserved for timm models")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"backbone {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec


def list_models() -> list[BackboneSpec]:
    """Registered backbones in registration order (``timm:<arch>`` names are not listed)."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    """Spec for a registry name or ``timm:<arch>``; unknown names raise ``ValueError`` with close matches."""
    key = name.strip()
    if key in _REGISTRY:
        return _REGISTRY[key]
    lowered = {n.lower(): s for n, s in _REGISTRY.items()}
    if key.lower() in lowered:
        return lowered[key.lower()]
    if key.startswith(TIMM_PREFIX):
        return _timm_spec(key[len(TIMM_PREFIX):])
    close = difflib.get_close_matches(key.lower(), list(lowered), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}.{hint} Known: {', '.join(_REGISTRY)}; any timm model also works as 'timm:<arch>'."
    )


@functools.lru_cache(maxsize=64)
def _timm_spec(arch: str) -> BackboneSpec:
    """Spec for any timm architecture: preprocessing from its pretrained_cfg, width from a meta-device build."""
    import timm

    base, _tag = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"timm has no model {base!r}.{hint}")
    cfg_obj = timm.models.get_pretrained_cfg(arch)
    cfg = cfg_obj.to_dict() if cfg_obj is not None else {}
    fixed = bool(cfg.get("fixed_input_size"))
    size_t = (cfg.get("input_size") if fixed else None) or cfg.get("test_input_size") or cfg.get("input_size")
    input_size = int(size_t[-1]) if size_t else 224
    width, prefix, has_cls = _probe(lambda: timm.create_model(arch, pretrained=False, num_classes=0), input_size)
    interp = cfg.get("interpolation") or "bicubic"
    hub_id = cfg.get("hf_hub_id") or None
    filenames = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else ("model.safetensors", "pytorch_model.bin")
    return BackboneSpec(
        name=TIMM_PREFIX + arch,
        arch=arch,
        hub_id=hub_id,
        filenames=filenames,
        kwargs={"num_classes": 0},
        layers={},
        input_size=input_size,
        interpolation=interp if interp in INTERPOLATIONS else "bicubic",
        mean=tuple(cfg.get("mean") or IN_MEAN),
        std=tuple(cfg.get("std") or IN_STD),
        width=width,
        default_pool=("cls",) if has_cls else ("mean",),
        gated=False,
        licence=str(cfg.get("license") or "see the model card"),
        notes=f"resolved from timm {timm.__version__} pretrained_cfg; gating and licence not checked"
        + ("" if hub_id else "; timm lists no Hugging Face weights for it: use --weights PATH"),
    )


def _probe(make: Any, input_size: int) -> tuple[int, int, bool]:
    """(pooled width, prefix tokens, has a class token) from a model built and run on the meta device."""
    import torch

    with torch.device("meta"):
        model = make()
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = getattr(model, "cls_token", None) is not None
    width = int(getattr(model, "num_features"))
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.empty(1, 3, input_size, input_size, device="meta"))
            if feats.ndim == 4:  # feature map: the model's own pooled vector
                width = int(model.forward_head(feats, pre_logits=True).shape[-1])
            elif feats.ndim == 3:
                width = int(feats.shape[-1])
    except Exception:  # some ops have no meta kernel; num_features is the usual answer
        pass
    return width, prefix, has_cls


# ---------------------------------------------------------------------------------------------
# Built-in entries
# ---------------------------------------------------------------------------------------------

def _add(name: str, arch: str, hub_id: str | None, filenames: tuple[str, ...], kwargs: dict, width: int, *,
         layers: dict | None = None, input_size: int = 224, interpolation: str = "bilinear",
         mean: tuple = IN_MEAN, std: tuple = IN_STD, pool: tuple = ("cls",), gated: bool = False,
         licence: str, notes: str = "") -> None:
    register(BackboneSpec(name, arch, hub_id, filenames, kwargs, layers or {}, input_size, interpolation,
                          mean, std, width, pool, gated, licence, notes))


_ST, _BIN = ("model.safetensors",), ("pytorch_model.bin",)
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

_add("uni", "vit_large_patch16_224", "MahmoodLab/UNI", _BIN,
     dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True), 1024,
     gated=True, licence="CC-BY-NC-ND-4.0",
     notes="UNI card: Resize(224) bilinear (+CenterCrop), ImageNet norm, CLS token.")
_add("uni2-h", "vit_giant_patch14_224", "MahmoodLab/UNI2-h", _BIN,
     dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
          mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True),
     1536, layers=_SWIGLU, gated=True, licence="CC-BY-NC-ND-4.0",
     notes="1 CLS + 8 register tokens. Kwargs as in the UNI card, TRIDENT and eva.")
_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
for _s, (_size, _w) in _SIZES.items():
    _add(f"dinobloom-{_s}", f"vit_{_size}_patch14_dinov2", f"1aurent/vit_{_size}_patch14_224.dinobloom", _ST,
         dict(img_size=224, num_classes=0), _w, licence="Apache-2.0",
         notes="Community timm copy of DinoBloom (the 1aurent config.json was not read, loading it has not "
               "been run). The official files (MarrLab/DinoBloom pytorch_model_*.bin, Zenodo "
               "DinoBloom-*.pth) load with --weights PATH (raw DINOv2 keys are mapped).")
for _s, (_size, _w) in _SIZES.items():
    _add(f"dinov2-{_s}", f"vit_{_size}_patch14_dinov2", f"timm/vit_{_size}_patch14_dinov2.lvd142m", _ST,
         dict(img_size=224, num_classes=0), _w, interpolation="bicubic", licence="Apache-2.0",
         notes="Trained at 518 px; run at 224 with pos_embed resampled by timm's checkpoint_filter_fn.")
_add("phikon", "vit_base_patch16_224", "owkin/phikon", _ST + _BIN,
     dict(img_size=224, num_classes=0), 768, licence="Owkin non-commercial",
     notes="Official HF transformers ViTModel weights, converted to timm keys on load. Unverified against "
           "the real file; HF ViT LayerNorm eps may be 1e-12 where timm uses 1e-6.")
_add("phikon-v2", "vit_large_patch16_224", "owkin/phikon-v2", _ST,
     dict(img_size=224, init_values=1e-5, num_classes=0), 1024, licence="Owkin non-commercial (LICENSE.pdf)",
     notes="HF transformers Dinov2Model (ViT-L/16) weights converted to timm keys on load; the conversion is "
           "tested against transformers but unverified against the real file.")
_add("ctranspath", "swin_tiny_patch4_window7_224", "1aurent/swin_tiny_patch4_window7_224.CTransPath", _ST,
     dict(num_classes=0), 768, layers={"embed_layer": "ConvStem"}, pool=("mean",), licence="GPL-3.0",
     notes="Swin-T with our ConvStem. Bilinear per TRIDENT (the card code uses bicubic). TRIDENT uses CHIEF's "
           "CTransPath weights instead; loading the 1aurent file has not been run.")
_add("resnet-rs50", "resnetrs50", "timm/resnetrs50.tf_in1k", _ST, dict(num_classes=0), 2048,
     interpolation="bicubic", pool=("mean",), licence="Apache-2.0",
     notes="ImageNet-1k baseline; 224 is timm's test size (trained at 160).")
_add("h-optimus-0", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0", _BIN + _ST,
     dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False), 1536,
     mean=HO_MEAN, std=HO_STD, gated=True, licence="Apache-2.0",
     notes="1 CLS + 4 registers. Card: 224 px tiles at 0.5 um/px, no resize; bilinear is TRIDENT's. "
           "Weight filename per TRIDENT (unverified).")
_add("virchow2", "vit_huge_patch14_224", "paige-ai/Virchow2", _BIN + _ST,
     dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
          dynamic_img_size=True), 1280, layers=_SWIGLU, interpolation="bicubic", pool=("cls", "mean"),
     gated=True, licence="CC-BY-NC-ND-4.0",
     notes="Card embedding is concat(CLS, mean of patch tokens) = 2560; stored here as two 1280-d pools. "
           "Registers (tokens 1-4) excluded from the mean.")

# DINOv3 ViTs (timm >= 1.0.20, which pyproject requires)
for _s in ("s", "b", "l"):
    _size, _w = _SIZES[_s]
    _add(f"dinov3-{_s}", f"vit_{_size}_patch16_dinov3", f"timm/vit_{_size}_patch16_dinov3.lvd1689m", _ST,
         dict(num_classes=0), _w, input_size=256, interpolation="bicubic", licence="DINOv3 License",
         notes="RoPE ViT with 1 CLS + 4 registers; dynamic input size (256 is timm's default). Whether the "
               "timm copies are gated is unverified.")
