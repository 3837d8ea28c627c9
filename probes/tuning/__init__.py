"""Fine-tunes from the cache: ``lp``, ``ft-last`` and ``lora`` as estimators over token readers.

The study that runs them from the images is :func:`probes.finetune` (``probes finetune`` on the command
line); this package holds the estimators, their networks, readers, losses and adapters.

    probe = FineTuneProbe(backbone, method="ft-last", k=1, epochs=50).fit(ArrayTokens(tokens), y)
    probe.predict(ArrayTokens(test_tokens)); probe.save_adapter("runs/ft"); load_adapter("runs/ft")
"""

from probes.tuning.adapter import (
    Adapter,
    AdapterError,
    load_adapter,
    read_adapter_meta,
    save_adapter,
)
from probes.tuning.estimator import DEFAULTS, METHODS, FineTuneProbe, TrainingDiverged
from probes.tuning.nets import FullBackboneModule, TunedNet, inject_lora, merge_lora
from probes.tuning.readers import ArrayTokens, ImageReader, TokenReader

__all__ = [
    "DEFAULTS",
    "METHODS",
    "Adapter",
    "AdapterError",
    "ArrayTokens",
    "FineTuneProbe",
    "FullBackboneModule",
    "ImageReader",
    "TokenReader",
    "TrainingDiverged",
    "TunedNet",
    "inject_lora",
    "load_adapter",
    "merge_lora",
    "read_adapter_meta",
    "save_adapter",
]
