"""The forward pass: same-shape uint8 batches in, pooled float32 features out, on any device.

:func:`compute_batch` is the one place a batch meets a backbone: extraction, the precision check and
neighbour queries by image all call it, so a feature computed for a query is the stored one's twin.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from embedcache.backbones.pooling import embed
from embedcache.backbones.preprocess import Preprocessing, to_model_input

__all__ = ["compute_batch", "compiled", "is_cnn"]


def compute_batch(
    model: torch.nn.Module,
    groups: Sequence[torch.Tensor],
    prep: Preprocessing,
    dev: torch.device,
    compute_dtype: torch.dtype,
    pools: Sequence[str],
    num_prefix_tokens: int,
    embed_fn: Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]] | None = None,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """Same-shape uint8 NHWC groups -> pooled float32 features (rows in group order).

    ``embed_fn(x, pools)`` (e.g. :meth:`LoadedBackbone.embed`, which honours a spec's ``embed`` hook)
    replaces the default timm-style pooling of ``model``. ``channels_last`` feeds the batch in that
    memory format (for a model converted with ``model.to(memory_format=torch.channels_last)``).
    """
    x = to_model_input(groups, prep, dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        if embed_fn is None:
            out = embed(model, x, pools, num_prefix_tokens)
        else:
            with torch.inference_mode():
                out = embed_fn(x, pools)
    return {p: v.float().cpu().numpy() for p, v in out.items()}


def is_cnn(model: torch.nn.Module) -> bool:
    """A convolutional backbone (more than a patch-embedding conv): runs channels-last."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 3


_compiled_models: weakref.WeakKeyDictionary[torch.nn.Module, _Compiled] = weakref.WeakKeyDictionary()


def compiled(model: torch.nn.Module) -> _Compiled:
    """``model`` with ``forward_features`` through ``torch.compile``, made once per model object in this
    process: a Dask worker's tasks (one per chunk) reuse one compiled backbone instead of compiling for each."""
    hit = _compiled_models.get(model)
    if hit is None:
        hit = _compiled_models[model] = _Compiled(model)
    return hit


class _Compiled(torch.nn.Module):
    """A timm model whose ``forward_features`` runs through ``torch.compile`` (what :func:`embed` calls)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        net: Any = model
        self.forward_features = torch.compile(net.forward_features, dynamic=False)
        self.forward_head = net.forward_head
