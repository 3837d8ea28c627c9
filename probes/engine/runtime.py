"""Where a study's fits run: ``scheduler`` (one Dask task per fit) and the out-of-core policy.

The study functions (:func:`probes.scale`, :func:`probes.evaluate`, :func:`probes.robustness`) take
``scheduler``, ``out_of_core`` and ``max_memory`` and run their body under :func:`study_runtime`; the CLI's
``--scheduler``, ``--out-of-core`` and ``--max-memory`` are those keywords.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def study_runtime(
    scheduler: str | None = None, out_of_core: str | None = None, max_memory: str | int | None = None
) -> Iterator[None]:
    """Run the fits inside under ``scheduler`` (``tcp://host:port``, ``local:N``) with features read out of core
        per ``out_of_core`` (``auto``: above ``max_memory``, default half the RAM; ``always``; ``never``). A None
        keeps what an enclosing block (or the default: this process, ``auto``) set. A body that raises leaves no
    empty output folder behind."""
    from probes.engine.dask_fits import fit_scheduler
    from probes.features.policy import current_policy, memory_policy
    from probes.reporting.tables import no_empty_outputs_on_failure

    with contextlib.ExitStack() as stack:
        stack.enter_context(no_empty_outputs_on_failure())
        if out_of_core is not None or max_memory is not None:
            policy = current_policy()
            stack.enter_context(memory_policy(out_of_core or policy.mode, max_memory, policy.block_rows))
        if scheduler is not None:
            stack.enter_context(fit_scheduler(scheduler))
        yield
