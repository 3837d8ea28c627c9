"""Fine-tunes from the cache: ``lp``, ``ft-last`` and ``lora`` as estimators over token readers.

The study that runs them from the images is :func:`probes.finetune` (``probes finetune`` on the command
line); this package holds the estimators, their networks, readers, losses and adapters.

    probe = FineTuneProbe(backbone, method="ft-last", k=1, epochs=50).fit(ArrayTokens(tokens), y)
    probe.predict(ArrayTokens(test_tokens)); probe.save_adapter("runs/ft"); load_adapter("runs/ft")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "inject_lora": "embedcache.backbones.adapters",
    "merge_lora": "embedcache.backbones.adapters",
    "Adapter": "probes.tuning.adapter",
    "AdapterError": "probes.tuning.adapter",
    "load_adapter": "probes.tuning.adapter",
    "read_adapter_meta": "probes.tuning.adapter",
    "save_adapter": "probes.tuning.adapter",
    "DEFAULTS": "probes.tuning.estimator",
    "METHODS": "probes.tuning.estimator",
    "FineTuneProbe": "probes.tuning.estimator",
    "TrainingDiverged": "probes.tuning.estimator",
    "FullBackboneModule": "probes.tuning.nets",
    "TunedNet": "probes.tuning.nets",
    "ArrayTokens": "probes.tuning.readers",
    "ImageReader": "probes.tuning.readers",
    "TokenReader": "probes.tuning.readers",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:  # deferred: the estimators import torch and peft
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes.tuning' has no attribute {name!r}")


__all__ = list(_EXPORTS)
