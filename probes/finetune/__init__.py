"""Fine-tunes from the cache: ``lp``, ``ft-last`` and ``lora`` as estimators over token readers.

The package is also the study: ``probes.finetune(store, model, method="lora", blocks="all", ...)`` calls
:func:`probes.studies.finetune.finetune` (``probes finetune`` on the command line).

    probe = FineTuneProbe(backbone, method="ft-last", k=1, epochs=50).fit(ArrayTokens(tokens), y)
    probe.predict(ArrayTokens(test_tokens)); probe.save_adapter("runs/ft"); load_adapter("runs/ft")
"""

import sys
import types

from probes.finetune.adapter import (
    Adapter,
    AdapterError,
    load_adapter,
    read_adapter_meta,
    save_adapter,
)
from probes.finetune.estimator import DEFAULTS, METHODS, FineTuneProbe, TrainingDiverged
from probes.finetune.nets import FullBackboneModule, TunedNet, inject_lora, merge_lora
from probes.finetune.readers import ArrayTokens, ImageReader, TokenReader

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


class _CallableModule(types.ModuleType):
    """``probes.finetune(...)`` runs the study; ``probes.finetune.FineTuneProbe`` etc. stay the package's."""

    def __call__(self, *args, **kwargs):
        from probes.studies.finetune import finetune

        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
